"""What MM-Zero's rewards and filters measure with other roles' engines.

- ``write_svgs``: a CodeGen pool writes SVGs for proposals; ``extract_svg`` on each.
- ``ask_solver``: a Solver pool answers the easy and the hard question of every
  rendered image ``n`` times; ``Answers`` holds the extracted final answers
  and what the spec derives from them: solvability (share of easy answers
  that grade equal to the proposer's easy answer, invalid answers in the
  denominator), easy and hard self-consistency and the hard pseudo-label.

A Solver call that fails (the pool gave up after its restarts) yields no
``Answers`` (None) for its items: the rewards give such samples nothing,
never a penalty.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from actors.sampling import Request, Sampling
from actors.svg_checks import extract_svg
from pipelines.algorithms.answers import extract_answer
from pipelines.algorithms.grading import agreement, majority
from pipelines.recipes.mmzero.prompts import codegen_messages, solver_messages

logger = logging.getLogger(__name__)


@dataclass
class Answers:
    easy: list[str | None]
    hard: list[str | None]
    solvability: float  # agreement(easy, easy_answer)
    easy_consistency: float
    hard_consistency: float
    label: str | None  # the hard majority answer


def seed(rng: np.random.Generator) -> int:
    return int(rng.integers(1 << 31))


def write_svgs(pool, proposals, n: int, m, rng: np.random.Generator) -> list[list[str | None]]:
    """``n`` SVGs per proposal from a CodeGen pool (T and top_p of the CodeGen role)."""
    if not proposals:
        return []
    requests = [Request(codegen_messages(p), sampling=Sampling(
        n=n, temperature=m.codegen_temperature, top_p=m.codegen_top_p, max_tokens=m.max_tokens,
        seed=seed(rng))) for p in proposals]
    return [[extract_svg(c.text) for c in samples] for samples in pool.generate(requests)]


def ask_solver(pool, items: list[tuple[bytes, str, str, str]], m,
               rng: np.random.Generator, judge: bool) -> list[Answers | None]:
    """``items``: (png, easy question, easy answer, hard question) -> Answers per item.

    ``judge``: the Solver scores a Proposer's or a CodeGen's image (``judge_solver_n``
    answers at ``judge_top_p`` / ``judge_top_k``, as the original's Solver service);
    else it answers for the Solver's own data set (``eval_samples`` at ``solver_top_p``)."""
    if not items:
        return []
    if judge:
        sampling = {"n": m.judge_solver_n, "top_p": m.judge_top_p, "top_k": m.judge_top_k}
    else:
        sampling = {"n": m.eval_samples, "top_p": m.solver_top_p, "top_k": 0}
    sampling.update(temperature=m.solver_temperature, max_tokens=m.max_tokens)
    requests = []
    for png, easy_q, _, hard_q in items:
        for question in (easy_q, hard_q):
            requests.append(Request(solver_messages(question), images=[png],
                                    sampling=Sampling(**sampling, seed=seed(rng))))
    try:
        out = pool.generate(requests)
    except Exception as err:  # noqa: BLE001 - a failed judge must not stop the phase
        logger.warning("solver call failed for %d items (%s); they get no judge score",
                       len(items), err)
        return [None] * len(items)
    answers = []
    for i, (_, _, easy_answer, _) in enumerate(items):
        easy = [extract_answer(c.text) for c in out[2 * i]]
        hard = [extract_answer(c.text) for c in out[2 * i + 1]]
        vote_easy, vote_hard = majority(easy), majority(hard)
        answers.append(Answers(easy, hard, agreement(easy, easy_answer), vote_easy.consistency,
                               vote_hard.consistency, vote_hard.label))
    return answers
