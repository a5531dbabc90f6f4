"""What a recipe gives the driver: its phases, and per phase how to make
requests, score completions and name the role it trains.

The driver owns everything else (engines, trainer, weights, checkpoints,
metrics). A phase is one GRPO run of ``steps`` optimizer steps on one role:

    phase.requests(step, rng) -> list[Request]       prompts of this step (n samples each)
    phase.score(requests, completions, ctx) -> Scores  one reward per completion

``rng`` is a pure function of (seed, iteration, phase, step), so a resumed
run makes the same requests as an uninterrupted one. ``ctx`` (the phase
runner) lets a scorer sample from other roles' engines with
``ctx.other_pool(role)`` (MM-Zero judges proposals with the Solver).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import numpy as np

from actors.generator import Completion, Request


@dataclass
class Scores:
    rewards: list[list[float]]  # [request][sample]
    metrics: dict[str, float] = field(default_factory=dict)  # logged under reward/
    columns: dict[str, list[list]] = field(default_factory=dict)  # extra rollout columns [request][sample]


class Phase(Protocol):
    name: str  # folder and metric namespace, e.g. "solver"
    role: str  # the role whose weights this phase trains
    steps: int  # may be lowered by prepare(), e.g. to 0 when no data survived the filters

    def requests(self, step: int, rng: np.random.Generator) -> list[Request]: ...

    def score(self, requests: list[Request], completions: list[list[Completion]],
              ctx: Any) -> Scores: ...


class Recipe(Protocol):
    roles: tuple[str, ...]  # every role the recipe runs engines for

    def phases(self, iteration: int) -> list[Phase]: ...


# Optional hooks, looked up with getattr:
#   phase.prepare(ctx) -> dict   once before the first step (also on resume): build or
#                                reload the phase's data; returned figures are logged as data/*
#   phase.finish(ctx) -> None    after the phase exported hf/, before its DONE marker
#   recipe.close() -> None       when the run ends (helper processes)


def load_function(ref: str) -> Callable:
    """``package.module:function`` -> the function, with errors that say what is wrong."""
    module_name, sep, attr = ref.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"reward function {ref!r}: expected module:function, "
                         "e.g. mypackage.rewards:exact_match")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"reward function {ref!r}: cannot import {module_name}: {err}") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ValueError(f"reward function {ref!r}: {module_name} has no function {attr!r}")
    return fn


def build_recipe(cfg) -> Recipe:
    if cfg.run.recipe == "simple":
        from pipelines.simple import SimpleRecipe

        return SimpleRecipe(cfg)
    if cfg.run.recipe == "mmzero":
        from pipelines.mmzero.recipe import MMZeroRecipe

        return MMZeroRecipe(cfg)
    raise ValueError(f"run.recipe: unknown recipe {cfg.run.recipe!r}")
