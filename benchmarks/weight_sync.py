"""Weight pushes, per transport this host has, against their floors.

    python -m benchmarks.weight_sync            # from the repository root

For a ~50M and a ~1 GB tiny model (fp32 trainer, engines in the trainer's dtype
here), a 1-rank trainer group pushes its weights into a live engine, in-process and
in a worker process (the GPU shape), through:

- ``transfer``: vLLM's weight-transfer protocol with coevolve's engine
  (actors/weight_transfer.py; gloo on a CPU host, NCCL on a GPU host): rank 0
  gathers a bucket, casts it, broadcasts it while gathering the next; the engine
  receives and loads per bucket, then finishes the reload and resets its caches;
- ``object store``: ``weight_buckets`` (the same per-bucket gather and cast, each
  bucket copied to host memory and put) then ``update_weights`` (every worker
  fetches the buckets and reloads).

Floors, measured in the same run: the engine's own reload of the same tensors
from its memory (the object-store path's reload time less its fetch), and a bare
``broadcast`` of the same bytes in the same bucket sizes between two processes over
the same backend (``torch.distributed`` gloo, or NCCL on a CUDA host).

Prints a table and writes ``benchmarks/results/weight_sync-<time>.json``. The best
of ``--repeats`` pushes is kept. Runs unchanged on a CUDA host.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
MODELS = {
    "~50M": ("tiny://qwen2.5-vl?hidden=640&layers=8&heads=10&kv_heads=2&intermediate=2304"
             "&vocab=4096&vision_hidden=256&vision_layers=4&vision_heads=4"),
    "~1 GB": ("tiny://qwen2.5-vl?hidden=1024&layers=16&heads=16&kv_heads=4&intermediate=4096"
              "&vocab=4096"),
}

# The receiving end of the bare broadcast: a process of its own, as an engine is.
RECEIVER = """
import sys, torch
sys.path.insert(0, sys.argv[1])
from actors.weight_transfer import broadcast, open_group
host, port, backend, sizes = sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5:]
device = "cuda" if backend == "nccl" else "cpu"
group = open_group(host, port, 1, 2, backend, 120)
for _ in range(2):  # a warm-up round, then the timed one
    for n in sizes:
        broadcast(group, torch.empty(int(n), dtype=torch.uint8, device=device)).wait()
"""


def bare_broadcast(sizes: list[int], backend: str) -> float:
    """Seconds to broadcast buffers of ``sizes`` bytes to another process (timed round)."""
    from actors.weight_transfer import broadcast, listen, open_group

    host, port, sock = listen()
    child = subprocess.Popen([sys.executable, "-c", RECEIVER, str(ROOT), host, str(port),
                              backend, *map(str, sizes)])
    try:
        group = open_group(host, port, 0, 2, backend, 120, listen_socket=sock)
        device = "cuda" if backend == "nccl" else "cpu"
        buffers = [torch.ones(n, dtype=torch.uint8, device=device) for n in sizes]
        seconds = []
        for _ in range(2):
            start = time.perf_counter()
            works = []
            for buf in buffers:
                for work in works:
                    work.wait()
                works = [broadcast(group, buf)]
            for work in works:
                work.wait()
            seconds.append(time.perf_counter() - start)
        return seconds[-1]
    finally:
        child.wait(timeout=120)


def engine(model: str, multiprocess: bool):
    from actors.generator import EngineSpec
    from actors.pool import GeneratorPool

    spec = EngineSpec(model=model, dtype="bfloat16" if torch.cuda.is_available() else "float32",
                      max_model_len=1024, max_num_batched_tokens=1024, multiprocess=multiprocess)
    resources = {"num_gpus": 1} if torch.cuda.is_available() else {"num_cpus": 1}
    return GeneratorPool("bench-push", spec, n_engines=1, resources=resources, threads=2,
                         run="bench")


def trainer(model: str):
    from actors.objectives import ObjectiveSpec
    from actors.trainer import TrainerSpec
    from actors.trainer_group import TrainerGroup

    spec = TrainerSpec(model=model, objective=ObjectiveSpec(kl_coef=0.0), reference=False,
                       threads=2)
    gpus = 1 if torch.cuda.is_available() else 0
    return TrainerGroup(spec, 1, name="bench/trainer", gpus_per_rank=gpus)


def bench_model(label: str, model: str, repeats: int, bucket_mb: int) -> dict:
    group = trainer(model)
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    row: dict = {"model": model, "shapes": {}}
    try:
        for shape, multiprocess in (("in-process", False), ("worker process", True)):
            pool = engine(model, multiprocess)
            try:
                transfer, store = [], []
                for _ in range(repeats):
                    start = time.perf_counter()
                    [m] = pool.push_from(group, pool.version + 1, bucket_bytes=bucket_mb << 20)
                    transfer.append({"seconds": time.perf_counter() - start, **m})
                    start = time.perf_counter()
                    refs = group.weight_buckets(bucket_mb << 20, pool.spec.dtype)
                    gathered = time.perf_counter() - start
                    [m] = pool.update_weights(refs, pool.version + 1)
                    store.append({"seconds": time.perf_counter() - start,
                                  "gather_put_seconds": gathered, **m})
                    del refs
                plan = group.transfer_plan(bucket_mb << 20, pool.spec.dtype)
            finally:
                pool.shutdown()
            best_t = min(transfer, key=lambda r: r["seconds"])
            best_s = min(store, key=lambda r: r["seconds"])
            floor = best_s["reload_seconds"] - best_s["get_seconds"]
            sizes = [sum(torch.Size(s).numel() * d.itemsize for _, s, d in entries)
                     for entries in plan.buckets()]
            bare = bare_broadcast(sizes, backend)
            row["bytes"] = plan.total_bytes
            row["shapes"][shape] = {
                "transfer": transfer, "object_store": store,
                "reload_floor_seconds": floor, "bare_broadcast_seconds": bare,
                "transfer_seconds": best_t["seconds"], "object_store_seconds": best_s["seconds"],
                "transfer_over_floor": best_t["seconds"] / floor,
                "transfer_over_bare": best_t["seconds"] / (bare + floor),
                "object_store_over_floor": best_s["seconds"] / floor}
    finally:
        group.shutdown()
    return row


def print_row(label: str, row: dict) -> None:
    gb = row["bytes"] / 1e9
    print(f"\n{label}: {gb:.3f} GB on the wire ({row['model']})")
    print(f"  {'engine':<16}{'path':<14}{'seconds':>9}{'GB/s':>7}  breakdown")
    for shape, r in row["shapes"].items():
        t = min(r["transfer"], key=lambda x: x["seconds"])
        s = min(r["object_store"], key=lambda x: x["seconds"])
        print(f"  {shape:<16}{'transfer':<14}{t['seconds']:>9.3f}{gb / t['seconds']:>7.2f}  "
              f"rank 0 gather+cast+send {t['send_seconds']:.3f} (waiting on the wire "
              f"{t['send_wait_seconds']:.3f}); engine: receive+load "
              f"{t['receive_load_seconds']:.3f}, finish {t['finish_seconds']:.3f}, "
              f"cache reset {t['reset_seconds']:.3f}")
        print(f"  {'':<16}{'object store':<14}{s['seconds']:>9.3f}{gb / s['seconds']:>7.2f}  "
              f"gather+put {s['gather_put_seconds']:.3f}; engine: get {s['get_seconds']:.3f}, "
              f"reload {s['reload_seconds']:.3f}")
        print(f"  {'':<16}{'floors':<14}  reload from memory {r['reload_floor_seconds']:.3f} s, "
              f"bare broadcast {r['bare_broadcast_seconds']:.3f} s; transfer = "
              f"{r['transfer_over_floor']:.2f}x the reload, "
              f"{r['transfer_over_bare']:.2f}x broadcast + reload; object store = "
              f"{r['object_store_over_floor']:.2f}x the reload")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="pushes per path (best kept)")
    parser.add_argument("--bucket-mb", type=int, default=256)
    parser.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    args = parser.parse_args()

    from pipelines.runtime.local_ray import ray_session

    report = {"host": {"machine": platform.machine(), "cpus": torch.get_num_threads(),
                       "cuda": torch.cuda.is_available()},
              "bucket_mb": args.bucket_mb, "models": {}}
    with ray_session(num_cpus=4, runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}}):
        for label in args.models:
            report["models"][label] = row = bench_model(label, MODELS[label], args.repeats,
                                                        args.bucket_mb)
            print_row(label, row)
    out = ROOT / "benchmarks" / "results" / f"weight_sync-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(f"\nwrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
