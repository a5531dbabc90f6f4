"""MM-Zero rewards, parsing and data filters as pure functions (no Ray, no engines).

Formulas: MM-Zero (arXiv:2603.09206; docs/mmzero.md), read against the original's
`reward_function/{proposer,codegen}_reward.py` (zli12321/MM-Zero). Deliberate
differences from the original, each explained where it is made:
- BLEU distance: lowercase tokens, symmetrised (the original took one direction,
  chosen by batch order), exact duplicates at distance 0 (method1 smoothing
  scores an identical 3-token text 0.56, so short duplicates never clustered).
- A declared content type "other" is kept (the original re-inferred it).
- Answers are graded with `pipelines.algorithms.grading.grade`; the Solver format check is
  the spec's whole-response one.
Spec defect: "(a unique proposal gains up to +0.5)" cannot happen with the spec's
own formula (share_F >= 1/n_valid, so the diversity term is in [-0.5, 0]); we
keep the formula, as the original's code does, and a unique proposal gets 0.

Metric keys carry no namespace; the phase logs them under `reward/`.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

import numpy as np
from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.spatial.distance import squareform

from actors.svg_checks import svg_like
from pipelines.algorithms.answers import closing_brace, extract_answer, tag_blocks
from pipelines.algorithms.grading import grade, is_valid_answer

CONTENT_TYPES = ("data_chart", "diagram", "geometry", "timeline", "map", "table", "other")
SEED_TOPICS = (  # spec order
    "chart and graph understanding", "statistical and trend analysis",
    "mathematical and quantitative reasoning", "spatial and geometric reasoning",
    "logical and abstract reasoning", "diagram and structural comprehension",
    "visual text recognition and OCR", "basic shape and object perception")
DIVERSITY_WEIGHTS = MappingProxyType({"caption": 0.45, "easy_question": 0.20,
                                      "hard_question": 0.35})
UNPARSABLE_REWARD = -1.0

# ------------------------------------------------------------------ parsing

# Whole words with an optional plural; `\w*` marks a stem ("chronological").
# Whole words keep "pieces" from counting as "pie" and "arrows" as "rows".
_TYPE_KEYWORDS = (
    ("data_chart", r"charts?|bars?|lines?|pies?|plots?|graphs?"),
    ("table", r"tables?|rows?|columns?"),
    ("timeline", r"timelines?|chronolog\w*"),
    ("map", r"maps?|regions?|country|countries"),
    ("geometry", r"triangles?|circles?|angles?|polygons?|geometr\w*"),
    ("diagram", r"diagrams?|flowcharts?|trees?|networks?|nodes?"),
)
_TYPE_RES = tuple((t, re.compile(rf"\b(?:{words})\b", re.IGNORECASE)) for t, words in _TYPE_KEYWORDS)
_FIELDS = ("caption", "easy_question", "easy_answer", "hard_question", "hard_answer")


def infer_content_type(caption: str) -> str:
    """Content type from caption keywords (whole words, case-insensitive):

    data_chart: chart, bar, line, pie, plot, graph; table: table, row, column;
    timeline: timeline, chronolog*; map: map, region, country/countries;
    geometry: triangle, circle, angle, polygon, geometr*; diagram: diagram,
    flowchart, tree, network, node (each also with a plural "s").

    The type with the most keyword occurrences wins, ties go to the earlier type
    in that list, no keyword gives "other". Counting (not first match) keeps
    "triangle ABC, the line AB, angle C" a geometry caption.
    """
    counts = [(len(pattern.findall(caption)), t) for t, pattern in _TYPE_RES]
    best = max(counts, key=lambda ct: ct[0])  # max keeps the first of equal counts
    return best[1] if best[0] > 0 else "other"


@dataclass(frozen=True)
class Proposal:
    content_type: str  # one of CONTENT_TYPES
    caption: str
    easy_question: str
    easy_answer: str
    hard_question: str
    hard_answer: str
    type_inferred: bool  # content_type came from the caption, not from the tag


def _first_tag(text: str, tag: str) -> str | None:
    """Stripped content of the first closed `<tag>...</tag>` block (linear time)."""
    blocks = tag_blocks(text, tag)
    return text[slice(*blocks[0])].strip() if blocks else None


def parse_proposal(text: str | None) -> Proposal | None:
    """The six tagged fields of a Proposer response, or None (reward -1).

    Tag names are case-insensitive and may have spaces inside the angle
    brackets; contents are stripped. A tag given twice counts once, the first
    (as the original's `re.search`). Caption, both questions and both answers
    must be present and non-empty. `<content_type>` is normalised (lowercase,
    spaces and hyphens -> "_"); when absent or not in CONTENT_TYPES it is
    inferred from the caption (`infer_content_type`). An explicit "other" is kept.
    """
    if not text:
        return None
    fields = {name: _first_tag(text, name) for name in _FIELDS}
    if not all(fields.values()):
        return None
    raw = _first_tag(text, "content_type") or ""
    declared = re.sub(r"[\s\-]+", "_", raw.lower())
    if declared in CONTENT_TYPES:
        return Proposal(content_type=declared, type_inferred=False, **fields)
    return Proposal(content_type=infer_content_type(fields["caption"]), type_inferred=True,
                    **fields)


# ---------------------------------------------------------------- proposer


@dataclass
class SampleJudgement:
    """One of the k SVGs the previous CodeGen wrote for a proposal, as judged.

    solv: share of Solver answers to the easy question that grade equal to the
    proposer's easy answer (`grading.agreement`); hard_consistency: the Solver's
    self-consistency c on the hard question (`grading.majority(...).consistency`).
    None = that Solver call failed (only possible for a rendered sample).
    """

    rendered: bool
    solv: float | None = None
    hard_consistency: float | None = None

    def __post_init__(self):
        _check_shares(solv=self.solv, hard_consistency=self.hard_consistency)
        if not self.rendered and (self.solv, self.hard_consistency) != (None, None):
            raise ValueError("SampleJudgement: Solver results given for a sample that did "
                             "not render")


def _check_shares(**shares: float | None) -> None:
    for name, value in shares.items():
        if value is not None and not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {value}")


def proposer_reward(judgements: Sequence[SampleJudgement], k: int) -> dict[str, float]:
    """Judge terms of one parsed proposal's reward (spec "Proposer", Reward).

    judge = (1/k) * sum over rendered samples of [min(solv, 0.5) + min(c, 1 - c)];
    a failed Solver call adds nothing for its question (the other one still
    counts), and so does a sample that did not render. Fewer than k judgements
    means the missing samples did not render.
    low_difficulty_penalty = -0.3 if the mean of min(c, 1 - c) over the samples
    with a hard-question judgement is < 0.15; 0 when there is none (no render,
    or every Solver call failed), as in the original (`and hard_scores`): an
    unknown difficulty is not a low one and a failed Solver call never costs.

    Returns judge, low_difficulty_penalty, and for metrics n_rendered, n_solv and
    n_judged (samples with an easy / a hard judgement), n_solver_failed (rendered
    samples missing either result), solv_sum and diff_sum (over those samples).
    """
    if k < 1:
        raise ValueError(f"k (CodeGen samples per proposal) must be >= 1, got {k}")
    if len(judgements) > k:
        raise ValueError(f"{len(judgements)} judgements for k={k} samples per proposal")
    rendered = [j for j in judgements if j.rendered]
    solvs = [j.solv for j in rendered if j.solv is not None]
    diffs = [min(j.hard_consistency, 1.0 - j.hard_consistency)
             for j in rendered if j.hard_consistency is not None]
    low = bool(diffs) and float(np.mean(diffs)) < 0.15
    return {
        "judge": (sum(min(s, 0.5) for s in solvs) + sum(diffs)) / k,
        "low_difficulty_penalty": -0.3 if low else 0.0,
        "n_rendered": float(len(rendered)),
        "n_solv": float(len(solvs)),
        "n_judged": float(len(diffs)),
        "n_solver_failed": float(sum(j.solv is None or j.hard_consistency is None
                                     for j in rendered)),
        "solv_sum": float(sum(solvs)),
        "diff_sum": float(sum(diffs)),
    }


def content_type_penalties(types: Sequence[str | None]) -> list[float]:
    """Term added to R for content-type balance (<= 0), one per proposal.

    Over the valid proposals (None = unparsable, gets 0): when at least two
    types are present, a proposal whose type has batch share f > 0.5 gets
    -0.15 * (f - 0.5) / 0.5.
    """
    valid = [t for t in types if t is not None]
    if unknown := set(valid) - set(CONTENT_TYPES):
        raise ValueError(f"unknown content types {sorted(unknown)}; expected {CONTENT_TYPES}")
    counts = Counter(valid)
    if len(counts) < 2:
        return [0.0] * len(types)
    share = {t: c / len(valid) for t, c in counts.items()}
    return [-0.15 * (share[t] - 0.5) / 0.5 if t is not None and share[t] > 0.5 else 0.0
            for t in types]


_SMOOTHING = SmoothingFunction().method1  # the original's (R-Zero's) choice


def bleu_similarity(a: str, b: str) -> float:
    """Sentence BLEU (nltk, 4-gram, smoothing method1) on lowercase whitespace
    tokens, averaged over both directions (hypothesis a vs reference b and back),
    so it does not depend on batch order. Identical token lists score 1: without
    this, method1 gives 0.1 ** (1/4) = 0.56 for any identical 3-token text.
    Nothing is downloaded: sentence_bleu needs no nltk corpora."""
    ta, tb = a.lower().split(), b.lower().split()
    if ta == tb:
        return 1.0
    forward = sentence_bleu([tb], ta, smoothing_function=_SMOOTHING)
    backward = sentence_bleu([ta], tb, smoothing_function=_SMOOTHING)
    return (float(forward) + float(backward)) / 2


def cluster_shares(distances: np.ndarray, threshold: float) -> list[float]:
    """Share of the items in each item's cluster: average-linkage agglomerative
    clustering of a symmetric (n, n) distance matrix, cut so that clusters merge
    only at a linkage distance strictly below `threshold` (sklearn's
    `distance_threshold`, which the original used; scipy's own cut is <=)."""
    n = len(distances)
    if n < 2:
        return [1.0] * n
    tree = linkage(squareform(distances, checks=False), method="average")
    labels = fcluster(tree, t=np.nextafter(threshold, -np.inf), criterion="distance")
    sizes = Counter(labels)
    return [sizes[label] / n for label in labels]


def diversity_penalties(proposals: Sequence[Proposal | None],
                        weights: Mapping[str, float] = DIVERSITY_WEIGHTS,
                        threshold: float = 0.25, budget: float = 0.5) -> list[float]:
    """Term added to R for text diversity (in [-budget, 0]), one per proposal.

    For each field F (weights: caption 0.45, easy_question 0.20, hard_question
    0.35) the valid proposals are clustered on distance 1 - `bleu_similarity`
    (`cluster_shares`, threshold 0.25); share_F = p's cluster size / n_valid;
    pen = clip(budget * n_valid * sum_F w_F * (share_F - 1/n_valid), -budget, budget)
    with budget 0.5, and the term is -pen. Unparsable proposals get 0; with
    n_valid <= 1 nobody is penalised.
    """
    valid = [i for i, p in enumerate(proposals) if p is not None]
    out = [0.0] * len(proposals)
    n = len(valid)
    if n <= 1:
        return out
    excess = np.zeros(n)
    for field, weight in weights.items():
        texts = [getattr(proposals[i], field) for i in valid]
        dist = np.zeros((n, n))
        for a in range(n):
            for b in range(a + 1, n):
                dist[a, b] = dist[b, a] = 1.0 - bleu_similarity(texts[a], texts[b])
        excess += weight * (np.asarray(cluster_shares(dist, threshold)) - 1.0 / n)
    pen = np.clip(budget * n * excess, -budget, budget)
    for slot, i in enumerate(valid):
        out[i] = 0.0 - float(pen[slot])  # 0.0 - 0.0 is 0.0, not -0.0
    return out


def proposer_rewards(proposals: Sequence[Proposal | None],
                     judgements_per_proposal: Sequence[Sequence[SampleJudgement]],
                     k: int) -> tuple[list[float], dict[str, float]]:
    """Total Proposer reward per proposal and the batch's metrics.

    R = judge + low_difficulty_penalty + content_type + diversity for a parsed
    proposal, -1 for an unparsable one (its judgements are ignored). Metrics:
    `*_mean` of each component over the parsed proposals, parse_rate,
    type_inferred_frac, low_difficulty_frac, render_rate (rendered samples /
    (k * parsed)), solvability_mean and difficulty_mean (over judged samples),
    solver_failures (count).
    """
    if len(proposals) != len(judgements_per_proposal):
        raise ValueError(f"{len(proposals)} proposals but {len(judgements_per_proposal)} "
                         f"judgement lists")
    types = content_type_penalties([p.content_type if p else None for p in proposals])
    texts = diversity_penalties(proposals)
    rewards, parts = [], []
    for p, judgements, ct, div in zip(proposals, judgements_per_proposal, types, texts):
        if p is None:
            rewards.append(UNPARSABLE_REWARD)
            continue
        part = {**proposer_reward(judgements, k), "content_type_penalty": ct,
                "diversity_penalty": div}
        parts.append(part)
        rewards.append(part["judge"] + part["low_difficulty_penalty"] + ct + div)
    total: Counter[str] = Counter()
    for part in parts:
        total.update(part)  # adds the values key by key
    n = max(len(parts), 1)
    metrics = {f"{key}_mean": total[key] / n for key in
               ("judge", "low_difficulty_penalty", "content_type_penalty", "diversity_penalty")}
    metrics.update(
        parse_rate=len(parts) / len(proposals) if proposals else 0.0,
        type_inferred_frac=sum(p.type_inferred for p in proposals if p is not None) / n,
        low_difficulty_frac=sum(part["low_difficulty_penalty"] < 0 for part in parts) / n,
        render_rate=total["n_rendered"] / (k * n),
        solvability_mean=total["solv_sum"] / max(total["n_solv"], 1.0),
        difficulty_mean=total["diff_sum"] / max(total["n_judged"], 1.0),
        solver_failures=float(total["n_solver_failed"]),
    )
    return rewards, metrics


# ----------------------------------------------------------------- codegen


def codegen_reward(code: str | None, rendered: bool, solv: float | None,
                   hard_consistency: float | None) -> float:
    """CodeGen reward of one SVG (spec "CodeGen", Reward).

    Not rendered: -(0.1 + 0.05 * [code empty] + 0.5 * [not svg_like(code)]).
    Rendered: 1 + solv + min(c, 1 - c), solv uncapped; a missing Solver result
    (failed call) counts 0. Floor -0.5 on the total. Kept literal: empty code
    is also "not SVG-like" (-0.65, as in the original), so with the floor both
    empty and non-SVG code score -0.5 and the 0.05 term never shows; only
    SVG-like code that fails to render scores -0.1. `code` is the extracted SVG
    (`actors.svg_checks.extract_svg`), blank counts as empty. The judging Solver
    must be the latest Solver (the original judged with the CodeGen checkpoint).
    """
    _check_shares(solv=solv, hard_consistency=hard_consistency)
    if not rendered:
        empty = not (code and code.strip())
        reward = -(0.1 + 0.05 * empty + 0.5 * (not svg_like(code)))
    else:
        c = hard_consistency
        reward = 1.0 + (solv or 0.0) + (min(c, 1.0 - c) if c is not None else 0.0)
    return max(reward, -0.5)


# ------------------------------------------------------------------ solver

_THINK_OPEN, _THINK_CLOSE, _BOX_OPEN = "<think>", "</think>", "\\boxed{"


def format_ok(response: str | None) -> bool:
    """Whether the whole response (outer whitespace stripped) is one
    `<think>...</think>`, optional whitespace, then one non-empty `\\boxed{...}`
    with balanced braces (escaped braces do not count, as in `extract_boxed`)
    and nothing after it. Tags are matched exactly as the prompt writes them."""
    text = (response or "").strip()
    if not text.startswith(_THINK_OPEN) or text.count(_THINK_OPEN) != 1 \
            or text.count(_THINK_CLOSE) != 1:
        return False
    tail = text.split(_THINK_CLOSE, 1)[1].lstrip()
    if not tail.startswith(_BOX_OPEN):
        return False
    end = closing_brace(tail, len(_BOX_OPEN))
    return end == len(tail) - 1 and bool(tail[len(_BOX_OPEN):end].strip())


def solver_reward(response: str | None, pseudo_label: str,
                  grader: Callable[[str, str], bool] = grade) -> float:
    """0.9 * grade(answer, pseudo_label) + 0.1 * format_ok(response) (spec
    "Solver", Reward). The answer is the last `\\boxed{}`, else the last
    `<answer>` block (`answers.extract_answer`); no answer grades 0."""
    if not is_valid_answer(pseudo_label):
        raise ValueError(f"pseudo_label must be a valid answer (see solver_keep), "
                         f"got {pseudo_label!r}")
    answer = extract_answer(response)
    correct = answer is not None and grader(answer, pseudo_label)
    return 0.9 * correct + 0.1 * format_ok(response)


# ----------------------------------------------------------------- filters


def codegen_keep(render_rate: float, low: float = 0.25, high: float = 0.75) -> bool:
    """CodeGen training-set filter: keep a proposal whose render success rate
    over the current CodeGen's samples is in [low, high] (both inclusive)."""
    if not 0.0 <= render_rate <= 1.0:
        raise ValueError(f"render_rate must be in [0, 1], got {render_rate}")
    return low <= render_rate <= high


def solver_keep(easy_consistency: float, hard_consistency: float, image_ok: bool,
                label: str | None, easy_min: float = 0.5,
                hard_range: tuple[float, float] = (0.25, 0.75)) -> bool:
    """Solver training-set filter: easy self-consistency >= 0.5, hard
    self-consistency in [0.25, 0.75] (inclusive), a valid image and a valid
    pseudo-label (`grading.is_valid_answer`)."""
    return (easy_consistency >= easy_min and hard_range[0] <= hard_consistency <= hard_range[1]
            and image_ok and is_valid_answer(label))


def clamp_batch(batch: int, available: int, floor: int = 16) -> tuple[int, str | None]:
    """Batch size for a filtered data set of `available` items (spec "GRPO
    settings"), and a log message when it changed.

    available >= batch: unchanged. Otherwise the largest power of two <=
    available, raised to min(floor, batch) and never above batch. The result may
    exceed `available` (10 items, batch 64 -> 16); the data set then cycles, so
    some items appear twice in a step, and the message says so.
    """
    if batch < 1 or floor < 1:
        raise ValueError(f"batch and floor must be >= 1, got batch={batch}, floor={floor}")
    if available <= 0:
        raise ValueError(f"the filtered data set is empty ({available} items): nothing to "
                         f"train on; loosen the filter or write more proposals")
    if available >= batch:
        return batch, None
    power = 1 << (available.bit_length() - 1)
    size = min(batch, max(power, min(floor, batch)))
    message = (f"filtered data set has {available} items, fewer than the batch of {batch}: "
               f"batch clamped to {size} (largest power of two <= {available}, "
               f"at least {min(floor, batch)})")
    if size > available:
        message += f"; {size} > {available}, so items repeat within a step"
    return size, message
