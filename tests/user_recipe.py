"""A recipe defined outside coevolve, as a user writes one (tests/test_driver.py runs it
with ``run.recipe=tests.user_recipe:LengthRecipe``)."""

from __future__ import annotations

from dataclasses import dataclass

from actors.generator import Request, Sampling
from pipelines.config import param
from pipelines.recipes.base import Scores


@dataclass
class LengthSettings:
    """Reward answers for having ``target`` tokens."""

    target: int = param(6, "Completion length (tokens) that scores 0; others score -|gap|.", ge=1)
    steps: int = param(2, "Optimizer steps.", ge=1)
    questions: list[str] = param(["Name a colour.", "Count to three."], "Prompts, one per group.")


class LengthPhase:
    name = role = "policy"

    def __init__(self, settings: LengthSettings):
        self.settings, self.steps = settings, settings.steps

    def requests(self, step, rng):
        return [Request([{"role": "user", "content": q}],
                        sampling=Sampling(n=4, max_tokens=12, seed=int(rng.integers(1 << 30))))
                for q in self.settings.questions]

    def score(self, requests, completions, ctx):
        return Scores([[-abs(len(c.token_ids) - self.settings.target) for c in group]
                       for group in completions])


class LengthRecipe:
    section = "length"
    Settings = LengthSettings
    roles = ("policy",)

    def __init__(self, cfg):
        self.cfg = cfg

    def phases(self, iteration):
        return [LengthPhase(self.cfg.length)]
