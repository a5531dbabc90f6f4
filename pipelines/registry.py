"""The recipe registry: the built-in recipes by name, and loading the recipe a config
names (``run.recipe``: a built-in name or ``package.module:Class``).

Below the runtime and the config loader, which build recipes through it; the
recipes themselves (pipelines/recipes/) are imported only when built. A
built-in recipe registers its class and settings here by path, so loading a
config imports only the settings module, not the recipe's code.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from pipelines.contract import Recipe, check_recipe, recipe_spec

# name -> (recipe class, settings dataclass), as module:attribute
BUILTIN_RECIPES = {
    "simple": ("pipelines.recipes.simple.recipe:SimpleRecipe",
               "pipelines.recipes.simple.config:SimpleConfig"),
    "mmzero": ("pipelines.recipes.mmzero.recipe:MMZeroRecipe",
               "pipelines.recipes.mmzero.config:MMZeroConfig"),
    "evolmm": ("pipelines.recipes.evolmm.recipe:EvoLMMRecipe",
               "pipelines.recipes.evolmm.config:EvoLMMConfig"),
    "ireasoner": ("pipelines.recipes.ireasoner.recipe:IReasonerRecipe",
                  "pipelines.recipes.ireasoner.config:IReasonerConfig"),
    "r3v": ("pipelines.recipes.r3v.recipe:R3VRecipe",
            "pipelines.recipes.r3v.config:R3VConfig"),
    "maye": ("pipelines.recipes.maye.recipe:MayeRecipe",
             "pipelines.recipes.maye.config:MayeConfig"),
}


@dataclass(frozen=True)
class RecipeRef:
    name: str                  # as written in run.recipe
    recipe: str                # module:Class
    section: str | None        # the config's top-level key of its settings
    settings: type | None      # the settings dataclass


def load_reference(ref: str, what: str, example: str) -> object:
    """The object ``package.module:attribute`` names; ValueError saying what is wrong."""
    module_name, sep, attr = ref.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"{what} {ref!r}: expected module:attribute, {example}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"{what} {ref!r}: cannot import {module_name}: {err}") from None
    obj = getattr(module, attr, None)
    if obj is None:
        raise ValueError(f"{what} {ref!r}: {module_name} has no {attr!r}")
    return obj


def _load(ref: str, what: str):
    return load_reference(ref, what, f"a built-in name ({', '.join(BUILTIN_RECIPES)}) or "
                                     "package.module:Class")


def resolve_recipe(name: str) -> RecipeRef:
    """The recipe ``run.recipe`` names; ValueError saying what is wrong."""
    if name in BUILTIN_RECIPES:
        recipe, settings = BUILTIN_RECIPES[name]
        return RecipeRef(name, recipe, name, _load(settings, "recipe settings"))
    if ":" not in name:
        raise ValueError(f"unknown recipe {name!r}; built-in: {', '.join(BUILTIN_RECIPES)}, "
                         "or package.module:Class for your own")
    cls = _load(name, "recipe")
    if not isinstance(cls, type) or not hasattr(cls, "phases"):
        raise ValueError(f"recipe {name!r} is not a recipe class (it needs phases(iteration))")
    settings = getattr(cls, "Settings", None)
    section = getattr(cls, "section", None) or (cls.__name__.lower() if settings else None)
    if section in BUILTIN_RECIPES or section in _CORE_SECTIONS:
        raise ValueError(f"recipe {name!r}: section {section!r} is taken; set {cls.__name__}.section")
    return RecipeRef(name, name, section, settings)


_CORE_SECTIONS = ("run", "model", "generator", "trainer", "algorithm", "placement", "logging")


def build_recipe(cfg) -> Recipe:
    """The recipe ``cfg.run.recipe`` names (a built-in one or ``package.module:Class``),
    its contract checked (pipelines/contract.py): a missing member fails in one line
    before any work."""
    ref = resolve_recipe(cfg.run.recipe)
    recipe = _load(ref.recipe, "recipe")(cfg)
    check_recipe(recipe)
    return recipe


def eval_role(recipe: Recipe) -> str | None:
    """The role ``coevolve eval`` evaluates after every iteration: the recipe's
    ``eval_role``, else its only role; None when it trains several and names none."""
    return recipe_spec(recipe).eval_role
