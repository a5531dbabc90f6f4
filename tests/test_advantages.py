"""Hand-computed tests for pipelines/algorithms/advantages.py (CPU, no Ray, no model)."""

import math

import pytest
import torch

from pipelines.algorithms.advantages import (
    AdaptiveKLController,
    EMABaseline,
    FixedKLController,
    discounted_returns,
    drgrpo_advantages,
    group_stats,
    grpo_advantages,
    masked_whiten,
    reinforce_pp_advantages,
    rloo_advantages,
)

# Group "a": [1, 0, 0, 1] interleaved with group "b": [0.5, 0.5]; "c" is a singleton.
SCORES = torch.tensor([1.0, 0.5, 0.0, 0.0, 0.5, 1.0, 2.0])
GROUPS = ["a", "b", "a", "a", "b", "a", "c"]
A_IDX = [0, 2, 3, 5]


def test_group_stats_use_the_unbiased_std():
    mean, std, size = group_stats(SCORES, GROUPS)
    # group a: mean 1/2; squared deviations 4 * (1/2)^2 = 1; unbiased var = 1 / (4 - 1)
    assert mean[A_IDX].tolist() == pytest.approx([0.5] * 4)
    assert std[A_IDX].tolist() == pytest.approx([math.sqrt(1 / 3)] * 4)
    assert std[[1, 4]].tolist() == [0.0, 0.0]
    assert size.tolist() == [4, 2, 4, 4, 2, 4, 1]
    assert std[6].item() == 0.0  # singleton: defined as 0, not NaN


def test_grpo_on_a_hand_computed_group():
    adv, metrics = grpo_advantages(SCORES, GROUPS)
    # group a: (r - 1/2) / (sqrt(1/3) + 1e-6) = +-0.866 (the biased std 1/2 would give +-1)
    a = 0.5 / (math.sqrt(1 / 3) + 1e-6)
    assert adv[A_IDX].tolist() == pytest.approx([a, -a, -a, a], rel=1e-6)
    assert adv[[1, 4]].tolist() == [0.0, 0.0]  # constant group: (r - mean) = 0 exactly
    assert adv[6].item() == 0.0  # singleton
    assert adv.dtype == torch.float32
    assert metrics["adv/zero_std_frac"] == pytest.approx(2 / 7)
    assert metrics["adv/singleton_frac"] == pytest.approx(1 / 7)
    assert metrics["adv/abs_mean"] == pytest.approx(4 * a / 7, rel=1e-6)


def test_grpo_accepts_tensor_ids_and_gives_the_same_answer():
    ids = torch.tensor([7, 3, 7, 7, 3, 7, 42])
    by_tensor, _ = grpo_advantages(SCORES, ids)
    by_uid, _ = grpo_advantages(SCORES, GROUPS)
    assert torch.equal(by_tensor, by_uid)
    with pytest.raises(ValueError, match="group_ids"):
        grpo_advantages(SCORES, GROUPS[:-1])


def test_grpo_constant_group_of_unround_numbers_is_zero():
    # In float32, (0.9 + 0.9 + 0.9) / 3 != 0.9: r - mean ~ 6e-8, which / (0 + 1e-6)
    # would be an advantage of ~0.06. float64 statistics keep it far below 1e-6.
    adv, _ = grpo_advantages(torch.full((3,), 0.9), [0, 0, 0])
    assert adv.abs().max().item() < 1e-6


def test_drgrpo_only_subtracts_the_group_mean():
    adv, _ = drgrpo_advantages(SCORES, GROUPS)
    assert adv[A_IDX].tolist() == pytest.approx([0.5, -0.5, -0.5, 0.5])
    assert adv[[1, 4, 6]].tolist() == [0.0, 0.0, 0.0]


def test_rloo_uses_the_leave_one_out_mean():
    adv, _ = rloo_advantages(SCORES, GROUPS)
    # sample 0 (r = 1): the others in a are [0, 0, 1] -> 1 - 1/3
    # sample 2 (r = 0): the others in a are [1, 0, 1] -> 0 - 2/3
    assert adv[A_IDX].tolist() == pytest.approx([2 / 3, -2 / 3, -2 / 3, 2 / 3])
    assert adv[[1, 4, 6]].tolist() == [0.0, 0.0, 0.0]


# ------------------------------------------------------------ REINFORCE++


def test_discounted_returns_by_hand():
    rewards = torch.tensor([[1.0, 2.0, 3.0, 7.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])  # the 7 is padding and must be ignored
    # gamma 1/2: G2 = 3, G1 = 2 + 3/2 = 3.5, G0 = 1 + 3.5/2
    half = discounted_returns(rewards, mask, 0.5)
    assert half[0].tolist() == pytest.approx([1 + 3.5 / 2, 2 + 3 / 2, 3.0, 0.0])
    # gamma 1: suffix sums 6, 5, 3
    assert discounted_returns(rewards, mask, 1.0)[0].tolist() == pytest.approx([6.0, 5.0, 3.0, 0.0])
    with pytest.raises(ValueError, match="gamma"):
        discounted_returns(rewards, mask, 1.5)


def test_masked_whiten_by_hand():
    values = torch.tensor([[1.0, 1.0, 1.0], [-0.5, -0.5, 99.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    # valid: 1, 1, 1, -0.5, -0.5 -> mean 2/5; deviations 0.6 (x3), -0.9 (x2)
    # unbiased var = (3 * 0.36 + 2 * 0.81) / (5 - 1) = 2.7 / 4
    mean, scale = 0.4, 1 / math.sqrt(2.7 / 4 + 1e-8)
    zero_mean = masked_whiten(values, mask, shift_mean=True)
    assert zero_mean[0].tolist() == pytest.approx([0.6 * scale] * 3, rel=1e-6)
    assert zero_mean[1].tolist() == pytest.approx([-0.9 * scale, -0.9 * scale, 0.0], rel=1e-6)
    kept = masked_whiten(values, mask, shift_mean=False)
    assert kept[0].tolist() == pytest.approx([0.6 * scale + mean] * 3, rel=1e-6)
    assert kept[1, 2].item() == 0.0  # padding stays 0
    # A single valid token has no spread: 0 (or its mean), never NaN.
    one = masked_whiten(values, torch.tensor([[1.0, 0, 0], [0, 0, 0]]), shift_mean=False)
    assert one[0].tolist() == [1.0, 0.0, 0.0]


def test_reinforce_pp_scores_at_last_token_mean_kept():
    # No KL, gamma 1: the returns are the score on every valid token.
    scores = torch.tensor([1.0, -0.5])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    adv, returns, _ = reinforce_pp_advantages(scores, mask)
    assert returns.tolist() == [[1.0, 1.0, 1.0], [-0.5, -0.5, 0.0]]
    # Same numbers as the whitening test above, mean 0.4 kept (MAYE default).
    scale = 1 / math.sqrt(2.7 / 4 + 1e-8)
    assert adv[0].tolist() == pytest.approx([0.6 * scale + 0.4] * 3, rel=1e-6)
    assert adv[1].tolist() == pytest.approx([-0.9 * scale + 0.4] * 2 + [0.0], rel=1e-6)


def test_reinforce_pp_whitens_each_run_of_whiten_size_on_its_own():
    """MAYE whitens each rank's share: runs of 2 here. The first run is the test above;
    the second has one return value (2) on all its tokens: no spread, its mean kept."""
    scores = torch.tensor([1.0, -0.5, 2.0, 2.0])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0], [1.0, 0.0, 0.0], [1.0, 1.0, 0.0]])
    adv, _, _ = reinforce_pp_advantages(scores, mask, whiten_size=2)
    scale = 1 / math.sqrt(2.7 / 4 + 1e-8)
    assert adv[0].tolist() == pytest.approx([0.6 * scale + 0.4] * 3, rel=1e-6)
    assert adv[1].tolist() == pytest.approx([-0.9 * scale + 0.4] * 2 + [0.0], rel=1e-6)
    assert adv[2].tolist() == pytest.approx([2.0, 0.0, 0.0])
    assert adv[3].tolist() == pytest.approx([2.0, 2.0, 0.0])
    # over the whole batch (0, or a size >= the batch) the second run is not constant
    whole, _, _ = reinforce_pp_advantages(scores, mask)
    assert torch.equal(whole, reinforce_pp_advantages(scores, mask, whiten_size=8)[0])
    assert whole[2, 0].item() != pytest.approx(2.0)


def test_reinforce_pp_kl_rewards_and_discount_by_hand():
    # ref - logp = ln 2 on each token -> k3 = 2 - ln 2 - 1; r_t = -0.1 * k3 (+ score 1 at t = 2)
    mask = torch.ones(1, 3, dtype=torch.float64)
    logp = torch.full((1, 3), math.log(0.25), dtype=torch.float64)
    ref = torch.full((1, 3), math.log(0.5), dtype=torch.float64)
    k = -0.1 * (1 - math.log(2))
    _, returns, metrics = reinforce_pp_advantages(
        torch.tensor([1.0], dtype=torch.float64), mask, logp, ref, kl_coef=0.1, gamma=0.5
    )
    g2 = k + 1.0
    g1 = k + 0.5 * g2
    g0 = k + 0.5 * g1
    assert returns[0].tolist() == pytest.approx([g0, g1, g2])
    assert metrics["adv/kl_reward_mean"] == pytest.approx(k)
    with pytest.raises(ValueError, match="ref_logprobs"):
        reinforce_pp_advantages(torch.tensor([1.0]), mask, kl_coef=0.1)


def _loop_reinforce_pp(scores, mask, logp, ref, kl_coef, gamma, shift_mean):
    """Reference: plain python loops over samples and tokens."""
    B, T = len(mask), len(mask[0])
    rewards = [[0.0] * T for _ in range(B)]
    returns = [[0.0] * T for _ in range(B)]
    for b in range(B):
        valid = [t for t in range(T) if mask[b][t] > 0]
        for t in valid:
            d = logp[b][t] - ref[b][t]
            k3 = min(max(math.exp(-d) + d - 1.0, -10.0), 10.0)
            rewards[b][t] -= kl_coef * k3
        if valid:
            rewards[b][valid[-1]] += scores[b]
        running = 0.0
        for t in reversed(valid):
            running = rewards[b][t] + gamma * running
            returns[b][t] = running
    flat = [returns[b][t] for b in range(B) for t in range(T) if mask[b][t] > 0]
    mean = sum(flat) / len(flat)
    var = sum((x - mean) ** 2 for x in flat) / (len(flat) - 1)
    adv = [
        [
            ((returns[b][t] - mean) / math.sqrt(var + 1e-8) + (0.0 if shift_mean else mean))
            if mask[b][t] > 0 else 0.0
            for t in range(T)
        ]
        for b in range(B)
    ]
    return adv, returns


@pytest.mark.parametrize("gamma", [1.0, 0.9])
@pytest.mark.parametrize("shift_mean", [False, True])
def test_reinforce_pp_loop_matches_vectorised(gamma, shift_mean):
    g = torch.Generator().manual_seed(1)
    B, T = 5, 9
    lengths = torch.tensor([9, 4, 0, 1, 7])  # right-padded, with an empty row
    mask = (torch.arange(T)[None, :] < lengths[:, None]).double()
    logp = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    ref = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    scores = torch.randn(B, generator=g, dtype=torch.float64)
    adv, returns, _ = reinforce_pp_advantages(
        scores, mask, logp, ref, kl_coef=0.05, gamma=gamma, shift_mean=shift_mean
    )
    ref_adv, ref_returns = _loop_reinforce_pp(
        scores.tolist(), mask.tolist(), logp.tolist(), ref.tolist(), 0.05, gamma, shift_mean
    )
    assert torch.allclose(returns, torch.tensor(ref_returns, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(adv, torch.tensor(ref_adv, dtype=torch.float64), atol=1e-10)


# ------------------------------------------------- baselines, KL control


def test_ema_baseline_numbers_and_state():
    b = EMABaseline()
    assert b.advantage(1.0) == 1.0  # b_0 = 0
    assert b.update(1.0) == pytest.approx(0.1)  # 0.9 * 0 + 0.1 * 1
    assert b.advantage(0.5) == pytest.approx(0.5 - 0.1)
    assert b.update(0.5) == pytest.approx(0.9 * 0.1 + 0.1 * 0.5)
    restored = EMABaseline()
    restored.load_state_dict(b.state_dict())
    assert restored.value == pytest.approx(0.14)
    with pytest.raises(ValueError, match="decay"):
        EMABaseline(decay=1.0)


def test_adaptive_kl_update_numbers():
    c = AdaptiveKLController()
    assert c.beta == 1e-3
    # KL twice the target: beta * exp(0.1 * (0.04 - 0.02) / 0.02) = 1e-3 * e^0.1
    assert c.update(0.04) == pytest.approx(1e-3 * math.exp(0.1))
    # KL on target: unchanged
    assert c.update(0.02) == pytest.approx(1e-3 * math.exp(0.1))
    # KL 0: exp(0.1 * -1) undoes the first step
    assert c.update(0.0) == pytest.approx(1e-3)
    restored = AdaptiveKLController()
    restored.load_state_dict(c.state_dict())
    assert restored.beta == c.beta


def test_adaptive_kl_is_clipped_and_never_overflows():
    high = AdaptiveKLController(beta=99.0)
    assert high.update(0.04) == 100.0  # 99 * e^0.1 > 100
    assert AdaptiveKLController().update(1e6) == 100.0  # exp(5e6) would overflow
    low = AdaptiveKLController(beta=1e-8)
    assert low.update(0.0) == 1e-8  # 1e-8 * e^-0.1 < 1e-8
    with pytest.raises(ValueError, match="KL"):
        AdaptiveKLController().update(float("nan"))
    with pytest.raises(ValueError, match="target"):
        AdaptiveKLController(target=0.0)


def test_fixed_kl_controller_has_the_same_interface():
    c = FixedKLController(beta=0.05)
    assert c.update(10.0) == 0.05
    c.load_state_dict({"beta": 0.2})
    assert c.state_dict() == {"beta": 0.2}
