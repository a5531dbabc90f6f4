"""The trainer's memory levers, single process (no Ray): chunked log-probs equal the
full-logits path (values and gradients), the bf16 reference equals the fp32 one under
bf16 mixed precision and stays close in fp32, and the config rejects what cannot work.

The 2-rank FSDP checks (offload, chunking and the bf16 reference inside a trainer
group) are in tests/test_trainer.py; what the levers save is pipelines/runtime/memory.py's
business (tests/test_placement.py).

The FSDP check runs in a child process started from this file
(``python tests/test_memory_levers.py reference FAMILY``): it joins a 1-rank gloo
process group, which the pytest process must not hold.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if __name__ == "__main__":  # run as the child script: make the repo and conftest importable
    sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import pytest
import torch

from actors.logprobs import (
    _TargetLogprob,
    chunked_token_logprobs,
    entropy_from_logits,
    token_logprobs,
)
from actors.objectives import ObjectiveSpec

FAMILIES = ["qwen2.5-vl", "qwen3-vl"]


def _inputs(n=13, h=8, v=50, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g).to(dtype).requires_grad_()
    weight = torch.randn(v, h, generator=g).to(dtype).requires_grad_()
    targets = torch.randint(0, v, (n,), generator=g)
    coef = torch.randn(n, generator=g)
    return hidden, weight, targets, coef


def _full(hidden, weight, targets):
    logits = torch.nn.functional.linear(hidden, weight)
    return token_logprobs(logits, targets), entropy_from_logits(logits)


@pytest.mark.parametrize("chunk", [1, 3, 13, 100])
@pytest.mark.parametrize("with_entropy", [False, True])
def test_chunked_token_logprobs_equal_the_full_logits(chunk, with_entropy):
    hidden, weight, targets, coef = _inputs()
    logp, ent = _full(hidden, weight, targets)
    ((logp + ent) * coef if with_entropy else logp * coef).sum().backward()
    expected = (logp.detach(), ent.detach(), hidden.grad.clone(), weight.grad.clone())
    hidden.grad = weight.grad = None

    got_logp, got_ent = chunked_token_logprobs(hidden, weight, targets, chunk, with_entropy)
    ((got_logp + got_ent) * coef if with_entropy else got_logp * coef).sum().backward()
    assert (got_ent is None) == (not with_entropy)
    torch.testing.assert_close(got_logp, expected[0], rtol=0, atol=1e-6)
    if with_entropy:
        torch.testing.assert_close(got_ent, expected[1], rtol=0, atol=1e-6)
    for got, want in ((hidden.grad, expected[2]), (weight.grad, expected[3])):
        # fp32 matmuls of other shapes sum in another order: ~1e-7 of the largest element
        assert float((got - want).norm() / want.norm()) <= 1e-6
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6 * float(want.abs().max()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lean_logprob_backward_is_autograds_bit_for_bit(dtype):
    """The in-place backward of _TargetLogprob repeats PyTorch's own formula.

    Bit-identical by construction, on any CPU: forward and backward are the same
    element-wise kernels (exp, sub, mul, scatter-add) and the same logsumexp reduction,
    applied in the same order to the same data; no matmul or reordered sum is involved.
    """
    hidden, weight, targets, coef = _inputs(v=300, dtype=dtype)
    logits = torch.nn.functional.linear(hidden, weight).detach()
    a = logits.clone().requires_grad_()
    b = logits.clone().requires_grad_()
    out_a = token_logprobs(a, targets)
    out_b = _TargetLogprob.apply(b, targets)
    (out_a * coef).sum().backward()
    (out_b * coef).sum().backward()
    assert torch.equal(out_a, out_b)
    assert b.grad.dtype == dtype and torch.equal(a.grad, b.grad)


def test_no_scored_token_still_gives_the_head_a_gradient():
    """A rank whose micro-batch scores nothing must still produce a head gradient (zeros):
    FSDP reduce-scatters the root unit's gradients on every rank."""
    hidden, weight, targets, _ = _inputs()
    logp, ent = chunked_token_logprobs(hidden[:0], weight, targets[:0], 4)
    assert logp.shape == (0,) and ent is None
    (logp.sum() + 0.0 * hidden.sum()).backward()
    assert weight.grad is not None and not weight.grad.any()


def test_chunked_token_logprobs_hold_no_graph_without_grad():
    hidden, weight, targets, _ = _inputs()
    with torch.no_grad():
        logp, _ = chunked_token_logprobs(hidden, weight, targets, 4)
    assert not logp.requires_grad
    torch.testing.assert_close(logp, _full(hidden, weight, targets)[0].detach(), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="chunk_tokens"):
        chunked_token_logprobs(hidden, weight, targets, 0)


def _micro_batch(path: str):
    from conftest import make_train_batch

    from actors.batching import InputBuilder

    batch = make_train_batch(path, n_prompts=3, n=2, seed=1)
    return InputBuilder.for_model(path).build(batch, list(range(len(batch))), 0)


@pytest.mark.parametrize("family", FAMILIES)
def test_chunked_model_logprobs_equal_the_full_logits_on_tiny_models(family, tiny_cache):
    """The LM-head hook on a real Qwen-VL forward: log-probs, entropies and every
    parameter gradient equal the full-logits path (fp32 CPU)."""
    from transformers import AutoModelForImageTextToText

    from actors.logprobs import chunked_model_logprobs
    from actors.models import resolve_model

    path = resolve_model(f"tiny://{family}")
    mb = _micro_batch(path)
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32)
    mask = mb["loss_mask"]
    coef = torch.randn(mask.shape, generator=torch.Generator().manual_seed(0)) * mask

    def run(fn):
        model.zero_grad(set_to_none=True)
        logp, ent = fn()
        ((logp + ent) * coef).sum().backward()
        return logp.detach(), ent.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                                             if p.grad is not None}

    def full():
        logits = model(**mb["inputs"], use_cache=False).logits[:, :-1]
        return token_logprobs(logits, mb["targets"]) * mask, entropy_from_logits(logits) * mask

    logp, ent, grads = run(full)
    for chunk in (1, 5, 2048):
        c_logp, c_ent, c_grads = run(lambda c=chunk: chunked_model_logprobs(model, mb, c, True))
        assert c_grads.keys() == grads.keys()
        d_logp = float((c_logp - logp).abs().max())
        d_ent = float((c_ent - ent).abs().max())
        flat = torch.cat([g.ravel() for g in grads.values()])
        c_flat = torch.cat([c_grads[k].ravel() for k in grads])
        relative = float((flat - c_flat).norm() / flat.norm())
        worst = max(float((c_grads[k] - g).abs().max() / g.abs().max().clamp(min=1e-12))
                    for k, g in grads.items())
        print(f"{family} chunk {chunk} ({int(mask.sum())} tokens): |dlogp| {d_logp:.1e}, "
              f"|dentropy| {d_ent:.1e}, |dg|/|g| {relative:.1e}, worst element {worst:.1e}")
        # fp32: the chunked path multiplies [chunk, H] x [H, V] instead of one [N, H] x [H, V]
        # and sums the backward's head gradient chunk by chunk, so BLAS/oneDNN may pick
        # other kernels and reduction orders, and which ones depends on the CPU. Measured:
        # <= 1.5e-6 on log-probs of about -6.9, 1.5e-6 worst gradient element (Intel Xeon);
        # one chunk holding every token: bit-identical on that Xeon, relative gradient
        # difference 3.8e-8 on an AMD EPYC. The bounds are ~2x the largest measured error,
        # two orders of magnitude above fp32's epsilon (1.2e-7) times the ~50 terms summed
        # per element, and far below what a wrong formula moves (> 1e-3).
        assert d_logp <= 3e-6 and d_ent <= 3e-6
        assert relative <= 1e-6 and worst <= 1e-5


def _reference_logprobs(family: str) -> dict:
    """Child process: reference log-probs of fp32 and bf16 weights, with and without
    FSDP2's bf16 mixed precision, through the trainer's own sharding."""
    import torch.distributed as dist
    from transformers import AutoModelForImageTextToText

    from actors import fsdp
    from actors.logprobs import chunked_model_logprobs
    from actors.models import resolve_model

    torch.set_num_threads(1)
    path = resolve_model(f"tiny://{family}")
    host, port = fsdp.free_address()
    fsdp.init_process_group(0, 1, host, port)
    mb = _micro_batch(path)
    mask = mb["loss_mask"].bool()
    out = {}
    for mp in (True, False):
        for dtype in ("float32", "bfloat16"):
            model = AutoModelForImageTextToText.from_pretrained(path, dtype=getattr(torch, dtype))
            model.requires_grad_(False)
            fsdp.apply_fsdp(model.eval(), mp)
            with torch.no_grad():
                out[f"{dtype}/mp={mp}"] = chunked_model_logprobs(model, mb, 2048)[0][mask].tolist()
    dist.destroy_process_group()
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_bf16_reference_equals_fp32_under_mixed_precision_and_is_close_in_fp32(family, tiny_cache):
    done = subprocess.run([sys.executable, __file__, "reference", family], capture_output=True,
                          text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    out = {k: torch.tensor(v) for k, v in json.loads(done.stdout.splitlines()[-1]).items()}
    # Under bf16 mixed precision (the GPU default) FSDP2 casts fp32 shards to bf16
    # before computing: storing the reference in bf16 changes nothing.
    assert torch.equal(out["bfloat16/mp=True"], out["float32/mp=True"])
    # fp32 compute (the CPU default): bf16 rounding of the weights. Measured on the
    # tiny random models: max 3.5e-3 / 2.3e-3, mean 1.1e-3 on log-probs of about -6.9.
    diff = (out["bfloat16/mp=False"] - out["float32/mp=False"]).abs()
    print(f"{family}: bf16 vs fp32 reference in fp32 compute: max {diff.max():.2e}, "
          f"mean {diff.mean():.2e}")
    assert 0 < diff.max() < 1e-2 and diff.mean() < 3e-3


def test_full_kl_needs_the_full_logits():
    from actors.trainer import TrainerSpec
    from pipelines.config import ConfigError, load_config

    full = ObjectiveSpec(kl_coef=0.1, kl_estimator="full")
    with pytest.raises(ValueError, match="logprob_chunk_tokens: 0"):
        TrainerSpec(model="m", objective=full)
    TrainerSpec(model="m", objective=full, logprob_chunk_tokens=0)
    with pytest.raises(ValueError, match="reference_dtype"):
        TrainerSpec(model="m", reference_dtype="float16")
    with pytest.raises(ConfigError, match="logprob_chunk_tokens=0"):
        load_config(None, ["algorithm.kl_estimator=full"])
    assert load_config(None, ["algorithm.kl_estimator=full",
                              "trainer.logprob_chunk_tokens=0"]).trainer.logprob_chunk_tokens == 0
    with pytest.raises(ConfigError, match="trainer.reference_dtype"):
        load_config(None, ["trainer.reference_dtype=float16"])



FAULTS = """
import resource, torch
def steps():
    for _ in range(8):
        block = torch.empty(64 << 20)  # 256 MiB of fp32
        block.fill_(1.0)
        del block
for _ in range(3):  # the first rounds grow the heap
    steps()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
steps()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def test_cpu_ranks_keep_freed_memory_for_the_next_allocation(monkeypatch):
    """A trainer rank on a CPU host (``cpu_rank_env``): glibc keeps freed memory, so
    once the heap has grown, allocating and filling a 256 MiB block 8 times faults
    no page in; by default each allocation is a fresh mapping and faults its 65536
    pages in again (the kernel's minor page-fault count)."""
    from actors.trainer_group import KEEP_FREED_MEMORY, cpu_rank_env

    for key in KEEP_FREED_MEMORY:
        monkeypatch.delenv(key, raising=False)
    env = cpu_rank_env({"env_vars": {"OMP_NUM_THREADS": "2"}, "pip": ["x"]})
    assert env == {"pip": ["x"], "env_vars": {"OMP_NUM_THREADS": "2", "MALLOC_MMAP_MAX_": "0",
                                              "MALLOC_TRIM_THRESHOLD_": str(1 << 40)}}

    def faults(extra: dict) -> int:
        out = subprocess.run([sys.executable, "-c", FAULTS], env={**os.environ, **extra},
                             capture_output=True, text=True, check=True)
        return int(out.stdout)

    pages = (256 << 20) // 4096
    default, kept = faults({}), faults(env["env_vars"])
    print(f"minor page faults for 8 x 256 MiB: default {default}, kept {kept}")
    assert default >= 8 * pages and kept < pages // 100
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "0")  # the user's setting wins
    assert cpu_rank_env(None)["env_vars"]["MALLOC_TRIM_THRESHOLD_"] == "0"


if __name__ == "__main__":
    if sys.argv[1] == "reference":
        print(json.dumps(_reference_logprobs(sys.argv[2])))
