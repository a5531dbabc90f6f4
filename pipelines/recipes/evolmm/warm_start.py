"""The built-in warm start of the tiny EvoLMM and iReasoner presets (docs/warm_start.md).

The originals start from Qwen2.5-VL-7B-Instruct, which writes ``<question>`` and
``<answer>`` tags when asked; a random tiny model never does, so every answer is
unparsable, every share the same and every reward constant. This SFT teaches it the
three formats on drawn figures with known answers (MM-Zero's warm-start figures: rows
of shapes, bar charts, tables; pipelines/recipes/mmzero/warm_start.py): per figure one
Proposer example (a question about it) and, for its easy and its hard question, one
Solver example in EvoLMM's format and one in iReasoner's numbered-step format. Both
recipes ask for the same examples, so one cached warm start serves both.
"""

from __future__ import annotations

import math

import numpy as np

from pipelines.recipes.evolmm import prompts
from pipelines.recipes.mmzero import warm_start as figures
from pipelines.runtime.sft import SFTExample

PER_FIGURE = 5
KINDS = ("shapes", "bars", "table")
RATIONALE = "It asks what the figure shows, which the image alone answers."
READ, COUNT = "I read it from the image.", "I count and compare."  # the Solver's hints
SIDE = 224  # rendered figures' largest side (the warm start's and the demo folder's)


def proposer_target(question: str) -> str:
    return f"<question>{question}</question>\n<rationale>{RATIONALE}</rationale>"


def solver_target(answer: str, hint: str) -> str:
    """EvoLMM's Solver format: brief thought, only the answer in the tag."""
    return f"<think>{hint}</think>\n<answer>{answer}</answer>"


def steps_target(answer: str, hint: str) -> str:
    """iReasoner's Solver format: numbered steps laid out in <think>, then the answer."""
    return (f"<think>\nStep 1: {hint}\nStep 2: The answer is {answer}.\n</think>\n"
            f"<answer>{answer}</answer>")


def render(svgs: list[str], side: int) -> list:
    """The figures as PNGs at most ``side`` pixels wide and high (the real renderer)."""
    from actors.renderer import PoolConfig, RendererPool
    from actors.svg_checks import RenderLimits

    pool = RendererPool(RenderLimits(max_output_side=side), PoolConfig(num_workers=1))
    try:
        return pool.render_many(svgs, early_stop=False)
    finally:
        pool.close()


def drawn_figures(count: int, stream: list[int]) -> list:
    rng = np.random.default_rng(stream)
    return [figures.figure(KINDS[i % len(KINDS)], rng) for i in range(count)]


def demo_figures(count: int, seed: int) -> list:
    """The figures of the tiny presets' image folder (a stream apart from the warm
    start's: the same kinds, other pictures)."""
    return drawn_figures(count, [seed, 4])


def sft_examples(count: int, seed: int, side: int = SIDE) -> list[SFTExample]:
    """``count`` examples, deterministic in ``seed`` (five per figure, in order)."""
    # a stream of its own (MM-Zero's warm start: 1, its held-out set: 2, the demo: 4)
    drawn = drawn_figures(math.ceil(count / PER_FIGURE), [seed, 3])
    renders = render([fig.svg for fig in drawn], side)
    out = []
    for fig, result in zip(drawn, renders):
        if not result.ok:
            raise RuntimeError(f"a built-in warm-start figure did not render: {result.failure} "
                               f"{result.detail}")
        p, image = fig.proposal, [result.png]
        out.append(SFTExample(prompts.image_message(prompts.PROPOSER),
                              proposer_target(p.easy_question), image))
        for question, answer, hint in ((p.easy_question, p.easy_answer, READ),
                                       (p.hard_question, p.hard_answer, COUNT)):
            out.append(SFTExample(prompts.image_message(prompts.SOLVER.format(question=question)),
                                  solver_target(answer, hint), image))
            out.append(SFTExample(
                prompts.image_message(prompts.SOLVER_STEPS.format(question=question)),
                steps_target(answer, hint), image))
    return out[:count]
