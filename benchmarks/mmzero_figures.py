"""The figures docs/mmzero.md quotes about the main command, recomputed from a run.

    python -m benchmarks.mmzero_figures runs/mmzero-tiny [--doc docs/mmzero.md]

Reads the run's per-phase ``metrics.jsonl`` and ``coevo.json`` of iterations 1 and 2,
prints the table as the doc writes it, and compares it row by row with the doc's
table: exit 0 when every quoted figure is the run's, 1 (naming the rows) otherwise.
Run it after ``coevolve run configs/mmzero/tiny-cpu.yaml`` whenever a change may move
the main command's figures.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROWS = (
    "Proposer: parse rate (step 1, 2)",
    "Proposer: SVGs of the previous CodeGen that render",
    "Proposer: reward std within a step",
    "CodeGen: kept by the render-rate filter",
    "CodeGen: render rate, reward std (step 1)",
    "Solver: kept by the consistency filter (of rendered)",
    "Solver: reward std (step 1, 2)",
    "gradient norm, every phase and step",
    "held-out Solver accuracy, before and after",
    "Solver pseudo-labels equal to the Proposer's answer (evaluated, kept)",
)


def steps(run: Path, iteration: int, phase: str) -> list[dict]:
    path = run / f"iter_{iteration:04d}" / phase / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if "reward/std" in r]


def pair(a: float, b: float) -> str:
    return f"{a:.2f}, {b:.2f}"


def column(run: Path, iteration: int) -> dict[str, str]:
    """The table's cells of one iteration."""
    p, c, s = (steps(run, iteration, phase) for phase in ("proposer", "codegen", "solver"))
    coevo = json.loads((run / f"iter_{iteration:04d}" / "coevo.json").read_text())
    norms = [r["train/grad_norm"] for r in p + c + s]
    return dict(zip(ROWS, (
        pair(p[0]["reward/parse_rate"], p[1]["reward/parse_rate"]),
        pair(p[0]["reward/render_rate"], p[1]["reward/render_rate"]),
        pair(p[0]["reward/std"], p[1]["reward/std"]),
        f"{c[0]['data/kept']:.0f}",
        pair(c[0]["reward/render_rate"], c[0]["reward/std"]),
        f"{s[0]['data/kept']:.0f} ({s[0]['data/rendered']:.0f})",
        pair(s[0]["reward/std"], s[1]["reward/std"]),
        f"{min(norms):.2f}-{max(norms):.2f}",
        f"{coevo['heldout_accuracy_before']:.3f}, {coevo['heldout_accuracy']:.3f}",
        pair(coevo["pseudo_label_accuracy"], coevo["kept_pseudo_label_accuracy"]),
    )))


def doc_table(text: str) -> dict[str, list[str]]:
    """The doc's rows: label -> cells (the markdown table whose labels are ROWS)."""
    out = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells and cells[0] in ROWS:
            out[cells[0]] = cells[1:]
    return out


def compare(got: list[dict[str, str]], doc: str) -> list[str]:
    """The rows whose figures (``got``: the columns of iterations 1 and 2) differ from the
    doc's (or are missing from it), described."""
    quoted = doc_table(doc)
    wrong = []
    for row in ROWS:
        mine = [g[row] for g in got]
        if quoted.get(row) != mine:
            wrong.append(f"{row}: the doc says {quoted.get(row)}, the run gives {mine}")
    return wrong


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--doc", type=Path, default=Path("docs/mmzero.md"))
    args = parser.parse_args(argv)
    cols = [column(args.run, k) for k in (1, 2)]
    print("| | iteration 1 | iteration 2 |\n| --- | --- | --- |")
    for row in ROWS:
        print(f"| {row} | {cols[0][row]} | {cols[1][row]} |")
    wrong = compare(cols, args.doc.read_text())
    for line in wrong:
        print("DIFFERS:", line)
    print("the doc's figures are the run's" if not wrong else f"{len(wrong)} row(s) differ")
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
