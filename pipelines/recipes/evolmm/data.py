"""Unlabeled images for EvoLMM and iReasoner: every image under a folder.

``ImageFolder(data_dir, include_subfolders, seed)`` lists the images as the
original walks its folder: every first-level subfolder (only those named in
``include_subfolders`` when it is given) recursively, and the files at the top
level only when there is no subfolder; hidden names (``.name``) are skipped at
every level. Extensions below, in a deterministic order drawn from the seed. Each image is opened and fully
decoded when it is listed: a corrupt, empty or unreadable file, or a file
that is not an image, is skipped and counted (``skipped``), never fatal. A
folder with no usable image is a clear error.

Hidden answers (optional): ``answers.jsonl`` at the folder's top, one
``{"image": "<path under the folder>", "question": ..., "answer": ...}`` per
line, any number per image. The recipes never reward with them: they ask those
questions (``evolmm.questions: known``) and compare the Solver's majority
answer with them (pseudo-label accuracy, docs/evolmm.md). A malformed line, or
one naming no listed image, is skipped and counted (``answers_skipped``).
"""

from __future__ import annotations

import io
import json
from collections import Counter
from pathlib import Path

import numpy as np

EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tiff", ".tif")
MAX_PIXELS = 8192 * 8192  # larger images are refused as decompression bombs
ANSWERS = "answers.jsonl"


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


def _hidden(path: Path) -> bool:
    return path.name.startswith(".")


def _walk(folder: Path) -> list[Path]:
    """Every file under ``folder``, sorted, hidden names (files and folders) left out;
    links to folders are not followed (no cycles)."""
    out = []
    for path in sorted(folder.iterdir()):
        if _hidden(path):
            continue
        if path.is_dir() and not path.is_symlink():
            out += _walk(path)
        elif path.is_file():
            out.append(path)
    return out


class ImageFolder:
    def __init__(self, data_dir: str | Path, include_subfolders: list[str] | None = None,
                 seed: int = 0):
        root = Path(data_dir).expanduser()
        if not root.is_dir():
            raise ValueError(f"data_dir {str(root)!r} is not a folder")
        subfolders = sorted(p for p in root.iterdir() if p.is_dir() and not _hidden(p))
        if include_subfolders is not None:
            missing = sorted(set(include_subfolders) - {p.name for p in subfolders})
            if missing:
                raise ValueError(f"include_subfolders: {missing} not found in {root}")
            subfolders = [p for p in subfolders if p.name in set(include_subfolders)]
        files = [p for folder in subfolders for p in _walk(folder)] if subfolders else \
            sorted(p for p in root.iterdir() if p.is_file() and not _hidden(p))
        self.skipped: Counter[str] = Counter()
        found = []
        for path in files:
            if path.suffix.lower() not in EXTENSIONS:
                continue
            why = _usable(path)
            if why is None:
                found.append(path)
            else:
                self.skipped[why] += 1
        if not found:
            raise ValueError(f"no usable image in {root} (its subfolders, or its files when it "
                             "has none) "
                             f"(extensions {', '.join(EXTENSIONS)}; skipped: "
                             f"{dict(self.skipped) or 'none'})")
        order = np.random.default_rng(seed).permutation(len(found))
        self.paths = [found[i] for i in order]
        self.answers, self.answers_skipped = _read_answers(root, set(found))

    def known(self, index: int) -> list[tuple[str, str]]:
        """The (question, hidden answer) pairs of image ``index`` (cycling), if any."""
        return self.answers.get(self.paths[index % len(self.paths)], [])

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
                "skipped": float(sum(self.skipped.values())),
                **({"answered_images": float(len(self.answers)),
                    "answers_skipped": float(self.answers_skipped)}
                   if self.answers or self.answers_skipped else {})}


def _read_answers(root: Path, images: set[Path]) -> tuple[dict[Path, list[tuple[str, str]]], int]:
    """``root/answers.jsonl`` as {image path: [(question, answer), ...]}, and how many
    lines were skipped (not JSON, not three strings, or no listed image)."""
    path = root / ANSWERS
    if not path.is_file():
        return {}, 0
    out: dict[Path, list[tuple[str, str]]] = {}
    skipped = 0
    for line in path.read_text(errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            image, question, answer = row["image"], row["question"], row["answer"]
        except (ValueError, TypeError, KeyError):
            skipped += 1
            continue
        full = root / image if isinstance(image, str) else None
        if full not in images or not (isinstance(question, str) and isinstance(answer, str)) \
                or not question.strip() or not answer.strip():
            skipped += 1
            continue
        out.setdefault(full, []).append((question.strip(), answer.strip()))
    return out, skipped
