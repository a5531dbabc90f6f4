"""Advantage estimators, baselines and KL controllers: pure, driver-side math.

Recipes turn rewards into advantages here and hand them to the trainer, which
never knows which estimator produced them.

Groups. Group-relative estimators take `scores` [B] and `group_ids` [B]: one
id per sample saying which prompt it answers (a 1-D integer tensor, or any
sequence of hashables such as uid strings). Groups need not be contiguous or
of equal size, so filtered or ragged batches work as they are. A group of one
sample has no baseline to compare against: its advantage is 0 (never NaN),
which all three estimators give by construction (mean_g = r, std_g = 0).
Group statistics are computed in float64 so that a constant group gives an
advantage of 0 rather than rounding noise divided by 1e-6.

Sources: verl core_algos (GRPO, arXiv:2402.03300; RLOO; REINFORCE++,
arXiv:2501.03262; masked whitening), Dr. GRPO (arXiv:2503.20783), MAYE's
Reinforce++ recipe, EvoLMM (EMA baseline, adaptive KL). Formulas and
defaults are in each function's docstring.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from actors.objectives import kl_penalty

# ------------------------------------------------------------ group stats


def _group_index(group_ids: Tensor | Sequence[Hashable], n: int) -> Tensor:
    """Map arbitrary group ids to dense indices 0..G-1, shape [n] (long)."""
    if isinstance(group_ids, Tensor):
        if group_ids.dim() != 1:
            raise ValueError(f"group_ids must be 1-D, got shape {tuple(group_ids.shape)}")
        _, index = torch.unique(group_ids, return_inverse=True)
    else:
        dense: dict[Hashable, int] = {}
        index = torch.tensor([dense.setdefault(g, len(dense)) for g in group_ids], dtype=torch.long)
    if index.shape[0] != n:
        raise ValueError(f"group_ids has {index.shape[0]} entries but scores has {n}")
    return index


def group_stats(
    scores: Tensor, group_ids: Tensor | Sequence[Hashable]
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-sample statistics of the sample's own group, all [B] float64.

    Returns (mean, std, size). std is the UNBIASED sample std (Bessel, n - 1),
    as torch.std in verl/EasyR1; it is 0 for groups of size 1.
    """
    if scores.dim() != 1:
        raise ValueError(f"scores must be 1-D [B], got shape {tuple(scores.shape)}")
    index = _group_index(group_ids, scores.shape[0]).to(scores.device)
    r = scores.detach().double()
    num_groups = int(index.max().item()) + 1 if index.numel() else 0
    size = torch.zeros(num_groups, dtype=torch.float64, device=r.device).index_add_(
        0, index, torch.ones_like(r)
    )
    total = torch.zeros_like(size).index_add_(0, index, r)
    mean = (total / size)[index]
    sq_dev = torch.zeros_like(size).index_add_(0, index, (r - mean).square())
    var = sq_dev / (size - 1).clamp(min=1)
    return mean, var.sqrt()[index], size[index]


def _group_metrics(adv: Tensor, std: Tensor, size: Tensor) -> dict[str, float]:
    multi = size > 1
    return {
        "adv/mean": adv.mean().item() if adv.numel() else 0.0,
        "adv/abs_mean": adv.abs().mean().item() if adv.numel() else 0.0,
        # Samples in groups (of >= 2) whose scores are all equal: no signal.
        "adv/zero_std_frac": ((std == 0) & multi).double().mean().item() if adv.numel() else 0.0,
        "adv/singleton_frac": (~multi).double().mean().item() if adv.numel() else 0.0,
    }


# ------------------------------------------------ group-relative estimators


def grpo_advantages(
    scores: Tensor, group_ids: Tensor | Sequence[Hashable], eps: float = 1e-6
) -> tuple[Tensor, dict[str, float]]:
    """GRPO: A_i = (r_i - mean_g) / (std_g + eps), std unbiased (torch.std).

    scores [B], group_ids [B] -> advantages [B] in scores' dtype.
    Groups of size 1 get 0 (verl special-cases them to mean 0, std 1, i.e.
    r / (1 + eps); a lone sample has no group baseline, so we give it no signal).
    """
    mean, std, size = group_stats(scores, group_ids)
    adv = (scores.double() - mean) / (std + eps)
    return adv.to(scores.dtype), _group_metrics(adv, std, size)


def drgrpo_advantages(
    scores: Tensor, group_ids: Tensor | Sequence[Hashable]
) -> tuple[Tensor, dict[str, float]]:
    """Dr. GRPO: A_i = r_i - mean_g (no division by the group std).

    scores [B], group_ids [B] -> [B]. Size-1 groups get 0 naturally.
    (Dr. GRPO also changes the loss aggregation; that choice lives in
    ObjectiveSpec.loss_agg, not here.)
    """
    mean, std, size = group_stats(scores, group_ids)
    adv = scores.double() - mean
    return adv.to(scores.dtype), _group_metrics(adv, std, size)


def rloo_advantages(
    scores: Tensor, group_ids: Tensor | Sequence[Hashable]
) -> tuple[Tensor, dict[str, float]]:
    """RLOO: A_i = r_i - mean_{j != i, j in g} r_j = n / (n - 1) * (r_i - mean_g).

    scores [B], group_ids [B] -> [B]. Size-1 groups (no other sample) get 0
    (the factor is taken as 1 there and r - mean_g = 0).
    """
    mean, std, size = group_stats(scores, group_ids)
    adv = (scores.double() - mean) * size / (size - 1).clamp(min=1)
    return adv.to(scores.dtype), _group_metrics(adv, std, size)


# ------------------------------------------------------------ REINFORCE++


def masked_whiten(
    values: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8
) -> Tensor:
    """Whiten values [B, T] with the mean and UNBIASED variance of the valid tokens.

    whitened = (x - mean) * rsqrt(var + eps). Naming follows verl/trl:
    shift_mean=True gives a zero-mean result; shift_mean=False adds the mean
    back afterwards ("mean kept": the scale is normalised, the location is
    not). Beware: MAYE's torchtune-derived `whiten` uses the opposite name
    (its shift_mean=True re-adds the mean). With <= 1 valid token the
    variance is taken as 0. Masked positions are returned as 0.
    """
    m = mask.to(values.dtype)
    n = m.sum()
    mean = (values * m).sum() / n.clamp(min=1)
    sq_dev = ((values - mean).square() * m).sum()
    var = torch.where(n > 1, sq_dev / (n - 1).clamp(min=1), torch.zeros_like(sq_dev))
    whitened = (values - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * m


def discounted_returns(rewards: Tensor, mask: Tensor, gamma: float = 1.0) -> Tensor:
    """G_t = sum_{k >= t} gamma^(k - t) r_k over the valid tokens; rewards, mask [B, T].

    Vectorised: a reversed cumulative sum when gamma == 1, else a [T, T]
    discount matrix (gamma^(k - t) for k >= t). Rewards outside the mask are
    ignored and returns there are 0. Distance is counted in positions, so
    for right-padded masks this is exactly the per-sequence return.
    """
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must be in [0, 1], got {gamma}")
    m = mask.to(rewards.dtype)
    r = rewards * m
    if gamma == 1.0:
        returns = r.flip(-1).cumsum(-1).flip(-1)
    else:
        t = torch.arange(r.shape[-1], device=r.device)
        lag = (t[None, :] - t[:, None]).to(r.dtype)  # lag[t, k] = k - t
        discount = torch.where(lag >= 0, gamma ** lag.clamp(min=0), torch.zeros_like(lag))
        returns = r @ discount.T
    return returns * m


def reinforce_pp_advantages(
    scores: Tensor,
    mask: Tensor,
    logprobs: Tensor | None = None,
    ref_logprobs: Tensor | None = None,
    kl_coef: float = 0.0,
    gamma: float = 1.0,
    shift_mean: bool = False,
    whiten_size: int = 0,
) -> tuple[Tensor, Tensor, dict[str, float]]:
    """REINFORCE++ as in MAYE: token rewards -> returns -> batch whitening.

    scores [B]; mask, logprobs, ref_logprobs [B, T] (right-padded).
      r_t = -kl_coef * k3_t  (+ score at the last valid token),
            k3 = low_var_kl(logprobs, ref_logprobs) (clamped to [-10, 10])
      G_t = sum_{k >= t} gamma^(k - t) r_k
      A   = masked_whiten(G, mask, shift_mean)
    Default shift_mean=False is MAYE's "mean kept" (its torchtune whiten re-adds
    the mean); verl's REINFORCE++ uses shift_mean=True (zero mean).
    Defaults kl_coef 0, gamma 1 are MAYE's. ``whiten_size`` > 0 whitens each run of
    that many consecutive sequences on its own (MAYE whitens each rank's share, 128
    responses) instead of the whole batch. A sequence with no valid token receives no
    score. Returns (advantages [B, T], returns [B, T], metrics).
    """
    m = mask.to(scores.dtype)
    rewards = torch.zeros_like(m)
    kl_reward = torch.zeros_like(m)
    if kl_coef != 0.0:
        if logprobs is None or ref_logprobs is None:
            raise ValueError(f"kl_coef={kl_coef} needs logprobs and ref_logprobs")
        kl_reward = -kl_coef * kl_penalty(logprobs, ref_logprobs, "low_var_kl").to(m.dtype) * m
        rewards = rewards + kl_reward
    # Index of the last valid token (T - 1 for an all-padding row, whose score is zeroed).
    last = m.shape[-1] - 1 - m.flip(-1).argmax(-1)
    has_valid = (m.sum(-1) > 0).to(scores.dtype)
    rewards = rewards.scatter_add(1, last.unsqueeze(-1), (scores * has_valid).unsqueeze(-1))
    returns = discounted_returns(rewards, m, gamma)
    size = whiten_size or max(len(returns), 1)
    advantages = torch.cat([masked_whiten(returns[i:i + size], m[i:i + size],
                                          shift_mean=shift_mean)
                            for i in range(0, len(returns), size)]) if len(returns) else returns
    valid = m.bool()
    metrics = {
        "adv/returns_mean": returns[valid].mean().item() if valid.any() else 0.0,
        "adv/kl_reward_mean": kl_reward[valid].mean().item() if valid.any() else 0.0,
        "adv/mean": advantages[valid].mean().item() if valid.any() else 0.0,
        "adv/std": advantages[valid].std().item() if valid.sum() > 1 else 0.0,
    }
    return advantages, returns, metrics


# ------------------------------------------------- baselines, KL control


@dataclass
class EMABaseline:
    """EvoLMM's per-role reward baseline: b <- decay * b + (1 - decay) * r, b_0 = 0.

    The advantage of a reward uses the baseline BEFORE that reward is folded
    in: `adv = baseline.advantage(r); baseline.update(r)`.
    """

    decay: float = 0.9
    value: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {self.decay}")

    def advantage(self, reward: float) -> float:
        return reward - self.value

    def update(self, reward: float) -> float:
        self.value = self.decay * self.value + (1.0 - self.decay) * reward
        return self.value

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])


@dataclass
class AdaptiveKLController:
    """EvoLMM's KL coefficient, updated after every optimizer step:

        beta <- clip(beta * exp(rate * (kl - target) / target), beta_min, beta_max)

    beta: current coefficient (starts at beta_0 = 1e-3).
    target: KL the controller steers towards (0.02).
    rate: proportional gain (0.1).
    beta_min, beta_max: clip range (1e-8, 100).
    """

    beta: float = 1e-3
    target: float = 0.02
    rate: float = 0.1
    beta_min: float = 1e-8
    beta_max: float = 100.0

    def __post_init__(self) -> None:
        if self.target <= 0:
            raise ValueError(f"target must be > 0, got {self.target}")
        if not 0 < self.beta_min <= self.beta_max:
            raise ValueError(
                f"need 0 < beta_min <= beta_max, got beta_min={self.beta_min}, "
                f"beta_max={self.beta_max}"
            )
        if not self.beta_min <= self.beta <= self.beta_max:
            raise ValueError(f"beta must be in [beta_min, beta_max], got {self.beta}")

    def update(self, kl: float) -> float:
        if not math.isfinite(kl):
            raise ValueError(f"KL must be finite to update the KL controller, got {kl}")
        exponent = self.rate * (kl - self.target) / self.target
        if exponent >= math.log(self.beta_max / self.beta):
            # Saturated; also keeps a huge KL from overflowing math.exp.
            self.beta = self.beta_max
        else:
            self.beta = min(max(self.beta * math.exp(exponent), self.beta_min), self.beta_max)
        return self.beta

    def state_dict(self) -> dict[str, float]:
        return {"beta": self.beta}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.beta = float(state["beta"])


@dataclass
class FixedKLController:
    """Constant KL coefficient with the AdaptiveKLController interface."""

    beta: float = 1e-3

    def __post_init__(self) -> None:
        if self.beta < 0:
            raise ValueError(f"beta must be >= 0, got {self.beta}")

    def update(self, kl: float) -> float:
        return self.beta

    def state_dict(self) -> dict[str, float]:
        return {"beta": self.beta}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.beta = float(state["beta"])
