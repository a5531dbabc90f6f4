"""Each benchmark's official scoring, as its authors' evaluation code computes it.

``score(metric, item, response, grader) -> (extracted, correct)`` for a task whose
``metric`` names a benchmark; ``aggregate(metric, rows)`` adds the benchmark's own
summary figures (HallusionBench's question, figure and question-pair accuracies,
ChartQA's human and augmented halves). Where the official code asks GPT to extract
or judge, the rule below stands in and the task's ``--judge`` can add a verdict;
docs/eval.md lists each rule, its source and how it differs.

Model output is hostile input: every parser here runs in time linear in the
response (patterns that could backtrack run on single words of bounded length).
"""

from __future__ import annotations

import ast
import json
import random
import re
from collections import defaultdict
from collections.abc import Sequence

from pipelines.algorithms.answers import extract_answer
from pipelines.eval.data import LETTERS, Item, item_seed, last_line

MAX_WORD = 100  # characters of one word the number patterns look at


def extracted(response: str) -> str:
    """The final answer of a response: the last ``\\boxed{}`` or ``<answer>``, else the
    last line, else the whole (stripped)."""
    return extract_answer(response, fallback=last_line) or response.strip()


# -- ChartQA: relaxed accuracy (pix2struct metrics.py, arXiv 2203.10244) ---------------


def relaxed_correctness(target: str, prediction: str, max_change: float = 0.05) -> bool:
    """A number within 5% of the target, relative to the target; a trailing % divides by
    100 on either side; otherwise (or against a target of 0) a case-insensitive exact
    match."""

    def to_float(text: str) -> float | None:
        try:
            return float(text.rstrip("%")) / 100.0 if text.endswith("%") else float(text)
        except ValueError:
            return None

    p, t = to_float(prediction), to_float(target)
    if p is not None and t:
        return abs(p - t) / abs(t) <= max_change
    return prediction.lower() == target.lower()


def chartqa(item: Item, response: str) -> tuple[str, bool]:
    pred = extracted(response)
    targets = item.meta.get("answers") or [item.answer]
    return pred, any(relaxed_correctness(str(t), pred) for t in targets)


# -- MathVista (lupantech/MathVista evaluation/, arXiv 2310.02255) -----------------------


def levenshtein(a: str, b: str, cap: int = 200) -> int:
    """Edit distance of the first ``cap`` characters of each."""
    a, b = a[:cap], b[:cap]
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (ca != cb))
    return row[-1]


def mathvista_extract(item: Item, response: str) -> str:
    """The official rules before its GPT extraction: a response that is one of the
    choices, or an integer / a float as a whole; else (where GPT would extract) the
    final answer."""
    text = response.strip()
    kind = item.meta.get("answer_type")
    if item.meta.get("question_type") == "multi_choice" and text in item.choices:
        return text
    for cast, wanted in ((int, "integer"), (float, "float")):
        if kind == wanted:
            try:
                return str(cast(text))
            except ValueError:
                pass
    return extracted(response)


def mathvista_normalize(extraction: str, item: Item) -> str | None:
    """``normalize_extracted_answer``: a choice letter (or "(B)") becomes the choice's
    text, any other choice answer the most similar choice (edit distance); integers are
    truncated, floats rounded to the item's precision."""
    kind = item.meta.get("answer_type")
    if item.meta.get("question_type") == "multi_choice":
        text = extraction.strip()
        letter = re.search(r"\(([a-zA-Z])\)", text)
        text = letter.group(1).upper() if letter else text
        letters = LETTERS[:len(item.choices)]
        if len(text) == 1 and text in letters:
            return item.choices[letters.index(text)]
        distances = [levenshtein(text, c) for c in item.choices]
        return item.choices[distances.index(min(distances))] if distances else None
    try:
        if kind == "integer":
            return str(int(float(extraction)))
        if kind == "float":
            return str(round(float(extraction), int(item.meta.get("precision") or 0)))
    except (ValueError, OverflowError):
        return None
    return str(extraction)


def mathvista(item: Item, response: str) -> tuple[str | None, bool]:
    pred = mathvista_normalize(mathvista_extract(item, response), item)
    return pred, pred is not None and pred.strip() == item.answer.strip()


# -- MMMU and MMMU-Pro (MMMU-Benchmark/MMMU eval/eval_utils.py, arXiv 2311.16502) -------


def mmmu_choice(response: str, options: dict[str, str], rng: random.Random) -> str | None:
    """``parse_multi_choice_response``: "(B)", then " B ", then (in a response of more
    than 5 words) an option's text; the last one mentioned wins; none: a random letter
    (seeded per item here, where the official code seeds the process once)."""
    if not options:
        return None
    for char in ",.!?;:'":
        response = response.strip(char)
    response = f" {response} "
    letters = list(options)
    found = [c for c in letters if f"({c})" in response]
    bracket, by_text = bool(found), False
    if not found:
        found = [c for c in letters if f" {c} " in response]
    if not found and len(response.split()) > 5:
        found = [c for c in letters if options[c].lower() in response.lower()]
        by_text = bool(found)
    if not found:
        return rng.choice(letters)
    if len(found) == 1:
        return found[0]
    lower = response.lower()
    position = {c: lower.rfind(options[c].lower()) if by_text else
                response.rfind(f"({c})" if bracket else f" {c} ") for c in found}
    return max(found, key=lambda c: (position[c], -found.index(c)))


_NUMBER_PATTERNS = (r"-?\b\d{1,3}(?:,\d{3})+\b", r"-?\d+(?:\.\d+)?[eE][+-]?\d+",
                    r"-?(?:\d+\.\d+|\.\d+|\d+)(?![eE][+-]?\d+)(?![,\d])")


def _numbers(text: str) -> list[str]:
    """``extract_numbers``' three patterns (numbers hold no spaces: they run word by word)."""
    words = [w[:MAX_WORD] for w in text.split()]
    return [n for pattern in _NUMBER_PATTERNS for w in words for n in re.findall(pattern, w)]


def _normalize(text: str) -> list:
    text = text.strip()
    try:
        return [round(float(text.replace(",", "")), 2)]
    except (ValueError, OverflowError):
        text = text.lower()
        return [" " + text, text + " "] if len(text) == 1 else [text]


_KEYS = ("could be ", "so ", "is ", "thus ", "therefore ", "final ", "answer ", "result ")


def mmmu_open(response: str) -> list:
    """``parse_open_response``: per line, the shortest tail after an answer indicator
    (or "=" in the last line), plus every number; normalised (numbers rounded to 2)."""
    text = response.strip().strip(".").lower()
    lines = re.split(r"\.\s(?=[A-Z])|\n", text)
    tails = []
    for index, line in enumerate(lines):
        keys = _KEYS + (("=",) if index == len(lines) - 1 else ())
        found = [line.split(k)[-1].strip() for k in keys if k in line]
        shortest = min(found, key=len) if found else None
        if shortest and shortest.strip() not in (":", ",", ".", "!", "?", ";", "'"):
            tails.append(shortest)
    tails = tails or [text]
    preds = []
    for part in tails + [n for t in tails for n in _numbers(t)]:
        preds += [p for p in _normalize(part) if p not in preds]
    return preds


def mmmu_open_correct(gold: str, preds: list) -> bool:
    """``eval_open``: a string prediction containing a normalised answer, or a number
    equal to one."""
    golds = [gold]
    if gold.strip().startswith("["):  # an answer list, as some open answers are written
        try:
            golds = list(ast.literal_eval(gold.strip()[:10_000]))
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            pass
    answers = [a for g in golds for a in _normalize(str(g))]
    return any(isinstance(p, str) and any(isinstance(a, str) and a in p for a in answers)
               or not isinstance(p, str) and p in answers for p in preds)


def _rng(item: Item) -> random.Random:
    return random.Random(item_seed("mmmu", item.id))


def mmmu(item: Item, response: str) -> tuple[str | None, bool]:
    if not item.choices:
        preds = mmmu_open(response)
        return ", ".join(map(str, preds[:3])), mmmu_open_correct(item.answer, preds)
    choice = mmmu_choice(response, item.options, _rng(item))
    return choice, choice == item.answer


def mmmu_pro(item: Item, response: str) -> tuple[str | None, bool]:
    """MMMU-Pro's evaluate.py: the letter after the last "Answer:" when exactly one
    letter is there, else the MMMU parser."""
    at = response.rfind("Answer:")
    if at >= 0:
        tail = response[at + len("Answer:"):]
        letters = [c for c in item.options if c in tail]
        if len(letters) == 1:
            return letters[0], letters[0] == item.answer
    return mmmu(item, response)


# -- HallusionBench (tianyi-lab/HallusionBench, arXiv 2310.14566) -----------------------


def hallusionbench(item: Item, response: str) -> tuple[str, bool]:
    """Yes when the final answer says yes (lmms-eval's rule variant of the official GPT
    judge): compared with the 1/0 reference read as Yes/No."""
    said = "Yes" if "yes" in extracted(response).lower() else "No"
    return said, said == item.answer


def hallusion_figures(rows: Sequence[dict]) -> dict[str, float]:
    """aAcc (questions), fAcc (figures whose every question is right; visual-supplement
    questions without a figure are left out) and qAcc (a question right on every figure
    of its set), as ``evaluation.py`` groups them; per item, its first sample."""
    first = {r["item_id"]: r for r in rows if r["sample"] == 0}
    figures, pairs = defaultdict(list), defaultdict(list)
    for r in first.values():
        meta = json.loads(r["meta"] or "{}")
        category, subcategory, set_id, figure_id, question_id = (meta[k] for k in (
            "category", "subcategory", "set_id", "figure_id", "question_id"))
        if not (category == "VS" and figure_id == "0"):
            figures[(category, subcategory, set_id, figure_id)].append(r["correct"])
        pairs[(category, subcategory, set_id, question_id)].append(r["correct"])

    def share(groups):
        return sum(all(g) for g in groups.values()) / len(groups) if groups else 0.0

    n = len(first)
    return {"aAcc": sum(r["correct"] for r in first.values()) / n if n else 0.0,
            "fAcc": share(figures), "qAcc": share(pairs)}


# -- VisNumBench and MMSI-Bench ----------------------------------------------------------


def visnumbench(item: Item, response: str) -> tuple[str | None, bool]:
    """The option chosen: a "(c)" mark in the final answer, else the MMMU parser over the
    options (the official code asks an MLLM to pick the mark), against the answer's."""
    final = extracted(response)
    mark = re.search(r"\(([a-e])\)", final.lower())
    choice = LETTERS["abcde".index(mark.group(1))] if mark else \
        mmmu_choice(final, item.options, _rng(item))
    return choice, choice == item.answer


def mmsi(item: Item, response: str) -> tuple[str | None, bool]:
    """``extract_single_choice_with_word_boundary`` (MMSI-Bench README): the text inside
    ``...``, `...` or {...} if any, then the first standalone A-D not followed by a
    word."""
    pred = response
    for pattern, close in ((r"``([^`]*)``", "`"), (r"`([^`]*)`", "`"), (r"\{([^}]*)\}", "}")):
        # only up to the last closing mark: every start tried then has an end (linear)
        found = re.search(pattern, pred[:pred.rfind(close) + 1])
        if found:
            pred = found.group(1)
    letter = re.search(r"\b[A-D]\b(?!\s[a-zA-Z])", pred)
    if letter is None:
        return None, False
    return letter.group(), item.answer.strip().lower() == letter.group().lower()


# -- MathVision, MathVerse, MM-Vet ------------------------------------------------------


def math_answer(item: Item, response: str, grader) -> tuple[str | None, bool]:
    """MathVision and MathVerse by rule: the final answer equals the reference (a letter
    or a value, math-verify's equivalence) or, for a lettered reference, the option's
    text."""
    pred = extracted(response)
    ok = grader.grade(pred, item.answer, options=item.options or None)
    if not ok and item.options and item.answer in item.options:
        ok = grader.grade(pred, item.options[item.answer])
    return pred, ok


OFFICIAL = {"chartqa": chartqa, "mathvista": mathvista, "mmmu": mmmu, "mmmu_pro": mmmu_pro,
            "hallusionbench": hallusionbench, "visnumbench": visnumbench, "mmsi": mmsi,
            "mathvision": None, "mathverse": None, "mmvet": None}
# Scored by the judge's graded answer alone (MM-Vet's 0-1 correctness, judge.MMVET_PROMPT):
# such a task needs --judge.
GRADED = ("mmvet",)


def score(metric: str, item: Item, response: str, grader) -> tuple[str | None, bool]:
    """(what was read from the response, whether it is right) under ``metric``; a graded
    metric's verdict is the judge's (False until it grades)."""
    if metric in GRADED:
        return None, False
    rule = OFFICIAL[metric]
    return math_answer(item, response, grader) if rule is None else rule(item, response)


def aggregate(metric: str, rows: Sequence[dict]) -> dict[str, float]:
    """The benchmark's own summary figures beside accuracy."""
    if metric == "hallusionbench":
        return hallusion_figures(rows)
    return {}
