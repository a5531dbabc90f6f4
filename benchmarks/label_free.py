"""Does label-free self-evolution make a model better? Held-out accuracy against a control.

    .venv/bin/python -m benchmarks.label_free [--seeds 0 1 2] [--steps 40] [--arms ...]

For each seed, two EvoLMM runs (the real engine: vLLM in Ray actors, the FSDP2
trainer, LoRA adapters) that differ in one thing:

- ``soft``: EvoLMM's Solver reward, the answer's share among the N sampled answers
  (test-time RL on fixed questions, TTRL arXiv:2504.16084; ``evolmm.questions: known``);
- ``shuffled``: the same rewards permuted across the step's answers (the control: the
  same compute and update sizes, no signal; ``evolmm.reward: shuffled``);
- ``discrete`` (``--arms discrete``): 1 for the majority answer, else 0 (EvoLMM's
  ablation, the rule of MM-Zero's Solver reward without its format term).

The task family ("spots"): one shape (circle, square or triangle) in one of six
colours, at a random place and size; the question is its colour. The training
images (64) and the held-out images (64) are drawn from different seed streams;
their answers sit in ``answers.jsonl`` and are never rewarded: they score the
majority vote (pseudo-label accuracy) and the held-out set.

The warm start: 1200 SFT steps (batch 8) on the Solver's format whose answers are wrong
``NOISE`` of the time (another colour, uniformly), with the vision tower trained
(the 0.8 M-parameter tiny model learns colour slowly: the answer is one token of a
~15-token target; 300 steps on colour and shape questions with clean answers gave
0.42 held-out greedy accuracy, shape hardly above chance). The warm model hedges:
its most likely answer is nearly always right (greedy accuracy ~0.9) but one
answer sampled at temperature 1 is right about half the time. That gap is the
headroom test-time RL lives on: sharpening the distribution toward its own
majority moves sampled accuracy toward greedy accuracy. Greedy accuracy itself
has next to no room here, and the table shows it beside the others.

Prints a table (recipe, seed, arm, held-out greedy / sampled / majority before
and after, pseudo-label accuracy at the start and the end of training), writes
``benchmarks/results/label_free-<time>.json`` and a PNG beside it. About 25
minutes on 2 CPU cores for the default 3 seeds x 2 arms (the warm start, 3.5 minutes,
is trained once per seed and cached).
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
COLOURS = ("red", "blue", "green", "yellow", "purple", "orange")
SHAPES = ("circle", "square", "triangle")
QUESTIONS = (("What colour is the shape?", COLOURS),)
SIDE = 112  # 4 x 4 merged patches of 28 pixels: 16 image tokens
NOISE = 0.4  # the warm start's share of wrong answers
THINK = "The colour."
ARMS = ("soft", "shuffled", "discrete")
STYLE = {"soft": "-", "shuffled": "--", "discrete": ":"}
# the runs' settings beside configs/evolmm/tiny-cpu.yaml (the one changed thing per arm: reward)
OVERRIDES = ("evolmm.questions=known", "evolmm.schedule=batched", "evolmm.images_per_step=8",
             "evolmm.solver_samples=8", "evolmm.heldout=64", "evolmm.heldout_every=10",
             "model.warm_start.data=benchmarks.label_free:warm_examples",
             "model.warm_start.examples=9600", "model.warm_start.steps=1200",
             "trainer.freeze_vision=false", "run.save_every=20")


def draw(rng: np.random.Generator) -> tuple[bytes, dict[str, str]]:
    """One image of the family and its answers."""
    from PIL import Image, ImageDraw

    colour, shape = COLOURS[rng.integers(len(COLOURS))], SHAPES[rng.integers(len(SHAPES))]
    size = int(rng.integers(28, 60))
    x, y = (int(v) for v in rng.integers(4, SIDE - size - 4, 2))
    image = Image.new("RGB", (SIDE, SIDE), "white")
    pen = ImageDraw.Draw(image)
    box = (x, y, x + size, y + size)
    if shape == "circle":
        pen.ellipse(box, fill=colour)
    elif shape == "square":
        pen.rectangle(box, fill=colour)
    else:
        pen.polygon([(x + size // 2, y), (x, y + size), (x + size, y + size)], fill=colour)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue(), {QUESTIONS[0][0]: colour}


def write_folder(folder: Path, count: int, stream: list[int]) -> Path:
    """``count`` images and their answers.jsonl (pipelines/recipes/evolmm/data.py)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(stream)
    rows = []
    for i in range(count):
        png, answers = draw(rng)
        (folder / f"spot_{i:03d}.png").write_bytes(png)
        rows += [{"image": f"spot_{i:03d}.png", "question": q, "answer": a}
                 for q, a in answers.items()]
    (folder / "answers.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def warm_examples(count: int, seed: int, cfg) -> list:
    """``model.warm_start.data``: ``count`` Solver examples on images of a stream of their
    own, answers wrong ``NOISE`` of the time (pipelines/runtime/warm_start.py)."""
    from pipelines.recipes.evolmm import prompts
    from pipelines.recipes.evolmm.warm_start import solver_target
    from pipelines.runtime.sft import SFTExample

    rng = np.random.default_rng([seed, 11])
    out = []
    for _ in range(math.ceil(count / len(QUESTIONS))):
        png, answers = draw(rng)
        for question, choices in QUESTIONS:
            answer = answers[question]
            if rng.random() < float(os.environ.get("LABEL_FREE_NOISE", NOISE)):
                answer = [c for c in choices if c != answer][rng.integers(len(choices) - 1)]
            out.append(SFTExample(prompts.image_message(prompts.SOLVER.format(question=question)),
                                  solver_target(answer, THINK), [png]))
    return out[:count]


def run(name: str, seed: int, arm: str, steps: int, root: Path, data: Path,
        extra: tuple[str, ...] = ()) -> dict:
    """One run through ``coevolve run``; its held-out and pseudo-label figures."""
    overrides = [*OVERRIDES, *extra, f"evolmm.reward={arm}", f"evolmm.steps={steps}",
                 f"evolmm.data_dir={data / 'train'}", f"evolmm.heldout_dir={data / 'heldout'}",
                 f"run.seed={seed}", f"run.root={root}", f"run.name={name}"]
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    started = time.time()
    log = root / f"{name}.log"
    with log.open("w") as out:
        code = subprocess.call([sys.executable, "-m", "pipelines.cli", "run",
                                str(ROOT / "configs/evolmm/tiny-cpu.yaml"), *overrides],
                               cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    if code:
        raise RuntimeError(f"run {name} failed (exit {code}); its log: {log}")
    rows = [json.loads(line) for line in
            (root / name / "iter_0001" / "evolmm" / "metrics.jsonl").read_text().splitlines()]
    first, last = rows[0], next(r for r in reversed(rows) if "heldout/greedy" in r)
    pseudo = [r["solver/reward/pseudo_label_accuracy"] for r in rows
              if "solver/reward/pseudo_label_accuracy" in r]
    tenth = max(1, len(pseudo) // 10)
    return {"recipe": "evolmm", "seed": seed, "arm": arm, "steps": steps,
            "seconds": round(time.time() - started, 1),
            **{f"{k}_before": first[f"heldout/{k}_before"] for k in ("greedy", "sampled",
                                                                        "majority")},
            **{f"{k}_after": last[f"heldout/{k}"] for k in ("greedy", "sampled", "majority")},
            "curve": [(r["step"], r["heldout/sampled"]) for r in rows if "heldout/sampled" in r],
            "pseudo_label_first": float(np.mean(pseudo[:tenth])),
            "pseudo_label_last": float(np.mean(pseudo[-tenth:])),
            "pseudo_label_curve": pseudo}


def table(results: list[dict]) -> str:
    head = (f"{'recipe':<7} {'seed':>4} {'arm':<9} {'greedy':>13} {'sampled':>13} "
            f"{'majority@8':>13} {'pseudo-label':>13}")
    lines = [head, "-" * len(head)]
    for r in results:
        pair = "{:>5.3f}->{:<5.3f}".format
        lines.append(f"{r['recipe']:<7} {r['seed']:>4} {r['arm']:<9} "
                     f"{pair(r['greedy_before'], r['greedy_after'])} "
                     f"{pair(r['sampled_before'], r['sampled_after'])} "
                     f"{pair(r['majority_before'], r['majority_after'])} "
                     f"{pair(r['pseudo_label_first'], r['pseudo_label_last'])}")
    lines.append("")
    for arm in ARMS:
        gains = [r["sampled_after"] - r["sampled_before"] for r in results if r["arm"] == arm]
        if gains:
            lines.append(f"{arm:<9} held-out sampled-accuracy gain: mean {np.mean(gains):+.3f}, "
                         f"spread {min(gains):+.3f} .. {max(gains):+.3f} over {len(gains)} seeds")
    return "\n".join(lines)


def figure(results: list[dict], path: Path) -> None:
    """Held-out sampled accuracy over the steps, one line per run (soft solid, control
    dashed), and the pseudo-label accuracy of the training steps."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 4.5), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    left, right = fig.subplots(1, 2)
    for r in results:
        style = STYLE[r["arm"]]
        steps = [0] + [s for s, _ in r["curve"]]
        left.plot(steps, [r["sampled_before"]] + [v for _, v in r["curve"]], style, marker="o",
                  label=f"{r['arm']} seed {r['seed']}")
        right.plot(range(1, len(r["pseudo_label_curve"]) + 1), r["pseudo_label_curve"], style,
                   alpha=0.7, label=f"{r['arm']} seed {r['seed']}")
    left.set(title="held-out accuracy (one answer at T 1, mean of 8)", xlabel="step",
             ylabel="accuracy", ylim=(0, 1.05))
    right.set(title="pseudo-label accuracy (majority of 8 = hidden answer)", xlabel="step",
              ylabel="share of the step's questions", ylim=(0, 1.05))
    left.legend(fontsize=8)
    names = {"soft": "soft reward (solid)", "discrete": "majority 0/1 reward (dotted)",
             "shuffled": "shuffled-reward control (dashed)"}
    arms = [names[a] for a in STYLE if any(r["arm"] == a for r in results)]
    fig.suptitle("EvoLMM on drawn shapes, held-out images: " + " vs ".join(arms))
    fig.savefig(path, format="png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--arms", nargs="+", default=["soft", "shuffled"], choices=ARMS)
    parser.add_argument("--noise", type=float, default=NOISE,
                        help="the warm start's share of wrong answers")
    parser.add_argument("overrides", nargs="*", help="more config overrides for every run, "
                        "e.g. model.path=tiny://qwen2.5-vl?hidden=256&layers=4")
    args = parser.parse_args()
    os.environ["LABEL_FREE_NOISE"] = str(args.noise)  # read by warm_examples in each run
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = ROOT / "benchmarks" / "results" / f"label_free-{stamp}"
    data = out / "data"
    write_folder(data / "train", 64, [0, 21])
    write_folder(data / "heldout", 64, [0, 22])
    results = []
    for seed in args.seeds:
        for arm in args.arms:
            results.append(run(f"evolmm-{arm}-s{seed}", seed, arm, args.steps, out, data,
                               tuple(args.overrides)))
            print(table(results[-1:]).splitlines()[2], flush=True)
    report = {"date": time.strftime("%Y-%m-%d"), "task": "spots", "noise": args.noise,
              "overrides": [*OVERRIDES, *args.overrides], "results": results}
    print(table(results))
    (out.with_suffix(".json")).write_text(json.dumps(report, indent=1))
    figure(results, out.with_suffix(".png"))
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
