"""Trainer throughput: the 2-rank FSDP2 group beside a bare single-process loop.

    python -m benchmarks.trainer            # from the repository root

Both run the same GRPO-style update (PPO clip + low-variance KL against the
reference, AdamW, grad clip 1.0, gradient checkpointing) on the same batch of
image + question prompts with random 128-token completions, on a ~50M
parameter tiny Qwen2.5-VL where compute, not overhead, dominates. Both get
the whole host: the group as 2 ranks x 1 thread, the bare loop as 1 process
x 2 threads. A step is old log-probs + forward/backward + optimizer step
(the reference log-probs are computed once, outside the timing, by both).
Also: the time to gather the full weights into object-store buckets.

Prints a table and writes ``benchmarks/results/trainer-<time>.json``.
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import platform
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
    from actors.objectives import policy_objective, token_logprobs

    torch.set_num_threads(threads)
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ref = copy.deepcopy(model).eval()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6, weight_decay=1e-2)
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


def group_loop(batch, steps: int, objective, ranks: int, budget: int):
    import ray

    from actors.trainer import TrainerSpec
    from actors.trainer_group import TrainerGroup

    spec = TrainerSpec(model=MODEL, objective=objective, lr=1e-6, micro_batch_tokens=budget,
                       threads=1)
    group = TrainerGroup(spec, ranks, name="bench/trainer",
                         runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    try:
        batch = batch.with_column(ref_logprobs=group.compute_logprobs(batch, reference=True))
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            step_batch = batch.with_column(old_logprobs=group.compute_logprobs(batch))
            group.forward_backward(step_batch)
            group.optim_step()
            times.append(time.perf_counter() - start)
        start = time.perf_counter()
        refs = group.weight_buckets(256 << 20)
        bucket_s = time.perf_counter() - start
        nbytes = sum(sum(a.nbytes for _, a in bucket) for bucket in ray.get(refs))
        return times, bucket_s, nbytes
    finally:
        group.shutdown()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--completion", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3, help="timed steps (after 1 warm-up)")
    parser.add_argument("--budget", type=int, default=4096, help="micro-batch tokens per rank")
    args = parser.parse_args(argv)

    sys.path.insert(0, str(ROOT))
    from actors.models import resolve_model
    from actors.objectives import ObjectiveSpec
    from pipelines.runtime.local_ray import ray_session

    objective = ObjectiveSpec(kl_coef=0.01)
    path = resolve_model(MODEL)
    n_params = _count_params(path)
    batch = make_batch(path, args.prompts, args.n, args.completion)
    tokens = sum(len(ids) for ids in batch.input_ids)
    steps = args.steps + 1
    bare = bare_loop(path, batch, steps, objective, threads=2)[1:]
    with ray_session(num_cpus=4):
        group, bucket_s, nbytes = group_loop(batch, steps, objective, 2, args.budget)
    group = group[1:]
    rows = {
        "bare loop (1 process x 2 threads)": float(np.median(bare)),
        "FSDP2 group (2 ranks x 1 thread)": float(np.median(group)),
    }
    print(f"\nmodel {MODEL}: {n_params / 1e6:.1f}M parameters; batch {len(batch)} samples, "
          f"{tokens} tokens ({batch.completion_tokens()} trained)")
    print(f"{'':38} {'step s':>8} {'tokens/s':>10}")
    for name, seconds in rows.items():
        print(f"{name:38} {seconds:8.2f} {tokens / seconds:10.0f}")
    ratio = rows["FSDP2 group (2 ranks x 1 thread)"] / rows["bare loop (1 process x 2 threads)"]
    print(f"group / bare step time: {ratio:.2f}x (goal <= 1.5x)")
    print(f"weight buckets: {nbytes / 1e6:.0f} MB in {bucket_s:.2f} s ({nbytes / bucket_s / 1e6:.0f} MB/s)")
    out = ROOT / "benchmarks" / "results" / f"trainer-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "model": MODEL, "params": n_params, "samples": len(batch), "tokens": tokens,
        "step_seconds": rows, "all_steps": {"bare": bare, "group": group},
        "ratio_group_over_bare": ratio, "bucket_seconds": bucket_s, "bucket_bytes": nbytes,
        "host": platform.node(), "torch": torch.__version__,
    }, indent=1))
    print(f"wrote {out.relative_to(ROOT)}")
    return 0


def _count_params(path: str) -> int:
    from safetensors import safe_open

    with safe_open(str(Path(path) / "model.safetensors"), "pt") as f:
        return sum(int(np.prod(f.get_slice(k).get_shape())) for k in f.keys())


if __name__ == "__main__":
    sys.exit(main())
