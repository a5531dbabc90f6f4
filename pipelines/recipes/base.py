"""Helpers every recipe shares: building the recipe a config names, its evaluated
role, the placement check, loading a reward function.

The contract itself (what a recipe and its phases define, ``Scores``,
``Rollout``) is in pipelines/contract.py; ``Scores`` and ``Rollout`` are
re-exported here for recipes written against this module.
"""

from __future__ import annotations

from collections.abc import Callable

from pipelines.contract import (
    Recipe,
    Rollout,
    Scores,
    check_recipe,
    phase_spec,
    recipe_spec,
)

__all__ = ["Rollout", "Scores", "build_recipe", "check_layouts", "eval_role", "load_function"]


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

    recipe = build(cfg)
    check_recipe(recipe)  # one line naming a missing member, before any work
    return recipe


def eval_role(recipe: Recipe) -> str | None:
    """The role ``coevolve eval`` evaluates after every iteration: the recipe's
    ``eval_role``, else its only role; None when it trains several and names none."""
    return recipe_spec(recipe).eval_role


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
        spec = phase_spec(phase)
        missing = sorted({*([spec.role] if spec.samples else []), *spec.uses} - own)
        if missing:
            raise ConfigError(f"{where}: phase {spec.name} trains {spec.role} and is scored "
                              f"with {', '.join(spec.uses) or 'no other role'}, "
                              f"but its layout has no engines for {', '.join(missing)}")
        data = set(spec.data_roles)
        if not (data <= own or data <= top):  # the data is made under one layout or the other
            raise ConfigError(f"placement: phase {phase.name} makes its data with "
                              f"{', '.join(sorted(data))} under one layout, but its own lacks "
                              f"{', '.join(sorted(data - own))} and the top-level one lacks "
                              f"{', '.join(sorted(data - top))}")
