"""Questions with hidden answers: what EvoLMM and iReasoner check their majority vote with.

The recipes learn from agreement alone; when an image comes with known answers
(``answers.jsonl`` in the image folder, which the drawn demo figures have) the
answers are never rewarded but tell a user whether the loop converges on the
truth or on its own mistakes (docs/evolmm.md, "Pseudo-labels against hidden answers"):

- ``pseudo_label_accuracy``: how often a question's majority answer (the answer the
  soft and discrete rewards favour) equals the hidden one;
- ``sample_accuracy``: how often a single sampled answer does;
- ``known_questions``: over how many of the step's questions (with the Proposer, only
  a proposed question that is one of the image's known questions has an answer).

The held-out set (``evolmm.heldout``) scores the Solver on drawn figures that neither
the warm start nor the demo folder holds: greedy, sampled and majority-vote accuracy.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from actors.sampling import Request, Sampling
from pipelines.recipes.evolmm.rewards import evolmm_normalize, final_answer, majority_answer

HELDOUT_KINDS = ("bars", "table")  # shapes: 36 figures in all, every one in the warm start
HELDOUT_STREAM = 5  # the warm start draws from stream 3, the demo folder from 4


def hidden_answer(question: str, known: Sequence[tuple[str, str]]) -> str | None:
    """The known answer of ``question`` when it is one of ``known``'s questions (case and
    spacing aside), else None."""
    def key(q: str) -> str:
        return " ".join(q.lower().split())

    return next((a for q, a in known if key(q) == key(question)), None)


def pseudo_label_metrics(groups: Sequence[Sequence[str]],
                         hidden: Sequence[str | None]) -> dict[str, float]:
    """Majority-vote and per-sample accuracy of the final answers in ``groups`` (one group
    per question) against ``hidden`` (None: unknown, left out); {} when none is known."""
    pairs = [(group, evolmm_normalize(h)) for group, h in zip(groups, hidden) if h is not None]
    if not pairs:
        return {}
    return {
        "pseudo_label_accuracy": float(np.mean([majority_answer(g) == h for g, h in pairs])),
        "sample_accuracy": float(np.mean([evolmm_normalize(a) == h for g, h in pairs
                                          for a in g])),
        "known_questions": float(len(pairs)),
    }


def heldout_figures(count: int, seed: int, warm_examples: int, demo_images: int) -> list:
    """``count`` drawn figures (bar charts and tables in turn) that are neither among the
    warm start's ``warm_examples`` examples nor the ``demo_images`` demo figures of
    ``seed``, nor twice in the set."""
    from pipelines.recipes.evolmm import warm_start as ws
    from pipelines.recipes.mmzero.warm_start import figure

    seen = {f.svg for f in ws.drawn_figures(math.ceil(warm_examples / ws.PER_FIGURE),
                                             [seed, 3])}
    seen |= {f.svg for f in ws.demo_figures(demo_images, seed)}
    rng = np.random.default_rng([seed, HELDOUT_STREAM])
    figures = []
    while len(figures) < count:
        fig = figure(HELDOUT_KINDS[len(figures) % len(HELDOUT_KINDS)], rng)
        if fig.svg not in seen:
            seen.add(fig.svg)
            figures.append(fig)
    return figures


def heldout_items(count: int, seed: int, warm_examples: int, demo_images: int
                  ) -> list[tuple[bytes, str, str]]:
    """(png, question, answer) for both questions of ``heldout_figures(...)``."""
    from pipelines.recipes.evolmm import warm_start as ws

    figures = heldout_figures(count, seed, warm_examples, demo_images)
    out = []
    for fig, result in zip(figures, ws.render([f.svg for f in figures], ws.SIDE)):
        if not result.ok:
            raise RuntimeError(f"a held-out figure did not render: {result.failure}")
        p = fig.proposal
        out += [(result.png, p.easy_question, p.easy_answer),
                (result.png, p.hard_question, p.hard_answer)]
    return out


def score_heldout(pool, items: Sequence[tuple[bytes, str, str]], prompt: str, settings,
                  seed: int) -> dict[str, float]:
    """The Solver adapter on ``items``: greedy accuracy, the mean accuracy of
    ``heldout_samples`` answers at the run's temperature and top_p, and their majority
    vote's, with fixed seeds so two Solvers are compared on the same draws."""
    from pipelines.recipes.evolmm import prompts

    s = settings
    n = s.heldout_samples
    greedy, sampled = [], []
    for k, (png, question, _) in enumerate(items):
        message = prompts.image_message(prompt.format(question=question))
        greedy.append(Request(message, images=[png], adapter="solver", sampling=Sampling(
            n=1, temperature=0.0, max_tokens=s.max_tokens, seed=seed + k)))
        sampled.append(Request(message, images=[png], adapter="solver", sampling=Sampling(
            n=n, temperature=s.temperature, top_p=s.top_p, max_tokens=s.max_tokens,
            seed=seed + k)))
    done = pool.generate(greedy + sampled)
    answers = [a for _, _, a in items]
    greedy_groups = [[final_answer(group[0].text)] for group in done[:len(items)]]
    groups = [[final_answer(c.text) for c in group] for group in done[len(items):]]
    votes = pseudo_label_metrics(groups, answers)
    return {"greedy": pseudo_label_metrics(greedy_groups, answers)["sample_accuracy"],
            "sampled": votes["sample_accuracy"], "majority": votes["pseudo_label_accuracy"]}
