"""The evaluation summary as a table (text and markdown) and a comparison plot across
models, with the numbers a seed's paper publishes beside them where the run's recipe
and base model are the paper's setting."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq

from pipelines.eval.runner import SUMMARY
from pipelines.runtime.rundir import atomic_path


# recipe -> (its paper's base model, where the numbers come from, task -> (base, trained)
# in percent; None where the paper gives none). From the papers' headline tables.
PUBLISHED: dict[str, tuple[str, str, dict[str, tuple[float | None, float]]]] = {
    "evolmm": ("Qwen/Qwen2.5-VL-7B-Instruct", "EvoLMM paper, headline table", {
        "evolmm_chartqa": (84.00, 86.70), "mathvista": (68.46, 70.52),
        "mathvision": (23.91, 24.81), "mathverse": (43.78, 44.88), "mmmu": (51.11, 52.01)}),
    "ireasoner": ("Qwen/Qwen2.5-VL-7B-Instruct", "iReasoner paper, headline table", {
        "evolmm_chartqa": (None, 85.78), "mathvista": (None, 69.74),
        "mathvision": (None, 25.29), "mathverse": (None, 45.91), "mmmu": (None, 52.37)}),
}


def published(recipe: str | None, base_model: str | None) -> tuple[str, dict] | None:
    """(source, task -> (base, trained)) when ``recipe`` on ``base_model`` is a paper's
    setting, else None."""
    entry = PUBLISHED.get(recipe or "")
    if entry is None or entry[0] != base_model:
        return None
    return entry[1], entry[2]


def markdown(rows: list[dict], paper: tuple[str, dict] | None = None) -> str:
    """Accuracy in percent per task (rows) and model (columns, training order), and the
    paper's base and trained numbers beside them when given."""
    if not rows:
        return "(no results)\n"
    models = _order(rows)
    cell = {(r["task"], r["model"]): r["accuracy"] for r in rows}
    head = ["task", *models] + (["paper: base", "paper: trained"] if paper else [])
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for task in sorted({r["task"] for r in rows}):
        values = [f"{100 * cell[(task, m)]:.1f}" if (task, m) in cell else "-" for m in models]
        if paper:
            base, trained = paper[1].get(task, (None, None))
            values += [f"{x:.2f}" if x is not None else "-" for x in (base, trained)]
        lines.append("| " + " | ".join([task, *values]) + " |")
    if paper:
        lines.append(f"\nPaper numbers: {paper[0]} (same base model and recipe).")
    return "\n".join(lines) + "\n"


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


def plot(rows: list[dict], path: Path, paper: tuple[str, dict] | None = None) -> Path | None:
    """Accuracy of every task across the models (training order), the paper's base and
    trained numbers as open markers at the first and last model; None without rows."""
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
        line, = ax.plot(xs, [by_model[models[i]] for i in xs], marker="o", label=t)
        base, trained = (paper[1].get(t, (None, None)) if paper else (None, None))
        for x, value in ((0, base), (len(models) - 1, trained)):
            if value is not None:
                ax.plot([x], [value / 100], marker="D", fillstyle="none", color=line.get_color())
    ax.set_xticks(range(len(models)), models, rotation=20)
    ax.set_ylabel("accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    ax.set_title("evaluation across models" + ("\n(open diamonds: " + paper[0] + ")"
                                               if paper else ""))
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    return path
