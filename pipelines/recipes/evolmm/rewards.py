"""EvoLMM's and iReasoner's label-free rewards (docs/algorithms.md, "EvoLMM").

Solver (continuous self-consistency): with p(a) the share of the N sampled
answers equal to a (after normalisation) and w the words written before
``<answer>``::

    r_i = p(a_i)^gamma * (1 - lambda * clip((w_i - T) / T, 0, 1))

Proposer (a question of the right difficulty): with H the entropy in nats of
the answer distribution::

    r_P = exp(-(H - target)^2 / (2 sigma^2))

The "discrete reward" ablation: 1 for an answer in the majority group, else 0.
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from collections.abc import Callable, Sequence

from pipelines.algorithms.answers import extract_tag, tag_blocks


def evolmm_normalize(s: str | None) -> str:
    """EvoLMM's answer normalisation for voting: lowercase, drop commas, collapse
    whitespace, strip punctuation. "Strip" is read as at both ends: removing all
    punctuation would merge "3.5" and "35", and the separate comma rule would
    be redundant. None -> ""."""
    if s is None:
        return ""
    s = " ".join(s.lower().replace(",", "").split())
    return s.strip(string.punctuation + " ")


FALLBACK_QUESTION = "What is the most prominent value shown in the image?"
_ANSWER_OPEN = re.compile(r"<answer>", re.IGNORECASE)


def parse_question(text: str | None) -> tuple[str, bool]:
    """The question inside ``<question>`` (else the whole output), newlines as spaces;
    (FALLBACK_QUESTION, True) when nothing is left."""
    question = extract_tag(text, "question") if text else None
    if question is None:
        question = text or ""
    question = " ".join(question.split())
    return (question, False) if question else (FALLBACK_QUESTION, True)


def final_answer(text: str | None) -> str:
    """The ``<answer>`` block, else the last non-empty line, else "unknown"."""
    answer = extract_tag(text, "answer") if text else None
    if answer is not None:
        return answer
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    return lines[-1] if lines else "unknown"


def words_before_answer(text: str | None) -> int:
    """Whitespace-separated words before the first ``<answer>`` (the whole text if none)."""
    text = text or ""
    match = _ANSWER_OPEN.search(text)
    return len((text[:match.start()] if match else text).split())


def answer_shares(answers: Sequence[str], normalize: Callable[[str], str] = evolmm_normalize
                  ) -> tuple[list[str], Counter]:
    keys = [normalize(a) for a in answers]
    return keys, Counter(keys)


def soft_rewards(answers: Sequence[str], words: Sequence[int], *, gamma: float = 0.7,
                 length_lambda: float = 0.10, length_target: float = 6.0,
                 normalize: Callable[[str], str] = evolmm_normalize) -> list[float]:
    keys, counts = answer_shares(answers, normalize)
    n = len(keys)
    out = []
    for key, w in zip(keys, words):
        penalty = min(max((w - length_target) / length_target, 0.0), 1.0)
        out.append((counts[key] / n) ** gamma * (1.0 - length_lambda * penalty))
    return out


def majority_answer(answers: Sequence[str],
                    normalize: Callable[[str], str] = evolmm_normalize) -> str:
    """The most frequent normalised answer (ties: the one seen first)."""
    keys, counts = answer_shares(answers, normalize)
    top = max(counts.values())
    return next(k for k in keys if counts[k] == top)


def discrete_rewards(answers: Sequence[str],
                     normalize: Callable[[str], str] = evolmm_normalize) -> list[float]:
    """1 for answers in the majority group (ties: the one seen first), else 0."""
    majority = majority_answer(answers, normalize)
    return [1.0 if normalize(a) == majority else 0.0 for a in answers]


def answer_entropy(answers: Sequence[str],
                   normalize: Callable[[str], str] = evolmm_normalize) -> float:
    keys, counts = answer_shares(answers, normalize)
    n = len(keys)
    return -sum(c / n * math.log(c / n) for c in counts.values())


def proposer_reward(answers: Sequence[str], *, target: float = 0.9, sigma: float = 0.35,
                    normalize: Callable[[str], str] = evolmm_normalize) -> float:
    h = answer_entropy(answers, normalize)
    return math.exp(-((h - target) ** 2) / (2 * sigma ** 2))


def well_formed(text: str | None, tag: str) -> bool:
    """Exactly one complete ``<tag>`` block (a format metric, not a reward)."""
    return len(tag_blocks(text or "", tag)) == 1
