"""Recipes: one folder per seed system (settings, prompts, rewards, phases).

A recipe is a class built as ``Recipe(cfg)`` with ``roles`` and ``phases(iteration)``
(the interface is in ``base.py``). It plugs in by name: ``run.recipe`` is a
built-in name below or ``package.module:Class`` for a recipe of your own. Its
settings are a dataclass of ``param`` fields, the class attribute ``Settings``
(None: no settings), read from the config's top-level section ``section``
(default: the built-in name, or the class name in lower case) and available
as ``cfg.<section>``; the loader checks them field by field like the core's.

    class MyRecipe:
        section = "mine"
        Settings = MySettings          # @dataclass with param(...) fields
        roles = ("policy",)
        def __init__(self, cfg): ...   # cfg.mine is a MySettings
        def phases(self, iteration): ...

Built-in recipes register their class and settings here by path, so loading a
config imports only the settings module, not the recipe's code.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

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


def build_recipe(cfg):
    """The recipe object of ``cfg.run.recipe``."""
    ref = resolve_recipe(cfg.run.recipe)
    return _load(ref.recipe, "recipe")(cfg)
