"""Trainer throughput: the 2-rank FSDP2 group beside a bare single-process loop, and
the AdamW step with ``trainer.offload``.

    python -m benchmarks.trainer                # from the repository root (CPU host, Ray)
    python -m benchmarks.trainer --in-process   # one rank in this process: no Ray (GPU tier)

Both run the same GRPO-style update (PPO clip + low-variance KL against the
reference, AdamW, grad clip 1.0, gradient checkpointing) on the same batch of
image + question prompts with random 128-token completions, on a ~50M
parameter tiny Qwen2.5-VL where compute, not overhead, dominates. Both get
the whole host: the group as 2 ranks x 1 thread, the bare loop as 1 process
x 2 threads. A step is old log-probs + forward/backward + optimizer step
(the reference log-probs are computed once, outside the timing, by both).
Also: the time to gather the full weights into object-store buckets.

Offload: the same trainer with ``offload=True`` (parameter, gradient and AdamW
shards in host memory), its step and its optimizer step, then one AdamW step
over each rank's host shards and gradients by torch's three implementations:
the for-loop (what torch picks for DTensor shards: the trainer before it asked
for fused), foreach, and fused (the trainer's). ``--in-process`` runs the
trainer as one rank in this process on whatever device it has (a GPU: bf16
mixed precision, pinned host shards) and skips the bare loop and the buckets,
which need the CPU and Ray (tests/gpu_tier.sh runs it there).

Prints a table and writes ``benchmarks/results/trainer-<time>.json``.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import io
import json
import os
import platform
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
MODEL = ("tiny://qwen2.5-vl?hidden=640&layers=8&heads=10&kv_heads=2&intermediate=2304"
         "&vocab=4096&vision_hidden=256&vision_layers=4&vision_heads=4")


def make_batch(path: str, prompts: int, n: int, completion: int):
    from PIL import Image, ImageDraw
    from transformers import AutoProcessor

    from actors.batching import TrainBatch

    processor = AutoProcessor.from_pretrained(path)
    vocab = len(processor.tokenizer)  # the trained BPE may be smaller than the requested vocab
    rng = np.random.default_rng(0)
    ids, plens, pidx, images = [], [], [], []
    for p in range(prompts):
        image = Image.new("RGB", (224, 168), "white")
        ImageDraw.Draw(image).rectangle([20 + 5 * p, 40, 90, 150], fill=(60, 110, 200))
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        messages = [{"role": "user", "content": [
            {"type": "image"}, {"type": "text", "text": f"How many bars are in chart {p}?"}]}]
        text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        prompt = processor(text=[text], images=[image], return_tensors="np")["input_ids"][0]
        images.append([buf.getvalue()])
        for _ in range(n):
            ids.append(np.concatenate([prompt, rng.integers(20, vocab - 20, size=completion)]).astype(np.int64))
            plens.append(len(prompt))
            pidx.append(p)
    adv = rng.normal(size=len(ids)).astype(np.float32)
    return TrainBatch(ids, np.array(plens), np.array(pidx), images, adv)


def bare_loop(path: str, batch, steps: int, objective, threads: int) -> list[float]:
    """The same update in one process: no Ray, no FSDP, one micro-batch."""
    from transformers import AutoModelForImageTextToText

    from actors.batching import InputBuilder
    from actors.logprobs import token_logprobs
    from actors.objectives import policy_objective

    torch.set_num_threads(threads)
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ref = copy.deepcopy(model).eval()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6, weight_decay=1e-2, fused=True)  # as trainer
    mb = InputBuilder.for_model(path).build(batch, list(range(len(batch))))
    with torch.no_grad():
        ref_lp = token_logprobs(ref(**mb["inputs"]).logits[:, :-1], mb["targets"])
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        with torch.no_grad():
            old = token_logprobs(model(**mb["inputs"]).logits[:, :-1], mb["targets"])
        model.train()
        logp = token_logprobs(model(**mb["inputs"]).logits[:, :-1], mb["targets"])
        loss, _ = policy_objective(objective, logp, mb["advantages"], mb["loss_mask"],
                                   old_logprobs=old, ref_logprobs=ref_lp)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return times


class InProcess:
    """One TrainerActor in this process (no Ray): the group's verbs at world size 1."""

    def __init__(self, spec):
        from actors import fsdp
        from actors.trainer import TrainerActor

        self.actor = TrainerActor(spec, 0, 1)
        self.actor.setup(*fsdp.free_address())

    def compute_logprobs(self, batch, reference: bool = False):
        return self.actor.compute_logprobs(batch, reference)

    def forward_backward(self, batch):
        return self.actor.forward_backward(batch)

    def optim_step(self):
        return self.actor.optim_step()

    def shutdown(self):
        self.actor.shutdown()


def start_trainer(spec, ranks: int, in_process: bool):
    if in_process:
        return InProcess(spec)
    from actors.trainer_group import TrainerGroup

    return TrainerGroup(spec, ranks, name="bench/trainer",
                        runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})


def on_ranks(trainer, fn, *args) -> list:
    """``fn(rank's TrainerActor, *args)`` on every rank, results in rank order."""
    if isinstance(trainer, InProcess):
        return [fn(trainer.actor, *args)]
    import ray

    return ray.get([actor.__ray_call__.remote(fn, *args) for actor in trainer.actors])


def trainer_loop(trainer, batch, steps: int) -> tuple[list[float], list[float]]:
    """Seconds per step (old log-probs + forward/backward + optimizer) and of its
    optimizer step (gradient norm, clip, AdamW)."""
    batch = batch.with_column(ref_logprobs=trainer.compute_logprobs(batch, reference=True))
    times, optim = [], []
    for _ in range(steps):
        start = time.perf_counter()
        step_batch = batch.with_column(old_logprobs=trainer.compute_logprobs(batch))
        trainer.forward_backward(step_batch)
        mid = time.perf_counter()
        trainer.optim_step()
        end = time.perf_counter()
        times.append(end - start)
        optim.append(end - mid)
    return times, optim


def bucket_seconds(group) -> tuple[float, int]:
    """Gathering the full weights into 256 MB object-store buckets (seconds, bytes)."""
    import ray

    start = time.perf_counter()
    refs = group.weight_buckets(256 << 20)
    seconds = time.perf_counter() - start
    return seconds, sum(sum(a.nbytes for _, a in bucket) for bucket in ray.get(refs))


ADAMW = {"for-loop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}


def adamw_seconds(actor, repeats: int) -> dict[str, float]:
    """One AdamW step over this rank's trainable shards and their gradients, by
    implementation (median of ``repeats`` after one untimed step, which allocates the
    moments). It steps the live weights: run it last."""
    import statistics

    params = [p for p in actor.model.parameters() if p.grad is not None]
    out = {}
    for name, flags in ADAMW.items():
        optimizer = torch.optim.AdamW(params, lr=1e-6, weight_decay=1e-2, **flags)
        optimizer.step()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            optimizer.step()
            times.append(time.perf_counter() - start)
        out[name] = statistics.median(times)
    return out


def offload_loop(spec, batch, steps: int, ranks: int, in_process: bool, repeats: int) -> dict:
    """The trainer with offload: step and optimizer-step seconds, then AdamW by implementation
    on its host shards (the slowest rank's, which the group waits for)."""
    trainer = start_trainer(dataclasses.replace(spec, offload=True), ranks, in_process)
    try:
        times, optim = trainer_loop(trainer, batch, steps)
        # gradients for the AdamW timings (the last optimizer step dropped them)
        trainer.forward_backward(batch.with_column(
            ref_logprobs=trainer.compute_logprobs(batch, reference=True),
            old_logprobs=trainer.compute_logprobs(batch)))
        per_rank = on_ranks(trainer, adamw_seconds, repeats)
    finally:
        trainer.shutdown()
    return {"step": times, "optim_step": optim,
            "adamw": {name: max(rank[name] for rank in per_rank) for name in ADAMW}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--completion", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3, help="timed steps (after 1 warm-up)")
    parser.add_argument("--budget", type=int, default=4096, help="micro-batch tokens per rank")
    parser.add_argument("--adamw-repeats", type=int, default=5,
                        help="timed AdamW steps per implementation (offload)")
    parser.add_argument("--in-process", action="store_true",
                        help="the trainer as one rank in this process (no Ray, any device); "
                             "no bare loop, no buckets")
    args = parser.parse_args(argv)

    sys.path.insert(0, str(ROOT))
    from actors.models import resolve_model
    from actors.objectives import ObjectiveSpec
    from actors.trainer import TrainerSpec

    objective = ObjectiveSpec(kl_coef=0.01)
    path = resolve_model(MODEL)
    n_params = _count_params(path)
    batch = make_batch(path, args.prompts, args.n, args.completion)
    tokens = sum(len(ids) for ids in batch.input_ids)
    steps = args.steps + 1
    ranks = 1 if args.in_process else 2
    spec = TrainerSpec(model=MODEL, objective=objective, lr=1e-6, micro_batch_tokens=args.budget,
                       threads=0 if args.in_process else 1)
    if args.in_process:
        trainer_name, offload_name = ("trainer (1 rank, in process)",
                                      "trainer + offload (1 rank, in process)")
    else:
        trainer_name, offload_name = ("FSDP2 group (2 ranks x 1 thread)",
                                      "FSDP2 group + offload (2 ranks x 1 thread)")
    rows, optim_rows, all_steps, buckets = {}, {}, {}, None
    if not args.in_process:
        bare = bare_loop(path, batch, steps, objective, threads=2)[1:]
        rows["bare loop (1 process x 2 threads)"] = float(np.median(bare))
        all_steps["bare"] = bare
    with _ray(not args.in_process):
        trainer = start_trainer(spec, ranks, args.in_process)
        try:
            times, optim = trainer_loop(trainer, batch, steps)
            if not args.in_process:
                buckets = bucket_seconds(trainer)
        finally:
            trainer.shutdown()
        offload = offload_loop(spec, batch, steps, ranks, args.in_process, args.adamw_repeats)
    rows[trainer_name] = float(np.median(times[1:]))
    optim_rows[trainer_name] = float(np.median(optim[1:]))
    rows[offload_name] = float(np.median(offload["step"][1:]))
    optim_rows[offload_name] = float(np.median(offload["optim_step"][1:]))
    all_steps.update(group=times[1:], offload=offload["step"][1:])

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else _cpu_name()
    print(f"\nmodel {MODEL}: {n_params / 1e6:.1f}M parameters; batch {len(batch)} samples, "
          f"{tokens} tokens ({batch.completion_tokens()} trained); {device}")
    print(f"{'':42} {'step s':>8} {'tokens/s':>10} {'optimizer s':>12}")
    for name, seconds in rows.items():
        optim_s = f"{optim_rows[name]:12.3f}" if name in optim_rows else f"{'':12}"
        print(f"{name:42} {seconds:8.2f} {tokens / seconds:10.0f} {optim_s}")
    ratio = None
    if not args.in_process:
        ratio = rows[trainer_name] / rows["bare loop (1 process x 2 threads)"]
        print(f"group / bare step time: {ratio:.2f}x (goal <= 1.5x)")
        print(f"weight buckets: {buckets[1] / 1e6:.0f} MB in {buckets[0]:.2f} s "
              f"({buckets[1] / buckets[0] / 1e6:.0f} MB/s)")
    adamw = offload["adamw"]
    print("offload, one AdamW step over the host shards (slowest rank): "
          + ", ".join(f"{name} {seconds:.3f} s" for name, seconds in adamw.items())
          + f"; fused is {adamw['for-loop'] / adamw['fused']:.1f}x the for-loop's speed")
    out = ROOT / "benchmarks" / "results" / f"trainer-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "model": MODEL, "params": n_params, "samples": len(batch), "tokens": tokens,
        "step_seconds": rows, "optimizer_step_seconds": optim_rows, "all_steps": all_steps,
        "ratio_group_over_bare": ratio,
        "bucket_seconds": buckets and buckets[0], "bucket_bytes": buckets and buckets[1],
        "offload_adamw_seconds": adamw, "device": device,
        "host": platform.node(), "torch": torch.__version__,
    }, indent=1))
    print(f"wrote {out.relative_to(ROOT)}")
    return 0


def _ray(start: bool):
    """The benchmark's own local Ray (the group's ranks), or nothing (in process)."""
    if not start:
        return contextlib.nullcontext()
    from pipelines.runtime.local_ray import ray_session

    return ray_session(num_cpus=4)


def _cpu_name() -> str:
    info = Path("/proc/cpuinfo")
    match = re.search(r"^model name\s*:\s*(.+)$", info.read_text() if info.exists() else "", re.M)
    return f"{match.group(1) if match else platform.machine()} ({os.cpu_count()} cores)"


def _count_params(path: str) -> int:
    from safetensors import safe_open

    with safe_open(str(Path(path) / "model.safetensors"), "pt") as f:
        return sum(int(np.prod(f.get_slice(k).get_shape())) for k in f.keys())


if __name__ == "__main__":
    sys.exit(main())
