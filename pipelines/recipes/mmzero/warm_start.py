"""A built-in warm start for MM-Zero on tiny models: the three formats, drawn procedurally.

A random tiny model writes no parsable proposal, no SVG and no boxed answer, so
every reward group of a faithful MM-Zero iteration is constant and nothing
learns. The original starts from Qwen2.5-VL/Qwen3-VL, which already write all
three formats; ``model.warm_start.data: recipe`` gives a tiny model that starting
point with a short SFT (pipelines/runtime/warm_start.py) on examples of:

- the Proposer format: the six tagged fields about a simple figure (a row of
  shapes, a bar chart, a small table), for each seed topic;
- the CodeGen format: the SVG of that figure in an ```svg fence, for the
  CodeGen prompt of the proposal;
- the Solver format: ``<think>...</think> \\boxed{...}`` answers to the two
  questions, with the rendered figure as the image.

Everything is a pure function of a seed. The figures are small on purpose: a
six-field proposal and its SVG fit the tiny presets' token budgets. The same
generator makes the held-out Solver set (``heldout_figures``: questions about
rendered figures with known answers) that the Solver phase scores before and after
training (``mmzero.heldout``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipelines.recipes.mmzero.prompts import codegen_messages, proposer_messages, solver_messages
from pipelines.recipes.mmzero.rewards import SEED_TOPICS, Proposal
from pipelines.runtime.sft import SFTExample

COLOURS = ("red", "blue", "green", "black", "orange", "purple")
SHAPES = ("circle", "square")
LABELS = "ABCD"
# Which figure each seed topic asks for (the Proposer learns to follow the topic).
_TOPIC_KINDS = {
    "chart and graph understanding": ("bars",),
    "statistical and trend analysis": ("bars", "table"),
    "mathematical and quantitative reasoning": ("bars", "table", "shapes"),
    "spatial and geometric reasoning": ("shapes",),
    "logical and abstract reasoning": ("table", "shapes"),
    "diagram and structural comprehension": ("shapes", "bars"),
    "visual text recognition and OCR": ("table",),
    "basic shape and object perception": ("shapes",),
}
assert set(_TOPIC_KINDS) == set(SEED_TOPICS)


@dataclass(frozen=True)
class Figure:
    """One drawable figure: its proposal (six fields) and its SVG."""

    proposal: Proposal
    svg: str

    def proposal_text(self) -> str:
        p = self.proposal
        return (f"<content_type>{p.content_type}</content_type>\n<caption>{p.caption}</caption>\n"
                f"<easy_question>{p.easy_question}</easy_question>\n"
                f"<easy_answer>{p.easy_answer}</easy_answer>\n"
                f"<hard_question>{p.hard_question}</hard_question>\n"
                f"<hard_answer>{p.hard_answer}</hard_answer>")

    def svg_text(self) -> str:
        return f"```svg\n{self.svg}\n```"


def _svg(width: int, height: int, body: list[str]) -> str:
    return "\n".join([f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}">',
                      f'<rect width="{width}" height="{height}" fill="white"/>', *body, "</svg>"])


def shapes(n: int, shape: str, colour: str) -> Figure:
    """A row of ``n`` equal shapes of one colour: what colour, how many."""
    body = []
    for i in range(n):
        x = 30 + 40 * i
        body.append(f'<circle cx="{x}" cy="50" r="15" fill="{colour}"/>' if shape == "circle"
                    else f'<rect x="{x - 15}" y="35" width="30" height="30" fill="{colour}"/>')
    proposal = Proposal(
        content_type="geometry", type_inferred=False,
        caption=f"A row of {n} {colour} {shape}s on a white background.",
        easy_question=f"What colour are the {shape}s?", easy_answer=colour,
        hard_question=f"How many {shape}s are there?", hard_answer=str(n))
    return Figure(proposal, _svg(40 * n + 20, 100, body))


def bars(values: list[int], colour: str) -> Figure:
    """Labelled bars ("A 4" under each): read one, add them up."""
    body, parts = [], []
    for i, v in enumerate(values):
        x, label = 20 + 50 * i, f"{LABELS[i]} {v}"
        body.append(f'<rect x="{x}" y="{110 - 10 * v}" width="30" height="{10 * v}" '
                    f'fill="{colour}"/>')
        body.append(f'<text x="{x}" y="128" font-size="14">{label}</text>')
        parts.append(label)
    pick = LABELS[len(values) - 1]
    proposal = Proposal(
        content_type="data_chart", type_inferred=False,
        caption=f"A bar chart with {colour} bars: {', '.join(parts)}.",
        easy_question=f"What is the value of bar {pick}?", easy_answer=str(values[-1]),
        hard_question="What is the sum of all bars?", hard_answer=str(sum(values)))
    return Figure(proposal, _svg(50 * len(values) + 20, 140, body))


def table(values: list[int]) -> Figure:
    """Rows of a label and a number: read one, find the largest."""
    body, parts = [], []
    for i, v in enumerate(values):
        y, label = 30 + 25 * i, LABELS[i]
        body.append(f'<text x="20" y="{y}" font-size="16">{label} {v}</text>')
        parts.append(f"{label} {v}")
    largest = LABELS[int(np.argmax(values))]
    proposal = Proposal(
        content_type="table", type_inferred=False,
        caption=f"A table of {len(values)} rows: {', '.join(parts)}.",
        easy_question="What is the value of A?", easy_answer=str(values[0]),
        hard_question="Which row has the largest value?", hard_answer=largest)
    return Figure(proposal, _svg(100, 25 * len(values) + 20, body))


def figure(kind: str, rng: np.random.Generator) -> Figure:
    """A random figure of ``kind`` (shapes, bars or table)."""
    if kind == "shapes":
        return shapes(int(rng.integers(2, 5)), SHAPES[rng.integers(len(SHAPES))],
                      COLOURS[rng.integers(len(COLOURS))])
    n = int(rng.integers(2, 4))
    if kind == "bars":
        return bars([int(v) for v in rng.integers(1, 10, n)], COLOURS[rng.integers(len(COLOURS))])
    if kind == "table":
        values = rng.choice(np.arange(1, 20), size=n, replace=False)  # one largest value
        return table([int(v) for v in values])
    raise ValueError(f"unknown figure kind {kind!r}; choose shapes, bars or table")


def topic_figure(topic: str, rng: np.random.Generator) -> Figure:
    kinds = _TOPIC_KINDS[topic]
    return figure(kinds[rng.integers(len(kinds))], rng)


def solver_target(answer: str, hint: str) -> str:
    return f"<think>{hint}</think> \\boxed{{{answer}}}"


def warm_figures(count: int, seed: int) -> list[tuple[str, Figure]]:
    """(topic, figure) behind ``sft_examples(count, seed, ...)``."""
    rng = np.random.default_rng([seed, 1])
    out = []
    for i in range(-(-count // 4)):
        topic = SEED_TOPICS[i % len(SEED_TOPICS)]
        out.append((topic, topic_figure(topic, rng)))
    return out


def sft_examples(count: int, seed: int, render) -> list[SFTExample]:
    """``count`` examples, deterministic in ``seed``: per figure one Proposer, one CodeGen
    and two Solver examples (topics cycled). ``render(svgs) -> results`` draws the
    Solver's images as the run does (the recipe's renderer: same size, same pixels)."""
    figures = warm_figures(count, seed)
    renders = render([fig.svg for _, fig in figures])
    out = []
    for (topic, fig), result in zip(figures, renders):
        if not result.ok:
            raise RuntimeError(f"a built-in warm-start figure did not render: {result.failure} "
                               f"{result.detail}")
        p = fig.proposal
        out.append(SFTExample(proposer_messages(topic), fig.proposal_text()))
        out.append(SFTExample(codegen_messages(p), fig.svg_text()))
        out.append(SFTExample(solver_messages(p.easy_question),
                              solver_target(p.easy_answer, "I read it from the image."),
                              [result.png]))
        out.append(SFTExample(solver_messages(p.hard_question),
                              solver_target(p.hard_answer, "I count and compare."),
                              [result.png]))
    return out[:count]


def heldout_figures(count: int, seed: int, exclude: frozenset[str] = frozenset()
                    ) -> list[Figure]:
    """The held-out Solver set: ``count`` figures from another seed stream than the warm
    start's (kinds cycled; both questions of each are asked). A figure whose SVG is in
    ``exclude`` (the warm start's) is drawn again, up to 100 times."""
    rng = np.random.default_rng([seed, 2])
    kinds = ("shapes", "bars", "table")
    out = []
    for i in range(count):
        for _ in range(100):
            fig = figure(kinds[i % len(kinds)], rng)
            if fig.svg not in exclude:
                break
        out.append(fig)
    return out


__all__ = ["Figure", "figure", "heldout_figures", "sft_examples", "warm_figures"]
