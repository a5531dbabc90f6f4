"""iReasoner: step extraction on messy text, the step-agreement reward and the mixing
schedule with hand-computed numbers, and a tiny run (the trainer embeds the steps)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from pipelines.recipes.ireasoner.steps import extract_steps, mix_weight, step_agreement

ROOT = Path(__file__).resolve().parents[1]


def test_steps_from_tags_and_numbered_lines_and_unnumbered_text_is_one_step():
    assert extract_steps("<think><step>a</step> junk <step> b  c </step></think>"
                         "<answer>1</answer>") == ["a", "b c"]
    messy = """<think>Step 1: the chart has
three bars.
  2) the middle one
is tallest
Step3 - it reads 40
</think><answer>40</answer>"""
    assert extract_steps(messy) == ["the chart has three bars.", "the middle one is tallest",
                                    "it reads 40"]
    # no <think>: the text before <answer>; no numbering: one step, as the original
    # (meghanaasunil/iReasoner data_and_utils.extract_steps: unnumbered lines join the step
    # before, the first one starting it; its sentence split is reached only without lines)
    assert extract_steps("Bars are red. One is tall!\nWhy? <answer>x</answer>") == [
        "Bars are red. One is tall! Why?"]
    # text before the first number is a step of its own
    assert extract_steps("<think>Look.\nStep 1: red\nStep 2: tall</think>") == [
        "Look.", "red", "tall"]
    assert extract_steps("\n".join(f"{k}. s{k}" for k in range(1, 12))) == [
        f"s{k}" for k in range(1, 9)]  # at most 8
    assert extract_steps(None) == [] and extract_steps("<answer>5</answer>") == []


def unit(*v):
    v = np.array(v, dtype=np.float64)
    return v / np.linalg.norm(v)


def test_step_agreement_by_hand():
    # Samples 0, 1, 2 form the majority group of N = 5; sample 3 is outside.
    # Position 0: e00 = (1, 0), e10 = (0, 1), e20 = (1, 0): centroid normalise((2/3, 1/3))
    #   = (0.894427, 0.447214); cosines 0.894427, 0.447214, 0.894427.
    # Position 1: only sample 0 and 2 hold it: e01 = (1, 0), e21 = (1, 0): cosines 1, 1.
    # Position 2: only sample 0: unused (needs 2 members).
    steps = [[unit(1, 0), unit(1, 0), unit(0, 1)], [unit(0, 1)], [unit(1, 0), unit(1, 0)],
             [unit(1, 1)], []]
    rewards, info = step_agreement([0, 1, 2], steps, 5, position_decay=0.15, density_gamma=0.7)
    w0, w1 = 1.0, math.exp(-0.15)
    s = lambda c: (c + 1) / 2  # noqa: E731
    density = (3 / 5) ** 0.7
    assert rewards[0] == pytest.approx((w0 * s(0.894427) + w1 * s(1.0)) / (w0 + w1) * density,
                                       abs=1e-6)
    assert rewards[1] == pytest.approx(s(0.447214) * density, abs=1e-6)  # position 0 only
    assert rewards[2] == pytest.approx(rewards[0])
    assert 3 not in rewards and info["positions"] == 2 and info["group_size"] == 3
    # ablations: no position decay, no density
    flat, _ = step_agreement([0, 1, 2], steps, 5, position_decay=0.0, density_gamma=0.0)
    assert flat[0] == pytest.approx((s(0.894427) + s(1.0)) / 2, abs=1e-6)
    assert step_agreement([0], steps, 5) == ({}, {"group_size": 1.0, "positions": 0.0,
                                                  "mean_cosine": 0.0})


def test_mixing_schedule():
    assert [mix_weight(p) for p in (0.0, 0.29, 0.3, 0.65, 1.0)] == pytest.approx(
        [0.0, 0.0, 0.0, 0.35, 0.7])
    assert mix_weight(0.1, warmup=False) == 0.7


@pytest.mark.slow
def test_tiny_ireasoner_run_embeds_steps_in_the_trainer(ray_cluster, tmp_path):
    from test_evolmm import drawn_folder

    from pipelines.config import load_config
    from pipelines.runtime.driver import Driver
    from pipelines.runtime.metrics import read_metrics

    images = drawn_folder(tmp_path / "images")
    cfg = load_config(ROOT / "configs/ireasoner/tiny-cpu.yaml", [
        f"run.root={tmp_path}", f"ireasoner.data_dir={images}", "logging.progress=false",
        "ireasoner.warmup=false", "ireasoner.steps=2", "ireasoner.schedule=faithful"])
    Driver(cfg).run()
    lines = [m for m in read_metrics(tmp_path / "ireasoner-tiny/iter_0001/ireasoner/metrics.jsonl")
             if "solver/reward/mean" in m]
    assert len(lines) == 2 and all(m["solver/reward/mix_weight"] == 0.7 for m in lines)
    # the original's schedule: one image per step, one Solver update per sampled answer
    assert all(m["solver/train/updates"] == 5 for m in lines)
    assert all("solver/reward/dominant_group" in m for m in lines)


def test_solver_rewards_by_hand():
    """Four answers 3, 3, 3, 5 (majority group D = the first three, |D|/N = 3/4), each with
    one step; the steps of D embed as [1,0], [1,0], [0,1]. Short texts: no length cost.
    Without warm-up the step share is 0.7 throughout:
      soft_i  = share^0.7: 0.75^0.7 for D, 0.25^0.7 for the 5
      centroid = normalise([2/3, 1/3]) = [2, 1]/sqrt(5); s = (cos + 1) / 2:
      s = (2/sqrt(5) + 1)/2 for [1,0], (1/sqrt(5) + 1)/2 for [0,1]
      step_i  = s_i * 0.75^0.7 in D, 0 outside
      r_i     = 0.3 soft_i + 0.7 step_i"""
    import types

    from pipelines.config import load_config
    from pipelines.recipes.ireasoner.recipe import IReasonerPhase

    root = Path(__file__).resolve().parents[1]
    cfg = load_config(root / "configs/ireasoner/tiny-cpu.yaml", ["ireasoner.warmup=false"])
    phase = IReasonerPhase(cfg, cfg.ireasoner)
    texts = ["<think>Step 1: left</think><answer>3</answer>",
             "<think>Step 1: left</think><answer>3</answer>",
             "<think>Step 1: up</think><answer>3</answer>",
             "<think>Step 1: down</think><answer>5</answer>"]
    vectors = {"left": [1.0, 0.0], "up": [0.0, 1.0]}
    ctx = types.SimpleNamespace(embed=lambda steps, max_tokens: [
        np.asarray(next(v for k, v in vectors.items() if k in s)) for s in steps])
    rewards, metrics = phase.solver_rewards(texts, ["3", "3", "3", "5"], step=0, ctx=ctx)
    density = 0.75 ** 0.7
    s_left, s_up = (2 / math.sqrt(5) + 1) / 2, (1 / math.sqrt(5) + 1) / 2
    expected = [0.3 * density + 0.7 * s_left * density] * 2 + \
        [0.3 * density + 0.7 * s_up * density, 0.3 * 0.25 ** 0.7]
    assert rewards == pytest.approx(expected, abs=1e-6)
    assert metrics["mix_weight"] == 0.7 and metrics["dominant_group"] == 3


def test_the_roles_budgets_and_the_originals_sampling_reach_the_requests():
    """ireasoner.proposer_max_tokens gives the Proposer its own budget (the original's 128
    against the Solver's 256); top_k and repetition_penalty reach both roles (1 and 1.05
    reproduce the original's near-greedy generation config)."""
    from pipelines.config import load_config
    from pipelines.recipes.ireasoner.recipe import IReasonerPhase

    root = Path(__file__).resolve().parents[1]
    cfg = load_config(root / "configs/ireasoner/qwen2.5-vl-7b-2gpu.yaml",
                      ["ireasoner.top_k=1", "ireasoner.repetition_penalty=1.05"])
    phase = IReasonerPhase(cfg, cfg.ireasoner)
    rng = np.random.default_rng(0)
    proposer, solver = phase._sampling(rng, proposer=True), phase._sampling(rng, n=5)
    assert (proposer.max_tokens, solver.max_tokens, solver.n) == (128, 256, 5)
    for s in (proposer, solver):
        assert (s.top_k, s.repetition_penalty) == (1, 1.05)
    tiny = load_config(root / "configs/ireasoner/tiny-cpu.yaml")
    phase = IReasonerPhase(tiny, tiny.ireasoner)  # one budget when the Proposer's is 0
    assert phase._sampling(rng, proposer=True).max_tokens == tiny.ireasoner.max_tokens
    assert (phase._sampling(rng).top_k, phase._sampling(rng).repetition_penalty) == (0, 1.0)
