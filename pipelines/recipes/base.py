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

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import numpy as np

from actors.generator import Completion, Request


@dataclass
class Scores:
    rewards: list[list[float]]  # [request][sample]
    metrics: dict[str, float] = field(default_factory=dict)  # logged under reward/
    columns: dict[str, list[list]] = field(default_factory=dict)  # extra rollout columns [request][sample]


@dataclass
class Rollout:
    """What one step sampled for one policy and how it scored."""

    policy: str | None  # the LoRA adapter trained on it; None: the phase's single policy
    requests: list[Request]
    completions: list[list[Completion]]  # [request][sample]
    scores: Scores
    mini_batches: int | None = None  # updates over it (default: algorithm.mini_batches)

    def refused(self) -> list[str]:
        """Why the engines refused requests of this rollout (one reason per request)."""
        return [group[0].text for group in self.completions if group and group[0].refused]

    def answered(self) -> Rollout:
        """This rollout without the requests the engines refused: nothing to train on."""
        keep = [i for i, group in enumerate(self.completions)
                if not (group and group[0].refused)]
        if len(keep) == len(self.completions):
            return self

        def pick(rows: list) -> list:
            return [rows[i] for i in keep]

        scores = Scores(pick(self.scores.rewards), self.scores.metrics,
                        {k: pick(v) for k, v in self.scores.columns.items()})
        return dataclasses.replace(self, requests=pick(self.requests),
                                   completions=pick(self.completions), scores=scores)


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


# Optional attributes and hooks, looked up with getattr:
#   phase.uses: tuple[str, ...]        roles whose engines score the phase's samples (judges)
#   phase.data_roles: tuple[str, ...]  roles whose engines prepare() samples from to make the
#                                      data; when the phase's own layout lacks one, the data
#                                      is made under the top-level layout first
#   phase.mini_batches: int      updates per generation step of this phase (default:
#                                algorithm.mini_batches), e.g. MM-Zero's per-role update batches
#   phase.prepare(ctx) -> dict   once before the first step (also on resume): build or
#                                reload the phase's data; returned figures are logged as data/*
#   phase.finish(ctx) -> None    after the phase exported hf/, before its DONE marker
#   phase.after_step(step, ctx) -> dict  after each step (its weights synced to the engines);
#                                returned figures join the step's metrics (MAYE's evaluation)
#   phase.from_base = True       the phase starts from the run's base model (or warm start),
#                                not the role's newest weights (R3V: each iteration from base)
#   phase.policies: tuple[str, ...]  LoRA adapters on the role's backbone, each a policy of its
#                                own (optimizer, estimator state, KL coefficient, version);
#                                then rollout(step, rng, ctx) -> list[Rollout] replaces
#                                requests/score (it samples with ctx.pool, adapter=<policy>)
#   phase.objective = "sft"      a supervised phase: batch_examples(step, seed_path) instead of
#                                requests/score, no engines (pipelines/runtime/sft.py)
#   recipe.close() -> None       when the run ends (helper processes)
#   recipe.eval_role: str        the role coevolve eval evaluates per iteration (eval_role())


def load_function(ref: str) -> Callable:
    """``package.module:function`` -> the function, with errors that say what is wrong."""
    from pipelines.recipes import load_reference

    fn = load_reference(ref, "reward function", "e.g. mypackage.rewards:exact_match")
    if not callable(fn):
        raise ValueError(f"reward function {ref!r} is not a function")
    return fn


def build_recipe(cfg) -> Recipe:
    """The recipe ``run.recipe`` names (a built-in one or ``package.module:Class``)."""
    from pipelines.recipes import build_recipe as build

    return build(cfg)


def eval_role(recipe: Recipe) -> str | None:
    """The role ``coevolve eval`` evaluates after every iteration: the recipe's
    ``eval_role``, else its only role; None when it trains several and names none."""
    named = getattr(recipe, "eval_role", None)
    return named or (recipe.roles[0] if len(recipe.roles) == 1 else None)


def check_layouts(cfg, recipe: Recipe) -> None:
    """Refuse a placement that leaves a phase without engines it needs, before any work.

    A phase's own layout must serve its role and the roles that score it
    (``uses``); the roles it makes data with (``data_roles``) must be in its own
    layout or in the top-level one, where the driver then makes the data first.
    """
    from pipelines.config import ConfigError
    from pipelines.runtime.placement import resolve_layout

    def serving(phase: str | None) -> set[str]:
        layout = resolve_layout(cfg.placement, phase, recipe.roles)
        return {role for role, r in layout.roles.items() if r.engines > 0}

    top = serving(None)
    for phase in recipe.phases(1):
        own = serving(phase.name)
        where = f"placement.phases.{phase.name}" if phase.name in cfg.placement.phases \
            else "placement"
        samples = getattr(phase, "objective", "rl") != "sft"  # an SFT phase samples nothing
        missing = sorted({*([phase.role] if samples else []), *getattr(phase, "uses", ())} - own)
        if missing:
            raise ConfigError(f"{where}: phase {phase.name} trains {phase.role} and is scored "
                              f"with {', '.join(getattr(phase, 'uses', ())) or 'no other role'}, "
                              f"but its layout has no engines for {', '.join(missing)}")
        data = set(getattr(phase, "data_roles", ()))
        if not (data <= own or data <= top):  # the data is made under one layout or the other
            raise ConfigError(f"placement: phase {phase.name} makes its data with "
                              f"{', '.join(sorted(data))} under one layout, but its own lacks "
                              f"{', '.join(sorted(data - own))} and the top-level one lacks "
                              f"{', '.join(sorted(data - top))}")
