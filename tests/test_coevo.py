"""Co-evolution metrics (hand-computed), their JSON and figures, the sample gallery and
``coevolve plot``. No Ray, no model: matplotlib and PIL only."""

from __future__ import annotations

import io
import json
import math

import pytest
from conftest import chart_png
from PIL import Image

from pipelines.cli import main
from pipelines.recipes.mmzero.coevo import (
    FunnelItem,
    coevo_metrics,
    plot_run,
    save_samples,
    write_coevo,
)

TYPES = ("data_chart", "diagram", "geometry", "other")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
FIGURE_SIZE = (1500, 1600)  # figsize (15, 16) at 100 dpi


def funnel_items() -> list[FunnelItem]:
    """7 proposals: 6 parsed, 4 rendered and evaluated, 2 kept."""
    return [
        FunnelItem(True, "data_chart", True, 1000, True, easy_consistency=1.0,
                   hard_consistency=0.5, kept=True, label_right=True),
        FunnelItem(True, "data_chart", True, 2000, True, easy_consistency=0.8,
                   hard_consistency=0.3, kept=True, label_right=False),
        FunnelItem(True, "geometry", True, 1500, True, easy_consistency=0.6, hard_consistency=0.9,
                   label_right=True),
        FunnelItem(True, "geometry", True, 500, True, easy_consistency=0.2, hard_consistency=0.1,
                   label_right=True),
        FunnelItem(True, "data_chart", rendered=False, svg_chars=3000),  # SVG that failed to render
        FunnelItem(True, "geometry"),  # CodeGen wrote no SVG
        FunnelItem(False),  # unparsable proposal
    ]


def test_metrics_hand_computed():
    m = coevo_metrics(funnel_items(), codegen_kept=12, solver_kept=2, content_types=TYPES)
    # difficulty: 2*min(h, 1-h) for h = 0.5, 0.3, 0.9, 0.1 -> 1.0, 0.6, 0.2, 0.2; mean 2.0/4
    assert m["difficulty"] == pytest.approx(0.5)
    # solvability: (1.0 + 0.8 + 0.6 + 0.2) / 4 = 2.6 / 4
    assert m["solvability"] == pytest.approx(0.65)
    # mean hard consistency (0.5 + 0.3 + 0.9 + 0.1) / 4 = 0.45; gap 0.65 - 0.45
    assert m["hard_consistency"] == pytest.approx(0.45)
    assert m["easy_hard_gap"] == pytest.approx(0.2)
    # 4 rendered of 7 proposals (the unparsed one counts in the denominator)
    assert m["render_rate"] == pytest.approx(4 / 7)
    # parsed: 3 data_chart, 3 geometry -> shares 0.5, 0, 0.5, 0; H = ln 2, / ln 4 = 0.5
    assert m["content_types"] == pytest.approx(
        {"data_chart": 0.5, "diagram": 0.0, "geometry": 0.5, "other": 0.0})
    assert list(m["content_types"]) == list(TYPES)
    assert m["content_type_entropy"] == pytest.approx(0.5)
    assert m["funnel"] == {"proposals": 7, "parsed": 6, "rendered": 4, "evaluated": 4, "kept": 2}
    # SVG lengths of the 5 items that have one: (1000 + 2000 + 1500 + 500 + 3000) / 5
    assert m["mean_svg_chars"] == pytest.approx(1600.0)
    assert (m["codegen_kept"], m["solver_kept"]) == (12, 2)
    # the majority equals the Proposer's hard answer on 3 of 4 evaluated items, 1 of 2 kept
    assert m["pseudo_label_accuracy"] == pytest.approx(0.75)
    assert m["kept_pseudo_label_accuracy"] == pytest.approx(0.5)


def test_entropy_extremes_and_missing_type_is_other():
    one_type = [FunnelItem(True, "diagram") for _ in range(3)]
    assert coevo_metrics(one_type, 0, 0, TYPES)["content_type_entropy"] == 0.0
    # one parsed item of each of the 4 types: H = ln 4 -> 1; None counts as "other"
    uniform = [FunnelItem(True, t) for t in ("data_chart", "diagram", "geometry", None)]
    m = coevo_metrics(uniform, 0, 0, TYPES)
    assert m["content_type_entropy"] == pytest.approx(1.0)
    assert m["content_types"]["other"] == pytest.approx(0.25)
    # 3 of one type, 1 of another: H = -(0.75 ln 0.75 + 0.25 ln 0.25) = 0.562335 nats
    skewed = [FunnelItem(True, "map")] * 3 + [FunnelItem(True, "table")]
    h = coevo_metrics(skewed, 0, 0, ("map", "table", "other"))["content_type_entropy"]
    assert h == pytest.approx(0.562335 / math.log(3), abs=1e-6)


def test_empty_inputs():
    m = coevo_metrics([], 0, 0, TYPES)
    for key in ("difficulty", "solvability", "hard_consistency", "easy_hard_gap", "render_rate",
                "mean_svg_chars"):
        assert m[key] is None, key
    assert m["pseudo_label_accuracy"] is None and m["kept_pseudo_label_accuracy"] is None
    assert m["content_type_entropy"] == 0.0
    assert m["content_types"] == dict.fromkeys(TYPES, 0.0)
    assert m["funnel"] == dict.fromkeys(("proposals", "parsed", "rendered", "evaluated", "kept"), 0)
    # nothing evaluated: the means are None, the render rate is 0 / 2
    m = coevo_metrics([FunnelItem(False), FunnelItem(True, "diagram")], 0, 0, TYPES)
    assert m["difficulty"] is None and m["easy_hard_gap"] is None
    assert m["render_rate"] == 0.0
    assert m["content_type_entropy"] == 0.0


@pytest.mark.parametrize("item, message", [
    (FunnelItem(False, rendered=True), "rendered but not parsed"),
    (FunnelItem(True, "diagram", True, kept=True), "kept but not evaluated"),
    (FunnelItem(True, "diagram", True, evaluated=True, easy_consistency=0.5), "hard_consistency"),
    (FunnelItem(True, "diagram", True, evaluated=True, easy_consistency=1.5,
                hard_consistency=0.5), "easy_consistency"),
    (FunnelItem(True, "poster"), "'poster' is not one of"),
])
def test_invalid_items_fail_loudly(item, message):
    with pytest.raises(ValueError, match=message):
        coevo_metrics([item], 0, 0, TYPES)


def png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    return Image.open(io.BytesIO(data)).size


def first_and_second() -> tuple[dict, dict]:
    first = coevo_metrics(funnel_items(), 12, 2, TYPES)
    # iteration 2 evaluated nothing: its None means must still plot (as gaps)
    second = coevo_metrics([FunnelItem(True, "geometry"), FunnelItem(False)], 3, 0, TYPES)
    return first, second


@pytest.fixture(scope="module")
def written_run(tmp_path_factory):
    """A 2-iteration run written by write_coevo; iteration 1's PNG as it was first drawn.

    Shared by the tests below because each figure takes ~1 s on 2 busy cores."""
    run = tmp_path_factory.mktemp("coevo") / "runs" / "demo"
    first, second = first_and_second()
    write_coevo(run / "iter_0001", first, iteration=1)
    png_1 = (run / "iter_0001" / "coevo.png").read_bytes()
    write_coevo(run / "iter_0002", second, iteration=2)
    return run, first, png_1


def test_write_coevo_json_and_png(written_run):
    run, first, _ = written_run
    assert json.loads((run / "iter_0001" / "coevo.json").read_text()) == {"iteration": 1, **first}
    record = json.loads((run / "iter_0002" / "coevo.json").read_text())
    assert record["iteration"] == 2 and record["difficulty"] is None
    assert record["funnel"]["proposals"] == 2
    assert png_size(run / "iter_0001" / "coevo.png") == FIGURE_SIZE
    assert png_size(run / "iter_0002" / "coevo.png") == FIGURE_SIZE
    assert not list(run.glob("**/.*.tmp"))


def test_plot_run_draws_each_iteration_up_to_itself(written_run):
    run, _, png_1 = written_run
    paths = plot_run(run)
    assert paths == [run / "iter_0001" / "coevo.png", run / "iter_0002" / "coevo.png",
                     run / "coevo.png"]
    assert all(png_size(p) == FIGURE_SIZE for p in paths)
    images = [p.read_bytes() for p in paths]
    # iteration 1's figure only shows iteration 1, even now that iteration 2 exists
    assert images[0] == png_1
    assert len(set(images)) == 3


def test_plot_run_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        plot_run(tmp_path / "missing")
    (tmp_path / "empty" / "iter_0001").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no iter_\\*/coevo.json"):
        plot_run(tmp_path / "empty")


def test_save_samples(tmp_path):
    samples = [
        {"png": chart_png(0), "question": "What is the tallest bar's value?", "answer": "42",
         "caption": "A bar chart.\nThree bars.", "easy_question": "How many bars?",
         "easy_answer": "3", "kept": True},
        {"png": None, "question": "Which angle is largest?", "answer": None, "kept": False},
        {"png": chart_png(2), "question": "Q3", "answer": "7"},
    ]
    out = tmp_path / "samples"
    (out).mkdir()
    (out / "sample_05.png").write_bytes(b"stale")  # from an earlier, longer call
    save_samples(out, samples, limit=2)
    assert sorted(p.name for p in out.iterdir()) == ["index.md", "sample_00.png"]
    assert (out / "sample_00.png").read_bytes() == chart_png(0)
    index = (out / "index.md").read_text()
    assert index.startswith("# Samples (2 of 3)")
    assert "## sample_00 (kept)\n\n![sample_00](sample_00.png)" in index
    assert "> A bar chart.\n> Three bars." in index
    assert "- **Easy question:** How many bars?\n- **Easy answer:** 3" in index
    assert "- **Question:** What is the tallest bar's value?\n- **Answer:** 42" in index
    assert "## sample_01 (filtered out, not rendered)" in index
    assert "- **Answer:** *(none)*" in index
    assert "Q3" not in index


def test_cli_plot(tmp_path, capsys):
    run = tmp_path / "demo"
    for iteration, metrics in enumerate(first_and_second(), start=1):
        iter_dir = run / f"iter_{iteration:04d}"
        iter_dir.mkdir(parents=True)
        (iter_dir / "coevo.json").write_text(json.dumps({"iteration": iteration, **metrics}))
    assert main(["plot", str(run)]) == 0
    printed = capsys.readouterr().out.split()
    assert printed == [str(run / "iter_0001" / "coevo.png"), str(run / "iter_0002" / "coevo.png"),
                       str(run / "coevo.png")]
    assert png_size(run / "coevo.png") == FIGURE_SIZE


def test_cli_plot_errors(tmp_path, capsys):
    assert main(["plot", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("coevolve: error: ") and "does not exist" in err
    assert "Traceback" not in err
    assert main(["plot", str(tmp_path)]) == 2
    assert "no iter_*/coevo.json" in capsys.readouterr().err


def test_phase_rewards_by_hand(tmp_path):
    """Means over each phase's logged steps of reward/mean and reward/std; a phase that
    logged no step (no metrics.jsonl, or only its export line) has None."""
    from pipelines.recipes.mmzero.coevo import phase_rewards

    def log(phase: str, *records: dict) -> None:
        (tmp_path / phase).mkdir()
        (tmp_path / phase / "metrics.jsonl").write_text(
            "".join(json.dumps(r) + "\n" for r in records))

    log("proposer", {"step": 1, "reward/mean": -0.5, "reward/std": 0.2},
        {"step": 2, "reward/mean": -0.3, "reward/std": 0.4}, {"step": 2, "timing/export": 1.0})
    log("solver", {"step": 2, "timing/export": 1.0})
    got = phase_rewards(tmp_path)
    assert got == pytest.approx({"proposer_reward_mean": -0.4, "proposer_reward_std": 0.3,
                                 "codegen_reward_mean": None, "codegen_reward_std": None,
                                 "solver_reward_mean": None, "solver_reward_std": None})
