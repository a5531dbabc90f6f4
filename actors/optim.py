"""The optimizer's schedule and state: the LR multiplier per step, AdamW's state
created up front (so a checkpoint taken before the first step changes nothing),
the scheduler's saved counters."""

from __future__ import annotations

import math

import torch


def scheduler_state(scheduler) -> dict:
    # The LR function is rebuilt from the spec; only the counters are state.
    return {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}


def lr_factor(step: int, schedule: str, warmup_steps: int, total_steps: int) -> float:
    """Multiplier of the base LR before optimizer step ``step`` (0-based).

    constant: 1. warmup: linear (step+1)/warmup over the first warmup_steps,
    then 1. cosine: the same warm-up, then 0.5 * (1 + cos(pi * progress)) with
    progress = (step - warmup) / (total - warmup), reaching 0 at total_steps.
    """
    if schedule not in ("constant", "warmup", "cosine"):
        raise ValueError(f"schedule must be constant, warmup or cosine, got {schedule!r}")
    if schedule == "constant":
        return 1.0
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "warmup":
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def init_adam_state(optimizer: torch.optim.AdamW) -> None:
    """Give AdamW the state of a fresh optimizer (step 0, zero moments) up front.

    Saving needs optimizer state, and torch.distributed.checkpoint creates a
    missing one by running a zero-lr step, which advances Adam's step count and
    so changes the bias correction of every later update: a run that saved
    before its first step would diverge from one that did not.
    """
    for group in optimizer.param_groups:
        for p in group["params"]:
            optimizer.state[p] = {  # fused AdamW keeps its step count beside the shard
                "step": torch.zeros((), dtype=torch.float32, device=p.device),
                "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format),
            }
