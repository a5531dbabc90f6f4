"""Hand-computed tests for actors/objectives.py (CPU, no Ray, no model).

Every expected number is derived in the test from the formula, never pasted
from an output.
"""

import dataclasses
import math

import pytest
import torch

from actors.logprobs import entropy_from_logits, token_logprobs
from actors.objectives import (
    AGG_MODES,
    ObjectiveSpec,
    aggregate,
    full_kl,
    kl_penalty,
    loss_normalisers,
    micro_token_weights,
    policy_objective,
    ppo_clip_loss,
    reinforce_loss,
    sft_loss,
)

LN2 = math.log(2.0)


def t(*rows):
    return torch.tensor(rows, dtype=torch.float64)


# ---------------------------------------------------------- token_logprobs


def test_token_logprobs_matches_softmax_by_hand():
    # logits [0, 2 ln 2, 0] -> softmax = [1, 4, 1] / 6, so the middle token has log(4/6).
    logits = torch.tensor([[[0.0, 2 * LN2, 0.0], [0.0, 2 * LN2, 0.0]]])
    ids = torch.tensor([[1, 0]])
    out = token_logprobs(logits, ids)
    assert out.shape == (1, 2)
    assert out[0, 0].item() == pytest.approx(math.log(4 / 6), abs=1e-6)
    assert out[0, 1].item() == pytest.approx(math.log(1 / 6), abs=1e-6)
    # Temperature 2 halves the logits: [0, ln 2, 0] -> [1, 2, 1] / 4.
    hot = token_logprobs(logits, ids, temperature=2.0)
    assert hot[0, 0].item() == pytest.approx(math.log(2 / 4), abs=1e-6)
    assert hot[0, 1].item() == pytest.approx(math.log(1 / 4), abs=1e-6)


def test_token_logprobs_is_fp32_for_bf16_logits():
    logits = torch.tensor([[[0.0, 2 * LN2, 0.0]]], dtype=torch.bfloat16)
    out = token_logprobs(logits, torch.tensor([[1]]))
    assert out.dtype == torch.float32
    # bf16 rounds 2 ln 2 = 1.386... to 1.3828125; the log-prob stays within 1e-2.
    assert out.item() == pytest.approx(math.log(4 / 6), abs=1e-2)
    with pytest.raises(ValueError, match="temperature"):
        token_logprobs(logits, torch.tensor([[1]]), temperature=0.0)


# ----------------------------------------------------------------- PPO-clip


def test_ppo_ratio_e_is_clipped_at_one_plus_clip_high():
    # logp - old = 1, so ratio = e > 1.3: the clipped branch -A * 1.3 wins for A = 1.
    logp = t([1.0]).requires_grad_()
    loss, metrics = ppo_clip_loss(logp, t([0.0]), t(1.0), t([1.0]))
    assert loss.item() == pytest.approx(-1.3)
    assert metrics["policy/clip_frac"] == 1.0
    assert metrics["policy/ratio_mean"] == pytest.approx(math.e)
    loss.sum().backward()
    assert logp.grad.item() == 0.0  # clipped: no gradient


def test_ppo_clip_higher_is_asymmetric():
    # token 0: ratio 1.25, A = +1: inside [0.8, 1.3] -> -1.25, gradient -A * ratio = -1.25
    # token 1: ratio 0.75, A = -1: below 0.8 -> max(0.75, 0.8) = 0.8, clipped, no gradient
    ratios = [1.25, 0.75]
    logp = torch.log(t(ratios)).requires_grad_()
    old = t([0.0, 0.0])
    adv = t([1.0, -1.0])
    mask = t([1.0, 1.0])
    loss, metrics = ppo_clip_loss(logp, old, adv, mask)
    assert loss[0].tolist() == pytest.approx([-1.25, 0.8])
    loss.sum().backward()
    assert logp.grad[0].tolist() == pytest.approx([-1.25, 0.0])
    assert metrics["policy/clip_frac"] == pytest.approx(1 / 2)
    assert metrics["policy/ratio_mean"] == pytest.approx((1.25 + 0.75) / 2)
    assert metrics["policy/ratio_min"] == pytest.approx(0.75)
    assert metrics["policy/ratio_max"] == pytest.approx(1.25)
    assert metrics["policy/approx_kl_old"] == pytest.approx(-(math.log(1.25) + math.log(0.75)) / 2)
    # The symmetric eps = 0.2 of the textbook would have clipped token 0 at 1.2.
    sym, sym_metrics = ppo_clip_loss(logp.detach(), old, adv, mask, clip_low=0.2, clip_high=0.2)
    assert sym[0].tolist() == pytest.approx([-1.2, 0.8])
    assert sym_metrics["policy/clip_frac"] == 1.0


def test_ppo_dual_clip_bounds_negative_advantages():
    # token 0: A = -1, ratio e^2: max(e^2, 1.3) = e^2 > c|A| = 3 -> dual-clip gives 3, no grad
    # token 1: A = -1, ratio 2: max(2, 1.3) = 2 < 3 -> 2, gradient -A * ratio = 2
    # token 2: A = +1, ratio e^2: dual-clip does not apply to A > 0 -> -1.3
    # token 3: padding with a wild ratio e^5 must not move the metrics
    logp = t([2.0, LN2, 2.0, 5.0]).requires_grad_()
    old = torch.zeros(4, dtype=torch.float64)
    adv = t([-1.0, -1.0, 1.0, -1.0])
    mask = t([1.0, 1.0, 1.0, 0.0])
    loss, metrics = ppo_clip_loss(logp, old, adv, mask, dual_clip=3.0)
    assert loss[0, :3].tolist() == pytest.approx([3.0, 2.0, -1.3])
    (loss * mask).sum().backward()
    assert logp.grad[0, :3].tolist() == pytest.approx([0.0, 2.0, 0.0])
    assert metrics["policy/dual_clip_frac"] == pytest.approx(1 / 3)
    # The ordinary clipped branch wins only on token 2: for A < 0 and a large
    # ratio the unclipped term (e^2 or 2) is larger than the clipped 1.3.
    assert metrics["policy/clip_frac"] == pytest.approx(1 / 3)
    assert metrics["policy/ratio_max"] == pytest.approx(math.exp(2.0))
    off, _ = ppo_clip_loss(logp.detach(), old, adv, mask, dual_clip=None)
    assert off[0, 0].item() == pytest.approx(math.exp(2.0))


def test_per_sequence_advantages_broadcast_over_tokens():
    logp = torch.log(t([1.1, 0.9, 1.5], [0.7, 1.0, 1.0]))
    old = torch.zeros_like(logp)
    mask = t([1, 1, 1], [1, 1, 0])
    per_seq = t(2.0, -1.0)
    per_tok = t([2.0, 2.0, 2.0], [-1.0, -1.0, -1.0])
    a, _ = ppo_clip_loss(logp, old, per_seq, mask)
    b, _ = ppo_clip_loss(logp, old, per_tok, mask)
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="advantages"):
        ppo_clip_loss(logp, old, t(1.0, 2.0, 3.0), mask)


# ---------------------------------------------------------------- REINFORCE


def test_reinforce_is_minus_advantage_times_logprob():
    # logp = [ln 1/2, ln 1/4], A = 2 -> loss = [-2 ln 1/2, -2 ln 1/4] = [2 ln 2, 4 ln 2]
    logp = torch.log(t([0.5, 0.25])).requires_grad_()
    loss, metrics = reinforce_loss(logp, t(2.0), t([1.0, 1.0]))
    assert loss[0].tolist() == pytest.approx([2 * LN2, 4 * LN2])
    assert metrics["policy/nll"] == pytest.approx((LN2 + 2 * LN2) / 2)
    loss.sum().backward()
    assert logp.grad[0].tolist() == pytest.approx([-2.0, -2.0])


def test_ppo_on_policy_gradient_equals_reinforce():
    # At ratio 1 nothing is clipped and d(-A * ratio)/dlogp = -A, REINFORCE's gradient.
    logp = torch.log(t([0.3, 0.6], [0.2, 0.9]))
    adv = t(1.5, -0.5)
    mask = t([1, 1], [1, 1])
    lp1 = logp.clone().requires_grad_()
    lp2 = logp.clone().requires_grad_()
    ppo, _ = ppo_clip_loss(lp1, lp1.detach(), adv, mask)
    rf, _ = reinforce_loss(lp2, adv, mask)
    ppo.sum().backward()
    rf.sum().backward()
    assert torch.allclose(lp1.grad, lp2.grad)


# ---------------------------------------------------------------------- KL


def test_kl_estimators_on_a_known_pair():
    # logp = ln 1/2, ref = ln 1/4: d = logp - ref = ln 2, ref / pi = 1/2
    logp = torch.log(t([0.5])).requires_grad_()
    ref = torch.log(t([0.25]))
    assert kl_penalty(logp, ref, "k1").item() == pytest.approx(LN2)
    assert kl_penalty(logp, ref, "k2").item() == pytest.approx(0.5 * LN2**2)
    k3_by_hand = 0.5 - (-LN2) - 1  # exp(ref - logp) - (ref - logp) - 1
    assert kl_penalty(logp, ref, "k3").item() == pytest.approx(k3_by_hand)
    assert kl_penalty(logp, ref, "low_var_kl").item() == pytest.approx(k3_by_hand)
    # d k3 / d logp = 1 - exp(ref - logp) = 1 - 1/2
    kl_penalty(logp, ref, "k3").sum().backward()
    assert logp.grad.item() == pytest.approx(0.5)
    with pytest.raises(ValueError, match="k4"):
        kl_penalty(logp, ref, "k4")


def test_low_var_kl_clamps_to_ten():
    # ref - logp = 15: k3 = e^15 - 15 - 1 (huge) -> 10
    # ref - logp = -30: k3 = e^-30 + 30 - 1 ~ 29 -> 10
    logp = t([0.0, 0.0])
    ref = t([15.0, -30.0])
    k3 = kl_penalty(logp, ref, "k3")
    assert k3[0].tolist() == pytest.approx([math.exp(15) - 16, math.exp(-30) + 29])
    assert kl_penalty(logp, ref, "low_var_kl")[0].tolist() == [10.0, 10.0]


def test_full_kl_on_a_two_token_vocabulary():
    # p = softmax([ln 3, 0]) = [3/4, 1/4], q = softmax([0, 0]) = [1/2, 1/2]
    logits = torch.tensor([[[math.log(3.0), 0.0]]], requires_grad=True)
    ref_logits = torch.zeros(1, 1, 2, requires_grad=True)
    kl = full_kl(logits, ref_logits)
    forward = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    backward = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)  # KL(q || p)
    assert kl.item() == pytest.approx(forward, abs=1e-6)
    assert abs(kl.item() - backward) > 1e-3
    assert full_kl(logits, logits).item() == pytest.approx(0.0, abs=1e-7)
    kl.sum().backward()
    assert ref_logits.grad is None  # the reference is a constant
    assert logits.grad is not None


def test_entropy_of_uniform_is_log_v():
    for shift in (0.0, 3.3):
        logits = torch.full((2, 3, 7), shift)
        assert torch.allclose(entropy_from_logits(logits), torch.full((2, 3), math.log(7.0)))
    # [ln 3, 0] -> [3/4, 1/4]: H = -(3/4 ln 3/4 + 1/4 ln 1/4)
    two = torch.tensor([[[math.log(3.0), 0.0]]])
    expected = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert entropy_from_logits(two).item() == pytest.approx(expected, abs=1e-6)


# -------------------------------------------------------------- aggregation

# Three sequences: lengths 3, 1 and 0 (all padding, with junk values).
LOSS = t([1, 2, 3], [4, 0, 0], [9, 9, 9])
MASK = t([1, 1, 1], [1, 0, 0], [0, 0, 0])


def test_aggregate_modes_by_hand():
    # token-mean: (1+2+3+4) / 4 tokens
    assert aggregate(LOSS, MASK, "token-mean").item() == pytest.approx(10 / 4)
    # seq-mean-token-mean: (6/3 + 4/1) / 2 sequences with tokens
    assert aggregate(LOSS, MASK, "seq-mean-token-mean").item() == pytest.approx((2 + 4) / 2)
    # seq-mean-token-sum: (6 + 4) / 2
    assert aggregate(LOSS, MASK, "seq-mean-token-sum").item() == pytest.approx(10 / 2)
    assert loss_normalisers(MASK) == (4, 2)
    # Global normalisers replace the local counts.
    assert aggregate(LOSS, MASK, "token-mean", global_tokens=8).item() == pytest.approx(10 / 8)
    per_seq_mean = aggregate(LOSS, MASK, "seq-mean-token-mean", global_seqs=4)
    assert per_seq_mean.item() == pytest.approx((2 + 4) / 4)
    per_seq_sum = aggregate(LOSS, MASK, "seq-mean-token-sum", global_seqs=4)
    assert per_seq_sum.item() == pytest.approx((6 + 4) / 4)
    with pytest.raises(ValueError, match="token-mean"):
        aggregate(LOSS, MASK, "mean")


def test_micro_token_mean_by_hand():
    """MAYE's aggregation: a token mean per run of 2 sequences, averaged over the runs."""
    # lengths 3, 1 | 4, 0 | 2: runs of 4, 4 and 2 tokens, 3 runs -> 1/12, 1/12, 1/6
    w = micro_token_weights([3, 1, 4, 0, 2], 2)
    assert w.tolist() == pytest.approx([1 / 12, 1 / 12, 1 / 12, 1 / 12, 1 / 6])
    loss = t([1, 2, 3, 0], [4, 0, 0, 0], [1, 1, 1, 1], [7, 7, 7, 7], [2, 6, 0, 0])
    mask = t([1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0], [1, 1, 0, 0])
    # run means: (6 + 4) / 4 = 2.5, 4 / 4 = 1, 8 / 2 = 4; their mean 7.5 / 3 = 2.5
    got = aggregate(loss, mask, "micro-token-mean", seq_weights=torch.as_tensor(w))
    assert got.item() == pytest.approx(7.5 / 3)
    # against the whole batch's token mean, 22 / 10: the 2-token run weighs more here
    assert aggregate(loss, mask, "token-mean").item() == pytest.approx(22 / 10)
    # runs of 1 are seq-mean-token-mean; one run of all is token-mean
    one = torch.as_tensor(micro_token_weights([3, 1, 4, 0, 2], 1))
    assert aggregate(loss, mask, "micro-token-mean", seq_weights=one).item() == \
        pytest.approx(aggregate(loss, mask, "seq-mean-token-mean").item())
    every = torch.as_tensor(micro_token_weights([3, 1, 4, 0, 2], 5))
    assert aggregate(loss, mask, "micro-token-mean", seq_weights=every).item() == \
        pytest.approx(2.2)
    assert micro_token_weights([0, 0], 2).tolist() == [0.0, 0.0]
    with pytest.raises(ValueError, match="seq_weights"):
        aggregate(loss, mask, "micro-token-mean")


def test_aggregate_of_all_padding_is_zero_not_nan():
    for mode in AGG_MODES:
        weights = torch.zeros(MASK.shape[0], dtype=torch.float64)
        assert aggregate(LOSS, torch.zeros_like(MASK), mode, seq_weights=weights).item() == 0.0


def _microbatch_problem():
    g = torch.Generator().manual_seed(0)
    B, T, V = 8, 6, 5
    logits = torch.randn(B, T, V, generator=g, dtype=torch.float64)
    ids = torch.randint(0, V, (B, T), generator=g)
    lengths = torch.tensor([6, 1, 3, 0, 5, 2, 6, 4])  # uneven, with an empty row
    mask = (torch.arange(T)[None, :] < lengths[:, None]).double()
    old = token_logprobs(logits + 0.3 * torch.randn(B, T, V, generator=g, dtype=torch.float64), ids)
    ref = token_logprobs(logits + 0.3 * torch.randn(B, T, V, generator=g, dtype=torch.float64), ids)
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    return logits, ids, mask, old, ref, adv


def _grad(spec, logits, ids, mask, old, ref, adv, splits, use_globals):
    param = logits.clone().requires_grad_()
    tokens, seqs = loss_normalisers(mask)
    weights = torch.as_tensor(micro_token_weights(mask.sum(-1).tolist(), 2))
    total = 0.0
    for sl in torch.arange(mask.shape[0]).chunk(splits):
        kwargs = dict(global_tokens=tokens, global_seqs=seqs) if use_globals else {}
        # micro-token-mean: the global batch's weights, or (naive) the micro-batch's own
        kwargs["seq_weights"] = weights[sl] if use_globals else torch.as_tensor(
            micro_token_weights(mask[sl].sum(-1).tolist(), 2))
        loss, _ = policy_objective(
            spec, token_logprobs(param[sl], ids[sl]), adv[sl], mask[sl],
            old_logprobs=old[sl], ref_logprobs=ref[sl], logits=param[sl], **kwargs,
        )
        # Without global normalisers the usual fallback is averaging micro-batch losses.
        total = total + (loss if use_globals else loss / splits)
    total.backward()
    return total.detach(), param.grad


@pytest.mark.parametrize("mode", AGG_MODES)
def test_aggregation_is_microbatch_invariant(mode):
    problem = _microbatch_problem()
    spec = ObjectiveSpec(loss_agg=mode, kl_coef=0.1, entropy_coef=0.01)
    # micro-token-mean split into its own runs (4 x 2 rows) IS the average of the
    # micro-batches' losses, so the control below could not tell: split 3, 3, 2
    splits = 3 if mode == "micro-token-mean" else 4
    full_loss, full_grad = _grad(spec, *problem, splits=1, use_globals=False)
    micro_loss, micro_grad = _grad(spec, *problem, splits=splits, use_globals=True)
    assert micro_loss.item() == pytest.approx(full_loss.item(), rel=1e-9)
    assert ((micro_grad - full_grad).norm() / full_grad.norm()).item() < 1e-6
    # Control: per-micro-batch normalisers (averaged) give a different gradient,
    # so the comparison above can fail.
    _, naive_grad = _grad(spec, *problem, splits=splits, use_globals=False)
    assert ((naive_grad - full_grad).norm() / full_grad.norm()).item() > 1e-3


# ---------------------------------------------------------------------- SFT


def test_sft_loss_is_masked_nll():
    # logp = [ln 1/2, ln 1/4, pad]: token-mean NLL = (ln 2 + 2 ln 2) / 2
    logp = torch.log(t([0.5, 0.25, 0.1]))
    mask = t([1, 1, 0])
    loss, metrics = sft_loss(logp, mask)
    assert loss.item() == pytest.approx(1.5 * LN2)
    assert metrics["sft/nll"] == pytest.approx(1.5 * LN2)
    assert metrics["sft/tokens"] == 2.0
    # seq-mean-token-sum with one sequence: the summed NLL, 3 ln 2
    summed, _ = sft_loss(logp, mask, mode="seq-mean-token-sum")
    assert summed.item() == pytest.approx(3 * LN2)


# ---------------------------------------------------------- policy_objective


def _uniform_case(V=4):
    # Uniform logits over V = 4: every token has logp = ln 1/4 and entropy ln 4.
    logits = torch.zeros(1, 2, V, dtype=torch.float64, requires_grad=True)
    ids = torch.tensor([[0, 3]])
    logp = token_logprobs(logits, ids)
    ref = torch.full((1, 2), math.log(0.5), dtype=torch.float64)
    return logits, logp, ref, t([1.0, 1.0])


def test_policy_objective_ppo_plus_kl_plus_entropy_by_hand():
    logits, logp, ref, mask = _uniform_case()
    spec = ObjectiveSpec(kl_coef=0.1, entropy_coef=0.01)
    loss, metrics = policy_objective(
        spec, logp, t(1.0), mask, old_logprobs=logp.detach(), ref_logprobs=ref, logits=logits
    )
    # ratio 1, A = 1 -> pg = -1 per token; d = ln 1/4 - ln 1/2 = -ln 2 -> k3 = 2 + (-ln 2) - 1
    k3 = 2 - LN2 - 1
    assert loss.item() == pytest.approx(-1 + 0.1 * k3 - 0.01 * math.log(4))
    assert metrics["policy/pg_loss"] == pytest.approx(-1.0)
    assert metrics["policy/kl"] == pytest.approx(k3)
    assert metrics["policy/entropy"] == pytest.approx(math.log(4))
    assert metrics["policy/clip_frac"] == 0.0
    assert metrics["policy/loss"] == pytest.approx(loss.item())


def test_policy_objective_reinforce_by_hand():
    logits, logp, ref, mask = _uniform_case()
    spec = ObjectiveSpec(policy_loss="reinforce", kl_coef=0.1)
    loss, metrics = policy_objective(spec, logp, t(1.0), mask, ref_logprobs=ref)
    # -A * ln 1/4 = ln 4 per token, plus 0.1 * k3; no logits -> no entropy metric
    assert loss.item() == pytest.approx(math.log(4) + 0.1 * (1 - LN2))
    assert "policy/entropy" not in metrics


def test_policy_objective_full_kl_by_hand():
    logits = torch.tensor([[[math.log(3.0), 0.0]]], dtype=torch.float64, requires_grad=True)
    ref_logits = torch.zeros(1, 1, 2, dtype=torch.float64)
    logp = token_logprobs(logits, torch.tensor([[0]]))
    spec = ObjectiveSpec(kl_coef=1.0, kl_estimator="full")
    loss, metrics = policy_objective(
        spec, logp, t(0.0), t([1.0]), old_logprobs=logp.detach(),
        logits=logits, ref_logits=ref_logits,
    )
    kl = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)  # A = 0, so only the KL term is left
    assert loss.item() == pytest.approx(kl)
    assert metrics["policy/kl"] == pytest.approx(kl)


def test_spec_and_objective_validation_name_the_field():
    for kwargs, field in [
        (dict(clip_low=1.0), "clip_low"),
        (dict(clip_high=-0.1), "clip_high"),
        (dict(dual_clip=1.0), "dual_clip"),
        (dict(loss_agg="mean"), "loss_agg"),
        (dict(kl_estimator="k4"), "kl_estimator"),
        (dict(policy_loss="grpo"), "policy_loss"),
        (dict(kl_coef=-1.0), "kl_coef"),
        (dict(entropy_coef=-1.0), "entropy_coef"),
    ]:
        with pytest.raises(ValueError, match=field):
            ObjectiveSpec(**kwargs)
    _, logp, _, mask = _uniform_case()
    adv = t(1.0)
    with pytest.raises(ValueError, match="old_logprobs"):
        policy_objective(ObjectiveSpec(), logp, adv, mask)
    with pytest.raises(ValueError, match="ref_logprobs"):
        policy_objective(ObjectiveSpec(kl_coef=0.1), logp, adv, mask, old_logprobs=logp)
    with pytest.raises(ValueError, match="logits"):
        policy_objective(ObjectiveSpec(entropy_coef=0.1), logp, adv, mask, old_logprobs=logp)


def test_truncated_importance_sampling_and_the_engine_mismatch_by_hand():
    """On-policy (old = current), A = 1, token-mean. Engine log-probs -1.5 and -1.0 for
    tokens the trainer scores -1.0 and -2.0: weights min(exp(0.5), 2) = 1.64872 and
    exp(-1) = 0.36788, so the loss is -(1.64872 + 0.36788) / 2 = -1.00830 and each
    token's gradient -w / 2; the mismatch is (0.5 + 1.0) / 2 = 0.75. Engine -2.0 for both:
    exp(1) = 2.718 is cut to 2 (half the tokens truncated), loss -(2 + 1) / 2 = -1.5."""
    from actors.objectives import ObjectiveSpec, policy_objective

    spec = ObjectiveSpec(clip_low=0.2, clip_high=0.2, dual_clip=None, tis_cap=2.0)
    mask = torch.ones(1, 2)
    logp = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    loss, m = policy_objective(spec, logp, torch.tensor([1.0]), mask,
                               old_logprobs=logp.detach(),
                               engine_logprobs=torch.tensor([[-1.5, -1.0]]))
    assert loss.item() == pytest.approx(-1.00830, abs=1e-5)
    loss.backward()
    assert logp.grad[0].tolist() == pytest.approx([-0.82436, -0.18394], abs=1e-5)
    assert m["policy/engine_logprob_diff"] == pytest.approx(0.75)
    assert m["policy/tis_weight_mean"] == pytest.approx((1.64872 + 0.36788) / 2, abs=1e-5)
    assert m["policy/tis_truncated_frac"] == 0.0
    loss, m = policy_objective(spec, logp.detach(), torch.tensor([1.0]), mask,
                               old_logprobs=logp.detach(),
                               engine_logprobs=torch.tensor([[-2.0, -2.0]]))
    assert loss.item() == pytest.approx(-1.5) and m["policy/tis_truncated_frac"] == 0.5
    # off: no weights, the mismatch still measured; on without engine log-probs: an error
    off = dataclasses.replace(spec, tis_cap=0.0)
    loss, m = policy_objective(off, logp.detach(), torch.tensor([1.0]), mask,
                               old_logprobs=logp.detach(),
                               engine_logprobs=torch.tensor([[-1.5, -1.0]]))
    assert loss.item() == pytest.approx(-1.0) and "policy/tis_weight_mean" not in m
    assert m["policy/engine_logprob_diff"] == pytest.approx(0.75)
    with pytest.raises(ValueError, match="engine's log-probs"):
        policy_objective(spec, logp.detach(), torch.tensor([1.0]), mask,
                         old_logprobs=logp.detach())
