"""GPU tier (``pytest -m gpu``; skipped without CUDA, vLLM or Ray): the whole step on one GPU.

The simple recipe end to end as a GPU user runs it on one device: a bf16 vLLM
engine with multiprocessing (its worker process loads each pushed version
through ``actors/vllm_worker.py``), colocated with a 1-rank FSDP2 trainer on
NCCL and sleeping (vLLM sleep mode, level 1) through every update; 3 GRPO
steps with weight sync, then the same with LoRA adapters. The trainer-only
checks (offload, chunked log-probs, LoRA under mixed precision) are in
tests/test_gpu_trainer.py.

Bounds: the engine's and the trainer's log-probs of the sampled tokens are
computed by different bf16 kernels (vLLM's fused ops against transformers'
eager ones), so they agree to bf16 precision, not to fp32's ~1e-6: the mean
|difference| per token must stay under 0.05 nats (bf16 has 8 bits of
mantissa; logits of a few units round at ~0.01-0.03). Estimated, not yet
measured: replace with ~2x the figure of the first GPU run.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

# Checked before anything imports vLLM or Ray: a CPU host does not pay vLLM's import,
# and the trainer-only GPU tier (tests/gpu_tier.sh, no vLLM or Ray) skips this file.
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)
pytest.importorskip("vllm", reason="the engine GPU tests need vLLM (the trainer ones do not)")
pytest.importorskip("ray", reason="the engine GPU tests need Ray (the trainer ones do not)")

from pipelines.config import load_config
from pipelines.runtime.driver import Driver
from pipelines.runtime.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.gpu

BF16_LOGPROB_BOUND = 0.05


def gpu_config(tmp_path, name: str, *extra: str):
    return load_config(ROOT / "configs/simple/tiny-cpu.yaml", [
        f"run.root={tmp_path}", f"run.name={name}", "logging.progress=false",
        "model.dtype=bfloat16", "simple.steps=3", "simple.max_tokens=32",
        "placement.trainer_ranks=1", "placement.gpus_per_rank=1", "placement.cpus_per_rank=1",
        "placement.roles={policy: {engines: 1, gpus_per_engine: 1, cpus_per_engine: 1}}",
        "placement.colocate=[policy]", "generator.gpu_memory_utilization=0.3",
        "generator.multiprocess=always", "run.save_every=100", *extra])


def run_lines(tmp_path, name: str, *extra: str) -> list[dict]:
    state = Driver(gpu_config(tmp_path, name, *extra)).run()
    assert state.roles["policy"].version == 3
    return [m for m in read_metrics(tmp_path / name / "iter_0001/policy/metrics.jsonl")
            if "reward/mean" in m]


@pytest.mark.parametrize("variant", ["full", "lora"])
def test_three_colocated_grpo_steps_in_bf16(ray_cluster, tmp_path, variant):
    extra = (["trainer.lora.enabled=true", "trainer.lora.rank=8", "trainer.lr=1e-3"]
             if variant == "lora" else ["trainer.lr=1e-4"])
    lines = run_lines(tmp_path, variant, *extra)
    print(f"\n{variant}: engine - trainer mean |dlogp| per step: "
          + " ".join(f"{m['rollout/logprob_diff']:.3g}" for m in lines)
          + "; sleep/wake s: " + " ".join(f"{m['timing/sleep']:.2f}/{m['timing/wake']:.2f}"
                                          for m in lines))
    assert [m["rollout/version"] for m in lines] == [1, 2, 3]
    assert all(m["timing/sleep"] > 0 and m["timing/wake"] > 0 for m in lines)
    assert max(m["rollout/logprob_diff"] for m in lines) < BF16_LOGPROB_BOUND
    assert all(m["train/grad_norm"] > 0 for m in lines)
