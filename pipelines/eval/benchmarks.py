"""The published benchmarks as their datasets lay them out.

Per benchmark: where it lives (hub id, config, split as published), how a row
becomes an ``Item`` (the question, the answer, every image in order, the options
parsed from the benchmark's own format) and what its official scoring reads
beside them (``Item.meta``). Facts from the datasets' cards and lmms-eval 0.7.3's
task definitions; docs/eval.md has the table, and tests/eval_fixtures.py writes a
few rows of each in the real layout.

A copy is found, in order, as ``DATA_DIR/<task>.jsonl``, ``DATA_DIR/<task>/`` (a
``save_to_disk`` folder), ``DATA_DIR/<hub id>/`` (the dataset repository's files:
``hf download <hub id> --repo-type dataset --local-dir DATA_DIR/<hub id>``), then
the local hub cache.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from pipelines.eval.data import LETTERS, Item, encode_image, parse_list


@dataclass(frozen=True)
class Layout:
    hub: str  # the dataset's hub id
    config: str | None  # None: its default config; "*": every config, in name order
    split: str
    row: Callable[[dict, int], Item]
    note: str = ""  # what a user fetching it should know

    def describe(self) -> str:
        config = f", config {self.config!r}" if self.config else ""
        config = ", every config" if self.config == "*" else config
        return f"{self.hub}{config}, split {self.split!r}"


# -- row adapters -------------------------------------------------------------------


def _chartqa(row: dict, index: int) -> Item:
    labels = [str(x) for x in parse_list(row["label"])] or [str(row["label"])]
    return Item(id=str(index), question=row["query"], answer=labels[0],
                images=[encode_image(row["image"])],
                meta={"answers": labels, "human": row.get("human_or_machine") == 0})


def _mathvista(row: dict, index: int) -> Item:
    question = row["question"]
    if row.get("unit"):
        question += f" (Unit: {row['unit']})"
    precision = row.get("precision")
    precision = int(precision) if precision is not None else None  # float64 on the hub
    return Item(id=str(row["pid"]), question=question, answer=str(row["answer"]),
                images=[encode_image(row["decoded_image"])],
                choices=[str(c) for c in row.get("choices") or []],
                meta={"question_type": row["question_type"], "answer_type": row["answer_type"],
                      "precision": precision,
                      "hint": _mathvista_hint(row["question_type"], row["answer_type"],
                                              precision)})


def _mathvista_hint(question_type: str, answer_type: str, precision: int | None) -> str:
    """The instruction lmms-eval's format prompt ends a MathVista question with."""
    if question_type == "multi_choice":
        return "Answer with the option's letter from the given choices directly."
    if answer_type == "float":
        places = {1: "one decimal place", 2: "two decimal places"}.get(
            precision, f"{precision} decimal places")
        return f"Answer the question using a single floating-point number with {places}."
    if answer_type == "list":
        return "Answer the question using a Python list."
    return "Answer the question using a single integer number."


def _mathverse(row: dict, index: int) -> Item:
    image = row.get("image")
    return Item(id=str(row["sample_index"]), question=row["question"],
                answer=str(row["answer"]),
                images=[encode_image(image)] if image not in (None, "") else [],
                meta={"question_type": row["question_type"],
                      "problem_version": row["problem_version"],
                      "query_wo": row.get("query_wo") or row["question"],
                      "question_for_eval": row.get("question_for_eval") or row["question"]})


def _mathvision(row: dict, index: int) -> Item:
    options = [str(c) for c in row.get("options") or []]
    # lmms-eval's layout of the options: "Choices: A. x\nB. y" and its instruction
    block = ("\nChoices: " + "\n".join(f"{LETTERS[k]}. {o}" for k, o in enumerate(options))
             + "\nAnswer the question with the option's letter from the given choices "
             "directly.") if options else ""
    return Item(id=str(row["id"]), question=row["question"], answer=str(row["answer"]),
                images=[encode_image(row["decoded_image"])], choices=options,
                meta={"level": row.get("level"), "subject": row.get("subject"),
                      "choices_block": block})


_IMAGE_TAG = re.compile(r"<image (\d+)>")


def _mmmu(row: dict, index: int) -> Item:
    """MMMU and MMMU-Pro (standard): options as the text of a Python list, images
    ``image_1..image_7`` referenced as ``<image k>`` in the question or the options,
    shown in the order of their numbers (lmms-eval's order)."""
    options = [str(o) for o in parse_list(row["options"])]
    text = row["question"] + " " + " ".join(options)
    numbers = sorted({int(k) for k in _IMAGE_TAG.findall(text)})
    if not numbers:  # no reference: every image the row has
        numbers = [k for k in range(1, 8) if row.get(f"image_{k}") is not None]
    images = [encode_image(row[f"image_{k}"]) for k in numbers if row.get(f"image_{k}") is not None]
    kind = row.get("question_type", "multiple-choice")
    instruction = "Answer with the option's letter from the given choices directly." \
        if kind == "multiple-choice" else "Answer the question using a single word or phrase."
    return Item(id=str(row["id"]), question=row["question"], answer=str(row["answer"]),
                images=images, choices=options if kind == "multiple-choice" else [],
                meta={"question_type": kind, "instruction": instruction,
                      "subject": row.get("subject") or row.get("subfield")})


def _mmmu_pro_vision(row: dict, index: int) -> Item:
    """MMMU-Pro's vision setting: the question and its options are in the screenshot; the
    options are kept for reading the answer, not shown in the prompt."""
    return Item(id=str(row["id"]), question="", answer=str(row["answer"]),
                images=[encode_image(row["image"])],
                choices=[str(o) for o in parse_list(row["options"])],
                meta={"subject": row.get("subject")})


def _mmvet(row: dict, index: int) -> Item:
    capability = row.get("capability") or []
    if isinstance(capability, str):  # lmms-lab/MMVet: "ocr,math"
        capability = [c for c in capability.split(",") if c]
    image = row.get("image")
    return Item(id=str(row.get("id", row.get("question_id", index))), question=row["question"],
                answer=str(row["answer"]), images=[encode_image(image)] if image else [],
                meta={"capability": list(capability)})


HALLUSION_KEYS = ("category", "subcategory", "set_id", "figure_id", "question_id")


def _hallusion(row: dict, index: int) -> Item:
    """``gt_answer`` is "1" (yes) or "0" (no)."""
    answer = {"1": "Yes", "0": "No"}.get(str(row["gt_answer"]).strip())
    if answer is None:
        raise ValueError(f"gt_answer {row['gt_answer']!r} is neither '1' nor '0'")
    image = row.get("image")
    return Item(id="_".join(str(row[k]) for k in HALLUSION_KEYS), question=row["question"],
                answer=answer, images=[encode_image(image)] if image is not None else [],
                meta={k: str(row[k]) for k in HALLUSION_KEYS})


_VISNUM_OPTION = re.compile(r"(?:^|\s)\(([a-e])\)\s")


def visnum_options(text: str) -> list[str]:
    """``"(a) 0.15 (b) 0.27"`` -> ["0.15", "0.27"]: split at the ``(letter)`` marks only
    (an option may hold parentheses itself, e.g. ``(0.50, 0.60)``)."""
    parts = _VISNUM_OPTION.split(" " + text.strip() + " ")
    return [p.strip() for p in parts[2::2]]


def _visnum(row: dict, index: int) -> Item:
    """VisNumBench: options in one string, the answer as ``"(c) 0.76"``; its ids repeat
    between the synthetic and the real half, so the item id carries the half."""
    options = visnum_options(row["option"])
    mark = re.match(r"\s*\(([a-e])\)", str(row["answer"]))
    if mark is None:
        raise ValueError(f"answer {row['answer']!r} does not start with an option mark")
    half = row.get("class")
    return Item(id=f"{half}/{row['id']}" if half else str(row["id"]),
                question=row["question"], answer=LETTERS["abcde".index(mark.group(1))],
                images=[encode_image(row["image"])], choices=options,
                meta={"attribute": row.get("Attributes"), "task_class": row.get("task_class"),
                      "half": half, "option": row["option"]})


def _mmsi(row: dict, index: int) -> Item:
    """MMSI-Bench: several images as raw bytes; the options are written in the question."""
    return Item(id=str(row["id"]), question=row["question"], answer=str(row["answer"]).strip(),
                images=[encode_image(im) for im in row["images"]],
                meta={"question_type": row.get("question_type")})


LAYOUTS: dict[str, Layout] = {
    "chartqa": Layout("HuggingFaceM4/ChartQA", None, "test", _chartqa),
    "mathvista": Layout("AI4Math/MathVista", None, "testmini", _mathvista,
                        "the test split's answers are not released"),
    "mathverse": Layout("AI4Math/MathVerse", "testmini", "testmini", _mathverse,
                        "five versions of each of 788 problems"),
    "mathvision": Layout("MathLLMs/MathVision", None, "test", _mathvision),
    "mmmu": Layout("MMMU/MMMU", "*", "validation", _mmmu,
                   "one config per subject (30): all are read"),
    "mmmu_pro": Layout("MMMU/MMMU_Pro", "standard (10 options)", "test", _mmmu),
    "mmmu_pro_4": Layout("MMMU/MMMU_Pro", "standard (4 options)", "test", _mmmu),
    "mmmu_pro_vision": Layout("MMMU/MMMU_Pro", "vision", "test", _mmmu_pro_vision,
                              "the question and options are in the image"),
    "mmvet": Layout("whyu/mm-vet", None, "test", _mmvet),
    "hallusionbench": Layout("lmms-lab/HallusionBench", None, "image", _hallusion,
                             "the 951 questions with an image (lmms-eval's set)"),
    "visnumbench": Layout("GML-FMGroup/VisNumBench", None, "train", _visnum,
                          "published as one 'train' split (the whole benchmark)"),
    "mmsi": Layout("RunsenXu/MMSI-Bench", None, "test", _mmsi),
}
