"""The `simple` recipe: GRPO on your prompts with your reward function.

Data flow: one phase per iteration, training role "policy". Each step takes
``prompts_per_step`` questions (cycled from ``simple.prompts``, each with a
bar chart drawn locally when ``simple.images``), samples ``n`` answers from
the policy engines (weights of the previous step), scores every answer with
``simple.reward`` and trains on the group-normalised rewards.

With ``simple.data`` (a labeled set, pipelines/recipes/labeled.py) the questions
and their images come from the set's items instead, in the set's order.

A reward function is any importable ``fn(sample) -> float`` where ``sample``
is a dict with ``prompt`` (the question), ``response`` (the decoded answer),
``token_ids`` (the answer's token ids), ``prompt_index`` and ``answer`` (the
item's reference answer with ``simple.data``, else None). Name it in the
config as ``simple.reward: mypackage.rewards:my_reward``.
"""

from __future__ import annotations

import io
import math

import numpy as np

from actors.sampling import Completion, Request, Sampling
from pipelines.algorithms.grading import grade
from pipelines.recipes.base import Scores, load_function


def answer_length_reward(sample: dict) -> float:
    """A default that needs no labels: prefer answers of about 20 tokens."""
    return math.exp(-((len(sample["token_ids"]) - 20) / 10.0) ** 2)


def correct_answer(sample: dict) -> float:
    """1 if the response's final answer (last \\boxed{}, else <answer>, else its last
    line) grades equal to the item's answer (needs ``simple.data``), else 0."""
    from pipelines.algorithms.answers import extract_answer
    from pipelines.eval.tasks import last_line

    if sample.get("answer") is None:
        raise ValueError("correct_answer needs labeled data: set simple.data")
    pred = extract_answer(sample["response"], fallback=last_line)
    return 1.0 if pred is not None and grade(pred, sample["answer"]) else 0.0


def draw_chart(seed: int) -> bytes:
    """A bar chart with 2-5 bars; deterministic in the seed."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    image = Image.new("RGB", (224, 168), "white")
    draw = ImageDraw.Draw(image)
    bars = int(rng.integers(2, 6))
    for i in range(bars):
        height = int(rng.integers(20, 140))
        x = 16 + i * 200 // bars
        colour = tuple(int(c) for c in rng.integers(0, 200, size=3))
        draw.rectangle([x, 160 - height, x + 200 // bars - 12, 160], fill=colour)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


class SimplePhase:
    role = "policy"

    def __init__(self, cfg):
        self.cfg = cfg.simple
        self.name = "policy"
        self.steps = self.cfg.steps
        self.temperature = cfg.generator.temperature
        self.top_p = cfg.generator.top_p
        self._reward_fn = None
        self._items = None

    @property
    def reward_fn(self):
        """The user's reward, imported on first use (a plan needs no user package)."""
        if self._reward_fn is None:
            self._reward_fn = load_function(self.cfg.reward)
        return self._reward_fn

    @property
    def items(self) -> list:
        """``simple.data``'s items, read on first use (a plan reads no data)."""
        if self._items is None:
            from pipelines.recipes.labeled import load_items, usable

            self._items, _ = usable(load_items(self.cfg.data, "train"), "simple.data")
        return self._items

    def _sampling(self, rng) -> Sampling:
        return Sampling(n=self.cfg.n, temperature=self.temperature, top_p=self.top_p,
                        max_tokens=self.cfg.max_tokens, seed=int(rng.integers(1 << 31)))

    def requests(self, step: int, rng: np.random.Generator) -> list[Request]:
        if self.cfg.data:
            from pipelines.recipes.labeled import item_messages

            size = self.cfg.prompts_per_step
            chosen = [self.items[(step * size + k) % len(self.items)] for k in range(size)]
            return [Request(item_messages(item, ""), images=item.image_bytes(), meta=item,
                            sampling=self._sampling(rng)) for item in chosen]
        out = []
        for k in range(self.cfg.prompts_per_step):
            index = step * self.cfg.prompts_per_step + k
            question = self.cfg.prompts[index % len(self.cfg.prompts)]
            content = [{"type": "text", "text": question}]
            images = []
            if self.cfg.images:
                content.insert(0, {"type": "image"})
                images = [draw_chart(int(rng.integers(1 << 31)))]
            out.append(Request(messages=[{"role": "user", "content": content}], images=images,
                               sampling=self._sampling(rng)))
        return out

    def score(self, requests: list[Request], completions: list[list[Completion]], ctx) -> Scores:
        rewards = []
        for p, (req, samples) in enumerate(zip(requests, completions)):
            question = req.messages[0]["content"][-1]["text"]
            answer = req.meta.answer if req.meta is not None else None
            rewards.append([float(self.reward_fn({
                "prompt": question, "response": c.text, "token_ids": list(c.token_ids),
                "prompt_index": p, "answer": answer})) for c in samples])
        return Scores(rewards)


class SimpleRecipe:
    roles = ("policy",)

    def __init__(self, cfg):
        self.cfg = cfg

    def phases(self, iteration: int) -> list[SimplePhase]:
        return [SimplePhase(self.cfg)]
