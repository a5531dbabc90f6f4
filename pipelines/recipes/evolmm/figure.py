"""The step curves of an EvoLMM or iReasoner phase: ``iter_NNNN/<phase>/curves.png``.

Drawn from the phase's metrics.jsonl when the phase ends, and again by ``coevolve plot
RUN_DIR``. Four panels over the steps: the Solver's reward (mean and spread within the
step: 0 spread is no learning signal), the answer-tag share and answer entropy, the
majority vote against hidden answers (pseudo-label and single-answer accuracy, when the
images come with answers), and the held-out accuracy (``evolmm.heldout``; step 0 is
before training).
"""

from __future__ import annotations

import io
from pathlib import Path

from pipelines.runtime.metrics import read_metrics
from pipelines.runtime.rundir import atomic_write

PANELS = (
    ("Solver reward", "reward", ("solver/reward/mean", "solver/reward/std")),
    ("answer format and agreement", "share / nats",
     ("solver/reward/answer_tag_share", "solver/reward/answer_entropy")),
    ("majority vote vs hidden answers (never rewarded)", "accuracy",
     ("solver/reward/pseudo_label_accuracy", "solver/reward/sample_accuracy")),
    ("held-out accuracy (step 0: before training)", "accuracy",
     ("heldout/greedy", "heldout/sampled", "heldout/majority")),
)
LABELS = {"solver/reward/pseudo_label_accuracy": "pseudo-label (majority) right",
          "solver/reward/sample_accuracy": "one answer right"}


def series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of ``key``; a held-out key starts at step 0 with its ``_before``."""
    steps = [r["step"] for r in rows if key in r]
    values = [r[key] for r in rows if key in r]
    before = next((r[f"{key}_before"] for r in rows if f"{key}_before" in r), None)
    if before is not None:
        steps, values = [0, *steps], [before, *values]
    return steps, values


def curves_png(rows: list[dict], title: str) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 8), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    for ax, (name, ylabel, keys) in zip(fig.subplots(2, 2).ravel(), PANELS):
        drawn = False
        for key in keys:
            steps, values = series(rows, key)
            if steps:
                ax.plot(steps, values, marker="o" if len(steps) < 30 else None,
                        label=LABELS.get(key, key.rsplit("/", 1)[-1]))
                drawn = True
        ax.set(title=name, xlabel="step", ylabel=ylabel)
        if ylabel == "accuracy":
            ax.set_ylim(0, 1.05)
        if drawn:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "not measured in this run", ha="center", transform=ax.transAxes)
    fig.suptitle(title)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def write_curves(phase_dir: Path) -> Path | None:
    """``phase_dir/curves.png`` from its metrics.jsonl; None when no step was logged."""
    rows = [r for r in read_metrics(phase_dir / "metrics.jsonl") if "step" in r]
    if not rows:
        return None
    out = phase_dir / "curves.png"
    atomic_write(out, curves_png(rows, f"{phase_dir.parent.parent.name} "
                                       f"{phase_dir.parent.name}/{phase_dir.name}"))
    return out


def plot_run(run_dir: Path) -> list[Path]:
    """Every EvoLMM or iReasoner phase's curves.png in ``run_dir``."""
    written = [write_curves(d) for d in sorted(Path(run_dir).glob("iter_*/*"))
               if d.name in ("evolmm", "ireasoner") and (d / "metrics.jsonl").exists()]
    return [p for p in written if p is not None]
