"""What recipes share: loading a reward function by reference.

The contract (what a recipe and its phases define, ``Scores``, ``Rollout``) is
in pipelines/contract.py, building recipes in pipelines/registry.py; the names
re-exported here keep recipes written against this module working.
"""

from __future__ import annotations

from collections.abc import Callable

from pipelines.contract import Rollout, Scores
from pipelines.registry import load_reference

__all__ = ["Rollout", "Scores", "load_function"]


def load_function(ref: str) -> Callable:
    """``package.module:function`` -> the function, with errors that say what is wrong."""

    fn = load_reference(ref, "reward function", "e.g. mypackage.rewards:exact_match")
    if not callable(fn):
        raise ValueError(f"reward function {ref!r} is not a function")
    return fn
