"""iReasoner's trajectory-aware step agreement (docs/ireasoner.md).

``extract_steps`` splits a Solver's reasoning into at most ``max_steps`` steps;
``step_agreement`` rewards the samples of the majority answer group whose
steps agree with the group's, position by position; ``mix_weight`` is the
warm-up schedule of the step reward's share.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import numpy as np

from pipelines.algorithms.answers import extract_tag, tag_blocks

_STEP_LINE = re.compile(r"\s*(?:step\s*\d+\s*[:.)-]?|\d+\s*[.)])\s*", re.IGNORECASE)
_ANSWER_OPEN = re.compile(r"<answer>", re.IGNORECASE)


def reasoning(text: str | None) -> str:
    """The ``<think>`` block; without it, the text before ``<answer>`` (or all of it)."""
    text = text or ""
    think = extract_tag(text, "think")
    if think is not None:
        return think
    match = _ANSWER_OPEN.search(text)
    return text[:match.start()] if match else text


def extract_steps(text: str | None, max_steps: int = 8) -> list[str]:
    """Steps of the reasoning: ``<step>`` blocks, else numbered lines ("Step k ..." or
    "k." / "k)"); a line without a number continues the step before it, so reasoning
    without numbers is one step (as the original: its sentence split never runs)."""
    body = reasoning(text)
    blocks = tag_blocks(body, "step")
    if blocks:
        steps = [body[a:b] for a, b in blocks]
    else:
        steps = []
        for line in body.splitlines():
            if not line.strip():
                continue
            match = _STEP_LINE.match(line)
            if match and match.end() > len(line) - len(line.lstrip()):
                steps.append(line[match.end():])
            elif steps:
                steps[-1] += " " + line.strip()
            else:
                steps.append(line)
    steps = [" ".join(s.split()) for s in steps]
    return [s for s in steps if s][:max_steps]


def step_agreement(group: Sequence[int], steps: Sequence[Sequence[np.ndarray]], n: int, *,
                   position_decay: float = 0.15, density_gamma: float = 0.7,
                   min_group: int = 2) -> tuple[dict[int, float], dict]:
    """Step rewards of the samples in ``group`` (the majority answer group, indices into
    ``steps``; every other sample gets 0). ``steps[i]``: sample i's unit step embeddings
    in order; ``n``: samples in all.

    For each step position j held by >= 2 members: centroid c_j = normalise(mean e_ij),
    s_ij = (cos(e_ij, c_j) + 1) / 2, weight w_j = exp(-position_decay * j);
    r_i = (sum_j w_j s_ij / sum_j w_j) * (|group| / n) ** density_gamma over the positions
    i has. A group smaller than ``min_group`` gets nothing."""
    info = {"group_size": float(len(group)), "positions": 0.0, "mean_cosine": 0.0}
    if len(group) < min_group:
        return {}, info
    depth = max((len(steps[i]) for i in group), default=0)
    scores: dict[int, list[tuple[float, float]]] = {i: [] for i in group}
    cosines = []
    for j in range(depth):
        members = [i for i in group if len(steps[i]) > j]
        if len(members) < 2:
            continue
        info["positions"] += 1
        centre = np.mean([steps[i][j] for i in members], axis=0)
        centre = centre / max(float(np.linalg.norm(centre)), 1e-12)
        weight = math.exp(-position_decay * j)
        for i in members:
            cos = float(np.dot(steps[i][j], centre))
            cosines.append(cos)
            scores[i].append((weight, (cos + 1.0) / 2.0))
    density = (len(group) / n) ** density_gamma
    rewards = {i: (sum(w * s for w, s in ws) / sum(w for w, _ in ws)) * density if ws else 0.0
               for i, ws in scores.items()}
    info["mean_cosine"] = float(np.mean(cosines)) if cosines else 0.0
    return rewards, info


def mix_weight(progress: float, *, start: float = 0.3, top: float = 0.7,
               warmup: bool = True) -> float:
    """The step reward's share at training progress in [0, 1]: 0 before ``start``, then
    rising linearly to ``top`` at the end (without warm-up: ``top`` throughout)."""
    if not warmup:
        return top
    if progress < start:
        return 0.0
    return top * min((progress - start) / (1.0 - start), 1.0)
