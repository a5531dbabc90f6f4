"""MAYE: the score, the reflection analysis and the epoch report by hand; the recipe
end to end (it learns a fixed answer, resumes after a kill)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pipelines.eval.data import Item
from pipelines.recipes.maye.recipe import MayePhase, summarise_epochs
from pipelines.recipes.maye.rewards import (
    REFLECTION_WORDS,
    cjk_share,
    reflection_stats,
    score_response,
    think_blocks,
)


def exact(pred, ref):
    return pred == ref


def score(text, ref="4", finished=True, tokens=20, min_tokens=1):
    return score_response(text, ref, finished=finished, tokens=tokens, grade=exact,
                          min_tokens=min_tokens)


def test_score_components_by_hand():
    good = score("<think>two and two</think> so \\boxed{4}")
    assert (good.score, good.accuracy, good.format, good.penalised) == (2.0, 1.0, 1.0, False)
    # right answer, no think block: 1 + 0
    assert score("\\boxed{4}").score == 1.0
    # wrong answer, one block: 0 + 1
    assert score("<think>x</think>\\boxed{5}").score == 1.0
    # two blocks: no format point
    assert score("<think>a</think><think>b</think>\\boxed{4}").score == 1.0
    # 2 CJK characters out of 26: 2 - 0.1 * 2 / 26
    text = "<think>四个</think>\\boxed{4}"
    assert len(text) == 26 and cjk_share(text) == 2 / 26
    assert score(text).score == pytest.approx(2 - 0.1 * 2 / 26)
    # no EOS, or shorter than min_tokens: -0.1 whatever the content
    assert score("<think>x</think>\\boxed{4}", finished=False).score == -0.1
    cut = score("<think>x</think>\\boxed{4}", tokens=3, min_tokens=4)
    # penalised, but "correct" as the original counts it (before the penalty)
    assert (cut.score, cut.accuracy, cut.penalised) == (-0.1, 1.0, True)
    assert score("\\boxed{5}", finished=False).accuracy == 0.0
    assert score("no box", tokens=4, min_tokens=4).score == 0.0


def test_think_blocks_as_the_lazy_regex_counts_them():
    import re

    for text in ["<think>a</think><think>b", "<think><think>a</think></think>",
                 "</think><think>y</think>", "<think>a</think>x<think>b</think>", "",
                 "<think>" * 1000 + "</think>"]:
        assert think_blocks(text) == len(re.findall(r"<think>.*?</think>", text, re.DOTALL))


def test_reflection_ratios_by_hand():
    texts = ["Wait, let me verify.", "The answer is 3.", "Let me RECHECK: yet 4", "plain"]
    correct = [True, True, False, False]
    stats = reflection_stats(texts, correct)
    # reflective: 0 and 2 (lower-case substring match)
    assert stats["reflection_ratio"] == 0.5
    assert stats["reflection_ratio_correct"] == 0.5  # 1 of the 2 correct
    assert stats["reflection_ratio_incorrect"] == 0.5  # 1 of the 2 incorrect
    assert stats["accuracy_reflective"] == 0.5  # 1 of the 2 reflective is correct
    assert stats["accuracy_not_reflective"] == 0.5
    assert stats["reflection_word/wait"] == 1 and stats["reflection_word/verify"] == 1
    assert stats["reflection_word/recheck"] == 1 and stats["reflection_word/yet"] == 1
    assert stats["reflection_word/rethink"] == 0
    assert len([k for k in stats if k.startswith("reflection_word/")]) == len(REFLECTION_WORDS)
    # per word: occurrences (text.count), not responses; the ratios count responses
    repeated = reflection_stats(["wait... wait, wait", "Wait"], [True, False])
    assert repeated["reflection_word/wait"] == 4 and repeated["reflection_ratio"] == 1.0
    # no correct response: the ratios over correct ones are left out, not 0
    none_right = reflection_stats(["wait", "no"], [False, False])
    assert "reflection_ratio_correct" not in none_right
    assert "accuracy_reflective" in none_right and none_right["accuracy_reflective"] == 0.0


def test_epoch_report_before_mean_max():
    report = summarise_epochs({0: {"test": 0.2}, 1: {"test": 0.3}, 2: {"test": 0.5},
                               3: {"test": 0.4}})
    f = report["figures"]["test"]
    assert (f["before"], f["max"], f["last"]) == (0.2, 0.5, 0.4)
    assert math.isclose(f["mean"], 0.4)
    assert summarise_epochs({0: {"test": 0.1}})["figures"]["test"]["mean"] is None


def test_steps_and_order_per_epoch():
    """An epoch is len(train) // prompts_per_step steps; each epoch a new order in which
    every item is asked at most once."""
    from types import SimpleNamespace

    from pipelines.config import load_config

    cfg = load_config(None, ["run.recipe=maye", "maye.prompts_per_step=4",
                             "maye.updates_per_step=2", "maye.epochs=2"])
    phase = MayePhase(cfg, cfg.maye)
    phase.train = [Item(str(i), f"q{i}", str(i)) for i in range(10)]
    phase.per_epoch = len(phase.train) // 4
    asked = [[r.meta.id for r in phase.requests(step, np.random.default_rng(step))]
             for step in range(4)]
    assert all(len(a) == 4 for a in asked)
    assert len(set(asked[0] + asked[1])) == 8 and len(set(asked[2] + asked[3])) == 8
    assert asked[:2] != asked[2:]
    with pytest.raises(ValueError, match="cannot exceed"):
        MayePhase(cfg, SimpleNamespace(**{**vars(cfg.maye), "updates_per_step": 5}))


# -- end to end ----------------------------------------------------------------------------

WORDS = ("tulip", "maple", "river", "stone", "cloud", "amber", "frost", "lemon")
TEMPLATE = "Item {k}: what is the code word?"


def code_word_examples(count: int, seed: int, cfg) -> list:
    """The warm start of the learning check: the template answered with one of eight
    words in turn, in MAYE's format, so the model starts answering "tulip" about one
    time in eight; the RL has to find that only "tulip" scores."""
    from pipelines.recipes.labeled import item_messages
    from pipelines.runtime.sft import SFTExample

    out = []
    for k in range(count):
        word = WORDS[k % len(WORDS)]
        item = Item(str(k), TEMPLATE.format(k=k % 64), word)
        out.append(SFTExample(item_messages(item, cfg.maye.instruction),
                              f"<think>The code word is {word}.</think> \\boxed{{{word}}}"))
    return out


def write_code_word_set(path, count: int, offset: int = 0):
    from pipelines.eval.data import write_jsonl

    return write_jsonl(path, [{"question": TEMPLATE.format(k=offset + k), "answer": "tulip"}
                              for k in range(count)])


@pytest.mark.slow
def test_maye_learns_a_fixed_answer_and_resumes_after_a_kill(ray_cluster, tmp_path):
    """The tiny preset's RL on a task the tiny model can learn: one fixed word for a fixed
    question template, from a warm start that answers with one of eight words. The run is
    SIGKILLed after its third step and resumed; the accuracy of the sampled answers rises
    by at least 0.3, and the evaluation report covers every epoch."""
    import json

    from conftest import ROOT, driver_cli, sigkill_after_step

    from pipelines.runtime.metrics import read_metrics

    train = write_code_word_set(tmp_path / "train.jsonl", 64)
    held = write_code_word_set(tmp_path / "val.jsonl", 16, offset=64)
    args = [str(ROOT / "configs/maye/tiny-cpu.yaml"), f"run.root={tmp_path}", "run.name=learn",
            "logging.progress=false", "model.warm_start.data=test_maye:code_word_examples",
            "model.warm_start.examples=800", "model.warm_start.steps=100",
            f"maye.train=jsonl:{train}", f"maye.validation=jsonl:{held}", "maye.test=",
            "maye.epochs=2", "maye.prompts_per_step=16", "maye.updates_per_step=2",
            "maye.max_tokens=32", "trainer.lr=1e-3", "run.save_every=2"]
    metrics = tmp_path / "learn/iter_0001/policy/metrics.jsonl"
    sigkill_after_step(driver_cli(*args), metrics, "reward/accuracy", step=3)
    resumed = driver_cli(*args)
    assert resumed.wait(timeout=900) == 0, resumed.stderr.read()[-3000:]
    rows = [m for m in read_metrics(metrics) if "reward/accuracy" in m]
    curve = [m["reward/accuracy"] for m in rows]
    print("MAYE accuracy per step: " + " ".join(f"{a:.2f}" for a in curve))
    assert [m["step"] for m in rows] == list(range(1, 9))
    assert np.mean(curve[-3:]) - np.mean(curve[:3]) >= 0.3
    report = json.loads((tmp_path / "learn/maye_report.json").read_text())
    print("evaluation per epoch:", report["epochs"])
    assert sorted(report["epochs"]) == ["0", "1", "2"]
    sampled = report["figures"]["validation_pass@1_t0.6"]
    assert sampled["max"] - sampled["before"] >= 0.3


def test_reinforce_pp_on_one_response_per_question_by_hand():
    """MAYE's advantages for three questions with one response each (scores 2, 0, -0.1;
    2, 1 and 3 tokens), through the estimator the phase uses. Returns (gamma 1): 2 2 | 0 |
    -0.1 -0.1 -0.1; over the 6 tokens mean 3.7 / 6 = 0.61667, unbiased variance
    5.74833 / 5 = 1.14967 (std 1.07222); whitened with the mean kept:
    1.38333 / 1.07222 + 0.61667 = 1.90682, -0.61667 / 1.07222 + 0.61667 = 0.04154,
    -0.71667 / 1.07222 + 0.61667 = -0.05173."""
    from types import SimpleNamespace

    from pipelines.algorithms.estimators import ReinforcePPEstimator

    batch = SimpleNamespace(old_logprobs=[np.zeros(2), np.zeros(1), np.zeros(3)],
                            ref_logprobs=None)
    adv, metrics = ReinforcePPEstimator(kl_in_reward=0.0, gamma=1.0).advantages(
        np.array([2.0, 0.0, -0.1]), [0, 1, 2], batch)
    assert np.allclose(adv[0], [1.90682] * 2, atol=1e-5)
    assert np.allclose(adv[1], [0.04154], atol=1e-5)
    assert np.allclose(adv[2], [-0.05173] * 3, atol=1e-5)
    assert metrics["adv/mean"] == pytest.approx(3.7 / 6)
