"""The recipe contract: what a recipe gives the driver, and the types both share.

A recipe is a class built as ``Recipe(cfg)`` (pipelines/registry.py says
how it is named and configured). Its members:

    roles: tuple[str, ...]                 every role it runs engines for      required
    phases(iteration) -> list[phase]       the phases of one iteration, in order  required
    Settings, section                      its settings dataclass and their config section
                                           (read by pipelines/registry.py when the config loads)
    eval_role: str                         the role ``coevolve eval`` evaluates  default: its only role
    benchmarks: tuple[str, ...]            the eval tasks it names             default: ()
    warm_start_examples(count, seed, cfg)  examples of ``model.warm_start.data: recipe``
    close()                                when the run ends (helper processes)

A phase is one training run of ``steps`` generation steps on one ``role``, of one
of three kinds; every phase has ``name`` (its folder and metric namespace),
``role`` and ``steps`` (which ``prepare`` may lower, e.g. to 0 when no data
survived the filters):

    RL phase (the default)
        requests(step, rng) -> list[Request]            the step's prompts, n samples each
        score(requests, completions, ctx) -> Scores      one reward per completion
    multi-policy phase (``policies`` set: LoRA adapters on one backbone, each trained
    as a policy of its own: optimizer, estimator state, KL coefficient, version)
        rollout(step, rng, ctx) -> list[Rollout]         samples with ctx.pool(adapter=...)
    SFT phase (``objective = "sft"``; no engines, pipelines/runtime/sft.py)
        batch_examples(step, seed_path) -> list[SFTExample]

and may define, for any kind:

    uses: tuple[str, ...]        roles whose engines score its samples (judges)
    data_roles: tuple[str, ...]  roles whose engines ``prepare`` samples from to make the
                                 data; when the phase's own layout lacks one, the data is
                                 made under the top-level layout first
    mini_batches: int            updates per generation step (default:
                                 algorithm.mini_batches), e.g. MM-Zero's per-role batches
    from_base: bool              start from the run's base model (or warm start), not the
                                 role's newest weights (R3V: each iteration from the base)
    prepare(ctx) -> dict         once before the first step (also on resume): build or
                                 reload the data; the figures are logged as data/*
    after_step(step, ctx) -> dict  after each step, its weights synced to the engines; the
                                 figures join the step's metrics (MAYE's evaluation)
    finish(ctx) -> None          after the phase exported hf/, before its DONE marker

A request carries what its scorer needs in ``Request.meta`` (never sent to an
engine). ``rng`` is a pure function of (seed, iteration, phase, step), so a resumed run
makes the same requests as an uninterrupted one. ``ctx`` is a ``PhaseContext``
(below): the phase's folders and seeds, ``ctx.pool`` (its own engines),
``ctx.pool_for(role)`` (another role's: MM-Zero judges proposals with the Solver),
``ctx.serve(role, weights)``, ``ctx.embed(texts)``.

The driver reads a recipe and its phases only through ``recipe_spec`` and
``phase_spec`` below, which check the required members once, when the recipe is
built, and fail with one line naming what is missing.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from pathlib import Path

    import numpy as np

    from actors.sampling import Completion, Request


class ContractError(TypeError):
    """A recipe or phase lacks a member the contract requires, or has one of the wrong kind."""


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


class RLPhase(Protocol):
    name: str
    role: str
    steps: int

    def requests(self, step: int, rng: np.random.Generator) -> list[Request]: ...

    def score(self, requests: list[Request], completions: list[list[Completion]],
              ctx: Any) -> Scores: ...


class MultiPolicyPhase(Protocol):
    name: str
    role: str
    steps: int
    policies: tuple[str, ...]

    def rollout(self, step: int, rng: np.random.Generator, ctx: Any) -> list[Rollout]: ...


class SFTPhase(Protocol):
    name: str
    role: str
    steps: int
    objective: str  # "sft"

    def batch_examples(self, step: int, seed_path: tuple[int, ...]) -> list: ...

    # optional: ``held_out(step) -> list``, examples scored (not trained on) after ``step``


Phase = RLPhase | MultiPolicyPhase | SFTPhase  # a phase of any kind


class PhaseContext(Protocol):
    """What a phase's ``score``, ``rollout`` and hooks get as ``ctx``: where the phase
    lives, its seeds, and the engines it may sample from; not the runner itself."""

    dir: Path  # the phase's folder: iter_NNNN/<phase>/
    run_dir: Path  # the run's folder
    iteration: int
    seed_path: tuple[int, ...]  # (run.seed, iteration, phase index): seeds of its own draws
    start_weights: str  # what the phase trains from
    version: int  # the weight version its engines serve now
    pool: Any  # the engines of its own role (None in an SFT phase)

    def pool_for(self, role: str) -> Any:
        """The engines of ``role`` serving its newest weights (judges, data makers)."""

    def serve(self, role: str, weights: str) -> Any:
        """The engines of ``role`` serving ``weights`` (started or restarted on them)."""

    def embed(self, texts: list[str], max_tokens: int) -> Any:
        """[len(texts), hidden]: each text's mean input embedding of its first
        ``max_tokens`` tokens under the trained model, L2-normalised."""


class Recipe(Protocol):
    roles: tuple[str, ...]

    def phases(self, iteration: int) -> list[Phase]: ...


# kind -> the methods a phase of that kind must have
KIND_METHODS = {"rl": ("requests", "score"), "policies": ("rollout",),
                "sft": ("batch_examples",)}


@dataclass(frozen=True)
class PhaseSpec:
    """What the driver knows of a phase besides its steps: the contract's optional
    members with their defaults filled in, hooks bound (None where not defined)."""

    name: str
    role: str
    kind: str  # "rl", "policies" (multi-policy) or "sft"
    uses: tuple[str, ...] = ()
    data_roles: tuple[str, ...] = ()
    mini_batches: int | None = None
    from_base: bool = False
    policies: tuple[str, ...] = ()
    prepare: Callable[[Any], dict | None] | None = None
    after_step: Callable[[int, Any], dict | None] | None = None
    finish: Callable[[Any], None] | None = None

    @property
    def sft(self) -> bool:
        return self.kind == "sft"

    @property
    def samples(self) -> bool:
        """The phase samples from its role's engines (every kind but SFT)."""
        return self.kind != "sft"


@dataclass(frozen=True)
class RecipeSpec:
    roles: tuple[str, ...]
    eval_role: str | None  # None: several roles and none named
    benchmarks: tuple[str, ...] = ()
    warm_start_examples: Callable | None = None
    close: Callable[[], None] | None = None


def _members(obj: object, what: str, required: tuple[str, ...],
             optional: dict[str, Any]) -> dict[str, Any]:
    """``obj``'s required members (ContractError naming the missing ones) and its
    optional ones, each defaulted: the one place the contract's members are read."""
    missing = [m for m in required if not hasattr(obj, m)]
    if missing:
        raise ContractError(f"{what} lacks {', '.join(missing)} (the recipe contract: "
                            "pipelines/contract.py, docs/recipes.md)")
    return {m: getattr(obj, m) for m in required} | {
        m: getattr(obj, m, default) for m, default in optional.items()}


def phase_spec(phase: object) -> PhaseSpec:
    """The contract's view of ``phase``; ContractError, in one line, if it is incomplete."""
    first = _members(phase, "a phase", (), {"name": type(phase).__name__, "objective": "rl",
                                            "policies": ()})
    if first["objective"] not in ("rl", "sft"):
        raise ContractError(f"phase {first['name']!r}: objective must be 'rl' or 'sft', "
                            f"not {first['objective']!r}")
    kind = "sft" if first["objective"] == "sft" else "policies" if first["policies"] else "rl"
    label = f"phase {first['name']!r} ({kind})"
    m = _members(phase, label, ("name", "role", "steps", *KIND_METHODS[kind]),
                 {"uses": (), "data_roles": (), "mini_batches": None, "from_base": False,
                  "prepare": None, "after_step": None, "finish": None})
    for hook in ("prepare", "after_step", "finish", *KIND_METHODS[kind]):
        if m[hook] is not None and not callable(m[hook]):
            raise ContractError(f"{label}: {hook} must be a method")
    return PhaseSpec(name=m["name"], role=m["role"], kind=kind, uses=tuple(m["uses"]),
                     data_roles=tuple(m["data_roles"]), mini_batches=m["mini_batches"],
                     from_base=bool(m["from_base"]), policies=tuple(first["policies"]),
                     prepare=m["prepare"], after_step=m["after_step"], finish=m["finish"])


def recipe_spec(recipe: object) -> RecipeSpec:
    """The contract's view of ``recipe``; ContractError, in one line, if it is incomplete."""
    m = _members(recipe, f"recipe {type(recipe).__name__}", ("roles", "phases"),
                 {"eval_role": None, "benchmarks": (), "warm_start_examples": None,
                  "close": None})
    roles = tuple(m["roles"])
    if not roles or not all(isinstance(r, str) for r in roles):
        raise ContractError(f"recipe {type(recipe).__name__}: roles must be a non-empty "
                            f"tuple of names, not {m['roles']!r}")
    return RecipeSpec(roles=roles,
                      eval_role=m["eval_role"] or (roles[0] if len(roles) == 1 else None),
                      benchmarks=tuple(m["benchmarks"]),
                      warm_start_examples=m["warm_start_examples"], close=m["close"])


def check_recipe(recipe: object, iterations: int = 1) -> RecipeSpec:
    """``recipe_spec`` and ``phase_spec`` of every phase of the first ``iterations``
    iterations: what the driver runs, checked before any work starts."""
    spec = recipe_spec(recipe)
    for iteration in range(1, iterations + 1):
        for phase in recipe.phases(iteration):
            p = phase_spec(phase)
            unknown = sorted({p.role, *p.uses, *p.data_roles} - set(spec.roles))
            if unknown:
                raise ContractError(f"phase {p.name!r} names roles the recipe does not run "
                                    f"({', '.join(unknown)}); its roles: "
                                    f"{', '.join(spec.roles)}")
    return spec
