"""Unlabeled images for EvoLMM and iReasoner: every image under a folder.

``ImageFolder(data_dir, include_subfolders, seed)`` lists the images in
``data_dir`` and in its first-level subfolders (only those named in
``include_subfolders`` when it is given), with the extensions below, in a
deterministic order drawn from the seed. Each image is opened and fully
decoded when it is listed: a corrupt, empty or unreadable file, or a file
that is not an image, is skipped and counted (``skipped``), never fatal. A
folder with no usable image is a clear error.
"""

from __future__ import annotations

import io
from collections import Counter
from pathlib import Path

import numpy as np

EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tiff", ".tif")
MAX_PIXELS = 8192 * 8192  # larger images are refused as decompression bombs


def _usable(path: Path) -> str | None:
    """None if ``path`` decodes as an image, else why not."""
    from PIL import Image

    try:
        if path.stat().st_size == 0:
            return "empty"
        with Image.open(path) as image:
            if image.width * image.height > MAX_PIXELS:
                return "too_large"
            image.load()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        return "unreadable" if isinstance(err, PermissionError) else "corrupt"
    return None


class ImageFolder:
    def __init__(self, data_dir: str | Path, include_subfolders: list[str] | None = None,
                 seed: int = 0):
        root = Path(data_dir).expanduser()
        if not root.is_dir():
            raise ValueError(f"data_dir {str(root)!r} is not a folder")
        folders = [root]
        subfolders = sorted(p for p in root.iterdir() if p.is_dir())
        if include_subfolders is not None:
            missing = sorted(set(include_subfolders) - {p.name for p in subfolders})
            if missing:
                raise ValueError(f"include_subfolders: {missing} not found in {root}")
            subfolders = [p for p in subfolders if p.name in set(include_subfolders)]
        folders += subfolders
        self.skipped: Counter[str] = Counter()
        found = []
        for folder in folders:
            for path in sorted(folder.iterdir()):
                if not path.is_file() or path.suffix.lower() not in EXTENSIONS:
                    continue
                why = _usable(path)
                if why is None:
                    found.append(path)
                else:
                    self.skipped[why] += 1
        if not found:
            raise ValueError(f"no usable image in {root} or its first-level subfolders "
                             f"(extensions {', '.join(EXTENSIONS)}; skipped: "
                             f"{dict(self.skipped) or 'none'})")
        order = np.random.default_rng(seed).permutation(len(found))
        self.paths = [found[i] for i in order]

    def __len__(self) -> int:
        return len(self.paths)

    def image(self, index: int) -> bytes:
        """PNG bytes of image ``index`` (cycling), RGB."""
        from PIL import Image

        with Image.open(self.paths[index % len(self.paths)]) as image:
            buf = io.BytesIO()
            image.convert("RGB").save(buf, format="PNG")
        return buf.getvalue()

    def stats(self) -> dict[str, float]:
        return {"images": float(len(self.paths)),
                **{f"skipped_{k}": float(v) for k, v in self.skipped.items()},
                "skipped": float(sum(self.skipped.values()))}
