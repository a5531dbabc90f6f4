"""MAYE's score of one response and its reflection analysis (docs/maye.md).

Score (MAYE, "Rethinking RL Scaling for Vision Language Models", as its code computes it):

    score = accuracy + format - language_penalty * (CJK characters / characters)
    accuracy = 1 if the last \\boxed{} grades equal to the reference, else 0
    format   = 1 if the response has exactly one <think>...</think> block (the blocks a
               lazy left-to-right scan finds, as the original's regex), else 0
    score    = invalid_score instead (-0.1) when the response has no end-of-sequence
               token (cut at the budget) or fewer than ``min_tokens`` tokens; its
               ``accuracy`` is still graded (the original counts a response "correct"
               before that penalty)

Reflection analysis: a response is reflective when its lower-cased text contains any
of ``REFLECTION_WORDS`` as a substring. Over a batch of responses with their
correctness: the reflection ratio, the ratio among correct and among incorrect
responses, the accuracy among reflective and among non-reflective responses, and for
each word the number of its occurrences (``text.count(word)``, as the original counts). A ratio over an empty set (no
correct response, say) is left out of the metrics rather than logged as 0, as the
original does, which would read as a measurement.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from pipelines.algorithms.answers import extract_boxed

REFLECTION_WORDS = ("re-check", "re-evaluate", "re-examine", "re-think", "recheck",
                    "reevaluate", "reexamine", "reevaluation", "rethink", "check again",
                    "think again", "try again", "verify", "wait", "yet")
_CJK_RE = re.compile(r"[\u4e00-\u9fff]")  # CJK unified ideographs, the original's range


@dataclass(frozen=True)
class Score:
    score: float
    accuracy: float  # 0/1 (0 when penalised)
    format: float  # 0/1 (0 when penalised)
    language: float  # share of CJK characters
    penalised: bool  # no EOS or too short: the score is invalid_score
    answer: str | None  # the extracted final answer


def cjk_share(text: str) -> float:
    """CJK characters / all characters (0 for an empty text)."""
    return len(_CJK_RE.findall(text)) / len(text) if text else 0.0


def think_blocks(text: str) -> int:
    """How many ``<think>...</think>`` blocks a lazy left-to-right scan finds (what
    ``re.findall(r"<think>.*?</think>", text, re.DOTALL)`` counts), in linear time."""
    count, pos = 0, 0
    while (start := text.find("<think>", pos)) >= 0:
        end = text.find("</think>", start + len("<think>"))
        if end < 0:
            break
        count, pos = count + 1, end + len("</think>")
    return count


def score_response(text: str, reference: str, *, finished: bool, tokens: int,
                   grade: Callable[[str | None, str], bool], min_tokens: int = 1,
                   language_penalty: float = 0.1, invalid_score: float = -0.1) -> Score:
    """The score of one response (``finished``: it ended with EOS; ``tokens``: its
    length). ``grade(pred, ref)`` is the answer check (time-limited)."""
    answer = extract_boxed(text)
    share = cjk_share(text)
    accuracy = 1.0 if answer is not None and grade(answer, reference) else 0.0
    if not finished or tokens < min_tokens:
        return Score(invalid_score, accuracy, 0.0, share, True, answer)
    fmt = 1.0 if think_blocks(text) == 1 else 0.0
    return Score(accuracy + fmt - language_penalty * share, accuracy, fmt, share, False, answer)


def is_reflective(text: str) -> bool:
    lowered = text.lower()
    return any(word in lowered for word in REFLECTION_WORDS)


def reflection_stats(texts: Sequence[str], correct: Sequence[bool]) -> dict[str, float]:
    """MAYE's reflection metrics of a batch (see the module's docstring)."""
    lowered = [t.lower() for t in texts]
    reflective = [any(w in t for w in REFLECTION_WORDS) for t in lowered]

    def share(flags: list[bool]) -> float:
        return sum(flags) / len(flags) if flags else math.nan

    ratios = {
        "reflection_ratio": share(reflective),
        "reflection_ratio_correct": share([r for r, c in zip(reflective, correct) if c]),
        "reflection_ratio_incorrect": share([r for r, c in zip(reflective, correct) if not c]),
        "accuracy_reflective": share([c for r, c in zip(reflective, correct) if r]),
        "accuracy_not_reflective": share([c for r, c in zip(reflective, correct) if not r]),
    }
    out = {k: v for k, v in ratios.items() if not math.isnan(v)}
    for word in REFLECTION_WORDS:
        out[f"reflection_word/{word}"] = float(sum(t.count(word) for t in lowered))
    return out
