"""Placement: bundles from the config, validation, the PACK/SPREAD simulation,
model sizes and the memory estimate (hand-checked), ``coevolve plan``, and
real Ray placement groups with logical GPUs.

The session's shared Ray (conftest ``ray_cluster``) has no GPUs, and a
process holds one Ray: the Ray scenarios (one node x 8 logical GPUs; two
nodes x 4 from ``ray.cluster_utils.Cluster``) run in a subprocess started
from this very file (``python tests/test_placement.py single|two-nodes``),
which starts its own private Ray on 127.0.0.1 and shuts down only that.
Probes are tasks, not vLLM or trainers.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if __name__ == "__main__":  # run as the scenario script: make the repo importable
    sys.path.insert(0, str(ROOT))

import pytest

from pipelines.config import ConfigError, load_config
from pipelines.layouts import PlacementError, group_specs, resolve_layout, thread_counts
from pipelines.runtime.memory import (
    BUILTIN_MODELS,
    CONTEXT_BYTES,
    GIB,
    ModelSizes,
    engine_memory,
    logits_bytes,
    lora_params,
    model_sizes,
    optimizer_state,
    trainer_memory,
)
from pipelines.runtime.placement import Placement
from pipelines.runtime.plan import run_plan
from pipelines.simulation import Node, simulate

LAYOUTS = ROOT / "configs" / "layouts"
TWO_SIX = LAYOUTS / "mmzero-8gpu-2+6.yaml"
PER_PHASE = LAYOUTS / "mmzero-8gpu-per-phase.yaml"


# --------------------------------------------------------------------------
# Bundles and layouts (pure)
# --------------------------------------------------------------------------


def test_two_plus_six_bundles():
    layout = resolve_layout(load_config(TWO_SIX).placement)
    specs = {g.role: g for g in group_specs(layout)}
    assert list(specs) == ["trainer", "proposer", "codegen", "solver"]
    assert specs["trainer"].bundles == ({"CPU": 8, "GPU": 1},) * 2
    for role in ("proposer", "codegen", "solver"):
        assert specs[role].bundles == ({"CPU": 4, "GPU": 1},) * 2
        assert specs[role].members == ((0,), (1,))
        assert specs[role].actor == {"num_cpus": 4, "num_gpus": 1}
    assert layout.gpus() == 8 and layout.cpus() == 40


def test_tensor_parallel_engine_is_one_bundle_of_its_gpus():
    cfg = load_config(TWO_SIX, ["placement.roles.solver.gpus_per_engine=2",
                                "placement.roles.solver.tensor_parallel=2",
                                "placement.roles.codegen.engines=0",
                                "placement.roles.proposer.engines=0"])
    layout = resolve_layout(cfg.placement)
    solver = {g.role: g for g in group_specs(layout)}["solver"]
    # vLLM's mp executor: the host actor holds both GPUs and starts a worker per GPU
    assert solver.bundles == ({"CPU": 4, "GPU": 2},) * 2
    assert solver.members == ((0,), (1,))
    assert solver.actor == {"num_cpus": 4, "num_gpus": 2}
    placement = Placement(layout, groups={"solver": "pg"})
    assert placement.pool_kwargs("solver") == {
        "placement_group": "pg", "bundle_indices": [0, 1],
        "resources": {"num_cpus": 4, "num_gpus": 2}}
    slots = [s for s in simulate(layout, [Node("n", 8)]) if s.role == "solver"]
    assert [len(s.devices) for s in slots] == [2, 2]


def test_cpu_layout_and_pool_kwargs():
    cfg = load_config(LAYOUTS / "cpu.yaml")
    layout = resolve_layout(cfg.placement)
    assert not layout.uses_gpus and layout.gpus() == 0 and layout.cpus() == 5
    placement = Placement(layout, groups={"trainer": "pg-t", "solver": "pg-s",
                                          "proposer": "pg-p", "codegen": "pg-c"}, cores=2)
    assert placement.trainer_kwargs() == {"placement_group": "pg-t", "cpus_per_rank": 1,
                                          "gpus_per_rank": 0}
    assert placement.pool_kwargs("solver") == {"placement_group": "pg-s", "bundle_indices": [0],
                                               "resources": {"num_cpus": 1}, "threads": 2}


@pytest.mark.parametrize("cores, ranks, threads", [(2, 1, 2), (2, 2, 1), (16, 2, 8), (1, 2, 1)])
def test_all_cores_threads_take_turns_with_the_whole_host(cores, ranks, threads):
    """cpu_threads: all: the ranks split the cores, each engine of a role gets them all
    (roles generate one after the other); reserved: what each one reserves."""
    cfg = load_config(LAYOUTS / "cpu.yaml", [f"placement.trainer_ranks={ranks}",
                                             "placement.roles.solver.engines=2"])
    layout = resolve_layout(cfg.placement)
    assert thread_counts(layout, cores) == {"trainer": threads, "proposer": cores,
                                            "codegen": cores, "solver": max(1, cores // 2)}
    reserved = resolve_layout(load_config(LAYOUTS / "cpu.yaml", [
        "placement.cpu_threads=reserved", "placement.cpus_per_rank=3"]).placement)
    assert thread_counts(reserved, cores) == {"trainer": 3, "proposer": 1, "codegen": 1,
                                              "solver": 1}


def test_the_simple_tiny_layout_schedules_on_a_two_core_host(capsys):
    """The shipped laptop layout: one rank and one engine, each reserving one of the two
    CPUs Ray sees on a 2-core host and running two threads in its turn."""
    cfg = load_config(ROOT / "configs/simple/tiny-cpu.yaml")
    layout = resolve_layout(cfg.placement, None, ("policy",))
    slots = simulate(layout, [Node("laptop", 0, cpus=2)])
    assert sorted((s.role, s.cpus) for s in slots) == [("policy", 1), ("trainer", 1)]
    assert thread_counts(layout, 2) == {"trainer": 2, "policy": 2}
    assert run_plan(cfg, nodes=1, cpus_per_node=2) == 0
    out = capsys.readouterr().out
    assert "threads (cpu_threads: all, 2 cores): trainer 1 x 2, policy 1 x 2" in out
    assert "take turns" in out


def test_per_phase_layouts_replace_and_inherit():
    placement = load_config(PER_PHASE).placement
    proposer = resolve_layout(placement, "proposer")
    assert proposer.trainer_ranks == 3
    assert {n: r.engines for n, r in proposer.roles.items()} == {"proposer": 1, "codegen": 2, "solver": 2}
    assert resolve_layout(placement, "codegen").gpus() == 8
    solver = resolve_layout(placement, "solver")
    assert list(solver.roles) == ["solver"] and solver.colocate == ("solver",)
    assert solver.gpu_memory_utilization == 0.8
    specs = {g.role: g for g in group_specs(solver)}
    assert specs["trainer"].bundles == ({"CPU": 10, "GPU": 1},) * 8  # rank 8 + engine 2 CPUs
    assert specs["trainer"].actor["num_gpus"] == 0.5
    assert specs["solver"].bundles == () and specs["solver"].host == "trainer"
    assert specs["solver"].members == tuple((i,) for i in range(8))
    unknown = resolve_layout(placement, "evaluation")  # no entry: the top-level 2+6
    assert unknown.phase is None and unknown.trainer_ranks == 2 and unknown.gpus() == 8
    assert not solver.same_devices(proposer) and unknown.same_devices(resolve_layout(placement))


@pytest.mark.parametrize("overrides, message", [
    (["placement.roles.solver.gpus_per_engine=2"],
     "placement.roles.solver.gpus_per_engine: vLLM uses exactly tensor_parallel (1) GPUs per engine, got 2"),
    (["placement.roles.proposer.gpus_per_engine=0"],
     "placement.roles.proposer.gpus_per_engine: 0 in a GPU layout"),
    (["placement.phases.proposer.trainer_ranks=4"],
     ("placement.phases.proposer: phase proposer needs 9 GPUs (trainer 4 x {CPU: 8, GPU: 1} + "
      "proposer 1 x {CPU: 4, GPU: 1} + codegen 2 x {CPU: 4, GPU: 1} + solver 2 x {CPU: 4, GPU: 1}) "
      "but the cluster has 8 (1 node x 8 GPUs) (placement.cluster declares 1 node x 8 GPUs)")),
    (["placement.phases.solver.trainer_ranks=4"],
     ("placement.phases.solver.colocate: solver has 8 engines; colocation puts one engine on "
      "each trainer rank (4)")),
    (["placement.phases.solver.colocate=[proposer]"],
     "placement.phases.solver.colocate: 'proposer' runs no engines in this phase; roles here: solver"),
    (["placement.cluster.gpus_per_node=4"],
     "placement.cluster: phase all needs 8 GPUs"),
    (["placement.cluster.cpus_per_node=64"],
     "placement.phases.solver: phase solver needs 80 CPUs"),
])
def test_invalid_layouts_name_the_field_and_the_numbers(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(PER_PHASE, overrides)
    assert message in str(err.value)


def test_cpu_gpu_mix_and_reserved_name():
    with pytest.raises(ConfigError, match="placement.roles.proposer.gpus_per_engine: 0 in a GPU layout"):
        load_config(LAYOUTS / "cpu.yaml", ["placement.gpus_per_rank=1"])
    with pytest.raises(ConfigError, match="placement.gpus_per_rank: 0 while engines use GPUs"):
        load_config(LAYOUTS / "cpu.yaml", ["placement.roles.solver.gpus_per_engine=1"])
    with pytest.raises(ConfigError, match="roles.trainer: the name is reserved"):
        load_config(LAYOUTS / "cpu.yaml", ["placement.roles.trainer.engines=1"])


# --------------------------------------------------------------------------
# Simulation
# --------------------------------------------------------------------------


def _where(slots):
    return {(s.role, s.bundle): (s.node, s.devices) for s in slots}


def test_simulate_pack_one_node():
    slots = simulate(resolve_layout(load_config(TWO_SIX).placement), [Node("n", 8)])
    assert [(s.role, s.devices) for s in slots] == [
        ("trainer", (0,)), ("trainer", (1,)), ("proposer", (2,)), ("proposer", (3,)),
        ("codegen", (4,)), ("codegen", (5,)), ("solver", (6,)), ("solver", (7,))]


def test_simulate_pack_two_nodes_keeps_groups_whole():
    slots = simulate(resolve_layout(load_config(TWO_SIX).placement), [Node("a", 4), Node("b", 4)])
    where = _where(slots)
    assert where[("trainer", 0)] == (0, (0,)) and where[("trainer", 1)] == (0, (1,))
    assert where[("proposer", 0)] == (0, (2,)) and where[("proposer", 1)] == (0, (3,))
    assert where[("codegen", 0)] == (1, (0,)) and where[("solver", 1)] == (1, (3,))
    assert len({(s.node, s.devices) for s in slots}) == 8


def test_simulate_spread_and_strict():
    two = [Node("a", 4), Node("b", 4)]
    spread = load_config(TWO_SIX, ["placement.strategy=SPREAD", "placement.cluster.nodes=2",
                                   "placement.cluster.gpus_per_node=4"]).placement
    where = _where(simulate(resolve_layout(spread), two))
    for role in ("trainer", "proposer", "codegen", "solver"):
        assert where[(role, 0)][0] != where[(role, 1)][0]
    # 8 GPUs for 8 bundles, but no node keeps 3 GPUs for the last group once the others sit.
    strict = load_config(TWO_SIX, ["placement.strategy=STRICT_PACK", "placement.roles.proposer.engines=0",
                                   "placement.roles.codegen.engines=3",
                                   "placement.roles.solver.engines=3"]).placement
    with pytest.raises(PlacementError, match=r"the solver group \(3 bundles .* does not fit"):
        simulate(resolve_layout(strict), [Node("a", 4), Node("b", 4)])


def test_simulate_refuses_with_numbers():
    layout = resolve_layout(load_config(TWO_SIX).placement)
    with pytest.raises(PlacementError) as err:
        simulate(layout, [Node("a", 7)])
    assert "phase all needs 8 GPUs" in str(err.value) and "the cluster has 7" in str(err.value)
    with pytest.raises(PlacementError, match=r"needs 40 CPUs .* has 32"):
        simulate(layout, [Node("a", 8, 32)])


# --------------------------------------------------------------------------
# Model sizes and memory (hand-checked)
# --------------------------------------------------------------------------


def test_builtin_sizes_match_published_counts():
    # The parameter counts the checkpoints publish (safetensors metadata).
    counts = {"Qwen/Qwen3-VL-8B-Instruct": 8_767_123_696, "Qwen/Qwen3-VL-4B-Instruct": 4_437_815_808,
              "Qwen/Qwen2.5-VL-7B-Instruct": 8_292_166_656}
    for name, count in counts.items():
        assert model_sizes(BUILTIN_MODELS[name]).params == count, name
    m = model_sizes(BUILTIN_MODELS["Qwen/Qwen3-VL-8B-Instruct"])
    # By hand: q 4096^2 + k,v 2 x 4096 x 1024 + o 4096^2 + MLP 3 x 4096 x 12288 + norms 2 x 4096
    # + q/k norms 2 x 128 = 192,946,432; root = 2 x 151936 x 4096 + 4096 (untied).
    assert m.layer == 192_946_432 and m.root == 1_244_663_808
    assert (m.q_dim, m.kv_dim, m.head_dim) == (4096, 1024, 128)


def test_sizes_match_transformers_modules():
    """The formula against the modules transformers builds (meta device, no memory)."""
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText

    qwen2 = {"model_type": "qwen2_vl", "hidden_size": 64, "intermediate_size": 96,
             "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
             "vocab_size": 300, "tie_word_embeddings": True,
             "vision_config": {"depth": 2, "embed_dim": 32, "hidden_size": 64, "mlp_ratio": 2,
                               "num_heads": 2, "patch_size": 14, "spatial_merge_size": 2,
                               "temporal_patch_size": 2}}
    configs = [BUILTIN_MODELS["Qwen/Qwen3-VL-4B-Instruct"],
               BUILTIN_MODELS["Qwen/Qwen2.5-VL-7B-Instruct"], qwen2]
    for raw in configs:
        config = AutoConfig.for_model(**json.loads(json.dumps(raw)))
        with torch.device("meta"):
            model = AutoModelForImageTextToText.from_config(config)
        m = model_sizes(raw)
        assert m.params == sum(p.numel() for p in model.parameters()), raw["model_type"]
        assert m.vision == sum(p.numel() for p in model.model.visual.parameters())
        assert m.layer == sum(p.numel() for p in model.model.language_model.layers[0].parameters())


SMALL = ModelSizes(family="qwen3_vl", vision=100, projector=10, root=1000, layer=200, layers=4,
                   hidden=8, intermediate=16, q_dim=8, kv_dim=4, kv_heads=2, head_dim=2, vocab=50)


def test_trainer_memory_by_hand():
    assert SMALL.params == 100 + 1000 + 4 * 200 == 1900
    parts = trainer_memory(SMALL, ranks=2, micro_batch_tokens=10, checkpointing=True, reference=True)
    # per-token block activations a = 2 (4x8 + 3x8 + 3x4 + 4x16) = 264 bytes
    assert parts == {
        "master": 4 * 1900 / 2, "grads": 4 * 1900 / 2, "adamw": 8 * 1900 / 2,
        "reference": 4 * 1900 / 2,
        "gathered": 2 * (1000 + 2 * 200),        # root + two blocks in flight
        "grad buffers": 2 * (1000 + 200),
        "activations": 2 * 10 * 8 * 4 + 10 * 264,  # checkpointed inputs + one block = 3280
        "logits": 16 * 10 * 50,                  # full logits: 16 bytes per logit (measured)
        "context": CONTEXT_BYTES,
    }
    no_ckpt = trainer_memory(SMALL, ranks=2, micro_batch_tokens=10, checkpointing=False, reference=False)
    assert no_ckpt["activations"] == 10 * 264 * 4 and no_ckpt["reference"] == 0
    frozen = trainer_memory(SMALL, ranks=2, micro_batch_tokens=10, checkpointing=True,
                            reference=True, freeze_vision=True)
    assert frozen["grads"] == 4 * (1900 - 90) / 2  # the 10 merger parameters still train
    assert frozen["grad buffers"] == 2 * (1000 + 200)
    lora = trainer_memory(SMALL, ranks=2, micro_batch_tokens=10, checkpointing=True,
                          reference=True, lora=50)
    assert (lora["master"], lora["grads"], lora["adamw"], lora["reference"], lora["grad buffers"]) == (
        4 * 1950 / 2, 4 * 50 / 2, 8 * 50 / 2, 0, 2 * 50)


def test_trainer_memory_levers_by_hand():
    base = dict(ranks=2, micro_batch_tokens=10, checkpointing=True, reference=True)
    full = trainer_memory(SMALL, **base)
    # Log-prob head: full logits 16 t V, +8 with the entropy bonus, +10 with the full KL;
    # chunked 8 c V (24 with entropy), c = min(chunk, t).
    assert logits_bytes(SMALL, 10) == 16 * 10 * 50 == 8000
    assert logits_bytes(SMALL, 10, entropy=True) == 24 * 10 * 50
    assert logits_bytes(SMALL, 10, full_kl=True) == 26 * 10 * 50
    assert logits_bytes(SMALL, 10, 4) == 8 * 4 * 50 == 1600
    assert logits_bytes(SMALL, 10, 4, entropy=True) == 24 * 4 * 50
    assert logits_bytes(SMALL, 10, 100) == 8 * 10 * 50  # a chunk never exceeds the micro-batch
    with pytest.raises(ValueError, match="full logits"):
        logits_bytes(SMALL, 10, 4, full_kl=True)
    chunked = trainer_memory(SMALL, **base, logprob_chunk_tokens=4)
    assert chunked == {**full, "logits": 1600}
    bf16_ref = trainer_memory(SMALL, **base, reference_bytes=2)
    assert bf16_ref == {**full, "reference": 2 * 1900 / 2}
    offload = trainer_memory(SMALL, **base, offload=True)
    assert offload == {**full, "master": 0, "grads": 0, "adamw": 0}
    # What offload moves to host memory, per rank: 4 + 4 + 8 bytes per trained parameter.
    assert optimizer_state(SMALL, ranks=2) == {"master": 3800, "grads": 3800, "adamw": 7600}
    assert optimizer_state(SMALL, ranks=2, lora=50) == {"master": 4 * 1950 / 2, "grads": 100, "adamw": 200}


def test_trainer_memory_qwen3_vl_8b_two_ranks():
    m = model_sizes(BUILTIN_MODELS["Qwen/Qwen3-VL-8B-Instruct"])
    parts = trainer_memory(m, ranks=2, micro_batch_tokens=16384, checkpointing=True, reference=True)
    assert parts["master"] == 17_534_247_392 and parts["adamw"] == 35_068_494_784
    assert parts["logits"] == 39_829_110_784  # 16 x 16384 x 151936
    assert parts["activations"] == 2 * 16384 * 4096 * 36 + 16384 * 161_792
    assert round(sum(parts.values()) / GIB, 1) == 134.6
    # The levers of configs/mmzero/qwen3-vl-8b-8gpu.yaml: chunked log-probs and offload.
    levers = trainer_memory(m, ranks=2, micro_batch_tokens=16384, checkpointing=True,
                            reference=True, logprob_chunk_tokens=2048, offload=True)
    assert levers["logits"] == 8 * 2048 * 151936 == 2_489_319_424
    assert levers["master"] == levers["grads"] == levers["adamw"] == 0
    assert sum(levers.values()) == (17_534_247_392 + 4_794_880_960 + 3_642_104_288 + 7_482_638_336
                                    + 2_489_319_424 + GIB)  # 34.5 GiB
    host = optimizer_state(m, ranks=2)
    assert sum(host.values()) == 16 * 8_767_123_696 / 2  # 65.3 GiB per rank
    bf16 = trainer_memory(m, ranks=2, micro_batch_tokens=16384, checkpointing=True,
                          reference=True, logprob_chunk_tokens=2048, reference_bytes=2)
    assert bf16["reference"] == 8_767_123_696  # 2 bytes x P / 2 ranks
    assert round(sum(bf16.values()) / GIB, 1) == 91.6  # still over 80 without offload


def test_engine_memory_by_hand():
    """Text-only profile (no image tokens), eager: weights, the text model's profile
    activations, the sampler's logits for vLLM's default 1,024 sequences, the context."""
    m = model_sizes(BUILTIN_MODELS["Qwen/Qwen3-VL-8B-Instruct"])
    shape = {"device_bytes": 80 * GIB, "utilization": 0.85, "max_num_batched_tokens": 8192,
             "max_model_len": 8192, "max_num_seqs": 1024}
    e = engine_memory(m, tensor_parallel=1, **shape)
    assert e.budget == 0.85 * 80 * GIB
    assert e.parts["weights"] == 17_534_247_392
    assert e.parts["activations"] == 2 * 8192 * (3 * 12288 + 4 * 4096) == 872_415_232
    assert e.parts["sampler"] == 6 * 1024 * 151936 == 933_494_784  # bf16 + fp32 logits
    assert e.kv_bytes_per_token == 2 * 36 * 8 * 128 * 2 == 147_456
    assert e.parts["KV cache"] == e.budget - 17_534_247_392 - 872_415_232 - 933_494_784 - GIB
    # 52,600,544,800 bytes / 147,456 per token; / 8,192 tokens per sequence
    assert e.kv_tokens == 356_720 and e.sequences(8192) == 356_720 / 8192  # 43.5
    tp2 = engine_memory(m, tensor_parallel=2, **shape)
    assert tp2.parts["weights"] == 17_534_247_392 / 2 and tp2.kv_bytes_per_token == 147_456 / 2
    tp16 = engine_memory(m, tensor_parallel=16, **shape)
    assert tp16.kv_bytes_per_token == 2 * 36 * 1 * 128 * 2  # 8 KV heads replicated, one per GPU
    # max_num_seqs is capped at max_num_batched_tokens, as vLLM caps a default it chose
    small = engine_memory(m, tensor_parallel=1, **{**shape, "max_num_batched_tokens": 512})
    assert small.max_num_seqs == 512 and small.parts["sampler"] == 6 * 512 * 151936


def test_lora_params_by_hand():
    m = model_sizes(BUILTIN_MODELS["Qwen/Qwen3-VL-8B-Instruct"])
    # r (in + out): q 16 (4096 + 4096) + v 16 (4096 + 1024) per block, 36 blocks
    assert lora_params(m, 16, ["q_proj", "v_proj"]) == 36 * 16 * (8192 + 5120) == 7_667_712


# --------------------------------------------------------------------------
# coevolve plan
# --------------------------------------------------------------------------


def _plan(capsys, *argv):
    from pipelines.cli import main

    code = main(["plan", *map(str, argv)])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def test_plan_refuses_two_plus_six_with_qwen3_vl_8b(capsys, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    code, out = _plan(capsys, TWO_SIX)
    assert code == 2
    assert "node0     0  trainer rank 0" in out and "node0     7  solver engine 1" in out
    # Chunked log-probs are the default: 8 x 2048 x 151936 bytes of logits.
    assert "a trainer rank needs 99.8 GiB on a 80 GiB device (over by 19.8 GiB)" in out
    assert "logits 2.3" in out and "KV 44.3 GiB = 322,942 tokens = 39.4 sequences of 8,192" in out
    assert "trainer.offload" in out  # the levers are named
    code, out = _plan(capsys, TWO_SIX, "trainer.logprob_chunk_tokens=0")
    assert code == 2 and "a trainer rank needs 134.6 GiB" in out and "logits 37.1" in out


def test_plan_fits_and_overrides(capsys, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    code, out = _plan(capsys, TWO_SIX, "model.path=Qwen/Qwen3-VL-4B-Instruct",
                      "trainer.lora.enabled=true", "--cluster", ROOT / "configs/cluster/2x4gpu-80g.yaml")
    assert code == 0, out
    assert "2 nodes x 4 GPUs x 80 GiB" in out and "node1" in out and out.rstrip().endswith("fits")
    code, out = _plan(capsys, LAYOUTS / "cpu.yaml")
    assert code == 0 and "0 GPUs, 5 CPUs" in out


def test_plan_refusals(capsys, monkeypatch, tmp_path):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    code, out = _plan(capsys, TWO_SIX, "--gpus-per-node", 4)
    assert code == 2 and "phase all needs 8 GPUs" in out and "the cluster has 4" in out
    code, out = _plan(capsys, TWO_SIX, "model.path=Qwen/Qwen9-VL")
    assert code == 2 and "no sizes for model 'Qwen/Qwen9-VL'" in out
    code, out = _plan(capsys, TWO_SIX, "placement.cluster.nodes=0")
    assert code == 2 and "which cluster?" in out
    # A local folder: sizes from its config.json; a short KV cache is refused.
    (tmp_path / "config.json").write_text(json.dumps(BUILTIN_MODELS["Qwen/Qwen2.5-VL-7B-Instruct"]))
    code, out = _plan(capsys, TWO_SIX, f"model.path={tmp_path}", "trainer.lora.enabled=true",
                      "generator.gpu_memory_utilization=0.25", "generator.max_model_len=65536")
    assert code == 2 and f"sizes from {tmp_path / 'config.json'}" in out
    assert "proposer engine: its KV cache of" in out
    assert "sequences of max_model_len 65,536, fewer than generator.min_kv_sequences 8" in out


PRESETS = sorted((ROOT / "configs" / "mmzero").glob("*8gpu*.yaml"))


def test_there_are_the_three_gpu_presets():
    assert [p.name for p in PRESETS] == [
        "qwen2.5-vl-7b-8gpu.yaml", "qwen3-vl-4b-8gpu.yaml", "qwen3-vl-8b-8gpu.yaml"]


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
def test_gpu_preset_fits_with_the_spec_defaults(preset, capsys, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    cfg = load_config(preset)
    hub = {"qwen3-vl-8b": "Qwen/Qwen3-VL-8B-Instruct", "qwen3-vl-4b": "Qwen/Qwen3-VL-4B-Instruct",
           "qwen2.5-vl-7b": "Qwen/Qwen2.5-VL-7B-Instruct"}[preset.stem.removesuffix("-8gpu")]
    assert cfg.run.recipe == "mmzero" and cfg.model.path == hub and cfg.model.dtype == "bfloat16"
    t = cfg.trainer
    assert (t.lr, t.gradient_checkpointing, t.lora.enabled, t.freeze_vision) == (1e-6, True, False, False)
    assert cfg.mmzero.max_tokens == 4096 and cfg.generator.max_model_len >= 4096 + 4096
    assert cfg.placement == load_config(TWO_SIX).placement  # the 2 + 6 split, as the layout
    code, out = _plan(capsys, preset)
    assert code == 0, out
    assert out.rstrip().endswith("fits")
    assert "host memory node0 (2 trainer ranks): " in out and "of 1024 GiB" in out
    assert "sequences of 8,192" in out and "disk      step checkpoint" in out


def test_qwen3_vl_8b_preset_trainer_rank(capsys, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    code, out = _plan(capsys, ROOT / "configs/mmzero/qwen3-vl-8b-8gpu.yaml")
    assert code == 0
    assert "node0     0  trainer rank 0                                 34.5" in out
    assert ("trainer rank (2 ranks): reference 16.3 + gathered 4.5 + grad buffers 3.4 + "
            "activations 7.0 + logits 2.3 + context 1.0 = 34.5 GiB") in out
    assert "trainer rank host memory (trainer.offload): master 16.3 + grads 16.3 + adamw 32.7 = 65.3 GiB" in out
    assert ("host memory node0 (2 trainer ranks): 2 x 65.3 offloaded 130.6 + rank 0's weight "
            "sync 65.3 = 196.0 GiB of 1024 GiB") in out
    # Without offload the same preset does not fit: the reason it is on.
    code, out = _plan(capsys, ROOT / "configs/mmzero/qwen3-vl-8b-8gpu.yaml", "trainer.offload=false")
    assert code == 2 and "a trainer rank needs 99.8 GiB" in out


# --------------------------------------------------------------------------
# Real placement groups (subprocess: its own Ray with logical GPUs)
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def scenarios():
    """Both Ray scenarios, started together (each waits mostly on Ray starting up)."""
    from conftest import scenario_result, start_scenario

    procs = {name: start_scenario(__file__, name) for name in ("single", "two-nodes")}
    return {name: scenario_result(name, proc, timeout=150) for name, proc in procs.items()}


@pytest.fixture(scope="module")
def one_node(scenarios):
    return scenarios["single"]


@pytest.fixture(scope="module")
def two_nodes(scenarios):
    return scenarios["two-nodes"]


def _gpus(report):
    return [(r["node_id"], g) for r in report for g in r["gpu_ids"]]


def test_ray_two_plus_six_distinct_gpus(one_node):
    report = one_node["2+6"]
    assert [r["role"] for r in report] == ["trainer"] * 2 + ["proposer"] * 2 + ["codegen"] * 2 + ["solver"] * 2
    assert all(len(r["gpu_ids"]) == 1 for r in report)
    assert sorted(g for _, g in _gpus(report)) == [str(i) for i in range(8)]


def test_ray_phases_released_and_recreated(one_node):
    for phase, trainer_ranks in (("proposer", 3), ("codegen", 4), ("solver", 8)):
        report = one_node["phases"][phase]
        assert sum(r["role"] == "trainer" for r in report) == trainer_ranks
        assert sorted(g for _, g in _gpus(report)) == [str(i) for i in range(8)], phase
    # Between phases every GPU was free again, and after the manager closed.
    assert one_node["phases"]["free_between"] == [8.0, 8.0]
    assert one_node["phases"]["free_after"] == 8.0


def test_ray_impossible_layout_fails_fast(one_node):
    err = one_node["impossible"]
    assert "phase all needs 9 GPUs" in err["error"] and "the cluster has 8" in err["error"]
    assert err["seconds"] < 5
    busy = one_node["busy"]
    assert "not ready after 2 s" in busy["error"] and "free now: 0 GPUs" in busy["error"]


def test_ray_two_nodes_span_correctly(two_nodes):
    report = two_nodes["PACK"]
    pairs = _gpus(report)
    assert len(pairs) == 8 and len(set(pairs)) == 8  # 8 GPUs used, none twice
    nodes = {node for node, _ in pairs}
    assert len(nodes) == 2 and sorted(sum(1 for n, _ in pairs if n == x) for x in nodes) == [4, 4]
    for role in ("trainer", "proposer", "codegen", "solver"):
        assert len({r["node_id"] for r in report if r["role"] == role}) == 1, role  # PACK
    for role in ("trainer", "proposer", "codegen", "solver"):
        spread = [r["node_id"] for r in two_nodes["SPREAD"] if r["role"] == role]
        assert len(set(spread)) == 2, role
    assert len(set(_gpus(two_nodes["SPREAD"]))) == 8


SHIPPED = sorted(p for d in ("mmzero", "simple", "layouts", "evolmm", "ireasoner", "r3v", "maye")
                 for p in (ROOT / "configs" / d).glob("*.yaml"))


@pytest.mark.parametrize("path", SHIPPED, ids=[f"{p.parent.name}/{p.name}" for p in SHIPPED])
def test_every_shipped_config_passes_plan_on_its_own_cluster(path, capsys, monkeypatch):
    """Every run config we ship is placed and sized on the cluster it declares, and
    each phase's layout has the engines the phase needs. The one refusal is the
    2+6 reference layout with Qwen3-VL-8B full fine-tuning, kept as the example of
    what the plan refuses (the presets in configs/mmzero/ fit with the levers)."""
    from pipelines.cli import main

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    code = main(["plan", str(path)])
    out = capsys.readouterr().out
    if path == TWO_SIX:
        assert code == 2 and "a trainer rank needs 99.8 GiB" in out
    else:
        assert code == 0, out[-2000:]


def test_plan_refuses_a_phase_layout_without_the_engines_it_needs(capsys, monkeypatch):
    from pipelines.cli import main

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    code = main(["plan", str(LAYOUTS / "mmzero-8gpu-per-phase.yaml"),
                 "placement.phases.codegen.roles={codegen: {engines: 2, gpus_per_engine: 1}}"])
    err = capsys.readouterr().err
    assert code == 2
    assert "placement.phases.codegen: phase codegen trains codegen and is scored with solver, " \
           "but its layout has no engines for solver" in err
    # Data makers may come from the top-level layout instead (MM-Zero's Solver phase).
    code = main(["plan", str(LAYOUTS / "mmzero-8gpu-per-phase.yaml"),
                 "placement.roles.proposer.engines=0"])
    err = capsys.readouterr().err
    assert code == 2
    assert "phase solver makes its data with codegen, proposer, solver under one layout, but " \
           "its own lacks codegen, proposer and the top-level one lacks proposer" in err


# --------------------------------------------------------------------------
# The scenarios (run in the subprocess)
# --------------------------------------------------------------------------


def _report(placement) -> list[dict]:
    from pipelines.runtime.placement import bundle_report

    return [{"role": r.role, "bundle": r.bundle, "node_id": r.node_id, "gpu_ids": list(r.gpu_ids)}
            for r in bundle_report(placement)]


def _wait_free_gpus(total: float, timeout_s: float = 20.0) -> float:
    import ray

    deadline = time.monotonic() + timeout_s
    while True:
        free = ray.available_resources().get("GPU", 0.0)
        if free == total or time.monotonic() > deadline:
            return free
        time.sleep(0.1)


def _scenario_single() -> dict:
    from pipelines.runtime.local_ray import ray_session
    from pipelines.runtime.placement import PlacementManager, create_placement

    out: dict = {}
    with ray_session(num_cpus=96, num_gpus=8):
        with PlacementManager(load_config(TWO_SIX).placement, run="test") as places:
            out["2+6"] = _report(places.enter())
            try:  # a second job asking for the same GPUs: a clear error, not a hang
                create_placement(resolve_layout(load_config(TWO_SIX).placement), timeout_s=2)
            except PlacementError as err:
                out["busy"] = {"error": str(err)}
        _wait_free_gpus(8)
        phases: dict = {"free_between": []}
        with PlacementManager(load_config(PER_PHASE).placement, run="test") as places:
            for i, phase in enumerate(("proposer", "codegen", "solver")):
                if i:
                    places.release()
                    phases["free_between"].append(_wait_free_gpus(8))
                phases[phase] = _report(places.enter(phase))
        phases["free_after"] = _wait_free_gpus(8)
        out["phases"] = phases
        start = time.monotonic()
        nine = load_config(TWO_SIX, ["placement.trainer_ranks=3", "placement.cluster.nodes=0"])
        try:
            create_placement(resolve_layout(nine.placement))
        except PlacementError as err:
            out["impossible"] = {"error": str(err), "seconds": time.monotonic() - start}
    return out


def _scenario_two_nodes() -> dict:
    import shutil
    import tempfile

    # Cluster() writes its address file under Ray's temp dir: keep ours private.
    tmp = tempfile.mkdtemp(prefix="cvplace-")
    os.environ["RAY_TMPDIR"] = tmp
    from pipelines.runtime.local_ray import _loopback_only

    _loopback_only()
    import ray
    from ray.cluster_utils import Cluster

    from pipelines.runtime.placement import PlacementManager

    node = {"num_cpus": 48, "num_gpus": 4, "node_ip_address": "127.0.0.1"}
    cluster = Cluster(initialize_head=True, head_node_args={**node, "include_dashboard": False})
    out: dict = {}
    try:
        cluster.add_node(**node)
        ray.init(address=cluster.address, _node_ip_address="127.0.0.1", log_to_driver=False)
        cluster.wait_for_nodes()
        for strategy in ("PACK", "SPREAD"):
            cfg = load_config(TWO_SIX, [f"placement.strategy={strategy}", "placement.cluster.nodes=2",
                                        "placement.cluster.gpus_per_node=4"])
            with PlacementManager(cfg.placement, run="test") as places:
                out[strategy] = _report(places.enter())
            _wait_free_gpus(8)
    finally:
        ray.shutdown()
        cluster.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)
    return out


if __name__ == "__main__":
    scenarios = {"single": _scenario_single, "two-nodes": _scenario_two_nodes}
    print(json.dumps(scenarios[sys.argv[1]]()))

