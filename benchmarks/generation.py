"""Generation and weight-sync throughput: the engine pool beside Hugging Face.

    python -m benchmarks.generation            # from the repository root

Generation: 32 image+question prompts x n=4 samples x up to 128 new tokens
(temperature 1; a sample stops early only at the end-of-turn token), on the
default tiny model and on a ~50M-parameter tiny model, each measured in the
same run with:

- the pool: 2 engines x 1 thread, and 1 engine x 2 threads (2 cores here);
- Hugging Face ``generate``, all 128 sequences in one batch (left padding,
  ``num_return_sequences=4``);
- Hugging Face ``generate`` one sample at a time (as EvoLMM does), on the
  first ``--one-at-a-time`` samples (a rate; the full 128 would take minutes).

tokens/s = sampled tokens / wall seconds of the call (engine warm-up and
start excluded; the HF rows count tokens up to the first end token).

Weight sync: the state of a ~1 GB fp32 tiny model goes through
``make_buckets`` -> ``pool.update_weights`` (put once, ray.get in every
engine worker, vLLM reload, cache reset) into a live engine, beside an
in-process copy of the same tensors into preallocated ones
(``Tensor.copy_``). Two engine shapes, the same code: the in-process engine
(the worker is the engine actor's process) and a multiprocess one (the
worker is a process vLLM spawned, which fetches the buckets itself, as on a
GPU host).

Prints a table and writes ``benchmarks/results/generation-<time>.json``.
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
MODELS = {
    "tiny (default)": "tiny://qwen2.5-vl",
    "~50M": ("tiny://qwen2.5-vl?hidden=640&layers=8&heads=10&kv_heads=2&intermediate=2304"
             "&vocab=4096&vision_hidden=256&vision_layers=4&vision_heads=4"),
}
SYNC_MODEL = ("tiny://qwen2.5-vl?hidden=1024&layers=16&heads=16&kv_heads=4&intermediate=4096"
              "&vocab=4096")
PROMPTS, N, MAX_TOKENS = 32, 4, 128
POOLS = [(2, 1), (1, 2)]  # (engines, threads per engine)


def chart(i: int) -> bytes:
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (160, 120), "white")
    draw = ImageDraw.Draw(image)
    heights = [(17 * i + 29 * k) % 90 + 10 for k in range(4)]
    for k, h in enumerate(heights):
        draw.rectangle([10 + 37 * k, 110 - h, 38 + 37 * k, 110], fill=(50 * k, 90, 200 - 9 * i))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def requests(n_prompts: int = PROMPTS):
    from actors.generator import Request, Sampling

    out = []
    for i in range(n_prompts):
        question = f"Question {i}: what is the height of bar {i % 4}, and which bar is tallest?"
        messages = [{"role": "user", "content": [{"type": "image"},
                                                 {"type": "text", "text": question}]}]
        out.append(Request(messages, images=[chart(i)],
                           sampling=Sampling(n=N, temperature=1.0, max_tokens=MAX_TOKENS)))
    return out


def engine_spec(model: str, multiprocess: bool | None = None):
    from actors.generator import EngineSpec

    return EngineSpec(model=model, dtype="float32", max_model_len=2048,
                      max_num_batched_tokens=8192, cpu_kvcache_gib=2, multiprocess=multiprocess)


# --------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------


def bench_pool(model: str, engines: int, threads: int, reqs) -> dict:
    from actors.pool import GeneratorPool

    start = time.perf_counter()
    pool = GeneratorPool("bench", engine_spec(model), n_engines=engines,
                         resources={"num_cpus": threads}, threads=threads, run="bench")
    started = time.perf_counter() - start
    try:
        pool.generate(reqs[:engines * 2])  # warm-up
        start = time.perf_counter()
        results = pool.generate(reqs)
        seconds = time.perf_counter() - start
    finally:
        pool.shutdown()
    tokens = sum(len(s.token_ids) for samples in results for s in samples)
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
            "start_seconds": started}


class HFRunner:
    def __init__(self, model: str):
        from transformers import AutoModelForImageTextToText, AutoProcessor

        from actors.models import resolve_model

        path = resolve_model(model)
        self.processor = AutoProcessor.from_pretrained(path)
        self.model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
        tok = self.processor.tokenizer
        self.eos = [tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")]
        self.params = sum(p.numel() for p in self.model.parameters())

    def inputs(self, reqs):
        from PIL import Image

        texts = [self.processor.apply_chat_template(r.messages, tokenize=False,
                                                    add_generation_prompt=True) for r in reqs]
        images = [Image.open(io.BytesIO(r.images[0])).convert("RGB") for r in reqs]
        return self.processor(text=texts, images=images, padding=True, padding_side="left",
                              return_tensors="pt")

    def generate(self, reqs, num_return_sequences: int) -> tuple[int, float]:
        """(sampled tokens up to the first end token, seconds) of one generate call."""
        inputs = self.inputs(reqs)
        start = time.perf_counter()
        with torch.no_grad():
            out = self.model.generate(
                **inputs, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                max_new_tokens=MAX_TOKENS, num_return_sequences=num_return_sequences,
                eos_token_id=self.eos, pad_token_id=self.eos[1])
        seconds = time.perf_counter() - start
        new = out[:, inputs["input_ids"].shape[1]:]
        tokens = 0
        for row in new.tolist():
            ends = [k for k, t in enumerate(row) if t in self.eos]
            tokens += ends[0] + 1 if ends else len(row)
        return tokens, seconds


def bench_hf(model: str, reqs, one_at_a_time: int) -> tuple[dict, dict, int]:
    hf = HFRunner(model)
    hf.generate(reqs[:2], 1)  # warm-up
    tokens, seconds = hf.generate(reqs, N)
    batched = {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds}
    tokens = seconds = 0
    for i in range(one_at_a_time):  # sample i: prompt i // N, one sequence per call
        t, s = hf.generate([reqs[i // N]], 1)
        tokens, seconds = tokens + t, seconds + s
    single = {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
              "samples": one_at_a_time}
    return batched, single, hf.params


# --------------------------------------------------------------------------
# Weight sync
# --------------------------------------------------------------------------


def bench_sync(repeats: int, bucket_mb: int) -> dict:
    from transformers import AutoModelForImageTextToText

    from actors.models import resolve_model
    from actors.pool import GeneratorPool
    from actors.weights import make_buckets, put_buckets

    path = resolve_model(SYNC_MODEL)
    state = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).state_dict()
    total = sum(t.nbytes for t in state.values())

    # In-process copies of the same tensors: into preallocated (already
    # touched) tensors, and into fresh ones (clone: first-touch page faults,
    # as a put into new shared memory pays them).
    copies, clones = [], []
    targets = {n: torch.empty_like(t) for n, t in state.items()}
    for _ in range(repeats + 1):
        start = time.perf_counter()
        for n, t in state.items():
            targets[n].copy_(t)
        copies.append(time.perf_counter() - start)
    del targets
    for _ in range(repeats):
        start = time.perf_counter()
        fresh = [t.clone() for t in state.values()]
        clones.append(time.perf_counter() - start)
        del fresh

    copy, clone = min(copies), min(clones)
    report = {"model": SYNC_MODEL, "bytes": total, "bucket_mb": bucket_mb,
              "memcpy_seconds": copy, "memcpy_bytes_per_s": total / copy,
              "clone_seconds": clone, "clone_bytes_per_s": total / clone, "shapes": {}}
    for shape, multiprocess in (("in-process", False), ("worker process", True)):
        pool = GeneratorPool("bench-sync", engine_spec(SYNC_MODEL, multiprocess), n_engines=1,
                             resources={"num_cpus": 2}, threads=2, run="bench")
        rows = []
        try:
            for version in range(1, repeats + 1):
                start = time.perf_counter()
                buckets = make_buckets(state.items(), bucket_bytes=bucket_mb << 20)
                t_buckets = time.perf_counter() - start
                [engine] = pool.update_weights(buckets, version)
                seconds = time.perf_counter() - start
                rows.append({"seconds": seconds, "buckets_seconds": t_buckets,
                             "n_buckets": len(buckets),
                             **{f"engine_{k}": v for k, v in engine.items()
                                if k.endswith("seconds")}})
            # The put on its own (the pool does it inside update_weights).
            start = time.perf_counter()
            refs = put_buckets(buckets)
            put_seconds = time.perf_counter() - start
            del refs
        finally:
            pool.shutdown()
        best = min(rows, key=lambda r: r["seconds"])
        report["shapes"][shape] = {
            "runs": rows, "sync_seconds": best["seconds"],
            "sync_bytes_per_s": total / best["seconds"], "put_seconds": put_seconds,
            # vLLM's reload of tensors already in the worker's memory (the fetch taken out)
            "reload_only_seconds": best["engine_reload_seconds"] - best["engine_get_seconds"],
            "ratio_to_memcpy": copy / best["seconds"], "ratio_to_clone": clone / best["seconds"]}
    return report


# --------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--one-at-a-time", type=int, default=16,
                        help="samples timed for HF one-at-a-time (a rate)")
    parser.add_argument("--repeats", type=int, default=3, help="weight-sync repetitions (best kept)")
    parser.add_argument("--bucket-mb", type=int, default=256)
    parser.add_argument("--sync-only", action="store_true", help="only the weight-sync part")
    args = parser.parse_args()
    torch.set_num_threads(2)

    from pipelines.runtime.local_ray import ray_session

    env = {"env_vars": {"PYTHONPATH": str(ROOT)}}
    report = {"host": {"cpus": torch.get_num_threads(), "machine": platform.machine()},
              "workload": {"prompts": PROMPTS, "n": N, "max_tokens": MAX_TOKENS},
              "generation": {}}
    reqs = requests()
    with ray_session(num_cpus=2, runtime_env=env):
        for label, model in ({} if args.sync_only else MODELS).items():
            row = {"model": model}
            for engines, threads in POOLS:
                row[f"pool {engines}x{threads}"] = bench_pool(model, engines, threads, reqs)
            row["hf batched"], row["hf one-at-a-time"], row["params"] = bench_hf(
                model, reqs, args.one_at_a_time)
            report["generation"][label] = row
            print_generation(label, row)
        report["weight_sync"] = bench_sync(args.repeats, args.bucket_mb)
    print_sync(report["weight_sync"])
    out = ROOT / "benchmarks" / "results" / f"generation-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(f"\nwrote {out.relative_to(ROOT)}")


def print_generation(label: str, row: dict) -> None:
    print(f"\n{label}: {row['model']} ({row['params'] / 1e6:.1f}M parameters)")
    print(f"  {'':<20}{'tokens':>8}{'seconds':>9}{'tokens/s':>10}"
          f"{'pool/this (best pool)':>24}")
    best = max(row[f"pool {e}x{t}"]["tokens_per_s"] for e, t in POOLS)
    for key in [f"pool {e}x{t}" for e, t in POOLS] + ["hf batched", "hf one-at-a-time"]:
        r = row[key]
        ratio = "" if key.startswith("pool") else f"{best / r['tokens_per_s']:.1f}x"
        print(f"  {key:<20}{r['tokens']:>8}{r['seconds']:>9.2f}{r['tokens_per_s']:>10.0f}"
              f"{ratio:>24}")


def print_sync(s: dict) -> None:
    gb = s["bytes"] / 1e9
    print(f"\nweight sync: {gb:.2f} GB fp32 state ({s['model']}), {s['bucket_mb']} MB buckets")
    print(f"  copy_  {s['memcpy_bytes_per_s'] / 1e9:6.2f} GB/s in-process copy into allocated tensors")
    print(f"  clone  {s['clone_bytes_per_s'] / 1e9:6.2f} GB/s in-process copy into new tensors")
    for shape, r in s["shapes"].items():
        print(f"  {shape} engine:")
        for i, run in enumerate(r["runs"], 1):
            print(f"    run {i}: {run['seconds']:.2f} s; in the engine {run['engine_seconds']:.2f} s "
                  f"(name check {run['engine_check_seconds']:.3f}, ray.get "
                  f"{run['engine_get_seconds']:.3f}, vLLM reload {run['engine_reload_seconds']:.2f})"
                  f"; {run['n_buckets']} buckets")
        print(f"    ray.put of the same buckets alone: {r['put_seconds']:.2f} s; vLLM reload "
              f"without the fetch {r['reload_only_seconds']:.2f} s")
        print(f"    sync {r['sync_bytes_per_s'] / 1e9:6.2f} GB/s (best run, end to end) = "
              f"{r['ratio_to_memcpy']:.0%} of copy_, {r['ratio_to_clone']:.0%} of clone, "
              f"{r['sync_seconds'] / r['reload_only_seconds']:.2f}x the reload alone")


if __name__ == "__main__":
    main()
