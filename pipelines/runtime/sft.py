"""Supervised fine-tuning phases: a data set of (messages + images -> target) examples.

A phase trains with the SFT objective (the masked negative log-likelihood of the
target tokens, docs/algorithms.md) when it says ``objective = "sft"`` and gives
``batch_examples(step, seed_path) -> list[SFTExample]`` instead of
``requests``/``score`` (``seed_path``: the phase's seeds, for a deterministic order).
Everything else is an RL phase's: the trainer group, checkpoints every
``run.save_every`` steps, resume, the hf/ export and metrics. It needs no
engines. ``SFTPhase`` is the usual shape: a fixed list of examples, shuffled
each epoch from the run's seed, ``batch_size`` examples per optimizer step, and
optionally a share of them held out (``val_fraction``, LLaMA-Factory's ``val_size``):
never trained on, scored after every epoch (``sft/val_loss``, the mean negative
log-likelihood per target token). A phase may give ``held_out(step)``: the examples to
score after that step (none on the other steps).

Token ids come from the model's own processor and chat template, as the
engines build prompts: the prompt is the chat with the generation prompt
appended, the target is the assistant turn that the template renders after it,
closed by the end-of-turn token (the trainer learns to stop).
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from actors.batching import TrainBatch
from pipelines.runtime.metrics import Timer


@dataclass
class SFTExample:
    messages: list[dict]  # the chat up to the answer; image parts take ``images`` in order
    target: str  # the assistant's answer to learn
    images: list[Any] = field(default_factory=list)  # PNG/JPEG bytes


class SFTPhase:
    """``batch_size`` examples per step from ``examples``, every example once per epoch
    in an order drawn from the step's seed; ``epochs`` passes. The last
    ``floor(val_fraction * len(examples))`` examples (shuffle them first) are held out."""

    objective = "sft"

    def __init__(self, name: str, role: str, examples: list[SFTExample], batch_size: int,
                 epochs: int = 1, val_fraction: float = 0.0):
        if not 0 <= val_fraction < 1:
            raise ValueError(f"SFT phase {name}: val_fraction must be in [0, 1), got "
                             f"{val_fraction}")
        held = int(len(examples) * val_fraction)
        self.validation = list(examples[len(examples) - held:]) if held else []
        examples = examples[:len(examples) - held]
        if not examples:
            raise ValueError(f"SFT phase {name}: no examples")
        self.name, self.role, self.examples = name, role, list(examples)
        self.batch_size = min(batch_size, len(examples))
        self.per_epoch = math.ceil(len(examples) / self.batch_size)
        self.steps = self.per_epoch * epochs

    def batch_examples(self, step: int, seed_path: tuple[int, ...]) -> list[SFTExample]:
        epoch, k = divmod(step, self.per_epoch)
        order = np.random.default_rng([*seed_path, epoch]).permutation(len(self.examples))
        return [self.examples[i] for i in order[k * self.batch_size:(k + 1) * self.batch_size]]

    def held_out(self, step: int) -> list[SFTExample]:
        """The held-out examples after an epoch's last step; none after the others."""
        return self.validation if (step + 1) % self.per_epoch == 0 else []


def held_out_loss(group, examples: list[SFTExample], processor, chunk: int) -> float:
    """Mean negative log-likelihood per target token of ``examples`` (no update)."""
    total, tokens = 0.0, 0
    for start in range(0, len(examples), chunk):
        for logp in group.compute_logprobs(sft_batch(examples[start:start + chunk],
                                                     processor)):
            total -= float(np.sum(logp, dtype=np.float64))
            tokens += len(logp)
    return total / max(tokens, 1)


def sft_batch(examples: list[SFTExample], processor) -> TrainBatch:
    """The examples as a TrainBatch whose completion tokens are the targets."""
    from PIL import Image

    ids, prompt_lens, images = [], [], []
    eos = "<|im_end|>"
    for ex in examples:
        prompt = processor.apply_chat_template(ex.messages, add_generation_prompt=True,
                                               tokenize=False)
        full = processor.apply_chat_template(
            [*ex.messages, {"role": "assistant", "content": ex.target}], tokenize=False)
        if not full.startswith(prompt):
            raise ValueError("the chat template renders the answer turn differently from the "
                             "generation prompt; SFT targets need a template that appends it")
        answer = full[len(prompt):]
        cut = answer.find(eos)
        answer = answer[:cut + len(eos)] if cut >= 0 else answer
        kwargs = {"images": [Image.open(io.BytesIO(im)) for im in ex.images]} if ex.images else {}
        prompt_ids = processor(text=[prompt], return_tensors="np", **kwargs)["input_ids"][0]
        all_ids = processor(text=[prompt + answer], return_tensors="np", **kwargs)["input_ids"][0]
        if len(all_ids) <= len(prompt_ids) or \
                not np.array_equal(all_ids[:len(prompt_ids)], prompt_ids):
            raise ValueError(f"target {ex.target[:40]!r} does not tokenize after its prompt")
        ids.append(all_ids.astype(np.int64))
        prompt_lens.append(len(prompt_ids))
        images.append(list(ex.images))
    return TrainBatch(ids, np.array(prompt_lens), np.arange(len(examples)), images)


class SFTSteps:
    """The steps of an SFT phase (the runner's counterpart of rl_step.RLSteps): one
    optimizer step on ``batch_examples`` each, no engines, no state beside the trainer's."""

    def __init__(self, runner):
        self.r = runner
        self.version = runner.base_version  # the weights move on once the phase is done

    def restore(self, saved: dict, step: int, upcoming) -> None:
        self.version = self.r.base_version

    def state(self) -> dict:
        return {}

    def upcoming(self, step: int) -> None:
        """An SFT step samples nothing ahead."""

    def sync(self, resumed: bool, rollback: bool) -> None:
        """No engines serve an SFT phase's weights while it trains."""

    def finish(self) -> None:
        self.version = self.r.base_version + self.r.phase.steps

    def step(self, step: int) -> dict:
        r, timer = self.r, Timer()
        with timer("step"):
            examples = r.phase.batch_examples(step, r.seed_path)
            batch = sft_batch(examples, r.processor)
            with timer("update"):
                train = r.group.forward_backward(batch)
                train.update(r.group.optim_step())
            held = getattr(r.phase, "held_out", lambda _: [])(step)
            if held:
                with timer("validation"):
                    train["sft/val_loss"] = held_out_loss(r.group, held, r.processor,
                                                          len(examples))
        return {**{k if "/" in k else f"train/{k}": v for k, v in train.items()},
                "sft/examples": float(len(examples)), **r.data_metrics,
                **{f"timing/{k}": v for k, v in timer.seconds.items()}}
