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


@dataclass
class FactsSettings:
    """Supervised fine-tuning on a fixed set of facts about drawn charts."""

    epochs: int = param(3, "Passes over the facts.", ge=1)
    batch_size: int = param(4, "Examples per optimizer step.", ge=1)


def facts() -> list:
    """Eight fixed examples, half with a drawn chart."""
    from conftest import chart_png

    from pipelines.runtime.sft import SFTExample

    out = []
    for i in range(8):
        question = f"Fact {i}: what is the code word?"
        if i % 2:
            content = [{"type": "image"}, {"type": "text", "text": question}]
            out.append(SFTExample([{"role": "user", "content": content}],
                                  f"The code word is blue {i}.", [chart_png(i)]))
        else:
            out.append(SFTExample([{"role": "user", "content": question}],
                                  f"The code word is red {i}."))
    return out


class FactsRecipe:
    section = "facts"
    Settings = FactsSettings
    roles = ("policy",)

    def __init__(self, cfg):
        self.cfg = cfg

    def phases(self, iteration):
        from pipelines.runtime.sft import SFTPhase

        s = self.cfg.facts
        return [SFTPhase("sft", "policy", facts(), s.batch_size, s.epochs)]


def even_share(token_ids) -> float:
    return sum(1 for t in token_ids if t % 2 == 0) / max(len(token_ids), 1)


class AskAnswerPhase:
    """Two policies on one backbone: "asker" writes a question, "answerer" answers it
    (four samples each); dense rewards: the share of even token ids in the answer, and
    in the question plus the mean of its answers'. The asker trains every second step."""

    name = role = "policy"
    policies = ("answerer", "asker")
    steps = 3

    def rollout(self, step, rng, ctx):
        from pipelines.recipes.base import Rollout

        seed = int(rng.integers(1 << 30))
        ask = [Request([{"role": "user", "content": "Write one question."}],
                       sampling=Sampling(n=4, max_tokens=8, seed=seed), adapter="asker")]
        questions = ctx.pool.generate(ask)
        answer = [Request([{"role": "user", "content": q.text or "?"}],
                          sampling=Sampling(n=4, max_tokens=8, seed=seed + 1 + i),
                          adapter="answerer") for i, q in enumerate(questions[0])]
        answers = ctx.pool.generate(answer)
        shares = [[even_share(a.token_ids) for a in group] for group in answers]
        out = [Rollout("answerer", answer, answers, Scores(shares))]
        if step % 2 == 0:
            out.append(Rollout("asker", ask, questions, Scores([[
                even_share(q.token_ids) + sum(group) / len(group)
                for q, group in zip(questions[0], shares)]])))
        return out


class AskAnswerRecipe:
    roles = ("policy",)

    def __init__(self, cfg):
        self.cfg = cfg

    def phases(self, iteration):
        return [AskAnswerPhase()]


def warm_examples(count: int, seed: int, cfg) -> list:
    """``model.warm_start.data=tests.user_recipe:warm_examples``: the facts, cycled from
    ``seed``."""
    items = facts()
    return [items[(seed + i) % len(items)] for i in range(count)]
