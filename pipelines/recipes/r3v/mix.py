"""R3V's prompts, answer format and SFT mix (arXiv 2411.00855; docs/r3v.md).

A rationale ends with a line ``Answer: X``; its answer is the last ``\\boxed{}`` or
``<answer>`` block if there is one, else the text after the last ``Answer:``.

The mix of iteration k, from the labeled items and the pool of rationales that
models 0..k-1 sampled (3 per question each, in the order they were made):

- direct QA: every question with the instruction to answer directly -> ``Answer: X``;
- distilled CoT (off by default, as the original's Qwen2-VL version): every item with a
  ``solution`` -> the solution and ``Answer: X`` (the GPT rationales of the LLaVA
  version; the tiny preset's drawn data has one);
- self-CoT: each question with a correct rationale -> its last correct one;
- self-refine: each question with correct and wrong rationales -> prompt with its last
  wrong one and "judge the correctness of the model's prediction and refine it" ->
  its last correct one;
- self-select: each question with correct and wrong rationales -> up to two examples,
  2 right + 1 wrong (its last two right, its last wrong) when it has two right ones and
  1 right + 2 wrong (its last right, its last two wrong) when it has two wrong ones;
  candidates shuffled, "which prediction is correct?" -> ``Answer: X`` with the
  reference answer. Never skipped for what a candidate's answer says (an unparsable
  wrong one, two right ones written differently): the target is the reference.

Self-CoT, self-refine and self-select use rationales only (``filter_rationales``, on as
in the original): a text of 50 characters or fewer, or one that starts with "Answer",
is a bare answer, not reasoning, and is left out of them.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from pipelines.algorithms.answers import extract_answer
from pipelines.algorithms.grading import majority
from pipelines.eval.data import Item
from pipelines.recipes.labeled import item_messages
from pipelines.runtime.sft import SFTExample

COT = "Answer the question with chain-of-thought reasoning, then give the final answer on " \
      "the last line as \"Answer: X\"."
DIRECT = "Answer the question directly with the final answer as \"Answer: X\"."
REFINE = "Judge the correctness of the model's prediction and refine it."
SELECT = "Which prediction is correct? Give the final answer as \"Answer: X\"."
KINDS = ("direct", "distilled", "self_cot", "self_refine", "self_select")

_ANSWER_RE = re.compile(r"answer\s*:", re.IGNORECASE)
MIN_RATIONALE_CHARS = 51  # the original drops predictions of <= 50 characters


def is_rationale(text: str) -> bool:
    """Reasoning, not a bare answer: longer than 50 characters and not starting with
    "Answer" (the original's filter of self-CoT, refine and select data)."""
    return len(text) >= MIN_RATIONALE_CHARS and not text.startswith("Answer")


def after_answer(text: str) -> str | None:
    """The text after the last ``Answer:`` (first line of it), or None."""
    last = None
    for last in _ANSWER_RE.finditer(text):
        pass
    if last is None:
        return None
    rest = text[last.end():].strip()
    return rest.splitlines()[0].strip() if rest else None


def rationale_answer(text: str) -> str | None:
    """The final answer of a rationale (see the module's docstring)."""
    return extract_answer(text, fallback=after_answer)


def with_answer(rationale: str, answer: str) -> str:
    return f"{rationale.rstrip()}\nAnswer: {answer}"


@dataclass(frozen=True)
class Sample:
    """One sampled rationale of a training question."""

    item_id: str
    text: str
    answer: str | None  # extracted
    correct: bool
    iteration: int  # the iteration whose sampling made it (its model: iteration - 1)


def cot_messages(item: Item) -> list[dict]:
    return item_messages(item, COT)


def refine_messages(item: Item, wrong: str) -> list[dict]:
    return item_messages(item, f"{COT}\nModel's prediction:\n{wrong}\n{REFINE}")


def select_messages(item: Item, candidates: Sequence[str]) -> list[dict]:
    listed = "".join(f"Model's prediction {k}:\n{text}\n" for k, text in
                     enumerate(candidates, 1))
    return item_messages(item, f"{COT}\n{listed}{SELECT}")


def build_mix(items: Sequence[Item], pool: Sequence[Sample], rng: np.random.Generator, *,
              direct_qa: bool = True, distilled: bool = False, self_refine: bool = True,
              self_select: bool = True,
              filter_rationales: bool = True) -> tuple[list[SFTExample], dict[str, int]]:
    """The SFT examples of one iteration, shuffled, and how many of each kind."""
    by_item: dict[str, list[Sample]] = {}
    for s in pool:
        if is_rationale(s.text) or not filter_rationales:
            by_item.setdefault(s.item_id, []).append(s)
    out: list[tuple[str, SFTExample]] = []

    def add(kind: str, messages: list[dict], target: str, item: Item) -> None:
        out.append((kind, SFTExample(messages, target, item.image_bytes())))

    for item in items:
        if direct_qa:
            add("direct", item_messages(item, DIRECT), f"Answer: {item.answer}", item)
        if distilled and item.solution:
            add("distilled", cot_messages(item), with_answer(item.solution, item.answer), item)
        samples = by_item.get(item.id, [])
        right = [s for s in samples if s.correct]
        wrong = [s for s in samples if not s.correct]
        if right:
            add("self_cot", cot_messages(item), right[-1].text, item)
        if not (right and wrong):
            continue
        if self_refine:
            add("self_refine", refine_messages(item, wrong[-1].text), right[-1].text, item)
        if not self_select:
            continue
        for chosen in ([*right[-2:], wrong[-1]] if len(right) >= 2 else None,
                       [right[-1], *wrong[-2:]] if len(wrong) >= 2 else None):
            if chosen is None:
                continue
            order = rng.permutation(len(chosen))
            add("self_select", select_messages(item, [chosen[i].text for i in order]),
                f"Answer: {item.answer}", item)
    counts = {kind: sum(1 for k, _ in out if k == kind) for kind in KINDS}
    order = rng.permutation(len(out))
    return [out[i][1] for i in order], counts


# -- test-time selection --------------------------------------------------------------

def majority_answer(answers: Sequence[str | None],
                    grade: Callable[[str, str], bool]) -> str | None:
    """The most frequent answer (graded equal in either direction), ties to the earliest
    (the original's Counter.most_common); None when no answer parses."""

    return majority(answers, grader=grade).label
