"""Advantage estimators and KL controllers by name, as a phase uses them.

``make_estimator(algorithm)`` turns ``algorithm.advantage`` into an object
with one verb, ``advantages(rewards, groups, batch) -> (advantages,
metrics)``, and a checkpointable state (``state_dict`` /
``load_state_dict``, saved with the trainer's checkpoint so a resumed run
continues with the same baseline):

- ``grpo``, ``drgrpo``, ``rloo``: per sequence, over each prompt's group of
  samples (``pipelines/algorithms/advantages.py``; docs/algorithms.md).
- ``reinforce``: per sequence, ``r - b`` against an exponential moving
  average of the rewards, ``b <- decay * b + (1 - decay) * r`` from b = 0,
  each reward's advantage taken before it is folded in, in sample order
  (EvoLMM; docs/algorithms.md).
- ``reinforce_pp``: per token: the score at the last completion token, minus
  ``kl_in_reward * k3`` at every token, returns with discount ``gamma``,
  whitened over the batch (or runs of ``whiten_size`` sequences, MAYE's per-rank
  share) with the mean kept (REINFORCE++ as MAYE runs it;
  docs/algorithms.md); needs the old (and, with a KL reward, the reference)
  log-probs, so the phase computes advantages after them.

``make_kl_controller(algorithm)``: the KL coefficient each update uses;
``fixed`` keeps ``kl_coef``, ``adaptive`` starts at it and after every
optimizer step moves it by ``beta <- clip(beta * exp(rate * (KL - target) /
target), 1e-8, 100)`` (EvoLMM).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from pipelines.algorithms.advantages import (
    AdaptiveKLController,
    EMABaseline,
    FixedKLController,
    drgrpo_advantages,
    grpo_advantages,
    reinforce_pp_advantages,
    rloo_advantages,
)

GROUP_ESTIMATORS = {"grpo": grpo_advantages, "drgrpo": drgrpo_advantages,
                    "rloo": rloo_advantages}
ESTIMATORS = (*GROUP_ESTIMATORS, "reinforce", "reinforce_pp")


class GroupEstimator:
    """grpo / drgrpo / rloo: stateless, per sequence, over each prompt's samples."""

    token_level = False
    needs_reference = False

    def __init__(self, name: str):
        self.name, self._fn = name, GROUP_ESTIMATORS[name]

    def advantages(self, rewards: np.ndarray, groups: Sequence[int], batch=None):
        adv, metrics = self._fn(torch.tensor(rewards, dtype=torch.float64), list(groups))
        return adv.float().numpy(), metrics

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class ReinforceEstimator:
    """REINFORCE against an EMA baseline of the rewards (one baseline per policy)."""

    token_level = False
    needs_reference = False

    def __init__(self, decay: float):
        self.baseline = EMABaseline(decay=decay)

    def advantages(self, rewards: np.ndarray, groups: Sequence[int], batch=None):
        before = self.baseline.value
        adv = np.empty(len(rewards), dtype=np.float32)
        for i, r in enumerate(rewards):
            adv[i] = self.baseline.advantage(float(r))
            self.baseline.update(float(r))
        return adv, {"adv/baseline_before": before, "adv/baseline": self.baseline.value,
                     "adv/mean": float(adv.mean()) if len(adv) else 0.0}

    def state_dict(self) -> dict:
        return {"baseline": self.baseline.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if "baseline" in state:
            self.baseline.load_state_dict(state["baseline"])


class ReinforcePPEstimator:
    """REINFORCE++: token-level returns, batch whitening with the mean kept."""

    token_level = True

    def __init__(self, kl_in_reward: float, gamma: float, whiten_size: int = 0):
        self.kl_in_reward, self.gamma, self.whiten_size = kl_in_reward, gamma, whiten_size
        self.needs_reference = kl_in_reward > 0

    def advantages(self, rewards: np.ndarray, groups: Sequence[int], batch=None):
        # the completions' lengths, from whichever log-probs the batch has; the KL reward
        # needs the behaviour policy's own (the phase then makes a trainer pass)
        behaviour = None if batch is None else batch.old_logprobs
        lengths_from = behaviour if behaviour is not None else getattr(batch, "engine_logprobs",
                                                                        None)
        if lengths_from is None:
            raise ValueError("reinforce_pp needs the batch's old (or engine) log-probs")
        if self.needs_reference and (behaviour is None or batch.ref_logprobs is None):
            raise ValueError("reinforce_pp with kl_in_reward > 0 needs the old and the "
                             "reference log-probs")
        lengths = [len(lp) for lp in lengths_from]
        width = max(lengths, default=0)
        mask = torch.zeros(len(lengths), width, dtype=torch.float64)
        old = torch.zeros_like(mask)
        ref = torch.zeros_like(mask)
        for i, n in enumerate(lengths):
            mask[i, :n] = 1.0
            if self.needs_reference:
                old[i, :n] = torch.as_tensor(batch.old_logprobs[i], dtype=torch.float64)
                ref[i, :n] = torch.as_tensor(batch.ref_logprobs[i], dtype=torch.float64)
        adv, _, metrics = reinforce_pp_advantages(
            torch.tensor(rewards, dtype=torch.float64), mask,
            logprobs=old, ref_logprobs=ref if self.needs_reference else None,
            kl_coef=self.kl_in_reward, gamma=self.gamma, shift_mean=False,
            whiten_size=self.whiten_size)
        return [adv[i, :n].float().numpy() for i, n in enumerate(lengths)], metrics

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def make_estimator(algorithm):
    name = algorithm.advantage
    if name in GROUP_ESTIMATORS:
        return GroupEstimator(name)
    if name == "reinforce":
        return ReinforceEstimator(algorithm.baseline_decay)
    if name == "reinforce_pp":
        return ReinforcePPEstimator(algorithm.kl_in_reward, algorithm.gamma,
                                    algorithm.whiten_size)
    raise ValueError(f"algorithm.advantage: unknown estimator {name!r}; one of {ESTIMATORS}")


def make_kl_controller(algorithm):
    if algorithm.kl_control == "adaptive":
        return AdaptiveKLController(beta=algorithm.kl_coef, target=algorithm.kl_target,
                                    rate=algorithm.kl_rate)
    return FixedKLController(beta=algorithm.kl_coef)
