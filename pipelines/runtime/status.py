"""``coevolve status RUN_DIR``: where a run stands, for a person."""

from __future__ import annotations

import json
import time
from pathlib import Path

from pipelines.runtime.metrics import read_metrics
from pipelines.runtime.rundir import (
    DONE,
    STATE,
    PhaseDir,
    RunDir,
    RunState,
    complete_checkpoints,
)

# a metric is shown under its own name or a policy's (``solver/reward/mean``: EvoLMM)
SHOWN = ("reward/mean", "sft/nll", "train/grad_norm", "policy/loss", "policy/kl", "rollout/response_tokens",
         "perf/tokens_per_s", "reward/pseudo_label_accuracy", "reward/sample_accuracy")
HELDOUT = ("greedy", "sampled", "majority")  # EvoLMM's held-out scores (heldout/<name>)


def _step_row(m: dict) -> bool:
    return "sft/nll" in m or any(k == "reward/mean" or k.endswith("/reward/mean") for k in m)


def _shown(row: dict) -> str:
    keys = [k for name in SHOWN for k in row if k == name or k.endswith("/" + name)]
    return ", ".join(f"{k} {row[k]:.4g}" for k in keys)


def _heldout_line(metrics: list[dict]) -> str | None:
    """Held-out accuracy before training and at its newest scoring, when scored."""
    before = next((m for m in metrics if "heldout/sampled_before" in m), None)
    after = next((m for m in reversed(metrics) if "heldout/sampled" in m), None)
    if before is None:
        return None
    parts = [f"{k} {before[f'heldout/{k}_before']:.3f}" + (
        f" -> {after[f'heldout/{k}']:.3f}" if after else "") for k in HELDOUT]
    at = f" (step {after['step']})" if after else ""
    return "  held-out accuracy " + ", ".join(parts) + at


def render_status(run_dir: str | Path) -> str:
    run_dir = Path(run_dir).absolute()
    dirs = RunDir(run_dir)
    if not dirs.state.exists():
        raise FileNotFoundError(f"{run_dir} is not a coevolve run directory (no {STATE})")
    state = RunState.read(dirs.state)
    lines = [f"run {run_dir.name}: " + ("finished" if state.finished else
                                        f"iteration {state.iteration}, phase "
                                        f"{state.phase}, step {state.step} "
                                        "(not finished: `coevolve run` with the same config resumes)"),
             f"  last update {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(state.updated))}"
             if state.updated is not None else "  never updated"]
    if state.first_step_s is not None:  # engines, trainer group, warm start, data
        lines.append(f"  time to first step: {state.first_step_s:.1f} s (this launch)")
    for role, info in sorted(state.roles.items()):
        lines.append(f"  role {role}: iteration {info.iteration}, weight version "
                     f"{info.version}, weights {run_dir / info.path if info.path else 'n/a'}")
    order = {name: i for i, name in enumerate(state.order)}
    phase_dirs = sorted((d for d in run_dir.glob("iter_*/*") if (d / "metrics.jsonl").exists()
                         or PhaseDir(d).has(DONE) or f"{d.parent.name}/{d.name}" in order),
                        key=lambda d: (d.parent.name, order.get(f"{d.parent.name}/{d.name}",
                                                                len(order)), d.name))
    for phase_dir in phase_dirs:
        metrics = [m for m in read_metrics(phase_dir / "metrics.jsonl") if _step_row(m)]
        done = PhaseDir(phase_dir).has(DONE)
        ckpts = [p.name for _, p in complete_checkpoints(PhaseDir(phase_dir).ckpt)]
        lines.append(f"\n{phase_dir.parent.name}/{phase_dir.name}: {'done' if done else 'in progress'}"
                     f", {len(metrics)} steps logged, checkpoints: {', '.join(ckpts) or 'none'}")
        if metrics:
            last = metrics[-1]
            lines.append(f"  step {last['step']}: {_shown(last)}")
            heldout = _heldout_line(metrics)
            if heldout:
                lines.append(heldout)
            lines.append(_timing_table(metrics))
    for path in sorted(run_dir.glob("iter_*/coevo.json")):
        lines.append(_coevo_line(path))
    reports = sorted(run_dir.glob("*_report.md"))  # a recipe's evaluation (R3V, MAYE)
    if reports:
        lines.append("\nevaluation: " + ", ".join(str(p) for p in reports))
    return "\n".join(lines)


def _coevo_line(path: Path) -> str:
    c = json.loads(path.read_text())

    def fmt(v) -> str:
        return "n/a" if v is None else f"{v:.3g}"

    funnel = c.get("funnel", {})
    return (f"\n{path.parent.name} co-evolution: difficulty {fmt(c.get('difficulty'))}, "
            f"solvability {fmt(c.get('solvability'))}, render rate {fmt(c.get('render_rate'))}, "
            f"funnel " + " -> ".join(f"{k} {v}" for k, v in funnel.items()) +
            f", kept codegen {c.get('codegen_kept')} solver {c.get('solver_kept')}"
            f"; pseudo-labels right {fmt(c.get('pseudo_label_accuracy'))} "
            f"(kept {fmt(c.get('kept_pseudo_label_accuracy'))}), held-out accuracy "
            f"{fmt(c.get('heldout_accuracy_before'))} -> {fmt(c.get('heldout_accuracy'))}")


def _timing_table(metrics: list[dict]) -> str:
    totals: dict[str, float] = {}
    for m in metrics:
        for k, v in m.items():
            if k.startswith("timing/") and k != "timing/step":
                totals[k[7:]] = totals.get(k[7:], 0.0) + v
    wall = sum(m.get("timing/step", 0.0) for m in metrics)
    rows = [f"  {'timing':<12} {'seconds':>9} {'share':>7}"]
    for name, seconds in sorted(totals.items(), key=lambda kv: -kv[1]):
        rows.append(f"  {name:<12} {seconds:9.1f} {seconds / wall:7.1%}" if wall else
                    f"  {name:<12} {seconds:9.1f}")
    rows.append(f"  {'step total':<12} {wall:9.1f}")
    return "\n".join(rows)
