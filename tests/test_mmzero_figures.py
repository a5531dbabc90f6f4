"""benchmarks/mmzero_figures.py: the main command's table recomputed from a run's files
and compared with the doc's, on a small run directory written here."""

from __future__ import annotations

import json

from benchmarks.mmzero_figures import ROWS, column, compare


def write_run(root, iteration: int, scale: float) -> None:
    phases = {
        "proposer": [{"reward/std": 0.75 * scale, "reward/parse_rate": 0.5, "reward/render_rate": 0.875,
                      "train/grad_norm": 0.44},
                     {"reward/std": 0.52, "reward/parse_rate": 0.75, "reward/render_rate": 0.4166,
                      "train/grad_norm": 0.42}],
        "codegen": [{"reward/std": 0.906, "reward/render_rate": 0.5, "data/kept": 9.0,
                     "train/grad_norm": 0.133}] * 2,
        "solver": [{"reward/std": 0.45, "data/kept": 10.0, "data/rendered": 19.0,
                    "train/grad_norm": 2.109},
                   {"reward/std": 0.2265, "data/kept": 10.0, "data/rendered": 19.0,
                    "train/grad_norm": 0.8}],
    }
    for phase, rows in phases.items():
        folder = root / f"iter_{iteration:04d}" / phase
        folder.mkdir(parents=True)
        (folder / "metrics.jsonl").write_text(
            "".join(json.dumps({"step": k + 1, **r}) + "\n" for k, r in enumerate(rows))
            + json.dumps({"step": 2, "timing/export": 1.0}) + "\n")  # a row without rewards
    (root / f"iter_{iteration:04d}" / "coevo.json").write_text(
        json.dumps({"heldout_accuracy_before": 0.1667, "heldout_accuracy": 0.2083,
                    "pseudo_label_accuracy": 0.4737, "kept_pseudo_label_accuracy": 0.6}))


def test_the_table_is_recomputed_and_a_differing_figure_is_named(tmp_path):
    write_run(tmp_path, 1, 1.0)
    write_run(tmp_path, 2, 1.0)
    col = column(tmp_path, 1)
    assert [col[r] for r in ROWS] == ["0.50, 0.75", "0.88, 0.42", "0.75, 0.52", "9",
                                      "0.50, 0.91", "10 (19)", "0.45, 0.23", "0.13-2.11",
                                      "0.167, 0.208", "0.47, 0.60"]
    doc = "| | iteration 1 | iteration 2 |\n| --- | --- | --- |\n" + "".join(
        f"| {r} | {col[r]} | {col[r]} |\n" for r in ROWS)
    assert compare([col, column(tmp_path, 2)], doc) == []
    write_run(tmp_path / "other", 1, 2.0)  # iteration 1's Proposer std doubled
    write_run(tmp_path / "other", 2, 1.0)
    other = tmp_path / "other"
    [wrong] = compare([column(other, 1), column(other, 2)], doc)
    assert wrong.startswith("Proposer: reward std within a step: the doc says")
    assert "1.50, 0.52" in wrong
    renamed = doc.replace(f"| {ROWS[3]} |", "| renamed |")  # a row the doc lacks
    assert len(compare([col, column(tmp_path, 2)], renamed)) == 1
