"""Host memory of trainer ranks while they build: one full copy of the weights per group.

Rank 0 loads the checkpoint; the other ranks build the policy and the reference
on the meta device and receive only their shards from rank 0
(``TrainerActor._pretrained``, ``actors.fsdp.load_full_state``). Before, every
rank loaded a full fp32 copy of both, which for MM-Zero's 8 ranks of an 8B model
is 8 x 2 x 33 GB of host memory on one node at once.

The two ranks (gloo) are child processes started from this file
(``python tests/test_trainer_host_memory.py RANK HOST PORT``, printing JSON), so that
what is measured is a bare rank: no Ray worker, no pytest. Each first imports
and loads everything setup() needs besides the weights, then resets its peak
resident memory (``/proc/self/clear_refs``) and reports how far building the
policy and the reference raised it (VmHWM then minus VmRSS before), before
AdamW's state, a shard's worth on every rank, is allocated.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if __name__ == "__main__":  # run as a rank: make the repository importable
    sys.path.insert(0, str(ROOT))

import pytest

# ~27M parameters (106 MB in fp32): far above what a build allocates besides the weights.
MODEL = "tiny://qwen2.5-vl?hidden=512&layers=8&intermediate=1536"
pytestmark = [pytest.mark.slow,  # two trainer ranks (~20 s on 2 cores)
              pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(),
                                 reason="needs Linux's /proc/self/clear_refs")]


def test_ranks_past_0_hold_their_shards_not_a_full_copy(tiny_cache):
    from actors import fsdp
    from actors.models import resolve_model

    full = _safetensors_bytes(resolve_model(MODEL))  # built here, once, for both ranks
    address = [str(a) for a in fsdp.free_address()]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    children = [subprocess.Popen([sys.executable, __file__, str(rank), *address], env=env,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                for rank in (0, 1)]
    ranks = []
    try:
        for child in children:
            out, err = child.communicate(timeout=300)
            assert child.returncode == 0, err[-3000:]
            ranks.append(json.loads(out.splitlines()[-1]))
    finally:
        for child in children:  # a rank whose peer failed waits in a collective
            child.kill()
    print(f"full fp32 model {full / 1e6:.0f} MB; building policy and reference raised peak "
          "host memory by "
          + ", ".join(f"rank {r['rank']}: {r['peak_bytes'] / 1e6:.0f} MB "
                      f"(its shards {r['shard_bytes'] / 1e6:.0f} MB)" for r in ranks))
    # The policy and the fp32 reference, each split in two: a rank's shards are one copy.
    assert all(r["shard_bytes"] == pytest.approx(full, rel=0.01) for r in ranks)
    # Rank 1: its shards and a little (one tensor in flight): measured 1.13 x full. With
    # every rank loading the checkpoint, as before, 1.75 x (a full policy, then a full
    # reference, each beside its shards).
    assert ranks[1]["peak_bytes"] < 1.5 * full
    # The measure sees a full copy where there is one: rank 0 loads the checkpoint (2.1 x).
    assert ranks[0]["peak_bytes"] > ranks[1]["peak_bytes"] + 0.5 * full


def _safetensors_bytes(path: str) -> int:
    from safetensors import safe_open

    with safe_open(str(Path(path) / "model.safetensors"), "pt") as f:
        names = f.keys()  # (safe_open is not iterable)
        return sum(4 * math.prod(f.get_slice(k).get_shape()) for k in names)  # as fp32


# --------------------------------------------------------------------------
# A rank (child process)
# --------------------------------------------------------------------------


def _memory_kb() -> dict[str, int]:
    status = Path("/proc/self/status").read_text()
    return {k: int(v) for k, v in re.findall(r"(VmRSS|VmHWM):\s+(\d+) kB", status)}


def _load_all_but_the_weights(path: str) -> None:
    """What setup() imports and loads besides the weights, so that it does not count."""
    import torch
    import torch.distributed.checkpoint.state_dict
    import torch.distributed.fsdp
    from transformers import AutoConfig, AutoModelForImageTextToText

    from actors.batching import InputBuilder

    InputBuilder.for_model(path)
    with torch.device("meta"):
        AutoModelForImageTextToText.from_config(AutoConfig.from_pretrained(path))


def _rank(rank: int, host: str, port: int) -> dict:
    from torch.distributed.tensor import DTensor

    from actors.models import resolve_model
    from actors.trainer import TrainerActor, TrainerSpec

    class Rank(TrainerActor):
        def _build_reference(self):
            # Both models built, AdamW's state (a shard's worth on every rank) not yet.
            reference = super()._build_reference()
            self.built_peak_kb = _memory_kb()["VmHWM"]
            return reference

    actor = Rank(TrainerSpec(model=MODEL, threads=1), rank, 2)
    _load_all_but_the_weights(resolve_model(MODEL))
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    before = _memory_kb()["VmRSS"]
    actor.setup(host, port)
    shards = sum((p.to_local() if isinstance(p, DTensor) else p).nbytes
                 for model in (actor.model, actor.reference) for p in model.parameters())
    actor.shutdown()
    return {"rank": rank, "peak_bytes": (actor.built_peak_kb - before) * 1024,
            "shard_bytes": shards}


if __name__ == "__main__":
    print(json.dumps(_rank(int(sys.argv[1]), sys.argv[2], int(sys.argv[3]))))
