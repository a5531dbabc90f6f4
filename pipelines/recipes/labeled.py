"""Labeled data for the recipes that train on answers (R3V, MAYE, `simple.data`): where it
comes from.

The format is evaluation's (``pipelines/eval/data.py``): JSON-lines rows
``{question, answer, image[, solution, id, choices]}`` with image paths relative
to the file, or a Hugging Face ``datasets`` folder / hub id. A recipe names a
source as a string:

    jsonl:PATH            a file in that format (a bare path ending in .jsonl works too)
    hf:ID_OR_FOLDER[?split=S&FIELD=COLUMN...]
                          a datasets folder (save_to_disk) or a hub id in the local cache
                          (HF_DATASETS_OFFLINE=1); the split defaults to the recipe's
                          (train, validation, test), and FIELD=COLUMN maps this format's
                          fields (question, answer, image, id, choices, solution) to the
                          set's columns, e.g. geometry3k-style sets with
                          hf:hiyouga/geometry3k?question=problem&image=images
    shapes:COUNT          COUNT drawn images of 1-5 circles or squares, "how many?",
                          answer the count (built here, cached; tiny presets and tests)

Bad rows fail the whole file with their line numbers before any work starts.
``shapes`` sets differ by split: ``shapes:64`` read as "train" and as "test" are
drawn from different seeds and never share an image.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path
from urllib.parse import parse_qsl

import numpy as np

from actors.tiny import cache_root, cached_folder
from pipelines.eval.data import DataError, Item, read_hf, read_jsonl, write_jsonl

SHAPES_VERSION = 2  # bump when the drawn set would change for the same count and split
SPLIT_SEEDS = {"train": 0, "validation": 1, "test": 2}


def load_items(source: str, split: str = "train", limit: int | None = None) -> list[Item]:
    """The items ``source`` names (see the module's docstring); DataError when it cannot."""
    source = source.strip()
    kind, sep, rest = source.partition(":")
    if not sep and source.endswith(".jsonl"):
        kind, rest = "jsonl", source
    if kind == "jsonl":
        return read_jsonl(rest, limit)
    if kind == "hf":

        where, _, query = rest.partition("?")
        fields = dict(parse_qsl(query, keep_blank_values=True))
        split = fields.pop("split", split)
        known = {"question", "answer", "image", "id", "choices", "solution"}
        if set(fields) - known:
            raise DataError(f"data source {source!r}: unknown field(s) "
                            f"{sorted(set(fields) - known)}; map any of {sorted(known)} "
                            "or split")
        return read_hf(where, split, fields, limit)
    if kind == "shapes":
        try:
            count = int(rest)
        except ValueError:
            raise DataError(f"data source {source!r}: shapes:COUNT needs a whole number") from None
        if not 1 <= count <= 100_000:
            raise DataError(f"data source {source!r}: COUNT must lie in 1..100000")
        return read_jsonl(shapes_dataset(count, split), limit)
    raise DataError(f"data source {source!r}: expected jsonl:PATH, hf:ID_OR_FOLDER or "
                    "shapes:COUNT")


def usable(items: list[Item], what: str) -> tuple[list[Item], int]:
    """The items whose images all decode, and how many were dropped (each logged once):
    a broken image costs its item, never the run."""

    kept = []
    for item in items:
        try:
            item.image_bytes()
        except (DataError, OSError) as err:
            logging.getLogger(__name__).warning("%s: skipping item %s: %s", what, item.id, err)
            continue
        kept.append(item)
    if not kept:
        raise DataError(f"{what}: no item has images that decode")
    return kept, len(items) - len(kept)


class LabeledRecipe:
    """What the recipes on labeled data share: one role, evaluated by ``coevolve eval`` on
    the run's test set (``<settings>.test``). Subclasses name their config section."""

    roles = ("policy",)
    eval_role = "policy"
    settings_section = ""

    def __init__(self, cfg):
        self.cfg = cfg

    @property
    def benchmarks(self) -> tuple[str, ...]:
        """``coevolve eval RUN_DIR``'s default: the test set, when a task can name it."""
        return eval_tasks(getattr(self.cfg, self.settings_section).test, "test")


def eval_tasks(source: str, split: str) -> tuple[str, ...]:
    """``coevolve eval``'s tasks for a recipe's data ``source``: ``jsonl:PATH`` (a drawn
    set is built first), or none for an empty source or one the tasks cannot name (hf:)."""
    source = source.strip()
    kind, sep, rest = source.partition(":")
    if not sep and source.endswith(".jsonl"):
        return (f"jsonl:{Path(source).resolve()}",)
    if kind == "jsonl":
        return (f"jsonl:{Path(rest).resolve()}",)
    if kind == "shapes" and rest.isdigit() and split in SPLIT_SEEDS:
        return (f"jsonl:{shapes_dataset(int(rest), split)}",)
    return ()


def shapes_dataset(count: int, split: str = "train", root: Path | None = None) -> Path:
    """``count`` counting items drawn once into the model cache; the jsonl's path.

    Each image holds 1-5 circles or 1-5 squares (one kind per image) in random colours
    and places; the question asks for the number, the answer is the digit and the
    solution a one-line count. Deterministic in (count, split).
    """

    if split not in SPLIT_SEEDS:
        raise DataError(f"shapes data has the splits {sorted(SPLIT_SEEDS)}, not {split!r}")
    name = f"shapes-v{SHAPES_VERSION}-{split}-{count}"
    root = Path(root) if root is not None else cache_root().parent / "labeled"

    def build(folder: Path) -> None:
        rng = np.random.default_rng([SHAPES_VERSION, SPLIT_SEEDS[split], count])
        rows = []
        for i in range(count):
            kind = ("circle", "square")[int(rng.integers(2))]
            number = int(rng.integers(1, 6))
            image = f"img/{i:05d}.png"
            (folder / image).parent.mkdir(parents=True, exist_ok=True)
            (folder / image).write_bytes(draw_shapes(kind, number, rng))
            rows.append({"id": f"{split}-{i}", "question": f"How many {kind}s are in the image?",
                         "answer": str(number), "image": image,
                         "solution": f"I count the {kind}s one by one: there are {number}."})
        write_jsonl(folder / f"{name}.jsonl", rows)  # the file's stem names the eval task

    return cached_folder(root / name, build) / f"{name}.jsonl"


def draw_shapes(kind: str, number: int, rng: np.random.Generator, size: int = 112) -> bytes:
    """``number`` non-overlapping circles or squares on a white PNG."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(image)
    cells = rng.permutation(9)[:number]  # a 3x3 grid of places, one shape per cell
    side = size // 3
    for cell in cells:
        x0, y0 = (cell % 3) * side + 4, (cell // 3) * side + 4
        extent = int(rng.integers(side // 2, side - 8))
        box = [x0, y0, x0 + extent, y0 + extent]
        colour = tuple(int(c) for c in rng.integers(0, 200, size=3))
        (draw.ellipse if kind == "circle" else draw.rectangle)(box, fill=colour)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def item_messages(item: Item, instruction: str) -> list[dict]:
    """A user turn: the item's images, then its question (with lettered options for a
    multiple-choice item) and ``instruction`` on a new line."""
    text = item.question
    if item.choices:
        text += "\n" + "\n".join(f"{letter}. {option}" for letter, option in item.options.items())
    if instruction:
        text += "\n" + instruction
    content = [{"type": "image"} for _ in item.images] + [{"type": "text", "text": text}]
    return [{"role": "user", "content": content}]
