"""The driver on the full actor system: it learns, and it resumes exactly.

Real vLLM engines, FSDP2 trainer ranks and weight sync on the tiny model.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import driver_cli, sigkill_after_step

from pipelines.config import load_config
from pipelines.runtime.driver import Driver
from pipelines.runtime.metrics import read_metrics
from pipelines.runtime.status import render_status

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def even_token_share(sample: dict) -> float:
    """Share of completion tokens whose id is even: ~0.5 for a random model."""
    ids = sample["token_ids"]
    return sum(1 for t in ids if t % 2 == 0) / max(len(ids), 1)


def config(tmp_path, name: str, *extra: str):
    return load_config(ROOT / "configs/simple/tiny-cpu.yaml", [
        f"run.root={tmp_path}", f"run.name={name}", "simple.reward=test_driver:even_token_share",
        "simple.images=false", "logging.progress=false", *extra])


def rewards(run_dir: Path) -> list[float]:
    return [m["reward/mean"] for m in read_metrics(run_dir / "iter_0001/policy/metrics.jsonl")
            if "reward/mean" in m]


def test_grpo_raises_a_dense_reward_and_not_without_weight_sync(ray_cluster, tmp_path):
    """Learns through a multiprocess engine (a GPU host's shape: the weights are loaded
    by vLLM's worker process); the run without sync uses the in-process shape."""
    steps = ["simple.steps=24", "simple.prompts_per_step=4", "simple.n=8", "simple.max_tokens=16",
             "trainer.lr=2e-3", "algorithm.kl_coef=0", "run.save_every=100"]
    learning = Driver(config(tmp_path, "sync", *steps, "generator.multiprocess=always"))
    learning.run()
    # half the steps suffice to show that nothing drifts
    frozen = Driver(config(tmp_path, "nosync", *steps, "simple.steps=12",
                           "run.sync_weights=false"))
    frozen.run()
    curve, flat = rewards(tmp_path / "sync"), rewards(tmp_path / "nosync")
    print("reward with weight sync:    " + " ".join(f"{r:.2f}" for r in curve))
    print("reward without weight sync: " + " ".join(f"{r:.2f}" for r in flat))
    start = np.mean(curve[:3])
    assert max(np.convolve(curve, np.ones(3) / 3, mode="valid")) - start >= 0.15
    # The same updates without sync: the engines keep sampling the starting policy.
    assert abs(np.mean(flat[-5:]) - np.mean(flat[:5])) < 0.05


@pytest.mark.parametrize("estimator, overlap", [("rloo", 1), ("reinforce", 0)])
def test_other_estimators_raise_the_dense_reward(ray_cluster, tmp_path, estimator, overlap):
    """The learning check with REINFORCE against an EMA baseline, and with rloo and
    run.overlap=1: the engines sample step k+1 with weights k while the trainer updates
    on batch k. It still learns, and the rollouts show the bounded staleness: every
    sample after the first step was drawn by the weights one version behind the
    update's (the engines' log-probs are the ratio's behaviour policy)."""
    import pyarrow.parquet as pq

    steps = ["simple.steps=24", "simple.prompts_per_step=4", "simple.n=8", "simple.max_tokens=16",
             "trainer.lr=2e-3", "algorithm.kl_coef=0", "run.save_every=100",
             f"algorithm.advantage={estimator}", f"run.overlap={overlap}"]
    if overlap:  # generation and the update at once: each with its reserved CPUs
        steps.append("placement.cpu_threads=reserved")
    Driver(config(tmp_path, estimator, *steps)).run()
    curve = rewards(tmp_path / estimator)
    print(f"reward with {estimator}, overlap {overlap}: " + " ".join(f"{r:.2f}" for r in curve))
    start = np.mean(curve[:3])
    assert max(np.convolve(curve, np.ones(3) / 3, mode="valid")) - start >= 0.15
    if not overlap:
        return
    phase = tmp_path / estimator / "iter_0001/policy"
    for step in range(1, 25):
        rows = pq.read_table(phase / f"rollouts-{step:06d}.parquet").to_pylist()
        assert {r["version"] for r in rows} == {max(step - 2, 0)}
        assert {r["staleness"] for r in rows} == {min(step - 1, 1)}
    metrics = read_metrics(phase / "metrics.jsonl")
    assert all(m["train/behaviour_pass"] == 0 for m in metrics if "train/behaviour_pass" in m)
    assert all(m["timing/overlap"] > 0 for m in metrics[:23])


def test_a_users_recipe_runs_by_module_path(ray_cluster, tmp_path):
    """run.recipe=package.module:Class with its own settings section; two iterations that
    leave only what a resume, ``coevolve export`` and ``coevolve eval`` need: no step
    checkpoint (each phase saved one per step), each phase's hf/ (its one role is the
    evaluated one, which run.keep_exports leaves whole), logs and rollouts."""
    import pyarrow.parquet as pq
    import yaml

    from pipelines.runtime.export import export_run

    cfg = load_config(None, [
        "run.recipe=tests.user_recipe:LengthRecipe", "length.target=3", "length.steps=2",
        f"run.root={tmp_path}", "run.name=user", "logging.wandb=disabled",
        "logging.progress=false", "placement.roles={policy: {}}", "trainer.micro_batch_tokens=4096",
        "generator.max_model_len=1024", "generator.max_num_batched_tokens=2048",
        "run.iterations=2", "run.save_every=1", "run.keep_exports=1"])
    Driver(cfg).run()
    run = tmp_path / "user"
    phase = run / "iter_0001/policy"
    rows = pq.read_table(phase / "rollouts-000002.parquet").to_pylist()
    assert [r["reward"] for r in rows] == [-abs(r["response_tokens"] - 3) for r in rows]
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["length"]["target"] == 3 and saved["run"]["recipe"].endswith(":LengthRecipe")

    def left() -> dict[str, int]:
        """Files left in the run directory, by folder; the exports' files under "hf"."""
        out: dict[str, int] = {}
        for f in run.rglob("*"):
            if f.is_file():
                key = str(f.parent.relative_to(run)) if "hf" not in f.parts else "hf"
                out[key] = out.get(key, 0) + 1
        return out

    files = left()
    print("files left:", files)
    assert not list(run.rglob("ckpt"))  # step checkpoints of finished phases pruned
    assert files["hf"] == 2 * len(list((phase / "hf").iterdir()))  # iterations 1 and 2
    assert (run / "iter_0002/policy/hf/model.safetensors").exists()
    for it in ("iter_0001/policy", "iter_0002/policy"):  # two steps each, DONE, logs
        names = {f.name for f in (run / it).iterdir() if f.is_file()}
        assert names == {"DONE", "metrics.jsonl", "provenance.json", "rollouts-000001.parquet",
                         "rollouts-000002.parquet"}, names
    assert set(files) == {".", "iter_0001/policy", "iter_0002/policy", "hf"}
    small = sum(f.stat().st_size for f in run.rglob("*") if f.is_file() and "hf" not in f.parts)
    assert small < 1 << 20  # besides the export: logs, rollouts, state
    state = json.loads((run / "state.json").read_text())
    assert state["roles"]["policy"]["path"] == "iter_0002/policy/hf" and state["finished"]
    # A resume finds nothing to do; the export finds what it needs.
    Driver(cfg).run()
    assert left() == files
    manifest = export_run(run, tmp_path / "export")
    assert manifest["policies"]["policy"]["source"] == "iter_0002/policy/hf"
    assert (tmp_path / "export/policy/model.safetensors").exists()


def test_sft_phase_learns_resumes_after_sigkill_and_exports_what_vllm_serves(ray_cluster,
                                                                            tmp_path):
    """An SFT phase (pipelines/runtime/sft.py) on eight fixed examples: the NLL falls; a
    driver killed after its step-2 checkpoint finishes with the same weights and metrics
    as an uninterrupted run; vLLM serves the hf/ export."""
    import ray
    from safetensors.numpy import load_file

    from actors.generator import EngineSpec, GeneratorActor, Request, Sampling, cpu_engine_env

    common = [f"run.root={tmp_path}", "run.recipe=tests.user_recipe:FactsRecipe",
              "facts.epochs=3", "run.save_every=2", "trainer.lr=2e-3", "logging.progress=false",
              "logging.wandb=disabled", "placement.trainer_ranks=2"]

    def cli(name: str):
        return driver_cli(*common, f"run.name={name}")

    whole = cli("whole")
    assert whole.wait(timeout=600) == 0, whole.stderr.read()[-3000:]
    killed = cli("killed")
    sigkill_after_step(killed, tmp_path / "killed/iter_0001/sft/metrics.jsonl", "sft/nll")
    resumed = cli("killed")
    assert resumed.wait(timeout=600) == 0, resumed.stderr.read()[-3000:]

    def curve(run: str) -> list[dict]:
        return [{k: v for k, v in m.items() if not k.startswith(("timing/", "perf/", "phase/"))}
                for m in read_metrics(tmp_path / run / "iter_0001/sft/metrics.jsonl")
                if "sft/nll" in m]

    nll = [m["sft/nll"] for m in curve("whole")]
    print("SFT nll: " + " ".join(f"{x:.2f}" for x in nll))
    # measured: 7.00 6.41 5.84 5.21 5.63 4.60 (one epoch is two steps of four examples)
    assert len(nll) == 6 and nll[-1] < 0.8 * nll[0]
    assert curve("killed") == curve("whole")
    a = load_file(tmp_path / "whole/iter_0001/sft/hf/model.safetensors")
    b = load_file(tmp_path / "killed/iter_0001/sft/hf/model.safetensors")
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert json.loads((tmp_path / "killed/state.json").read_text())["roles"]["policy"][
        "version"] == 6

    actor = ray.remote(num_cpus=1, runtime_env={"env_vars": cpu_engine_env(1)})(GeneratorActor)
    engine = actor.remote(EngineSpec(model=str(tmp_path / "whole/iter_0001/sft/hf"),
                                     dtype="float32", max_model_len=1024,
                                     max_num_batched_tokens=2048), "sft-export")
    try:
        [[sample]] = ray.get(engine.generate.remote([Request(
            [{"role": "user", "content": "Fact 0: what is the code word?"}],
            sampling=Sampling(temperature=0.0, max_tokens=12))]))
    finally:
        ray.kill(engine)
    print("greedy answer of the export:", repr(sample.text))
    assert sample.token_ids


def test_a_phase_trains_two_adapters_served_by_one_engine(ray_cluster, tmp_path):
    """Two policies (LoRA adapters on one backbone) in one phase: each sampled from its
    own adapter (engine and trainer log-probs agree per policy), each updated on its own
    schedule and versioned on its own."""
    import pyarrow.parquet as pq

    cfg = load_config(None, [
        "run.recipe=tests.user_recipe:AskAnswerRecipe", f"run.root={tmp_path}", "run.name=two",
        "logging.wandb=disabled", "logging.progress=false", "placement.roles={policy: {}}",
        "trainer.lora.enabled=true", "trainer.lora.rank=8", "trainer.lr=1e-2",
        "trainer.micro_batch_tokens=4096", "algorithm.kl_coef=0.01",
        "generator.max_model_len=1024", "generator.max_num_batched_tokens=2048"])
    Driver(cfg).run()
    phase = tmp_path / "two/iter_0001/policy"
    lines = [m for m in read_metrics(phase / "metrics.jsonl") if "answerer/reward/mean" in m]
    assert [m["answerer/rollout/version"] for m in lines] == [1, 2, 3]
    assert [m.get("asker/rollout/version") for m in lines] == [1, None, 2]
    assert max(m[k] for m in lines for k in m if k.endswith("rollout/logprob_diff")) < 1e-5
    rows = pq.read_table(phase / "rollouts-000003.parquet").to_pylist()
    assert {r["policy"] for r in rows} == {"answerer", "asker"}
    assert {r["version"] for r in rows if r["policy"] == "asker"} == {1}  # sampled by asker v1
    assert (phase / "hf/adapter/asker/adapter_config.json").is_file()

    # coevolve export: a merged folder per policy, the adapters in peft's format
    import torch
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    from actors.models import resolve_model
    from pipelines.runtime.export import export_run

    manifest = export_run(tmp_path / "two", tmp_path / "out")
    assert set(manifest["policies"]) == {"policy", "policy-asker"}
    assert manifest["policies"]["policy"]["adapters"] == ["answerer", "asker"]
    assert manifest["config"]["run"]["recipe"] == "tests.user_recipe:AskAnswerRecipe"
    assert manifest["code"]["git_commit"]
    ids = torch.tensor([[5, 17, 42, 7, 99]])
    merged = AutoModelForImageTextToText.from_pretrained(tmp_path / "out/policy-asker")
    base = AutoModelForImageTextToText.from_pretrained(resolve_model("tiny://qwen2.5-vl"))
    with_adapter = PeftModel.from_pretrained(base, tmp_path / "out/policy/adapter/asker")
    with torch.no_grad():
        a, b = merged(input_ids=ids).logits, with_adapter(input_ids=ids).logits
    assert torch.allclose(a, b, atol=1e-5) and not torch.allclose(
        a, AutoModelForImageTextToText.from_pretrained(tmp_path / "out/policy")(
            input_ids=ids).logits, atol=1e-5)

    # ... and vLLM serves the exported adapter files like peft computes them
    import ray
    from safetensors.torch import load_file

    from actors.generator import EngineSpec, GeneratorActor, Request, Sampling, cpu_engine_env
    from actors.weights import adapter_payload

    folder = tmp_path / "out/policy/adapter/asker"
    payload = adapter_payload(json.loads((folder / "adapter_config.json").read_text()),
                              load_file(folder / "adapter_model.safetensors").items())
    actor = ray.remote(num_cpus=1, runtime_env={"env_vars": cpu_engine_env(1)})(GeneratorActor)
    engine = actor.remote(EngineSpec(model=resolve_model("tiny://qwen2.5-vl"), dtype="float32",
                                     max_model_len=1024, max_num_batched_tokens=2048,
                                     enable_lora=True, max_lora_rank=8), "exported-adapter")
    try:
        ray.get(engine.load_adapter.remote("asker", [payload], 1))
        messages = [{"role": "user", "content": "Write one question."}]
        [[sample]] = ray.get(engine.generate.remote([Request(
            messages, sampling=Sampling(temperature=0.0, max_tokens=6), adapter="asker")]))
    finally:
        ray.kill(engine)
    full = torch.tensor([sample.prompt_ids + sample.token_ids])
    with torch.no_grad():
        logp = torch.log_softmax(with_adapter(input_ids=full).logits[0].float(), dim=-1)
    start = len(sample.prompt_ids) - 1
    peft_lp = logp[start:start + len(sample.token_ids)].gather(
        -1, torch.tensor(sample.token_ids)[:, None])[:, 0]
    assert np.abs(peft_lp.numpy() - np.array(sample.logprobs)).max() < 1e-4


_ALIGNED: set[int] = set()
# The default tiny model's LM head spans only ~±0.5 nats of logits whatever the last
# hidden state is, so an adapter (which leaves the head frozen) can hardly move token
# probabilities; a head 8x larger gives it room (actors/tiny.py, head_scale).
LORA_MODEL = "tiny://qwen2.5-vl?head_scale=8"


def aligned_token_share(sample: dict) -> float:
    """Share of completion tokens among the 5% of the vocabulary whose LM-head rows
    point most along one fixed random direction of the hidden space (~0.05 for the
    base model). A LoRA adapter on the decoder can raise it by steering the final
    hidden state along that direction; "even token ids" is not such a direction
    (it needs the LM head itself, which adapters leave frozen)."""
    if not _ALIGNED:
        from safetensors.numpy import load_file

        from actors.models import resolve_model

        weights = load_file(f"{resolve_model(LORA_MODEL)}/model.safetensors")
        head = weights.get("lm_head.weight", weights.get("model.language_model.embed_tokens.weight"))
        score = head @ np.random.default_rng(0).standard_normal(head.shape[1])
        _ALIGNED.update(np.argsort(-score)[: head.shape[0] // 20].tolist())
    ids = sample["token_ids"]
    return sum(1 for t in ids if t in _ALIGNED) / max(len(ids), 1)


def test_grpo_with_lora_adapters_serves_each_adapter_version(ray_cluster, tmp_path):
    """LoRA end to end: the engines start with LoRA enabled, each step's adapter is
    pushed as a new version and sampled from (engine and trainer log-probs agree), the
    reward rises, the KL reference is the base with the adapter disabled, and the phase
    exports merged weights. The engine shares the trainer's bundle (colocated), so it
    sleeps through every update (vLLM sleep mode on a GPU; the same calls on CPU)."""
    steps = ["simple.steps=12", "simple.prompts_per_step=4", "simple.n=8", "simple.max_tokens=16",
             "simple.reward=test_driver:aligned_token_share", "trainer.lr=1e-2",
             f"model.path={LORA_MODEL}", "placement.colocate=[policy]",
             "placement.trainer_ranks=2", "placement.roles.policy.engines=2",
             "algorithm.kl_coef=0.01", "run.save_every=100", "trainer.lora.enabled=true",
             "trainer.lora.rank=8", "trainer.lora.alpha=16", "trainer.lora.dropout=0"]
    state = Driver(config(tmp_path, "lora", *steps)).run()
    lines = [m for m in read_metrics(tmp_path / "lora/iter_0001/policy/metrics.jsonl")
             if "reward/mean" in m]
    curve = [m["reward/mean"] for m in lines]
    print("reward with LoRA adapters:  " + " ".join(f"{r:.2f}" for r in curve))
    print("engine - trainer |dlogp|:   " + " ".join(f"{m['rollout/logprob_diff']:.0e}"
                                                  for m in lines[::4]))
    assert [m["rollout/version"] for m in lines] == list(range(1, 13))  # adapter versions
    assert all(m["timing/sleep"] > 0 and m["timing/wake"] > 0 for m in lines)
    assert max(m["rollout/logprob_diff"] for m in lines) < 1e-5  # the engines serve the adapter
    assert lines[-1]["policy/kl"] > 1e-3  # ... which moved the policy off the base
    # Measured: 0.07 0.21 0.97 1.00 ... (the base samples ~5% aligned tokens)
    assert curve[0] < 0.2 and np.mean(curve[-3:]) - curve[0] >= 0.5
    assert state.roles["policy"].version == 12
    hf = tmp_path / "lora/iter_0001/policy/hf"
    assert (hf / "model.safetensors").exists() and not (hf / "adapter_config.json").exists()

def test_sigkill_mid_phase_then_resume_matches_uninterrupted(ray_cluster, tmp_path):
    """The driver process is killed (SIGKILL) after its step-2 checkpoint; the same
    command finishes the run with the same weights and metrics as a run never killed."""
    from safetensors.numpy import load_file

    common = [str(ROOT / "configs/simple/tiny-cpu.yaml"), f"run.root={tmp_path}",
              "simple.reward=test_driver:even_token_share",
              "simple.images=false", "simple.steps=5", "simple.max_tokens=12", "run.save_every=2",
              "logging.progress=false"]
    whole = driver_cli(*common, "run.name=whole")
    assert whole.wait(timeout=600) == 0, whole.stderr.read()[-3000:]

    killed = driver_cli(*common, "run.name=killed")
    sigkill_after_step(killed, tmp_path / "killed/iter_0001/policy/metrics.jsonl",
                       "reward/mean")
    status = render_status(tmp_path / "killed")
    assert "not finished" in status and "step_000002" in status
    state_before = json.loads((tmp_path / "killed/state.json").read_text())
    resumed = driver_cli(*common, "run.name=killed")
    assert resumed.wait(timeout=600) == 0, resumed.stderr.read()[-3000:]

    def comparable(run: str) -> list[dict]:
        return [{k: v for k, v in m.items() if not k.startswith(("timing/", "perf/", "phase/"))}
                for m in read_metrics(tmp_path / run / "iter_0001/policy/metrics.jsonl")
                if "reward/mean" in m]

    assert [m["step"] for m in comparable("killed")] == [1, 2, 3, 4, 5]
    assert comparable("killed") == comparable("whole")
    a = load_file(tmp_path / "whole/iter_0001/policy/hf/model.safetensors")
    b = load_file(tmp_path / "killed/iter_0001/policy/hf/model.safetensors")
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    state = json.loads((tmp_path / "killed/state.json").read_text())
    assert state["finished"] and state["roles"]["policy"]["version"] == 5
    # the resumed launch's start-up: its engines, trainer group and checkpoint load
    assert 0 < state["first_step_s"] < 300 and state["launched"] > state_before["launched"]
    assert f"time to first step: {state['first_step_s']:.1f} s" in render_status(
        tmp_path / "killed")
    # Running the finished command again does nothing more.
    again = driver_cli(*common, "run.name=killed")
    assert again.wait(timeout=300) == 0
    assert comparable("killed") == comparable("whole")


FAULTS: dict[str, object] = {}  # what faulty_reward breaks, and when (set by the test)


def faulty_reward(sample: dict) -> float:
    """even_token_share, and on the calls named in FAULTS["plan"] (once each): "kill" an
    actor by name, make a trainer rank "die" inside its next forward_backward, or
    "stall" an engine's next generate (the actors' test hooks)."""
    import ray

    FAULTS["calls"] = FAULTS.get("calls", 0) + 1
    action = FAULTS["plan"].pop(FAULTS["calls"], None)
    if action is not None:
        what, name = action
        actor = ray.get_actor(name)
        if what == "kill":
            ray.kill(actor, no_restart=True)
        elif what == "die":
            ray.get(actor.arm_fault.remote("die"))
        else:
            ray.get(actor.stall.remote(120))
    return even_token_share(sample)


def test_dead_and_hung_engines_and_a_rank_killed_mid_update_are_recovered(ray_cluster,
                                                                          tmp_path):
    """An engine killed while the step scores (step 2) is restarted by its pool; a trainer
    rank killed inside step 3's forward_backward (its peer waits in a collective) makes
    the phase rebuild the group from the step-2 checkpoint and take step 3 again; an
    engine whose generate hangs in step 4 is found by its pool's health probes,
    restarted and its requests sent again. The run completes with one line per step."""
    per_step = 2 * 2  # prompts_per_step x n reward calls
    FAULTS.clear()
    FAULTS["plan"] = {per_step + 1: ("kill", "coevolve/failing/policy/0"),
                      2 * per_step + 1: ("die", "coevolve/failing/trainer/1"),
                      3 * per_step + 1: ("stall", "coevolve/failing/policy/0")}
    cfg = config(tmp_path, "failing", "simple.reward=test_driver:faulty_reward",
                 "simple.steps=4", "simple.prompts_per_step=2", "simple.n=2",
                 "simple.max_tokens=8", "run.save_every=2", "placement.trainer_ranks=2",
                 "generator.stall_timeout_s=10")
    state = Driver(cfg).run()
    assert FAULTS["plan"] == {}, "every fault was set off"
    assert state.finished and state.roles["policy"].version == 4
    lines = [m for m in read_metrics(tmp_path / "failing/iter_0001/policy/metrics.jsonl")
             if "reward/mean" in m]
    assert [m["step"] for m in lines] == [1, 2, 3, 4]
    # The engine died during step 2's scoring (the weight sync of step 2 found it); the
    # one stalled during step 3's second scoring hung in step 4's generate.
    assert [m["rollout/engine_restarts"] for m in lines] == [0, 1, 1, 2]
    assert [m["train/group_restarts"] for m in lines] == [0, 0, 1, 1]
    # Step 3 ran twice (the second time after the rollback to step 2): 5 steps of calls.
    assert FAULTS["calls"] == 5 * per_step
    assert (tmp_path / "failing/iter_0001/policy/hf/model.safetensors").exists()


def test_a_run_out_of_restarts_stops_with_the_history_of_its_failures(ray_cluster, tmp_path):
    """run.max_restarts=1: the engine killed in step 2 is restarted, the rank killed in
    step 3 is one failure too many; the error lists both."""
    from actors.restarts import RestartsExhausted

    per_step = 2 * 2
    FAULTS.clear()
    FAULTS["plan"] = {per_step + 1: ("kill", "coevolve/budget/policy/0"),
                      2 * per_step + 1: ("die", "coevolve/budget/trainer/1")}
    cfg = config(tmp_path, "budget", "simple.reward=test_driver:faulty_reward",
                 "simple.steps=4", "simple.prompts_per_step=2", "simple.n=2",
                 "simple.max_tokens=8", "run.save_every=2", "placement.trainer_ranks=2",
                 "run.max_restarts=1")
    with pytest.raises(RestartsExhausted) as caught:
        Driver(cfg).run()
    message = str(caught.value)
    assert message.startswith("2 failures, more than run.max_restarts=1 restarts allow")
    first, second = message.splitlines()[1:]
    assert "1. " in first and "engine coevolve/budget/policy/0" in first
    assert "2. " in second and "trainer group of policy" in second
