"""Labeled data: one format for evaluation and for recipes that train on labels.

A data set is a JSON-lines file, one item per line::

    {"question": "How many circles?", "answer": "3", "image": "img/0001.png",
     "id": "q1", "choices": ["2", "3", "4"], "solution": "..."}

``question`` and ``answer`` are required (the answer may be a number);
``image`` is a path relative to the file, a list of such paths, or absent
(a text-only item); ``id`` defaults to the line number; ``choices`` makes a
multiple-choice item whose options are lettered A, B, C, ... in order
(``answer`` may then be the letter or the option's text); ``solution`` is a
worked solution (used by SFT recipes, ignored by evaluation). Blank lines are
skipped. A bad row fails the whole file with the line numbers of every bad
row (up to ten), before any work starts.

A Hugging Face ``datasets`` folder (``save_to_disk``), a dataset repository's
files (``hf download ID --repo-type dataset --local-dir DIR``) or a hub id works
too, through ``read_hf``: a config (``"*"``: every config, concatenated in name
order), a split, and either a mapping from this format's fields to its columns or
a row adapter of a published benchmark (pipelines/eval/benchmarks.py). Hub ids
resolve from the local cache only when ``HF_DATASETS_OFFLINE=1``. ``DataMissing``
means nothing is there to read; any other ``DataError`` names the real cause.
"""

from __future__ import annotations

import ast
import hashlib
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Callable
from typing import Any

from pipelines.runtime.rundir import atomic_write

MAX_LINE_CHARS = 1 << 20  # one item; a longer line is not an item but a broken file
MAX_SHOWN = 10  # bad rows named in one message
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


class DataError(ValueError):
    """A data set that cannot be used as it is; the message names the file and the rows."""


class DataMissing(DataError):
    """No copy of the data set here: not in --data-dir, not in the local hub cache."""


class _BadRow(Exception):
    """One row that is not an item (collected with its line number)."""


@dataclass
class Item:
    id: str
    question: str
    answer: str
    images: list[Any] = field(default_factory=list)  # paths or encoded bytes
    choices: list[str] = field(default_factory=list)
    solution: str | None = None
    meta: dict = field(default_factory=dict)  # what a benchmark's own scoring reads

    @property
    def options(self) -> dict[str, str]:
        """Letter -> option text of a multiple-choice item ({} otherwise)."""
        return dict(zip(LETTERS, self.choices))

    def image_bytes(self) -> list[bytes]:
        """The item's images as encoded bytes, checked to decode (DataError if not)."""
        from PIL import Image, UnidentifiedImageError

        out = []
        for image in self.images:
            data = image if isinstance(image, bytes) else Path(image).read_bytes()
            try:
                with Image.open(io.BytesIO(data)) as probe:
                    probe.verify()
            except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
                name = "bytes" if isinstance(image, bytes) else image
                raise DataError(f"item {self.id}: image {name} does not decode ({err})") from None
            out.append(data)
        return out


def read_jsonl(path: str | Path, limit: int | None = None) -> list[Item]:
    """The items of a JSON-lines file in the format above (DataError on bad rows)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such data file")
    items, problems, seen = [], [], set()
    with path.open(encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                item = _row(json.loads(line) if len(line) <= MAX_LINE_CHARS else None,
                            number, path.parent)
            except (_BadRow, ValueError) as err:  # ValueError: not JSON
                problems.append(f"line {number}: {err}")
                continue
            if item.id in seen:
                problems.append(f"line {number}: duplicate id {item.id!r}")
                continue
            seen.add(item.id)
            items.append(item)
            if limit is not None and len(items) >= limit:
                break
    if problems:
        more = f" (and {len(problems) - MAX_SHOWN} more)" if len(problems) > MAX_SHOWN else ""
        raise DataError(f"{path}: {len(problems)} bad row(s): "
                        + "; ".join(problems[:MAX_SHOWN]) + more)
    if not items:
        raise DataError(f"{path}: no items")
    return items


def _row(row: Any, number: int, root: Path) -> Item:
    if row is None:
        raise _BadRow(f"line longer than {MAX_LINE_CHARS} characters")
    if not isinstance(row, dict):
        raise _BadRow(f"expected a JSON object, got {type(row).__name__}")
    unknown = set(row) - {"question", "answer", "image", "id", "choices", "solution"}
    if unknown:
        raise _BadRow(f"unknown field(s) {sorted(unknown)[:5]}")
    question, answer = row.get("question"), row.get("answer")
    if not isinstance(question, str) or not question.strip():
        raise _BadRow("'question' must be a non-empty string")
    if isinstance(answer, bool) or not isinstance(answer, (str, int, float)) or str(answer) == "":
        raise _BadRow("'answer' must be a non-empty string or a number")
    images = row.get("image", [])
    images = [images] if isinstance(images, str) else images
    if not isinstance(images, list) or not all(isinstance(p, str) and p for p in images):
        raise _BadRow("'image' must be a path or a list of paths")
    resolved = []
    for name in images:
        image = (root / name).resolve()
        if not image.is_file():
            raise _BadRow(f"image {name!r} not found next to the file")
        resolved.append(str(image))
    choices = row.get("choices", [])
    if not isinstance(choices, list) or not all(isinstance(c, (str, int, float)) for c in choices):
        raise _BadRow("'choices' must be a list of strings")
    if len(choices) > len(LETTERS):
        raise _BadRow(f"more than {len(LETTERS)} choices")
    item_id = row.get("id", number)
    if isinstance(item_id, bool) or not isinstance(item_id, (str, int)):
        raise _BadRow("'id' must be a string or an integer")
    solution = row.get("solution")
    if solution is not None and not isinstance(solution, str):
        raise _BadRow("'solution' must be a string")
    return Item(id=str(item_id), question=question, answer=str(answer), images=resolved,
                choices=[str(c) for c in choices], solution=solution)


def read_hf(source: str, split: str, fields: dict[str, str] | None = None,
            limit: int | None = None, config: str | None = None,
            row: Callable[[dict, int], Item] | None = None) -> list[Item]:
    """Items of a ``datasets`` folder, a dataset repository's files or a hub id, in
    ``config`` (None: the default; ``"*"``: every config) and ``split``. ``row`` turns a
    row into an Item (a benchmark's own layout); else ``fields`` maps this format's
    field names (question, answer, image, id, choices, solution) to the columns."""
    where = f"{source} ({'config ' + repr(config) + ', ' if config else ''}split {split!r})"
    rows = _rows(source, split, config, where)
    items, seen = [], set()
    for index, values in enumerate(rows):
        if limit is not None and index >= limit:
            break
        try:
            item = row(values, index) if row is not None else _mapped(values, index, fields)
        except KeyError as err:
            raise DataError(f"{where}: no column {err} (columns: {sorted(values)[:12]}); "
                            "map it with the task's fields") from None
        if item.id in seen:
            raise DataError(f"{where}: item id {item.id!r} appears twice")
        seen.add(item.id)
        items.append(item)
    if not items:
        raise DataError(f"{where}: no items")
    return items


def _rows(source: str, split: str, config: str | None, where: str):
    """The split's rows, one config after another."""
    try:
        import datasets
    except ImportError:
        raise DataError(f"{source}: reading Hugging Face data needs the `datasets` package "
                        "(installed by setup.sh with lmms-eval)") from None
    local = Path(source).is_dir()
    saved = local and any((Path(source) / name).is_file()
                          for name in ("dataset_dict.json", "dataset_info.json"))
    if saved:  # save_to_disk: one config
        data = datasets.load_from_disk(source)
        return data[split] if isinstance(data, datasets.DatasetDict) else data
    if not local and not _in_hub_cache(source):
        raise DataMissing(f"{where}: not in --data-dir and not in the local hub cache")
    try:
        configs = sorted(datasets.get_dataset_config_names(source)) if config == "*" \
            else [config]
        parts = [datasets.load_dataset(source, c, split=split) for c in configs]
    except Exception as err:  # noqa: BLE001 - the copy is there and does not load: say why
        raise DataError(f"{where}: {type(err).__name__}: {str(err)[:300]}") from None
    return datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]


def _in_hub_cache(repo_id: str) -> bool:
    """Whether the hub cache (or datasets' own cache) holds any file of ``repo_id``."""
    import os

    from huggingface_hub.constants import HF_HUB_CACHE

    name = "datasets--" + repo_id.replace("/", "--")
    home = Path(os.environ.get("HF_DATASETS_CACHE") or
                Path(os.environ.get("HF_HOME", Path.home() / ".cache/huggingface")) / "datasets")
    return (Path(HF_HUB_CACHE) / name).is_dir() or any(
        home.glob(repo_id.replace("/", "___") + "*"))


def _mapped(row: dict, index: int, fields: dict[str, str] | None) -> Item:
    """An item from columns named by ``fields`` (this format's name -> the column)."""
    names = {"question": "question", "answer": "answer", "image": "image", "id": "id",
             "choices": "choices", "solution": "solution", **(fields or {})}
    image = row.get(names["image"])
    images = image if isinstance(image, list) else [image] if image is not None else []
    question, answer = row[names["question"]], _first(row[names["answer"]])
    solution = row.get(names["solution"])
    return Item(id=str(row.get(names["id"], index)), question=str(question),
                answer=str(answer), images=[encode_image(im) for im in images],
                choices=[str(c) for c in parse_list(row.get(names["choices"]))],
                solution=str(solution) if solution is not None else None)


def _first(answer: Any) -> Any:
    """ChartQA-style labels are one-element lists."""
    return answer[0] if isinstance(answer, list) and len(answer) == 1 else answer


def parse_list(value: Any) -> list:
    """A list column as a list; MMMU keeps its options as the text of a Python list."""

    if isinstance(value, str) and value.strip().startswith("["):
        try:
            value = ast.literal_eval(value.strip()[:100_000])
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            return []
    return list(value) if isinstance(value, (list, tuple)) else []


def encode_image(image: Any) -> bytes:
    """Encoded bytes of a datasets image (PIL, ``{"bytes", "path"}`` or bytes)."""
    if isinstance(image, bytes):
        return image
    if isinstance(image, dict) and image.get("bytes"):
        return image["bytes"]
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="PNG")
    return buf.getvalue()


def last_line(text: str) -> str | None:
    """The last non-empty line, stripped (the fallback answer of a response)."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else None


def item_seed(*parts) -> int:
    """A 31-bit sampling seed from the parts naming one item (run seed, task, item id)."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def write_jsonl(path: str | Path, rows: list[dict]) -> Path:
    """Write rows in this format (used by fixtures and by recipes that make data)."""
    path = Path(path)
    atomic_write(path, "".join(json.dumps(r) + "\n" for r in rows))
    return path
