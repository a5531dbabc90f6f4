"""R3V: which questions yield which SFT examples (by hand), the answer format, the
test-time selection figures; the recipe end to end (two iterations, resume after a kill)."""

from __future__ import annotations

import numpy as np
import pytest

from pipelines.eval.data import Item
from pipelines.recipes.r3v.mix import (
    SELECT,
    Sample,
    build_mix,
    is_rationale,
    majority_answer,
    rationale_answer,
)

REASONING = "counting the shapes one by one in the picture gives"  # 51 characters


def items():
    return [Item(str(k), f"question {k}?", str(k), solution=f"worked {k}" if k == 1 else None)
            for k in range(1, 6)]


def s(item_id, answer, correct, n, iteration=1):
    return Sample(item_id, f"rationale {item_id}.{n}: {REASONING}\nAnswer: {answer}", answer,
                  correct, iteration)


def pool():
    return [
        # q1: all wrong -> no self-CoT, no refine, no select
        s("1", "9", False, 0), s("1", "8", False, 1), s("1", "7", False, 2),
        # q2: all right -> self-CoT only (the last right one)
        s("2", "2", True, 0), s("2", "2", True, 1), s("2", "2", True, 2),
        # q3: 2 right + 1 wrong -> self-CoT, refine, one select (2 + 1)
        s("3", "3", True, 0), s("3", "0", False, 1), s("3", "3", True, 2),
        # q4: 1 right + 2 wrong -> self-CoT, refine, one select (1 + 2)
        s("4", "1", False, 0), s("4", "4", True, 1), s("4", None, False, 2),
        # q5 (two iterations): 2 right + 2 wrong -> two selects (2 + 1 and 1 + 2)
        s("5", "5", True, 0), s("5", "6", False, 1),
        s("5", "5", True, 0, 2), s("5", "7", False, 1, 2),
    ]


def test_which_questions_yield_which_examples():
    examples, counts = build_mix(items(), pool(), np.random.default_rng(0), distilled=True)
    # direct QA for all 5; the one solution; self-CoT for q2..q5; refine for q3, q4, q5;
    # select: q3 (2+1), q4 (1+2: its unparsable wrong answer is a candidate like any), q5 two
    assert counts == {"direct": 5, "distilled": 1, "self_cot": 4, "self_refine": 3,
                      "self_select": 4}
    assert len(examples) == 17
    by_prompt = {ex.messages[0]["content"][-1]["text"]: ex.target for ex in examples}
    refine_q3 = next(p for p in by_prompt if p.startswith("question 3?") and "prediction:\n" in p)
    assert "rationale 3.1" in refine_q3 and by_prompt[refine_q3].startswith("rationale 3.2")
    cot_q5 = [t for p, t in by_prompt.items() if p.startswith("question 5?")
              and "prediction" not in p and "chain-of-thought" in p]
    assert cot_q5 == [f"rationale 5.0: {REASONING}\nAnswer: 5"]  # the last right one (iter. 2)
    selects = [(p, t) for p, t in by_prompt.items() if SELECT in p]
    assert sorted(t for _, t in selects) == ["Answer: 3", "Answer: 4", "Answer: 5", "Answer: 5"]
    q3 = next(p for p, _ in selects if p.startswith("question 3?"))
    assert all(f"rationale 3.{n}" in q3 for n in range(3))
    assert by_prompt[next(p for p in by_prompt if p.startswith("question 1?") and "directly" in p)] \
        == "Answer: 1"


def test_select_is_kept_when_the_right_candidates_are_written_differently():
    # two right answers written differently ("3", "3.0"): the target is the reference, so
    # the 2 + 1 select stays (the original never compares them)
    mixed = [s("3", "3", True, 0), s("3", "0", False, 1), s("3", "3.0", True, 2)]
    _, counts = build_mix(items()[2:3], mixed, np.random.default_rng(0))
    assert counts["self_select"] == 1 and counts["self_refine"] == 1
    # the kinds can be switched off; the solution is off by default
    _, counts = build_mix(items(), mixed, np.random.default_rng(0),
                          direct_qa=False, self_refine=False, self_select=False)
    assert counts == {"direct": 0, "distilled": 0, "self_cot": 1, "self_refine": 0,
                      "self_select": 0}


def test_bare_answers_are_left_out_of_the_reasoning_kinds():
    """The original's filter: a prediction of <= 50 characters, or one starting with
    "Answer", is not a rationale (self-CoT, refine and select use rationales only)."""
    assert is_rationale("x" * 51) and not is_rationale("x" * 50)
    assert not is_rationale("Answer: 3, since " + REASONING)
    assert is_rationale(" Answer: 3, since " + REASONING)  # as the original: a prefix test
    short_right = Sample("3", "3 shapes\nAnswer: 3", "3", True, 1)
    bare_right = Sample("3", "Answer: 3 " + REASONING, "3", True, 1)
    for right in (short_right, bare_right):
        pool = [right, s("3", "0", False, 1), s("3", "1", False, 2)]
        _, counts = build_mix(items()[2:3], pool, np.random.default_rng(0))
        # without a right rationale: no self-CoT, refine or select; the direct answer stays
        assert counts == {"direct": 1, "distilled": 0, "self_cot": 0, "self_refine": 0,
                          "self_select": 0}
        _, counts = build_mix(items()[2:3], pool, np.random.default_rng(0),
                              filter_rationales=False)
        assert (counts["self_cot"], counts["self_refine"], counts["self_select"]) == (1, 1, 1)


def test_candidates_are_shuffled_by_the_seed():
    def order(seed):
        examples, _ = build_mix(items()[2:3], pool()[6:9], np.random.default_rng(seed),
                                direct_qa=False, self_refine=False)
        text = next(ex.messages[0]["content"][-1]["text"] for ex in examples if SELECT in
                    ex.messages[0]["content"][-1]["text"])
        return [text.index(f"rationale 3.{n}") for n in range(3)]

    orders = {tuple(np.argsort(order(seed))) for seed in range(8)}
    assert len(orders) > 1


def test_answer_format_and_majority():
    assert rationale_answer("so\nAnswer: 4") == "4"
    assert rationale_answer("answer: 3 then Answer:  7\nmore") == "7"
    assert rationale_answer("\\boxed{5} Answer: 6") == "5"  # a boxed answer wins
    assert rationale_answer("nothing") is None
    assert majority_answer(["3", "4", "4", None], lambda a, b: a == b) == "4"
    assert majority_answer(["3", "4"], lambda a, b: a == b) == "3"  # ties: the earliest
    assert majority_answer([None, "unknown"], lambda a, b: a == b) is None


def test_gpu_preset_has_the_originals_values():
    from conftest import ROOT

    from pipelines.config import load_config

    cfg = load_config(ROOT / "configs/r3v/qwen2-vl-7b-8gpu.yaml")
    r, t = cfg.r3v, cfg.trainer
    assert (r.samples, r.temperature, r.top_p, r.epochs, r.batch_size) == (3, 0.9, 0.95, 3, 64)
    assert (r.max_tokens, r.val_fraction, r.distilled, r.filter_rationales) == \
        (200, 0.1, False, True)
    assert r.select_candidates == [2, 3, 4, 5, 6] and cfg.run.iterations == 3
    assert (t.lr, t.schedule, t.warmup_ratio, t.weight_decay, t.freeze_vision) == \
        (3e-5, "warmup", 0.1, 0.05, True)
    # the seed's version (hhhwmws0117/MM-self-improve-qwen2vl) trains with LLaMA-Factory's
    # LoRA defaults: r 8, alpha 16, dropout 0 (a LoRA scale of 2)
    assert (t.lora.enabled, t.lora.rank, t.lora.alpha, t.lora.dropout) == (True, 8, 16, 0.0)


@pytest.mark.slow
def test_r3v_two_iterations_resume_after_a_kill(ray_cluster, tmp_path):
    """The tiny preset, smaller: a warm start, then two iterations of sampling, mix and
    LoRA SFT from the base, each evaluated. SIGKILLed during iteration 2's SFT and
    resumed: it finishes, and the samples already made are reused, not drawn again."""
    import json

    from conftest import ROOT, driver_cli, sigkill_after_step

    from pipelines.runtime.metrics import read_metrics

    args = [str(ROOT / "configs/r3v/tiny-cpu.yaml"), f"run.root={tmp_path}", "run.name=r3v",
            "logging.progress=false", "r3v.train=shapes:16", "r3v.test=shapes:6",
            "r3v.select_candidates=[2, 3]", "r3v.batch_size=8", "r3v.epochs=2",
            "r3v.max_tokens=48", "model.warm_start.steps=32", "run.save_every=2"]
    run = tmp_path / "r3v"
    sigkill_after_step(driver_cli(*args), run / "iter_0002/sft/metrics.jsonl", "sft/nll",
                       step=2)
    made = {k: (run / f"iter_000{k}/sft/samples.jsonl").read_bytes() for k in (1, 2)}
    resumed = driver_cli(*args)
    assert resumed.wait(timeout=900) == 0, resumed.stderr.read()[-3000:]
    assert {k: (run / f"iter_000{k}/sft/samples.jsonl").read_bytes() for k in (1, 2)} == made
    assert [len(v.splitlines()) for v in made.values()] == [48, 48]  # 16 questions x 3
    rows = [m for m in read_metrics(run / "iter_0002/sft/metrics.jsonl") if "sft/nll" in m]
    assert [m["step"] for m in rows] == list(range(1, len(rows) + 1))
    data = rows[0]
    assert data["data/pool_samples"] == 96  # models 0 and 1
    assert data["data/mix_direct"] == 16 and data["data/mix_distilled"] == 16
    # 10% of the mix held out, scored after each of the 2 epochs (also after the resume)
    held = [m for m in rows if "sft/val_loss" in m]
    assert [m["step"] for m in held] == [len(rows) // 2, len(rows)], held
    assert all(0 < m["sft/val_loss"] < 20 for m in held)
    print("iteration 2 mix:", {k: v for k, v in data.items() if k.startswith("data/mix")},
          "sample accuracy", data["data/sample_accuracy"])
    evals = {p.stem: json.loads(p.read_text()) for p in (run / "r3v_eval").glob("*.json")}
    assert sorted(evals) == ["base", "iter_0001", "iter_0002"]
    for figures in evals.values():
        assert figures["items"] == 6
        for n in (2, 3):  # the oracle bounds majority vote; more candidates never hurt it
            assert figures[f"oracle@{n}"] >= figures[f"majority@{n}"]
        assert figures["oracle@3"] >= figures["oracle@2"]
    print("evaluations:", evals)
    assert (run / "r3v_report.png").stat().st_size > 0
    table = [line.split(" | ")[0] for line in (run / "r3v_report.md").read_text().splitlines()
             if line.startswith("| ") and "---" not in line]
    assert table == ["| model", "| base", "| iter_0001", "| iter_0002"]


def test_a_tenth_of_the_mix_is_held_out_and_scored_after_each_epoch(monkeypatch):
    from pipelines.runtime import sft

    examples = [sft.SFTExample([], str(k)) for k in range(25)]
    phase = sft.SFTPhase("sft", "policy", examples, batch_size=8, epochs=2, val_fraction=0.1)
    assert [e.target for e in phase.validation] == ["23", "24"]  # floor(2.5), the last ones
    assert len(phase.examples) == 23 and phase.per_epoch == 3 and phase.steps == 6
    trained = {e.target for step in range(3) for e in phase.batch_examples(step, (1,))}
    assert trained == {str(k) for k in range(23)}  # each once per epoch, never a held one
    assert [bool(phase.held_out(step)) for step in range(6)] == [False, False, True] * 2
    assert sft.SFTPhase("sft", "policy", examples, 8).validation == []
    with pytest.raises(ValueError, match="val_fraction"):
        sft.SFTPhase("sft", "policy", examples, 8, val_fraction=1.0)

    # the loss: minus the sum of the target tokens' log-probs over their count, whatever
    # the chunks (2 + 1 examples here: 3 + 1 + 2 tokens)
    class Group:
        def compute_logprobs(self, batch):
            return [np.array(x, np.float32) for x in batch]

    logps = {"a": [-1.0, -2.0, -0.5], "b": [-3.0], "c": [-0.25, -0.25]}
    monkeypatch.setattr(sft, "sft_batch", lambda chunk, processor: [logps[e.target]
                                                                    for e in chunk])
    held = [sft.SFTExample([], k) for k in "abc"]
    assert sft.held_out_loss(Group(), held, None, chunk=2) == pytest.approx(7.0 / 6)


def test_status_counts_sft_steps_and_names_the_report(tmp_path):
    import json

    from pipelines.runtime.status import render_status

    run = tmp_path / "run"
    (run / "iter_0001/sft").mkdir(parents=True)
    (run / "state.json").write_text(json.dumps({"finished": True, "updated": 0, "roles": {},
                                                "first_step_s": 46.25}))
    (run / "iter_0001/sft/metrics.jsonl").write_text(
        "".join(json.dumps({"step": k, "sft/nll": 3.0 / k, "timing/step": 1.0}) + "\n"
                for k in (1, 2)))
    (run / "r3v_report.md").write_text("# R3V evaluation\n")
    text = render_status(run)
    assert "iter_0001/sft: in progress, 2 steps logged" in text
    assert "time to first step: 46.2 s (this launch)" in text
    assert "step 2: sft/nll 1.5" in text
    assert f"evaluation: {run / 'r3v_report.md'}" in text


def test_sampling_keeps_finished_chunks_across_a_kill(tmp_path, monkeypatch):
    """Rationales are saved a chunk at a time: a run killed mid-sampling asks only the
    questions it has no complete set of samples for, and the file comes out in item
    order with the same rows as an uninterrupted run (per-question seeds)."""
    import json

    from actors.generator import Completion
    from pipelines.config import load_config
    from pipelines.recipes.r3v import recipe

    class Pool:
        def __init__(self, fail_after=None):
            self.asked, self.fail_after = [], fail_after

        def generate(self, requests):
            if self.fail_after is not None and len(self.asked) >= self.fail_after:
                raise RuntimeError("killed")
            self.asked.append([r.meta.id for r in requests])
            return [[Completion(f"s{k} {r.sampling.seed}\nAnswer: {r.meta.answer}", [], [1],
                                [0.0], "stop", 0) for k in range(r.sampling.n)]
                    for r in requests]

    monkeypatch.setattr(recipe, "CHUNK", 2)
    cfg = load_config(None, ["run.recipe=r3v", "r3v.samples=3"])
    phase = recipe.R3VPhase(cfg, cfg.r3v)
    items = [Item(str(k), f"q{k}?", str(k)) for k in range(5)]
    whole = tmp_path / "whole.jsonl"
    phase.sample(Pool(), None, items, 1, whole)
    killed, pool = tmp_path / "killed.jsonl", Pool(fail_after=2)
    with pytest.raises(RuntimeError):
        phase.sample(pool, None, items, 1, killed)
    assert not killed.exists() and pool.asked == [["0", "1"], ["2", "3"]]
    partial = tmp_path / ".killed.jsonl.partial"
    partial.write_text(partial.read_text() + '{"item_id": "4", "te')  # a torn last line
    again = Pool()
    phase.sample(again, None, items, 1, killed)
    assert again.asked == [["4"]]
    assert killed.read_text() == whole.read_text()
    rows = [json.loads(line) for line in whole.read_text().splitlines()]
    assert [r["item_id"] for r in rows] == [str(k) for k in range(5) for _ in range(3)]
    assert all(r["correct"] for r in rows)


def test_a_select_prompt_that_cannot_fit_is_refused_up_front():
    from pipelines.config import load_config
    from pipelines.recipes.r3v.recipe import R3VPhase

    cfg = load_config(None, ["run.recipe=r3v", "r3v.max_tokens=1024",
                             "generator.max_model_len=4096"])
    with pytest.raises(ValueError, match="max_model_len >= 7168"):
        R3VPhase(cfg, cfg.r3v)
    cfg = load_config(None, ["run.recipe=r3v", "r3v.select_candidates=[0, 2]"])
    with pytest.raises(ValueError, match="at least 1"):
        R3VPhase(cfg, cfg.r3v)


def test_evaluate_selection_by_hand():
    """Two items with known answers (7 and 3), scripted greedy answers, five sampled
    candidates each and the model's picks; every figure counted by hand below."""
    from actors.generator import Completion

    from pipelines.eval.data import Item
    from pipelines.recipes.r3v.recipe import evaluate_selection

    items = [Item(id="a", question="How many?", answer="7"),
             Item(id="b", question="How many?", answer="3")]
    candidates = {"a": ["Answer: 7", "Answer: 5", "Answer: 5", "Answer: 7", "Answer: 7"],
                  "b": ["Answer: 1", "Answer: 1", "Answer: 3", "Answer: 2", "Answer: 3"]}
    greedy = {"a": "Answer: 7", "b": "Answer: 2"}

    class Pool:
        calls = 0

        def generate(self, requests):
            self.calls += 1
            out = []
            for r in requests:
                item = r.meta
                if self.calls == 1 and r.sampling.n == 1:  # Test@1
                    texts = [greedy[item.id]]
                elif self.calls == 1:  # the sampled candidates
                    texts = candidates[item.id][:r.sampling.n]
                else:  # self-select: the model picks the first listed candidate
                    prompt = r.messages[0]["content"][-1]["text"]
                    texts = [prompt.split("Model's prediction 1:\n")[1].split("\n")[0]]
                out.append([Completion(t, [1], [2], [-0.1], "stop", 0) for t in texts])
            return out

    figures = evaluate_selection(Pool(), items, seed=0, counts=[2, 3, 5], temperature=0.9,
                                 top_p=0.95, max_tokens=16)
    # Test@1: a right (7), b wrong (2)
    assert figures["test@1"] == 0.5
    # N=2: a [7,5] b [1,1]. select picks the first: a right, b wrong -> 0.5; majority: a's
    # tie goes to the earliest (7, right), b's is 1 (wrong) -> 0.5; oracle: a only -> 0.5
    assert (figures["select@2"], figures["majority@2"], figures["oracle@2"]) == (0.5, 0.5, 0.5)
    # N=3: a [7,5,5] majority 5 (wrong); b [1,1,3] majority 1 (wrong); oracle: both
    assert (figures["select@3"], figures["majority@3"], figures["oracle@3"]) == (0.5, 0.0, 1.0)
    # N=5: a [7,5,5,7,7] majority 7 (right); b [1,1,3,2,3] tie 1 vs 3: the earliest, 1
    assert (figures["select@5"], figures["majority@5"], figures["oracle@5"]) == (0.5, 0.5, 1.0)
    assert figures["items"] == 2
