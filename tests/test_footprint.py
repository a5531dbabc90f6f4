"""What a GPU run takes beyond the trainer's device memory, by hand: vLLM 0.32's profile
of an engine (its default max_num_seqs, the sampler, the vision encoder, CUDA graphs)
and the KV sequences left, colocated engines taking turns with the trainer ranks, host
memory per node, the disk a run fills; and the hf/ export in the model's dtype. The
plan's figures for the shipped presets follow from the same numbers. No Ray, no GPU.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from pipelines.config import load_config
from pipelines.runtime.disk import disk_plan
from pipelines.runtime.memory import (
    BUILTIN_MODELS,
    CUDA_GRAPH_BYTES,
    GIB,
    encoder_profile,
    engine_memory,
    image_tokens,
    model_sizes,
    rank0_host_peak,
    vllm_max_num_seqs,
)
from pipelines.runtime.specs import sleep_level

ROOT = Path(__file__).resolve().parents[1]
QWEN3_8B = model_sizes(BUILTIN_MODELS["Qwen/Qwen3-VL-8B-Instruct"])
QWEN25_7B = model_sizes(BUILTIN_MODELS["Qwen/Qwen2.5-VL-7B-Instruct"])
P8, P7 = 8_767_123_696, 8_292_166_656  # their parameters
PRESET_8B = ROOT / "configs/mmzero/qwen3-vl-8b-8gpu.yaml"
PER_PHASE = ROOT / "configs/layouts/mmzero-8gpu-per-phase.yaml"
MAYE_7B = ROOT / "configs/maye/qwen2.5-vl-7b-8gpu.yaml"


def _plan(capsys, *argv) -> tuple[int, str]:
    from pipelines.cli import main

    code = main(["plan", *map(str, argv)])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


@pytest.fixture(autouse=True)
def no_ray(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)


# --------------------------------------------------------------------------
# One engine
# --------------------------------------------------------------------------


def test_vllm_default_max_num_seqs_by_device_memory():
    # EngineArgs.get_batch_defaults: 1,024 from 70 GiB (H100, H200, B200), else 256
    assert vllm_max_num_seqs(80 * GIB) == vllm_max_num_seqs(141 * GIB) == 1024
    assert vllm_max_num_seqs(70 * GIB) == 1024
    assert vllm_max_num_seqs(69.9 * GIB) == vllm_max_num_seqs(40 * GIB) == 256


def test_the_vision_encoders_profile_by_hand():
    # Qwen3-VL: 32 x 32 pixels per merged token; Qwen2.5-VL: 28 x 28
    assert image_tokens(QWEN3_8B, 4_194_304) == 4096
    assert image_tokens(QWEN3_8B, 0) == 16_384  # the processor's default, 16,777,216 pixels
    assert image_tokens(QWEN25_7B, 1_003_520) == 1280
    # The 8B preset: a budget of max(8192, 4096) tokens = two images of 4096 tokens, each
    # token 2 x 2 patches: 32,768 patches through blocks of width 1152, MLP 4304; the
    # outputs, 4096 wide, with 3 DeepStack levels next to the last layer's.
    parts = encoder_profile(QWEN3_8B, image_tokens=4096, max_num_batched_tokens=8192,
                            max_num_seqs=1024, images_per_prompt=4, max_model_len=8192)
    assert parts == {"vision encoder": 2 * 32_768 * (3 * 4304 + 4 * 1152),  # 1,148,190,720
                     "encoder outputs": 2 * 8192 * 4096 * 4}                # 268,435,456
    # One image larger than the budget is profiled alone: 16,384 tokens, 65,536 patches.
    one = encoder_profile(QWEN3_8B, image_tokens=16_384, max_num_batched_tokens=8192,
                          max_num_seqs=1024, images_per_prompt=4, max_model_len=8192)
    assert one["vision encoder"] == 2 * 65_536 * (3 * 4304 + 4 * 1152)
    assert encoder_profile(QWEN3_8B, image_tokens=0, max_num_batched_tokens=8192,
                           max_num_seqs=1024, images_per_prompt=4, max_model_len=8192) == {}


def test_the_8b_presets_engine_and_its_kv_sequences_by_hand(capsys):
    e = engine_memory(QWEN3_8B, tensor_parallel=1, device_bytes=80 * GIB, utilization=0.85,
                      max_num_batched_tokens=8192, max_model_len=8192, max_num_seqs=1024,
                      image_tokens=4096, images_per_prompt=4, cuda_graphs=True)
    assert e.parts == {
        "weights": 2 * P8,                                # 17,534,247,392
        "activations": 2 * 8192 * (3 * 12288 + 4 * 4096),  # 872,415,232
        "sampler": 6 * 1024 * 151_936,                     # 933,494,784
        "vision encoder": 1_148_190_720, "encoder outputs": 268_435_456,
        "cuda graphs": CUDA_GRAPH_BYTES, "context": GIB,
        "KV cache": 0.85 * 80 * GIB - 23_978_009_056,       # 49,036,434,976
    }
    assert e.kv_tokens == 332_549  # / 147,456 bytes per token
    assert f"{e.sequences(8192):.1f}" == "40.6"
    code, out = _plan(capsys, PRESET_8B)
    assert code == 0, out
    assert "node0     2  proposer engine 0                              68.0  KV 45.7 GiB = " \
           "332,549 tokens = 40.6 sequences of 8,192" in out
    assert "(max_num_seqs 1024): weights 16.3 + activations 0.8 + sampler 0.9 + vision encoder " \
           "1.1 + encoder outputs 0.2 + cuda graphs 2.0 + context 1.0 + KV cache 45.7" in out


def test_an_engine_with_fewer_kv_sequences_than_the_setting_is_refused(capsys):
    # The colocated Solver engines at 0.3 x 80 = 24 GiB: 24 - 22.33 of weights and profile
    # = 1.67 GiB of KV cache = 12,151 tokens (/ 147,456 bytes) = 1.5 sequences of 8,192.
    low = "placement.phases.solver.gpu_memory_utilization=0.3"
    code, out = _plan(capsys, PER_PHASE, low)
    assert code == 2
    assert ("phase solver: solver engine: its KV cache of 1.67 GiB holds 12,151 tokens = 1.5 "
            "sequences of max_model_len 8,192, fewer than generator.min_kv_sequences 8 "
            "(9.00 GiB) in its 24.0 GiB share") in out
    code, out = _plan(capsys, PER_PHASE, low, "generator.min_kv_sequences=1")
    assert code == 0, out  # vLLM itself starts with one sequence


# --------------------------------------------------------------------------
# Colocation: the engines and the trainer ranks take turns
# --------------------------------------------------------------------------


def test_colocated_engines_and_ranks_take_turns_by_hand(capsys):
    """The per-phase layout's Solver phase, 8 offloaded ranks + 8 engines at 0.8: while the
    engines generate, a rank keeps its fp32 reference shard (4 P / 8) and the context;
    while it updates, each sleeping engine keeps its context."""
    code, out = _plan(capsys, PER_PHASE)
    assert code == 0, out
    resident = 4 * P8 / 8 + GIB  # 5.08 GiB
    assert f"{(resident + 0.8 * 80 * GIB) / GIB:.1f}" == "69.1"
    assert ("a trainer GPU by turns: generate 5.1 + engines 64.0 = 69.1 GiB; update 22.2 + "
            "sleeping engines 1.0 = 23.2 GiB") in out
    assert "node0     0  trainer rank 0 + solver engine 0               69.1  KV 41.7 GiB" in out
    # 0.95 x 80 = 76 GiB beside the rank's 5.1: refused for the generate turn only
    code, out = _plan(capsys, PER_PHASE, "placement.phases.solver.gpu_memory_utilization=0.95")
    assert code == 2 and "while the colocated engines generate, a trainer rank keeps reference " \
                         "4.1 + context 1.0 = 5.1 GiB and the engines take 76.0 GiB" in out


def test_sleep_level_two_only_where_the_weight_sync_overwrites_the_weights():
    full = load_config(PER_PHASE)
    assert sleep_level(full) == 2
    assert sleep_level(load_config(PER_PHASE, ["run.sync_weights=false"])) == 1
    assert sleep_level(load_config(PER_PHASE, ["trainer.lora.enabled=true"])) == 1


# --------------------------------------------------------------------------
# Host memory per node
# --------------------------------------------------------------------------


def test_rank_zero_host_peak_by_hand():
    assert rank0_host_peak(QWEN3_8B, full_sync=True, export_bytes=2) == {
        "loading": 4 * P8, "weight sync": 8 * P8, "export": 6 * P8}
    assert rank0_host_peak(QWEN3_8B, full_sync=False, export_bytes=4, lora=100) == {
        "loading": 4 * (P8 + 100), "weight sync": 0, "export": 8 * (P8 + 100)}


def test_host_memory_per_node_for_maye_and_mmzero(capsys):
    # MAYE: 7 ranks, no offload: rank 0's weight sync, 8 P = 61.8 GiB
    code, out = _plan(capsys, MAYE_7B)
    assert code == 0, out
    assert f"{8 * P7 / GIB:.1f}" == "61.8"
    assert "host memory node0 (7 trainer ranks): rank 0's weight sync 61.8 = 61.8 GiB of " \
           "1024 GiB" in out
    # MM-Zero's Solver phase: 8 offloaded ranks of 16 P / 8 each, + 8 P: 24 P = 196.0 GiB
    code, out = _plan(capsys, PER_PHASE)
    assert f"{24 * P8 / GIB:.1f}" == "196.0"
    assert "host memory node0 (8 trainer ranks): 8 x 16.3 offloaded 130.6 + rank 0's weight " \
           "sync 65.3 = 196.0 GiB of 1024 GiB" in out
    code, out = _plan(capsys, PER_PHASE, "placement.cluster.host_memory_gib=150")
    assert code == 2 and "phase solver: host memory of node0: 196.0 GiB over its 150 GiB" in out
    # LoRA: the colocated engines sleep at level 1, their bf16 weights in host memory
    code, out = _plan(capsys, PER_PHASE, "trainer.lora.enabled=true")
    assert "8 x 16.3 weights of level-1 sleeping engines 130.6" in out


# --------------------------------------------------------------------------
# Disk
# --------------------------------------------------------------------------


def test_disk_footprint_of_the_6_iteration_8b_preset_by_hand(capsys):
    """A checkpoint is 4 P of fp32 weights + 8 P of AdamW moments; an export 2 P in bf16.
    18 phases; one checkpoint kept (two while saving); the six Solver exports (coevolve
    eval reads each) and the newest Proposer and CodeGen ones: 2 x 12 P + 8 x 2 P = 40 P
    = 351 GB, under 400."""
    disk = disk_plan(load_config(PRESET_8B), QWEN3_8B, gpu=True)
    assert disk.checkpoint == {"fp32 parameters": 4 * P8, "AdamW moments": 8 * P8}
    assert (disk.export, disk.export_dtype, disk.phases, disk.exports_kept) == (
        2 * P8, "bfloat16", 18, 8)
    assert disk.peak == 40 * P8 == 350_684_947_840
    assert disk.peak < 400e9
    assert disk.end == 16 * P8
    every = disk_plan(load_config(PRESET_8B, ["run.keep_exports=0"]), QWEN3_8B, gpu=True)
    assert every.exports_kept == 18 and every.peak == 2 * 12 * P8 + 18 * 2 * P8  # 526 GB
    default = disk_plan(load_config(PRESET_8B, ["run.keep_checkpoints=2"]), QWEN3_8B, gpu=True)
    assert default.peak == 3 * 12 * P8 + 8 * 2 * P8  # 456 GB: why the preset keeps one
    _, out = _plan(capsys, PRESET_8B)
    assert ("at the end 8 exports = 130.6 GiB; peak while the last phase saves "
            "(run.keep_checkpoints 1 + 1) x 98.0 + 130.6 = 326.6 GiB (351 GB)") in out


def test_disk_counts_every_policy_and_the_model_dtype():
    evolmm = load_config(ROOT / "configs/evolmm/qwen2.5-vl-7b-2gpu.yaml")
    disk = disk_plan(evolmm, QWEN25_7B, gpu=True)
    assert disk.exports_kept == 2  # one phase exports hf/ and hf-<second policy>/
    cpu = disk_plan(load_config(PRESET_8B, ["model.dtype=auto"]), QWEN3_8B, gpu=False)
    assert (cpu.export, cpu.export_dtype) == (4 * P8, "float32")


def test_every_gpu_preset_prints_kv_sequences_host_memory_and_disk(capsys):
    presets = sorted(p for p in (ROOT / "configs").glob("*/*gpu*.yaml") if p.parent.name != "cluster")
    assert len(presets) >= 8
    for preset in presets:
        code, out = _plan(capsys, preset)
        assert "sequences of" in out and "host memory node0" in out, preset
        assert "disk      step checkpoint" in out and "peak while the last phase saves" in out
        # the one refusal: the 2+6 reference layout's full fine-tuning without offload
        assert code == 0 or preset.name == "mmzero-8gpu-2+6.yaml", out[-1500:]
        assert load_config(preset).generator.enforce_eager is False, preset


# --------------------------------------------------------------------------
# The export in the model's dtype
# --------------------------------------------------------------------------


def test_hf_export_is_written_in_the_models_dtype(tmp_path):
    """``export_hf``'s writer casts the gathered fp32 state into the dtype it is given: the
    bf16 folder holds half the bytes and loads in transformers as bf16."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForImageTextToText

    from actors.checkpoint import _write_hf
    from actors.models import resolve_model

    path = resolve_model("tiny://qwen2.5-vl")
    state = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).state_dict()
    sizes = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        _write_hf(tmp_path / name, state, path, None, True, dtype=dtype)
        sizes[name] = sum(f.stat().st_size for f in (tmp_path / name).glob("*.safetensors"))
    written = load_file(tmp_path / "bf16" / "model.safetensors")
    assert {t.dtype for t in written.values()} == {torch.bfloat16}
    key = next(k for k in written if k.endswith("embed_tokens.weight"))
    source = next(v for k, v in state.items() if k.endswith("embed_tokens.weight"))
    assert torch.equal(written[key], source.to(torch.bfloat16))
    assert sizes["bf16"] < 0.51 * sizes["fp32"]


# --------------------------------------------------------------------------
# What a finished phase leaves (the driver's pruning; tests/test_driver.py runs it)
# --------------------------------------------------------------------------


def test_finished_phases_keep_their_export_and_superseded_ones_go(tmp_path):
    """MM-Zero, run.keep_exports=1, after iteration 2's phases: no phase keeps a step
    checkpoint; the Proposer and CodeGen keep their newest export only; the Solver, which
    coevolve eval evaluates per iteration, keeps both."""
    from pipelines.runtime.driver import Driver

    cfg = load_config(ROOT / "configs/mmzero/tiny-cpu.yaml",
                      [f"run.root={tmp_path}", "run.name=r", "run.keep_exports=1"])
    driver = Driver(cfg)
    run = tmp_path / "r"
    for iteration in (1, 2):
        for phase in driver.recipe.phases(iteration):
            folder = run / f"iter_{iteration:04d}" / phase.name
            for part in ("ckpt/step_000002", "hf"):
                (folder / part).mkdir(parents=True)
                (folder / part / "weights").write_text("x")
            (folder / "DONE").write_text("ok\n")
            driver._prune(iteration, phase)
    assert not list(run.rglob("ckpt"))
    left = sorted(str(p.parent.relative_to(run)) for p in run.rglob("hf"))
    assert left == ["iter_0001/solver", "iter_0002/codegen", "iter_0002/proposer",
                    "iter_0002/solver"]
