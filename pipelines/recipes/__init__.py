"""Recipes: one folder per seed system (settings, prompts, rewards, phases).

A recipe is a class built as ``Recipe(cfg)`` with ``roles`` and ``phases(iteration)``
(the contract: pipelines/contract.py, docs/recipes.md). It plugs in by name: ``run.recipe`` is a
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

Built-in recipes register their class and settings in pipelines/registry.py by
path, so loading a config imports only the settings module, not the recipe's code.
"""

from pipelines.registry import (
    BUILTIN_RECIPES,
    RecipeRef,
    build_recipe,
    load_reference,
    resolve_recipe,
)

__all__ = ["BUILTIN_RECIPES", "RecipeRef", "build_recipe", "load_reference", "resolve_recipe"]
