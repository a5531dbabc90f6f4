"""Pure training objectives: the one generic loss the algorithm-blind trainer runs.

The trainer receives token ids, a loss mask, advantages (per token [B, T] or
per sequence [B]), old log-probs and optional reference log-probs, and calls
`policy_objective` (or `sft_loss`). Everything here is a pure function over
tensors: no model, no Ray, no config file.

Shapes: B = sequences, T = completion tokens (right-padded), V = vocabulary.
`mask` is [B, T] with 1 on the tokens that count (completion, not padding).

Micro-batch invariance: micro-batch gradients are summed, so `aggregate` takes
normalisers counted once over the WHOLE global batch (`loss_normalisers`; for
micro-token-mean, per-sequence weights) and the micro-batch losses sum exactly to
the full-batch loss, however the batch was split. Under data parallelism that
averages gradients over W ranks (FSDP), each rank's loss is multiplied by W.

Formulas follow verl's core_algos (PPO-clip with clip-higher, arXiv:2503.14476,
and dual-clip, arXiv:1912.09729; k1/k2/k3/low_var_kl; the aggregation modes) and
EvoLMM for the REINFORCE form and the exact full-vocabulary KL; the numerics are
in docs/architecture.md ("Trainer numerics").
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from actors.logprobs import entropy_from_logits, upcast

AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "micro-token-mean")
KL_ESTIMATORS = ("k1", "k2", "k3", "low_var_kl")
POLICY_LOSSES = ("ppo", "reinforce")

# verl clamps the log-ratio before exp so one wild token cannot overflow.
_LOG_RATIO_CLAMP = 20.0
# verl's "low_var_kl": k3 clamped to this range.
_LOW_VAR_KL_CLAMP = 10.0


# ---------------------------------------------------------------- helpers


def per_token(advantages: Tensor, mask: Tensor) -> Tensor:
    """Broadcast advantages to [B, T]: per-sequence [B] values are repeated over
    the tokens; per-token [B, T] values are returned unchanged."""
    if advantages.dim() == 1:
        if advantages.shape[0] != mask.shape[0]:
            raise ValueError(
                f"advantages has {advantages.shape[0]} sequences but mask has {mask.shape[0]}"
            )
        return advantages.unsqueeze(-1).expand_as(mask)
    if advantages.shape != mask.shape:
        raise ValueError(
            f"advantages must be [B] or [B, T] = {tuple(mask.shape)}, "
            f"got {tuple(advantages.shape)}"
        )
    return advantages


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of `values` over the positions where mask is 1 (0 if none)."""
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1)


def _masked_float_stats(values: Tensor, mask: Tensor) -> tuple[float, float, float]:
    """(mean, min, max) over valid positions as python floats; zeros if empty."""
    valid = values.detach()[mask.bool()]
    if valid.numel() == 0:
        return 0.0, 0.0, 0.0
    return valid.float().mean().item(), valid.min().item(), valid.max().item()


# ------------------------------------------------------------ aggregation


def loss_normalisers(mask: Tensor) -> tuple[int, int]:
    """(valid tokens, sequences with >= 1 valid token) of a mask [B, T].

    Call it on the WHOLE global batch's mask and pass the two numbers as
    `global_tokens` / `global_seqs` to every micro-batch's `aggregate`.
    """
    tokens_per_seq = mask.sum(-1)
    return int(tokens_per_seq.sum().item()), int((tokens_per_seq > 0).sum().item())


def _normaliser(given: float | int | Tensor | None, default: Tensor, like: Tensor) -> Tensor:
    denom = default if given is None else torch.as_tensor(given, device=like.device)
    denom = denom.to(like.dtype)
    # A zero normaliser means no valid token anywhere: the loss is 0, not NaN.
    return torch.where(denom > 0, denom, torch.ones_like(denom))


def aggregate(
    loss_tok: Tensor,
    mask: Tensor,
    mode: str,
    global_tokens: float | int | Tensor | None = None,
    global_seqs: float | int | Tensor | None = None,
    seq_weights: Tensor | None = None,
) -> Tensor:
    """Reduce a per-token loss [B, T] to a scalar, split-invariantly.

    Modes (verl's names), with N_tok / N_seq the global normalisers:
      token-mean:          sum_{b,t} m*l / N_tok
      seq-mean-token-mean: sum_b [ sum_t m*l / n_b ] / N_seq   (n_b = valid tokens of b)
      seq-mean-token-sum:  sum_b [ sum_t m*l ] / N_seq
      micro-token-mean:    sum_b w_b sum_t m*l, w = ``seq_weights`` (micro_token_weights:
                           MAYE's token mean per micro-batch, averaged)
    n_b is a property of one sequence, so it never depends on the split; only
    N_tok and N_seq do, hence they come from the caller (see module docstring
    and `loss_normalisers`). When None they default to this batch's own counts
    (N_seq counts sequences with at least one valid token), which is right only
    when this batch IS the global batch. Sequences with no valid token add 0.
    """
    if mode not in AGG_MODES:
        raise ValueError(f"loss aggregation mode must be one of {AGG_MODES}, got {mode!r}")
    m = mask.to(loss_tok.dtype)
    masked = loss_tok * m
    tokens_per_seq = m.sum(-1)
    if mode == "token-mean":
        return masked.sum() / _normaliser(global_tokens, tokens_per_seq.sum(), loss_tok)
    if mode == "micro-token-mean":
        if seq_weights is None:
            raise ValueError("loss aggregation micro-token-mean needs the batch's seq_weights "
                             "(micro_token_weights)")
        return (masked.sum(-1) * seq_weights.to(loss_tok.dtype)).sum()
    n_seq = _normaliser(global_seqs, (tokens_per_seq > 0).sum(), loss_tok)
    if mode == "seq-mean-token-mean":
        per_seq = masked.sum(-1) / tokens_per_seq.clamp(min=1)
    else:
        per_seq = masked.sum(-1)
    return per_seq.sum() / n_seq


def micro_token_weights(lengths, seqs: int) -> np.ndarray:
    """``micro-token-mean``'s weights for a global batch of sequences of ``lengths`` valid
    tokens: runs of ``seqs`` in order (the last may be shorter), w_b = 1 / (runs with a
    token * tokens of b's run): each run's token mean, averaged over the runs."""
    lengths = np.asarray(lengths, dtype=np.float64)
    runs = np.arange(len(lengths)) // seqs
    tokens = np.bincount(runs, weights=lengths, minlength=runs.max(initial=-1) + 1)
    counted = int((tokens > 0).sum())
    per_run = np.divide(1.0, counted * tokens, out=np.zeros_like(tokens), where=tokens > 0)
    return per_run[runs].astype(np.float32)


# ---------------------------------------------------------- policy losses


def ppo_clip_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_low: float = 0.2,
    clip_high: float = 0.3,
    dual_clip: float | None = 3.0,
) -> tuple[Tensor, dict[str, float]]:
    """PPO-clip per-token loss with clip-higher and dual-clip (verl's vanilla loss).

    logprobs, old_logprobs, mask [B, T]; advantages [B] or [B, T] -> loss [B, T].
      ratio = exp(clamp(logp - old, -20, 20))
      l     = max(-A * ratio, -A * clamp(ratio, 1 - clip_low, 1 + clip_high))
      dual-clip (Ye et al. 2020), for A < 0 only:  l = min(l, -A * dual_clip)
    i.e. a negative-advantage token whose ratio exploded contributes at most
    dual_clip * |A| (and no gradient). Padding positions are returned as
    computed; `aggregate` masks them. Metrics are means over this batch's
    valid tokens:
      policy/clip_frac       share where the clipped branch is active
      policy/dual_clip_frac  share where the dual-clip bound is active
      policy/ratio_mean, policy/ratio_min, policy/ratio_max
      policy/approx_kl_old   mean of old - new (verl's ppo_kl)
    """
    adv = per_token(advantages, mask).detach()
    log_ratio = (logprobs - old_logprobs).clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)
    ratio = torch.exp(log_ratio)
    loss_unclipped = -adv * ratio
    loss_clipped = -adv * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    loss = torch.maximum(loss_unclipped, loss_clipped)
    clipped = loss_clipped > loss_unclipped
    dual_active = torch.zeros_like(clipped)
    if dual_clip is not None:
        loss_dual = -adv * dual_clip
        negative = adv < 0
        dual_active = negative & (loss > loss_dual)
        loss = torch.where(negative, torch.minimum(loss, loss_dual), loss)
    ratio_mean, ratio_min, ratio_max = _masked_float_stats(ratio, mask)
    metrics = {
        "policy/clip_frac": masked_mean(clipped.float(), mask).item(),
        "policy/dual_clip_frac": masked_mean(dual_active.float(), mask).item(),
        "policy/ratio_mean": ratio_mean,
        "policy/ratio_min": ratio_min,
        "policy/ratio_max": ratio_max,
        "policy/approx_kl_old": masked_mean(-log_ratio.detach(), mask).item(),
    }
    return loss, metrics


def reinforce_loss(
    logprobs: Tensor, advantages: Tensor, mask: Tensor
) -> tuple[Tensor, dict[str, float]]:
    """Plain REINFORCE with a baseline: loss_t = -A * log pi(y_t), per token [B, T].

    logprobs, mask [B, T]; advantages [B] or [B, T] (already r - b). This is
    EvoLMM's `(r - b) * NLL(completion)`: with "seq-mean-token-mean" (or
    "token-mean" on one sequence) the aggregate is exactly (r - b) times the
    mean token NLL that a HF `labels=` loss returns. No ratio, no clipping:
    it is on-policy by construction. Metric: policy/nll (mean -logp, valid tokens).
    """
    adv = per_token(advantages, mask).detach()
    loss = -adv * logprobs
    return loss, {"policy/nll": masked_mean(-logprobs.detach(), mask).item()}


def sft_loss(
    logprobs: Tensor,
    mask: Tensor,
    mode: str = "token-mean",
    global_tokens: float | int | Tensor | None = None,
    global_seqs: float | int | Tensor | None = None,
    seq_weights: Tensor | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """Masked negative log-likelihood: aggregate(-logprobs [B, T], mask, mode).

    Metrics: sft/nll (mean over this batch's valid tokens), sft/tokens.
    """
    loss = aggregate(-logprobs, mask, mode, global_tokens, global_seqs, seq_weights)
    metrics = {
        "sft/nll": masked_mean(-logprobs.detach(), mask).item(),
        "sft/tokens": float(mask.sum().item()),
    }
    return loss, metrics


# ------------------------------------------------------- KL and entropy


def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, estimator: str) -> Tensor:
    """Per-token sampled estimate of KL(pi || pi_ref) from log-probs [B, T] -> [B, T].

    With d = logp - ref (Schulman, "Approximating KL divergence"):
      k1:         d                                (unbiased, can be negative)
      k2:         0.5 * d^2
      k3:         exp(-d) + d - 1                  (unbiased, >= 0)
      low_var_kl: k3 with the log-ratio clamped to [-20, 20] and the result
                  clamped to [-10, 10] (verl; the MM-Zero and MAYE default)
    ref_logprobs is treated as a constant (detached).
    """
    d = logprobs - ref_logprobs.detach()
    if estimator == "k1":
        return d
    if estimator == "k2":
        return 0.5 * d.square()
    if estimator == "k3":
        return torch.exp(-d) + d - 1.0
    if estimator == "low_var_kl":
        d = d.clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)
        k3 = torch.exp(-d) + d - 1.0
        return k3.clamp(-_LOW_VAR_KL_CLAMP, _LOW_VAR_KL_CLAMP)
    raise ValueError(f"KL estimator must be one of {KL_ESTIMATORS} or 'full', got {estimator!r}")


def full_kl(logits: Tensor, ref_logits: Tensor) -> Tensor:
    """Exact KL(pi || pi_ref) over the whole vocabulary, per token.

    logits, ref_logits [B, T, V] -> [B, T] fp32:  sum_v p(v) (log p(v) - log q(v)).
    EvoLMM's KL term (its loss uses the completion-token mean of this). Pass
    temperature-scaled logits if the policy samples with a temperature.
    ref_logits is treated as a constant (detached).
    """
    logp = F.log_softmax(upcast(logits), dim=-1)
    logq = F.log_softmax(upcast(ref_logits.detach()), dim=-1)
    return (logp.exp() * (logp - logq)).sum(-1)


# ------------------------------------------------------ generic objective


@dataclass(frozen=True)
class ObjectiveSpec:
    """What the trainer's one generic loss computes. Defaults: MM-Zero's GRPO.

    policy_loss:  "ppo" (clipped ratio against old_logprobs) or "reinforce"
                  (-A * logp, EvoLMM).
    clip_low:     PPO lower clip eps: ratio floor 1 - clip_low. In [0, 1).
    clip_high:    PPO upper clip eps: ratio ceiling 1 + clip_high
                  (clip-higher when > clip_low). >= 0.
    dual_clip:    dual-clip constant c > 1 for negative advantages; None = off.
    loss_agg:     one of AGG_MODES, used for every term (policy, KL, entropy).
    loss_agg_seqs: micro-token-mean: sequences per token mean (MAYE's micro-batch, 2).
    kl_coef:      weight of the KL-to-reference loss term; 0 = no KL term.
    kl_estimator: one of KL_ESTIMATORS (from ref_logprobs) or "full" (exact
                  over the vocabulary, needs logits and ref_logits).
    entropy_coef: weight of the entropy bonus (subtracted); 0 = off.
    log_entropy:  compute the policy's entropy for the metrics (``policy/entropy``)
                  even without a bonus (MAYE's evaluation scheme); costs a softmax.
    tis_cap:      truncated importance sampling against the engine that sampled:
                  each token's policy term is weighted by min(exp(old - engine), tis_cap)
                  (needs engine_logprobs); 0 = off.
    """

    policy_loss: str = "ppo"
    clip_low: float = 0.2
    clip_high: float = 0.3
    dual_clip: float | None = 3.0
    loss_agg: str = "token-mean"
    loss_agg_seqs: int = 2
    kl_coef: float = 0.0
    kl_estimator: str = "low_var_kl"
    entropy_coef: float = 0.0
    log_entropy: bool = False
    tis_cap: float = 0.0

    def __post_init__(self) -> None:
        if self.policy_loss not in POLICY_LOSSES:
            raise ValueError(
                f"policy_loss must be one of {POLICY_LOSSES}, got {self.policy_loss!r}"
            )
        if not 0.0 <= self.clip_low < 1.0:
            raise ValueError(f"clip_low must be in [0, 1), got {self.clip_low}")
        if self.clip_high < 0.0:
            raise ValueError(f"clip_high must be >= 0, got {self.clip_high}")
        if self.dual_clip is not None and self.dual_clip <= 1.0:
            raise ValueError(f"dual_clip must be > 1 (or None to disable), got {self.dual_clip}")
        if self.loss_agg not in AGG_MODES:
            raise ValueError(f"loss_agg must be one of {AGG_MODES}, got {self.loss_agg!r}")
        if self.loss_agg_seqs < 1:
            raise ValueError(f"loss_agg_seqs must be >= 1, got {self.loss_agg_seqs}")
        if self.tis_cap < 0:
            raise ValueError(f"tis_cap must be >= 0 (0 = off), got {self.tis_cap}")
        if self.kl_coef < 0.0:
            raise ValueError(f"kl_coef must be >= 0, got {self.kl_coef}")
        if self.kl_estimator not in KL_ESTIMATORS + ("full",):
            raise ValueError(
                f"kl_estimator must be one of {KL_ESTIMATORS + ('full',)}, "
                f"got {self.kl_estimator!r}"
            )
        if self.entropy_coef < 0.0:
            raise ValueError(f"entropy_coef must be >= 0, got {self.entropy_coef}")


def _kl_per_token(
    spec: ObjectiveSpec,
    logprobs: Tensor,
    ref_logprobs: Tensor | None,
    logits: Tensor | None,
    ref_logits: Tensor | None,
) -> Tensor | None:
    """Per-token KL [B, T] if its inputs were given, else None (or ValueError
    when the spec needs the term)."""
    if spec.kl_estimator == "full":
        if logits is None or ref_logits is None:
            if spec.kl_coef > 0:
                raise ValueError("kl_estimator='full' with kl_coef > 0 needs logits and ref_logits")
            return None
        return full_kl(logits, ref_logits)
    if ref_logprobs is None:
        if spec.kl_coef > 0:
            raise ValueError(
                f"kl_coef={spec.kl_coef} > 0 needs ref_logprobs (or set kl_coef: 0)"
            )
        return None
    return kl_penalty(logprobs, ref_logprobs, spec.kl_estimator)


def _entropy_per_token(spec: ObjectiveSpec, logits: Tensor | None,
                       entropy: Tensor | None) -> Tensor | None:
    """Per-token entropies for the bonus (with gradient) or only the metric (detached);
    None when neither logits nor entropies were given."""
    if spec.entropy_coef > 0 and logits is None and entropy is None:
        raise ValueError(f"entropy_coef={spec.entropy_coef} > 0 needs logits or entropy")
    if entropy is None and logits is not None:
        entropy = entropy_from_logits(logits if spec.entropy_coef > 0 else logits.detach())
    if entropy is None:
        return None
    return entropy if spec.entropy_coef > 0 else entropy.detach()


def _policy_term(spec: ObjectiveSpec, logprobs: Tensor, advantages: Tensor, mask: Tensor,
                 old_logprobs: Tensor | None,
                 engine_logprobs: Tensor | None) -> tuple[Tensor, dict[str, float]]:
    """The per-token policy term (PPO clip or REINFORCE), weighted by the truncated
    importance ratio to the engine's log-probs when ``spec.tis_cap`` > 0, and its metrics."""
    if spec.policy_loss == "ppo":
        if old_logprobs is None:
            raise ValueError(
                "policy_loss='ppo' needs old_logprobs (logprobs.detach() if on-policy)"
            )
        pg_tok, metrics = ppo_clip_loss(
            logprobs, old_logprobs, advantages, mask,
            spec.clip_low, spec.clip_high, spec.dual_clip,
        )
    else:
        pg_tok, metrics = reinforce_loss(logprobs, advantages, mask)
    if engine_logprobs is not None:
        metrics["policy/engine_logprob_diff"] = masked_mean(
            (logprobs.detach() - engine_logprobs).abs(), mask).item()
    if spec.tis_cap > 0:
        if engine_logprobs is None:
            raise ValueError(f"tis_cap={spec.tis_cap} needs the engine's log-probs")
        behaviour = old_logprobs if old_logprobs is not None else logprobs.detach()
        weight = torch.exp((behaviour - engine_logprobs).clamp(max=_LOG_RATIO_CLAMP))
        truncated = weight > spec.tis_cap
        weight = weight.clamp(max=spec.tis_cap).detach()
        pg_tok = pg_tok * weight
        metrics["policy/tis_weight_mean"] = masked_mean(weight, mask).item()
        metrics["policy/tis_truncated_frac"] = masked_mean(truncated.float(), mask).item()
    return pg_tok, metrics


def policy_objective(
    spec: ObjectiveSpec,
    logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    old_logprobs: Tensor | None = None,
    ref_logprobs: Tensor | None = None,
    logits: Tensor | None = None,
    ref_logits: Tensor | None = None,
    entropy: Tensor | None = None,
    engine_logprobs: Tensor | None = None,
    global_tokens: float | int | Tensor | None = None,
    global_seqs: float | int | Tensor | None = None,
    seq_weights: Tensor | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """The trainer's one loss: policy term + kl_coef * KL - entropy_coef * H.

    ``engine_logprobs`` [B, T]: the sampling engine's log-probs of the same tokens. With
    them the metrics gain ``policy/engine_logprob_diff`` (mean |logprobs - engine|: the
    engine-trainer mismatch when logprobs are the sampling weights' own), and with
    ``spec.tis_cap`` > 0 the policy term of each token is weighted by the truncated
    importance ratio ``min(exp(old - engine), tis_cap)`` (no gradient through it).

    logprobs, mask, old_logprobs, ref_logprobs [B, T]; advantages [B] or [B, T];
    logits, ref_logits [B, T, V] (only for the entropy bonus / "full" KL, and
    for the entropy metric); entropy [B, T]: per-token entropies computed
    elsewhere (``chunked_token_logprobs``), used instead of logits for the
    entropy bonus and metric. Every term is reduced with `aggregate(...,
    spec.loss_agg, global_tokens, global_seqs, seq_weights)`, so micro-batch losses sum
    to the global-batch loss when the global normalisers (or weights) are passed.
    old_logprobs is required for "ppo" (for a strictly on-policy step pass
    logprobs.detach(), which makes the ratio 1 and the gradient REINFORCE's).
    The KL and entropy are logged whenever their inputs are given, even with
    a zero coefficient. Metrics are over this micro-batch's valid tokens.
    """
    agg = dict(mode=spec.loss_agg, global_tokens=global_tokens, global_seqs=global_seqs,
               seq_weights=seq_weights)
    pg_tok, metrics = _policy_term(spec, logprobs, advantages, mask, old_logprobs,
                                   engine_logprobs)
    pg_loss = aggregate(pg_tok, mask, **agg)
    loss = pg_loss
    metrics["policy/pg_loss"] = pg_loss.item()

    kl_tok = _kl_per_token(spec, logprobs, ref_logprobs, logits, ref_logits)
    if kl_tok is not None:
        kl_loss = aggregate(kl_tok, mask, **agg)
        metrics["policy/kl"] = masked_mean(kl_tok.detach(), mask).item()
        metrics["policy/kl_loss"] = kl_loss.item()
        if spec.kl_coef > 0:
            loss = loss + spec.kl_coef * kl_loss

    ent_tok = _entropy_per_token(spec, logits, entropy)
    if ent_tok is not None:
        metrics["policy/entropy"] = masked_mean(ent_tok.detach(), mask).item()
        if spec.entropy_coef > 0:
            loss = loss - spec.entropy_coef * aggregate(ent_tok, mask, **agg)

    metrics["policy/loss"] = loss.item()
    return loss, metrics


def merge_metrics(parts: list[dict]) -> dict:
    """Combine micro-batch or rank metrics.

    Loss terms are already shares of the global-batch loss (normalised by
    global counts), so they add up; ``train/tokens`` adds up; ``*_min`` and
    ``*_max`` take the extreme; everything else is a token-weighted mean.
    """
    if not parts:
        return {}
    tokens = sum(p.get("train/tokens", 0.0) for p in parts)
    merged: dict[str, float] = {}
    for key in parts[0]:
        values = [p[key] for p in parts]
        if key.endswith("loss") or key == "train/tokens":
            merged[key] = sum(values)
        elif key.endswith("_min"):
            merged[key] = min(values)
        elif key.endswith("_max"):
            merged[key] = max(values)
        else:
            merged[key] = sum(v * p.get("train/tokens", 0.0) for v, p in zip(values, parts))
            merged[key] /= max(tokens, 1.0)
    return merged
