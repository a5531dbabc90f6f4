"""Settings of the MM-Zero recipe (the ``mmzero:`` section of a config)."""

from __future__ import annotations

from dataclasses import dataclass

from pipelines.config import ConfigError, param
from pipelines.config_yaml import show


def _range(value: list[float], name: str) -> None:
    if len(value) != 2 or not 0 <= value[0] <= value[1] <= 1:
        raise ConfigError(
            f"{name}: expected [low, high] with 0 <= low <= high <= 1, got {show(value)}")


@dataclass
class MMZeroConfig:
    """The `mmzero` recipe (MM-Zero, arXiv:2603.09206; docs/mmzero.md); defaults are the
    original's."""

    train_steps: int = param(20, "GRPO steps of each phase (Proposer, CodeGen, Solver).", ge=1)
    max_tokens: int = param(4096, "Response budget of every role (tokens).", ge=1)
    judge_samples: int = param(
        4, "k: SVGs the previous CodeGen writes per proposal to reward the Proposer.", ge=1)
    eval_samples: int = param(
        10, "Solver answers per question when the Solver's data set is made (self-consistency "
            "of the easy and hard questions; the pseudo-label).", ge=2)
    judge_solver_n: int = param(
        8, "Solver answers per question when the Solver judges a Proposer's or a CodeGen's "
           "image (the original's Solver service: 8).", ge=2)
    judge_top_p: float = param(
        1.0, "Nucleus sampling of those judge answers (the original: 1.0, at temperature "
             "solver_temperature).", gt=0, le=1)
    judge_top_k: int = param(40, "Top-k of those judge answers (the original: 40; 0 = off).",
                             ge=0)
    proposer_batch: int = param(18, "Proposer prompts (seed topics) per step.", ge=1)
    proposer_n: int = param(4, "Proposals sampled per prompt (GRPO group).", ge=2)
    proposer_temperature: float = param(1.0, "Proposer sampling temperature.", gt=0)
    proposer_top_p: float = param(0.99, "Proposer nucleus sampling.", gt=0, le=1)
    proposer_mini_batches: int = param(
        1, "Proposer updates per generation step: the step's prompts split into this many "
           "PPO mini-batches (the original's rollout batch / global batch).", ge=1)
    codegen_batch: int = param(64, "Proposals per CodeGen step.", ge=1)
    codegen_n: int = param(4, "SVGs sampled per proposal (GRPO group).", ge=2)
    codegen_temperature: float = param(0.7, "CodeGen sampling temperature.", gt=0)
    codegen_top_p: float = param(0.95, "CodeGen nucleus sampling.", gt=0, le=1)
    codegen_mini_batches: int = param(
        1, "CodeGen updates per generation step: the step's prompts split into this many "
           "PPO mini-batches (the original's rollout batch / global batch).", ge=1)
    codegen_proposals: int = param(
        1280, "Proposals the new Proposer writes for the CodeGen data set.", ge=1)
    codegen_filter_samples: int = param(
        4, "SVGs the current CodeGen writes per proposal for the render-rate filter.", ge=1)
    codegen_render_rate: list[float] = param(
        [0.25, 0.75], "Keep proposals whose render success rate is in [low, high].")
    solver_batch: int = param(64, "Items per Solver step.", ge=1)
    solver_n: int = param(8, "Answers sampled per item (GRPO group).", ge=2)
    solver_temperature: float = param(1.0, "Solver sampling temperature (also for evaluation).", gt=0)
    solver_top_p: float = param(0.99, "Solver nucleus sampling.", gt=0, le=1)
    solver_mini_batches: int = param(
        1, "Solver updates per generation step: the step's prompts split into this many "
           "PPO mini-batches (the original's rollout batch / global batch).", ge=1)
    solver_proposals: int = param(
        5000, "Proposals the new Proposer writes for the Solver data set.", ge=1)
    solver_easy_min: float = param(
        0.5, "Keep items whose easy-question self-consistency is at least this.", ge=0, le=1)
    solver_hard_range: list[float] = param(
        [0.25, 0.75], "Keep items whose hard-question self-consistency is in [low, high].")
    batch_floor: int = param(
        16, "A filtered data set smaller than the batch clamps the batch to the largest power "
            "of two <= its size, but not below this.", ge=1)
    bootstrap: int = param(
        0, "Fill a CodeGen or Solver data set that has fewer items than this with built-in "
           "example items (0 = off, the original's behaviour; for tiny random models that "
           "write nothing usable).", ge=0)
    render_seconds: float = param(30.0, "Wall-clock limit of one SVG render.", gt=0)
    render_grace_s: float = param(
        180.0, "Once a render batch may stop early (70% rendered or 90% finished), the "
               "unfinished renders get this long before they are cancelled (the original's "
               "180 s).", ge=0)
    render_workers: int = param(0, "SVG render processes (0 = one per CPU this process may use, a container's "
        "CPU quota and memory limit included).", ge=0)
    image_side: int = param(1280, "Rendered images are downscaled to at most this side.", ge=16)
    samples_saved: int = param(16, "Rendered items saved per phase for a person to look at.", ge=0)
    heldout: int = param(
        24, "Figures in the held-out Solver set (drawn, with known answers; two questions "
            "each), scored before and after every Solver phase at the original's validation "
            "sampling (T 0.6, top_p 0.95, one answer); in coevo.json and the plot. 0 = off.",
        ge=0)

    def check(self) -> None:
        _range(self.codegen_render_rate, "codegen_render_rate")
        _range(self.solver_hard_range, "solver_hard_range")
