"""The evaluation summary as a table and a comparison plot across models."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq

from pipelines.eval.runner import SUMMARY
from pipelines.runtime.rundir import atomic_path


def load_summary(out: Path) -> list[dict]:
    path = Path(out) / SUMMARY
    return pq.read_table(path).to_pylist() if path.is_file() else []


def _order(rows: list[dict]) -> list[str]:
    """Models in training order: the base first, then by iteration, then by name."""
    seen = {}
    for r in rows:
        seen.setdefault(r["model"], r.get("iteration"))
    return sorted(seen, key=lambda m: (seen[m] is not None, seen[m] or 0, m))


def table(rows: list[dict]) -> str:
    """Accuracy per task (rows) and model (columns), with item counts."""
    if not rows:
        return "(no results)"
    models = _order(rows)
    tasks = sorted({r["task"] for r in rows})
    cell = {(r["task"], r["model"]): r for r in rows}
    width = max(8, *(len(m) for m in models))
    name_width = max(6, *(len(t) for t in tasks))
    lines = [f"{'task':<{name_width}}  " + "  ".join(f"{m:>{width}}" for m in models)]
    for t in tasks:
        values = []
        for m in models:
            r = cell.get((t, m))
            values.append(f"{r['accuracy']:>{width}.3f}" if r else f"{'-':>{width}}")
        items = max((cell[(t, m)]["items"] for m in models if (t, m) in cell), default=0)
        lines.append(f"{t:<{name_width}}  " + "  ".join(values) + f"   ({items} items)")
    judged = [r for r in rows if r.get("judged")]
    for r in judged:
        lines.append(f"judge on {r['task']}/{r['model']}: accuracy {r['judge_accuracy']:.3f}, "
                     f"agrees with the rule on {r['agree']:.1%} (kappa {r['kappa']:.2f}), "
                     f"rule only {r['rule_only']}, judge only {r['judge_only']}")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> Path | None:
    """Accuracy of every task across the models (training order); None without rows."""
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = _order(rows)
    fig, ax = plt.subplots(figsize=(max(4.0, 1.2 * len(models) + 2), 3.2))
    for t in sorted({r["task"] for r in rows}):
        by_model = {r["model"]: r["accuracy"] for r in rows if r["task"] == t}
        xs = [i for i, m in enumerate(models) if m in by_model]
        ax.plot(xs, [by_model[models[i]] for i in xs], marker="o", label=t)
    ax.set_xticks(range(len(models)), models, rotation=20)
    ax.set_ylabel("accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    ax.set_title("evaluation across models")
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    return path
