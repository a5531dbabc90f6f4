"""The phase loop's algorithm wiring, with hand-computed numbers (no Ray, no model).

A unit test of driver logic: the real ``PhaseRunner`` steps with a fixed
reward table, a fake engine pool (fixed completions) and a fake trainer group
(fixed log-probs; it records what it is asked to train on and checkpoints
only the phase's state). What is checked: each estimator's advantages as the
rollout parquet stores them, the mini-batch and epoch schedule, the KL
coefficient an adaptive controller hands each update, and that the EMA
baseline and the KL coefficient continue exactly across a resume.
"""

from __future__ import annotations

import json
import types
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from actors.generator import Completion, Request, Sampling
from pipelines.config import load_config
from pipelines.contract import Scores
from pipelines.runtime.phase import PhaseRunner

ROOT = Path(__file__).resolve().parents[1]

# Step s: two prompts of four samples; rewards by step, prompt, sample.
REWARDS = [[[1, 0, 0, 1], [2, 2, 0, 0]],
           [[0, 0, 1, 1], [1, 1, 1, 3]],
           [[3, 0, 0, 0], [0, 1, 0, 1]],
           [[1, 1, 0, 0], [0, 0, 0, 2]]]
LENGTHS = [2, 3, 1, 2]  # completion tokens of samples 0..3 of every prompt


class TablePhase:
    name = role = "policy"
    steps = len(REWARDS)

    def requests(self, step, rng):
        return [Request([{"role": "user", "content": f"q{step}-{p}"}], sampling=Sampling(n=4))
                for p in range(2)]

    def score(self, requests, completions, ctx):
        step = int(requests[0].messages[0]["content"].split("-")[0][1:])
        return Scores([list(map(float, r)) for r in REWARDS[step]])


class FakePool:
    restarts = 0
    spec = types.SimpleNamespace(dtype="float32")

    def __init__(self):
        self.pushed = []  # (adapter, version) in push order

    def load_adapter(self, name, payload, version):
        self.pushed.append((name, version))

    def generate(self, requests):
        return [[Completion(f"s{i}", [7, 8], list(range(10, 10 + n)), [-1.0] * n, "stop", 0)
                 for i, n in enumerate(LENGTHS)] for _ in requests]


class FakeGroup:
    """Old log-probs -1 per token, reference -1.5; policy/kl reported as ``kl``."""

    def __init__(self, kl: float = 0.05):
        self.kl, self.calls, self.steps, self.adapters = kl, [], 0, []
        self.passes = []  # "behaviour" / "reference", one per compute_logprobs call

    def compute_logprobs(self, batch, reference=False, adapter=None):
        self.passes.append("reference" if reference else "behaviour")
        value = -1.5 if reference else -1.0
        return [np.full(len(ids) - p, value) for ids, p in zip(batch.input_ids, batch.prompt_lens)]

    def forward_backward(self, batch, kl_coef=None, adapter=None):
        self.calls.append((batch, kl_coef))
        self.adapters.append(adapter)
        return {"policy/kl": self.kl, "train/tokens": float(batch.completion_tokens())}

    def adapter(self, name=None, dtype=None):
        return f"payload of {name}"

    def optim_step(self, adapter=None):
        self.steps += 1
        return {"train/grad_norm": 1.0, "train/lr": 1e-3, "train/step": self.steps}

    def save(self, directory, state=None):
        import shutil

        path = Path(directory)
        shutil.rmtree(path, ignore_errors=True)  # a save a kill cut short, as the trainer's
        path.mkdir(parents=True)
        (path / "state.json").write_text(json.dumps({"step": self.steps, "state": state}))
        from actors.checkpoint import MARKER

        (path / MARKER).write_text("ok\n")

    def load(self, directory):
        saved = json.loads((Path(directory) / "state.json").read_text())
        self.steps = saved["step"]
        return saved


def runner(tmp_path, *overrides, group=None, phase=None) -> PhaseRunner:
    cfg = load_config(ROOT / "configs/simple/tiny-cpu.yaml",
                      [f"run.root={tmp_path}", "run.sync_weights=false", "run.save_every=2",
                       "logging.wandb=disabled", *overrides])
    placement = types.SimpleNamespace(layout=types.SimpleNamespace(colocate=()))
    r = PhaseRunner(cfg, phase or TablePhase(), tmp_path / "policy", run_dir=tmp_path,
                    seed_path=(0, 1, 0), engines=None, placement=placement, weights=lambda role: "tiny://qwen2.5-vl")
    r.dir.mkdir(parents=True, exist_ok=True)
    r.pool, r.group = FakePool(), group or FakeGroup()
    return r


def run_steps(r: PhaseRunner, steps) -> list[dict]:
    """Steps of the phase loop from its checkpoint to ``steps``: each step, its checkpoint
    and metrics row as ``PhaseRunner.run`` takes them; their metrics."""
    start = r._resume()
    sink = r.metrics_sink(start)
    try:
        return [r.advance(s, sink) for s in range(start, steps)]
    finally:
        sink.close()


def parquet_advantages(r: PhaseRunner, step: int) -> list:
    return pq.read_table(r.dir / f"rollouts-{step + 1:06d}.parquet").column("advantage").to_pylist()


# Step 0's rewards, flattened: [1, 0, 0, 1, 2, 2, 0, 0]. Group a mean 1/2, unbiased std
# sqrt(1/3); group b mean 1, std sqrt(4/3). grpo: +-0.5 / 0.57735 = +-0.866025 and
# +-1 / 1.154701 = +-0.866025; drgrpo: r - mean; rloo: 4/3 (r - mean).
HAND = {
    "grpo": [0.866025, -0.866025, -0.866025, 0.866025, 0.866025, 0.866025, -0.866025, -0.866025],
    "drgrpo": [0.5, -0.5, -0.5, 0.5, 1.0, 1.0, -1.0, -1.0],
    "rloo": [2 / 3, -2 / 3, -2 / 3, 2 / 3, 4 / 3, 4 / 3, -4 / 3, -4 / 3],
    # b <- 0.9 b + 0.1 r from 0, each advantage r - b before folding r in:
    # b: 0, .1, .09, .081, .1729, .35561, .520049, .4680441
    "reinforce": [1.0, -0.1, -0.09, 0.919, 1.8271, 1.64439, -0.520049, -0.4680441],
}


@pytest.mark.parametrize("estimator", list(HAND))
def test_sequence_estimators_reach_the_rollouts(tmp_path, estimator):
    r = runner(tmp_path, f"algorithm.advantage={estimator}")
    run_steps(r, 1)
    assert parquet_advantages(r, 0) == pytest.approx(HAND[estimator], abs=1e-5)
    [(batch, _)] = r.group.calls
    assert np.asarray(batch.advantages) == pytest.approx(HAND[estimator], abs=1e-5)


def test_reinforce_pp_token_advantages_with_a_kl_reward(tmp_path):
    """Token rewards: -c * k3 at every token (c = 0.5; old -1, ref -1.5: d = 0.5,
    k3 = e^-0.5 + 0.5 - 1 = 0.1065307) plus the score at the last token; returns with
    gamma 1; whitened over the batch's 16 tokens with the mean kept."""
    r = runner(tmp_path, "algorithm.advantage=reinforce_pp", "algorithm.kl_in_reward=0.5",
               "algorithm.kl_coef=0")
    run_steps(r, 1)
    k = 0.5 * (np.exp(-0.5) + 0.5 - 1)
    returns = []
    scores = [1, 0, 0, 1, 2, 2, 0, 0]
    for i, score in enumerate(scores):
        n = LENGTHS[i % 4]
        # G_t = score - k * (tokens from t to the end)
        returns.append([score - k * (n - t) for t in range(n)])
    flat = np.concatenate(returns)
    mean, std = flat.mean(), flat.std(ddof=1)
    want = [list((np.array(g) - mean) / std + mean) for g in returns]
    got = parquet_advantages(r, 0)
    assert [len(g) for g in got] == LENGTHS * 2
    for g, w in zip(got, want):
        assert g == pytest.approx(w, abs=1e-5)
    # hand check of one value: sample 0's first token
    assert got[0][0] == pytest.approx((1 - 2 * k - mean) / std + mean, abs=1e-5)


class RefusingPool(FakePool):
    """Refuses the prompts in ``refuse`` (by index), as an engine does a prompt too long."""

    def __init__(self, refuse=(1,)):
        super().__init__()
        self.refuse = refuse

    def generate(self, requests):
        from actors.generator import REFUSED

        out = super().generate(requests)
        for p in self.refuse:
            out[p] = [Completion("ValueError: prompt too long", [], [], [], REFUSED, 0)] * 4
        return out


def test_a_refused_request_is_dropped_counted_and_the_step_completes(tmp_path):
    """The recipe scores the refused placeholders (its rewards for prompt b), the phase
    drops them: the update sees prompt a's four samples, with prompt a's GRPO
    advantages of step 0 (rewards 1, 0, 0, 1: +-0.866025); rollout/refused counts 1."""
    r = runner(tmp_path)
    r.pool = RefusingPool()
    metrics = run_steps(r, 2)
    assert [m["rollout/refused"] for m in metrics] == [1.0, 1.0]
    batch = r.group.calls[0][0]  # step 0's update
    assert len(batch) == 4 and set(batch.prompt_index.tolist()) == {0}
    assert parquet_advantages(r, 0) == pytest.approx(HAND["grpo"][:4], abs=1e-5)
    r.pool = RefusingPool(refuse=(0, 1))
    with pytest.raises(RuntimeError, match="refused every request"):
        r.step(2)


def test_mini_batches_and_epochs_schedule_whole_prompt_groups(tmp_path):
    r = runner(tmp_path, "algorithm.mini_batches=2", "algorithm.epochs=2")
    metrics = run_steps(r, 1)[0]
    assert metrics["train/updates"] == 4 and r.group.steps == 4
    batches = [b for b, _ in r.group.calls]
    assert [len(b) for b in batches] == [4, 4, 4, 4]  # one prompt's four samples each
    for b in batches:
        assert len(set(b.prompt_index.tolist())) == 1
        # the behaviour log-probs, taken once before the first update, travel with it
        assert all(np.array_equal(lp, np.full(len(lp), -1.0)) for lp in b.old_logprobs)
    for epoch in (batches[:2], batches[2:]):  # every sample once per epoch
        got = sorted(float(a) for b in epoch for a in b.advantages)
        assert got == pytest.approx(sorted(HAND["grpo"]), abs=1e-5)


def test_a_phase_sets_its_own_updates_per_generation_step(tmp_path, monkeypatch):
    """phase.mini_batches (MM-Zero's per-role update batches) overrides
    algorithm.mini_batches for the updates and for the schedule's length."""
    from pipelines.runtime.specs import trainer_spec

    monkeypatch.setattr(TablePhase, "mini_batches", 2, raising=False)
    r = runner(tmp_path, "algorithm.mini_batches=1")
    assert run_steps(r, 1)[0]["train/updates"] == 2 and r.group.steps == 2
    assert [len(b) for b, _ in r.group.calls] == [4, 4]
    assert trainer_spec(r.cfg, "tiny://qwen2.5-vl", 10, mini_batches=2).total_steps == 20
    assert trainer_spec(r.cfg, "tiny://qwen2.5-vl", 10).total_steps == 10


def test_adaptive_kl_and_ema_baseline_continue_exactly_across_a_resume(tmp_path):
    args = ["algorithm.advantage=reinforce", "algorithm.kl_control=adaptive",
            "algorithm.kl_coef=1e-3"]
    whole = runner(tmp_path / "whole", *args)
    full = run_steps(whole, 4)
    # beta <- beta * exp(0.1 * (0.05 - 0.02) / 0.02) = beta * e^0.15 after every step
    betas = [m["train/kl_coef"] for m in full]
    assert betas == pytest.approx([1e-3 * np.exp(0.15) ** s for s in range(4)], rel=1e-9)
    assert [kl for _, kl in whole.group.calls] == pytest.approx(betas, rel=1e-9)

    first = runner(tmp_path / "resumed", *args)
    run_steps(first, 2)  # checkpoint after step 2 (save_every 2)
    again = runner(tmp_path / "resumed", *args)
    rest = run_steps(again, 4)
    assert len(rest) == 2
    assert [m["train/kl_coef"] for m in rest] == pytest.approx(betas[2:], rel=1e-12)
    for step in (2, 3):
        assert parquet_advantages(again, step) == pytest.approx(
            parquet_advantages(whole, step), abs=1e-12)
    assert rest[-1]["adv/baseline"] == pytest.approx(full[-1]["adv/baseline"], abs=1e-12)


class Killed(Exception):
    """A SIGKILL at a chosen point of the loop, for the crash-point test."""


class EvaluatingPhase(TablePhase):
    """``after_step`` as MAYE's: an evaluation after each step, appended to a file of its
    own; with ``kill_in_eval`` the process dies inside that step's evaluation."""

    def __init__(self, kill_in_eval: int | None = None):
        self.kill_in_eval = kill_in_eval

    def after_step(self, step, ctx):
        if step == self.kill_in_eval:
            raise Killed
        with open(ctx.dir / "evals.jsonl", "a") as f:
            f.write(json.dumps({"step": step}) + "\n")
        return {"eval/step": float(step)}


def test_a_kill_at_any_point_of_a_step_loses_and_repeats_nothing(tmp_path, monkeypatch):
    """Kills: after step 2's checkpoint but before its metrics row; inside the evaluation
    of step 4 (a save step); then a torn last metrics line and a checkpoint folder of
    step 4 without its marker (a save cut short). Each resumes; in the end every row is
    there exactly once with the uninterrupted run's figures, the evaluation of every step
    is in the rows, the state and the last step's advantages equal the uninterrupted
    run's, and the complete checkpoint is the newest."""
    from actors.checkpoint import is_complete
    from pipelines.runtime.metrics import MetricsSink, read_metrics

    args = ["algorithm.advantage=reinforce", "algorithm.kl_control=adaptive"]
    whole = runner(tmp_path / "whole", *args, phase=EvaluatingPhase())
    run_steps(whole, 4)

    run = tmp_path / "killed"
    log = MetricsSink.log

    def dies_at_row_2(sink, step, metrics):
        if step == 2:
            raise Killed
        log(sink, step, metrics)

    monkeypatch.setattr(MetricsSink, "log", dies_at_row_2)
    with pytest.raises(Killed):
        run_steps(runner(run, *args, phase=EvaluatingPhase()), 4)
    monkeypatch.setattr(MetricsSink, "log", log)
    metrics = run / "policy/metrics.jsonl"
    assert is_complete(run / "policy/ckpt/step_000002")
    assert [m["step"] for m in read_metrics(metrics)] == [1]

    with pytest.raises(Killed):  # resumes at 2 (its row replayed), dies evaluating step 4
        run_steps(runner(run, *args, phase=EvaluatingPhase(kill_in_eval=3)), 4)
    assert not (run / "policy/ckpt/step_000004").exists()  # the checkpoint comes after it
    assert [m["step"] for m in read_metrics(metrics)] == [1, 2, 3]

    with open(metrics, "a") as f:
        f.write('{"step": 4, "phase": "pol')  # a row a kill cut
    (run / "policy/ckpt/step_000004/dcp").mkdir(parents=True)  # a save cut short
    last = runner(run, *args, phase=EvaluatingPhase())
    run_steps(last, 4)

    def figures(rows):  # as JSON text: NaN figures (no engine log-probs here) compare equal
        return json.dumps([{k: v for k, v in m.items() if not k.startswith(("timing/", "perf/"))}
                           for m in rows], sort_keys=True)

    rows = read_metrics(metrics)
    assert figures(rows) == figures(read_metrics(tmp_path / "whole/policy/metrics.jsonl"))
    assert [m["eval/step"] for m in rows] == [0.0, 1.0, 2.0, 3.0]
    assert metrics.read_text().endswith("}\n")
    assert last.steps.state() == whole.steps.state() and last.group.steps == whole.group.steps
    assert parquet_advantages(last, 3) == parquet_advantages(whole, 3)
    assert sorted(p.name for p in (run / "policy/ckpt").iterdir()) == [
        "step_000002", "step_000004"]
    assert is_complete(run / "policy/ckpt/step_000004")


class TwoPolicyPhase(TablePhase):
    """Policy "a" every step; policy "b" every second step (a proposer updated every
    proposer_update_freq steps): the same table, b's rewards negated."""

    policies = ("a", "b")

    def rollout(self, step, rng, ctx):
        from pipelines.contract import Rollout

        requests = self.requests(step, rng)
        scores = self.score(requests, None, ctx)
        out = [Rollout("a", requests, ctx.pool.generate(requests), scores)]
        if step % 2 == 0:
            negated = Scores([[-r for r in group] for group in scores.rewards])
            out.append(Rollout("b", requests, ctx.pool.generate(requests), negated))
        return out


def test_two_policies_keep_their_own_baselines_versions_and_rollouts(tmp_path):
    r = runner(tmp_path, "algorithm.advantage=reinforce", "run.sync_weights=true",
               "trainer.lora.enabled=true", phase=TwoPolicyPhase())
    r.engines = types.SimpleNamespace(served=lambda role, label: None)
    metrics = run_steps(r, 3)
    assert r.group.adapters == ["a", "b", "a", "a", "b"]
    # every adapter pushed at the start (version 0), then after each of its updates
    assert r.pool.pushed == [("a", 0), ("b", 0), ("a", 1), ("b", 1), ("a", 2), ("a", 3),
                             ("b", 2)]
    assert metrics[0]["a/adv/baseline"] == pytest.approx(0.42123969)  # HAND["reinforce"]'s
    assert metrics[0]["b/adv/baseline"] == pytest.approx(-0.42123969)  # its own EMA
    assert "b/reward/mean" not in metrics[1] and metrics[1]["a/rollout/version"] == 2
    table = pq.read_table(r.dir / "rollouts-000001.parquet").to_pylist()
    assert [row["policy"] for row in table] == ["a"] * 8 + ["b"] * 8
    assert [row["advantage"] for row in table[8:]] == pytest.approx(
        [-a for a in HAND["reinforce"]], abs=1e-5)


def test_adaptive_kl_moves_after_every_optimizer_step(tmp_path):
    r = runner(tmp_path, "algorithm.kl_control=adaptive", "algorithm.kl_coef=1e-3",
               "algorithm.mini_batches=2")
    run_steps(r, 2)
    # each update uses the beta left by the previous one: x e^0.15 per update (KL 0.05)
    assert [kl for _, kl in r.group.calls] == pytest.approx(
        [1e-3 * np.exp(0.15) ** k for k in range(4)], rel=1e-9)


@pytest.mark.parametrize(("overrides", "passes", "old"), [
    # one update per generation batch: that update's forward is the behaviour policy
    ((), [], None),
    # several updates: a trainer pass before them
    (("algorithm.mini_batches=2",), ["behaviour"], "trainer"),
    (("algorithm.behaviour_logprobs=trainer",), ["behaviour"], "trainer"),
    # the engines' own log-probs (-1.0 per token from FakePool), no pass
    (("algorithm.mini_batches=2", "algorithm.behaviour_logprobs=engine"), [], "engine"),
    # LoRA dropout: the update's forward is not the sampling policy's
    (("trainer.lora.enabled=true",), ["behaviour"], "trainer"),
    (("trainer.lora.enabled=true", "trainer.lora.dropout=0"), [], None),
    # reinforce_pp's KL reward needs the behaviour policy's log-probs: a pass even at one update
    (("algorithm.advantage=reinforce_pp", "algorithm.kl_in_reward=0.1"),
     ["behaviour", "reference"], "trainer"),
])
def test_where_the_behaviour_logprobs_come_from(tmp_path, overrides, passes, old):
    r = runner(tmp_path, "algorithm.kl_coef=0", *overrides)
    metrics = run_steps(r, 1)[0]
    assert r.group.passes == passes
    batch = r.group.calls[0][0]
    if old is None:
        assert batch.old_logprobs is None
    else:  # the trainer's fake pass and the fake engines both give -1 per token
        assert [x.tolist() for x in batch.old_logprobs] == \
            [[-1.0] * (len(ids) - p) for ids, p in zip(batch.input_ids, batch.prompt_lens)]
    # the engines' log-probs reach the trainer whenever no trainer pass measures the mismatch
    assert (batch.engine_logprobs is not None) == (old != "trainer")
    assert metrics["train/behaviour_pass"] == float(old == "trainer")


def test_truncated_importance_sampling_sends_the_engine_logprobs(tmp_path):
    r = runner(tmp_path, "algorithm.kl_coef=0", "algorithm.tis_cap=2",
               "algorithm.behaviour_logprobs=trainer")
    run_steps(r, 1)
    batch = r.group.calls[0][0]
    assert batch.old_logprobs is not None and batch.engine_logprobs is not None
    from pipelines.runtime.specs import trainer_spec

    assert trainer_spec(r.cfg, "tiny://qwen2.5-vl", 4).objective.tis_cap == 2.0


class VersionedPool(FakePool):
    """Stamps each completion with the weight version it serves (log-probs -0.5, unlike
    the fake trainer's -1) and logs generate and push calls in order."""

    def __init__(self):
        super().__init__()
        self.version, self.log = 0, []

    def update_weights(self, refs, version, rollback=False):
        self.version = version
        self.log.append(("push", version))

    def generate(self, requests):
        import dataclasses

        self.log.append(("generate", self.version))
        return [[dataclasses.replace(c, logprobs=[-0.5] * len(c.token_ids), version=self.version)
                 for c in group] for group in super().generate(requests)]


def overlap_runner(tmp_path, *overrides) -> PhaseRunner:
    r = runner(tmp_path, "run.sync_weights=true", "run.overlap=1",
               "placement.cpu_threads=reserved", "algorithm.kl_coef=0", *overrides)
    r.pool = VersionedPool()
    r.engines = types.SimpleNamespace(served=lambda role, label, saved=False: None)
    r.group.weight_buckets = lambda bucket_bytes, dtype: []
    return r


def staleness(r: PhaseRunner, step: int) -> list:
    return pq.read_table(r.dir / f"rollouts-{step + 1:06d}.parquet").column("staleness").to_pylist()


def test_overlap_samples_the_next_batch_with_the_weights_being_updated(tmp_path):
    """run.overlap=1: step k+1's batch is sampled with weights k during step k's update,
    trained one version later (staleness 1, per sample in the rollouts), against the
    engines' log-probs; the batch sampled ahead is saved with the checkpoint and the
    resumed run trains on it instead of sampling again."""
    r = overlap_runner(tmp_path)
    metrics = run_steps(r, 4)
    assert r.pool.log == [("generate", 0), ("generate", 0), ("push", 1), ("generate", 1),
                          ("push", 2), ("generate", 2), ("push", 3), ("push", 4)]
    assert [staleness(r, s) for s in range(4)] == [[0] * 8] + [[1] * 8] * 3
    assert [m["rollout/staleness"] for m in metrics] == [0.0, 1.0, 1.0, 1.0]
    assert r.group.passes == []  # no trainer pass: the engines' log-probs are the behaviour's
    for batch, _ in r.group.calls:
        assert {float(x) for lp in batch.old_logprobs for x in lp} == {-0.5}
    assert all(m["timing/overlap"] > 0 for m in metrics[:3]) and "timing/overlap" not in metrics[3]
    assert metrics[1]["timing/generate"] > 0  # the batch's own sampling, a step earlier

    # killed after the checkpoint of step 2: the resumed run takes steps 3 and 4 on the
    # batch sampled ahead (with weights 1), as the uninterrupted run did
    resumed_dir = tmp_path / "resumed"
    first = overlap_runner(resumed_dir)
    run_steps(first, 2)
    # written before the checkpoint's completion marker, beside it
    assert (first.dir / "ckpt/step_000002.upcoming.pkl").exists()
    again = overlap_runner(resumed_dir)
    assert run_steps(again, 4)[0]["rollout/staleness"] == 1.0
    # the checkpoint's weights pushed; step 3's batch not sampled again; step 4's sampled
    assert again.pool.log == [("push", 2), ("generate", 2), ("push", 3), ("push", 4)]
    assert [staleness(again, s) for s in (2, 3)] == [[1] * 8, [1] * 8]
    for s in (2, 3):
        assert parquet_advantages(again, s) == parquet_advantages(r, s)


def test_overlap_refuses_layouts_where_trainer_and_engines_share(tmp_path):
    from pipelines.config import ConfigError

    with pytest.raises(ConfigError, match="cpu_threads"):
        runner(tmp_path, "run.overlap=1", "placement.cpu_threads=all")
    with pytest.raises(ConfigError, match="sleep during its updates"):
        load_config(ROOT / "configs/layouts/mmzero-8gpu-per-phase.yaml", ["run.overlap=1"])


class SleepingPool(VersionedPool):
    """Logs the sleep mode calls of engines colocated with the trainer ranks."""

    def sleep(self, level=1):
        self.log.append(("sleep", level))

    def wake_up(self):
        self.log.append(("wake",))


@pytest.mark.parametrize("overrides, level", [([], 2), (["trainer.lora.enabled=true"], 1),
                                               (["run.sync_weights=false"], 1)])
def test_colocated_engines_sleep_through_the_update_and_wake_after_the_ranks_free_memory(
        tmp_path, overrides, level):
    """Colocated engines sleep while the ranks update; the ranks return their cached device
    memory before the engines wake into it; then the weights are pushed. Level 2 (the
    weights discarded) only where that push overwrites them: full weights synced."""
    r = runner(tmp_path, "run.sync_weights=true", "algorithm.kl_coef=0", *overrides)
    r.placement = types.SimpleNamespace(layout=types.SimpleNamespace(colocate=("policy",)))
    r.pool = SleepingPool()
    r.engines = types.SimpleNamespace(served=lambda role, label, saved=False: None)
    log = r.pool.log
    r.group.weight_buckets = lambda bucket_bytes, dtype: []
    r.group.release_memory = lambda: log.append(("release",))
    update = r.group.optim_step
    r.group.optim_step = lambda adapter=None: log.append(("update",)) or update(adapter)
    if "trainer.lora.enabled=true" in overrides:
        r.pool.load_adapter = lambda name, payload, version: log.append(("push", version))
    run_steps(r, 1)
    pushed = [("push", 1)] if "run.sync_weights=false" not in overrides else []
    assert log == [("generate", 0), ("sleep", level), ("update",), ("release",), ("wake",),
                   *pushed]


def test_checkpoints_of_older_versions_still_unpickle():
    """upcoming.pkl holds pickled objects by module path: the names older versions wrote
    (before rl_step.py, contract.py and actors/sampling.py) still resolve to the classes."""
    import pipelines.recipes.base as base
    import pipelines.runtime.phase as phase
    from actors import generator, sampling
    from pipelines import contract
    from pipelines.runtime import rl_step

    assert phase.SampledBatch is rl_step.SampledBatch
    assert (base.Rollout, base.Scores) == (contract.Rollout, contract.Scores)
    assert (generator.Request, generator.Completion, generator.Sampling) == (
        sampling.Request, sampling.Completion, sampling.Sampling)


def test_a_peers_closed_connection_is_a_group_failure_not_a_rank_error():
    """A surviving rank's gloo or NCCL error about a dead or hung peer can reach the
    driver before Ray reports the dead rank: it is a group failure (the phase rebuilds
    the group from its checkpoint); a rank's own error is passed on as it is."""
    import torch.distributed as dist
    from ray.exceptions import RayTaskError

    from actors.trainer_group import peer_failure

    gloo = RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection "
                        "closed by peer [127.0.0.1]:29500")
    assert peer_failure(gloo) and peer_failure(dist.DistBackendError("NCCL error: unhandled"))
    assert peer_failure(RayTaskError("forward_backward", "traceback", gloo).as_instanceof_cause())
    assert not peer_failure(ValueError("micro-batch of 0 tokens"))
    assert not peer_failure(RayTaskError("optim_step", "traceback", KeyError("lm_head.weight")))


def test_the_restart_budget_counts_every_failure_and_names_them_all_when_spent(monkeypatch):
    """run.max_restarts=2: two failures are restarted, the third stops the run with the
    three in order, one line each (a multi-line error folded), long causes cut at 500."""
    import time

    from actors.restarts import RestartBudget, RestartsExhausted

    # (fmt, when) too: a log handler's formatter may call it while the patch is on
    monkeypatch.setattr(time, "strftime", lambda fmt, when=None: "2026-12-07 10:00:00")
    budget = RestartBudget(2)
    budget.spend("engine coevolve/r/solver/1", RuntimeError("actor died\n  in generate"))
    budget.spend("trainer group of proposer", "no answer within 600 s")
    assert budget.used == 2
    with pytest.raises(RestartsExhausted) as caught:
        budget.spend("engine coevolve/r/solver/0", "x" * 600)
    assert str(caught.value) == (
        "3 failures, more than run.max_restarts=2 restarts allow; the run stops. "
        "Failures in order:\n"
        "  1. 2026-12-07 10:00:00 engine coevolve/r/solver/1: RuntimeError: actor died in "
        "generate\n"
        "  2. 2026-12-07 10:00:00 trainer group of proposer: no answer within 600 s\n"
        "  3. 2026-12-07 10:00:00 engine coevolve/r/solver/0: " + "x" * 500)
    with pytest.raises(ValueError, match="run.max_restarts must be >= 0"):
        RestartBudget(-1)


def test_the_timeout_settings_and_the_run_budget_reach_the_pools_and_trainer_groups(
        tmp_path, monkeypatch):
    """generator.*_timeout_s go to every pool the run starts, trainer.*_timeout_s to every
    trainer group, and the pools and the phases share one restart budget."""
    import actors.pool
    from pipelines.layouts import phase_layouts
    from pipelines.runtime import phase as phase_module
    from pipelines.runtime.engines import Engines

    made = {}

    class Recorder:
        def __init__(self, *args, **kwargs):
            made.setdefault(type(self).__name__, []).append(kwargs)

        def wait_ready(self):
            pass

    monkeypatch.setattr(actors.pool, "GeneratorPool", type("GeneratorPool", (Recorder,), {}))
    monkeypatch.setattr(phase_module, "TrainerGroup", type("TrainerGroup", (Recorder,), {}))
    r = runner(tmp_path, "generator.stall_timeout_s=7", "generator.call_timeout_s=8",
               "generator.start_timeout_s=9", "generator.sync_timeout_s=6",
               "trainer.call_timeout_s=10",
               "trainer.collective_timeout_s=11", "run.max_restarts=4")
    layout = phase_layouts(r.cfg.placement)[0]
    r.placement = types.SimpleNamespace(
        layout=layout, pool_kwargs=lambda role: {}, trainer_kwargs=lambda: {},
        rank_threads=lambda: 1)
    engines = Engines(r.cfg)
    r.engines = engines
    engines.pool("policy", "tiny://qwen2.5-vl", r.placement)
    r._start_group()
    [pool] = made["GeneratorPool"]
    assert (pool["stall_timeout_s"], pool["call_timeout_s"], pool["start_timeout_s"],
            pool["sync_timeout_s"]) == (7, 8, 9, 6)
    assert pool["restarts"] is engines.restarts and engines.restarts.limit == 4
    [group] = made["TrainerGroup"]
    assert (group["call_timeout_s"], group["timeout_s"]) == (10, 11)


class ProbedPool(FakePool):
    """Two engines that take pushes and log restarts."""

    def __init__(self):
        super().__init__()
        self.log = []

    def __len__(self):
        return 2

    def push_from(self, trainer, version, bucket_bytes, rollback=False):
        self.log.append(("push", version))

    def restart(self, i, cause):
        self.log.append(("restart", i, str(cause)))


def test_the_sync_probe_restarts_a_mismatched_engine_and_a_second_mismatch_fails_the_step(
        tmp_path, monkeypatch):
    """generator.sync_check_every=1: after each push the probe runs on the next engine in
    turn; a mismatch restarts that engine and probes it again; a second one fails the step
    with the probe's error (which names the engine)."""
    from actors import weight_push
    from actors.weight_push import SyncMismatch

    r = runner(tmp_path, "run.sync_weights=true", "generator.sync_check_every=1",
               "algorithm.kl_coef=0")
    r.pool = ProbedPool()
    r.engines = types.SimpleNamespace(served=lambda role, label, saved=False: None)
    outcomes = [1e-7, SyncMismatch("engine 1 differs"), 2e-7,
                SyncMismatch("engine 0 differs"), SyncMismatch("engine 0 still differs")]
    probed = []

    def check(pool, trainer, engine, tol, adapter=None):
        probed.append((engine, tol, adapter))
        outcome = outcomes.pop(0)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    monkeypatch.setattr(weight_push, "check", check)
    first, second = run_steps(r, 2)
    assert (first["sync/probe_logprob_diff"], second["sync/probe_logprob_diff"]) == (1e-7, 2e-7)
    assert probed == [(0, 0.1, None), (1, 0.1, None), (1, 0.1, None)]
    assert r.pool.log == [("push", 1), ("push", 2), ("restart", 1, "engine 1 differs")]
    with pytest.raises(SyncMismatch, match="engine 0 still differs"):
        run_steps(r, 3)
    assert r.pool.log[-1] == ("restart", 0, "engine 0 differs")
