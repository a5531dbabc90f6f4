"""The built-in warm start (model.warm_start, docs/warm_start.md): MM-Zero's drawn
figures in the three formats, and the driver's cached SFT phase before iteration 1."""

from __future__ import annotations

import json

import numpy as np
import pytest

from actors.renderer import RendererPool, RenderLimits
from actors.svg_checks import extract_svg
from pipelines.algorithms.answers import extract_answer
from pipelines.recipes.mmzero import warm_start as mw
from pipelines.recipes.mmzero.rewards import format_ok, parse_proposal


def test_a_row_of_shapes_by_hand():
    fig = mw.shapes(3, "circle", "red")
    p = fig.proposal
    assert (p.content_type, p.caption) == ("geometry",
                                           "A row of 3 red circles on a white background.")
    assert (p.easy_question, p.easy_answer) == ("What colour are the circles?", "red")
    assert (p.hard_question, p.hard_answer) == ("How many circles are there?", "3")
    assert fig.svg.count("<circle") == 3 and 'cx="110"' in fig.svg  # 30, 70, 110
    assert 'viewBox="0 0 140 100"' in fig.svg


def test_bars_and_table_answers_by_hand():
    bars = mw.bars([4, 7, 2], "blue").proposal
    assert bars.caption == "A bar chart with blue bars: A 4, B 7, C 2."
    assert (bars.easy_question, bars.easy_answer) == ("What is the value of bar C?", "2")
    assert (bars.hard_question, bars.hard_answer) == ("What is the sum of all bars?", "13")
    table = mw.table([5, 12, 3]).proposal
    assert table.caption == "A table of 3 rows: A 5, B 12, C 3."
    assert (table.easy_answer, table.hard_answer) == ("5", "B")


def test_examples_are_deterministic_parse_render_and_answer():
    """Every target is what the run's parsers accept: a proposal that parses to its own
    fields, an SVG that extracts and renders, a Solver answer in the format."""
    with RendererPool(RenderLimits(max_output_side=224)) as pool:
        def render(svgs):
            return pool.render_many(svgs, early_stop=False)
        a = mw.sft_examples(32, 0, render)
        b = mw.sft_examples(32, 0, render)
        c = mw.sft_examples(32, 1, render)
        heldout = mw.heldout_figures(6, 0)
        assert all(r.ok for r in render([fig.svg for fig in heldout]))
    assert len(a) == 32 and [e.target for e in a] == [e.target for e in b]
    assert [e.target for e in a] != [e.target for e in c]
    proposals = [parse_proposal(e.target) for e in a[0::4]]
    assert all(p is not None and not p.type_inferred for p in proposals)
    assert all(extract_svg(e.target) for e in a[1::4])
    solver = [e for k, e in enumerate(a) if k % 4 >= 2]
    assert all(format_ok(e.target) and e.images for e in solver)
    answers = [extract_answer(e.target) for e in solver]
    assert answers[0::2] == [p.easy_answer for p in proposals]
    assert answers[1::2] == [p.hard_answer for p in proposals]
    # the seed topics are cycled, each asking for its own kinds of figure (chart: bars,
    # spatial: shapes, OCR: a table, basic shapes: shapes)
    kinds = [p.content_type for p in proposals]
    assert (kinds[0], kinds[3], kinds[6], kinds[7]) == ("data_chart", "geometry", "table",
                                                        "geometry")
    # held-out figures cycle shapes, bars, table
    assert [fig.proposal.content_type for fig in heldout] == [
        "geometry", "data_chart", "table"] * 2


@pytest.mark.slow
def test_warm_start_trains_once_is_cached_and_every_role_starts_from_it(ray_cluster,
                                                                         tmp_path):
    """A user's recipe with model.warm_start: the driver runs the SFT phase before
    iteration 1 (its NLL falls; its step checkpoints are deleted once it is done), the
    phase starts from warm_start/hf, and another run with the same settings copies the
    cached weights instead of training (no engines, no trainer needed)."""
    from safetensors.numpy import load_file

    from pipelines.config import load_config
    from pipelines.registry import build_recipe
    from pipelines.runtime.driver import Driver
    from pipelines.runtime.metrics import read_metrics
    from pipelines.runtime.warm_start import cache_root, warm_start

    def cfg(name: str):
        return load_config(None, [
            "run.recipe=tests.user_recipe:LengthRecipe", "length.steps=1",
            "model.warm_start.data=tests.user_recipe:warm_examples",
            "model.warm_start.examples=8", "model.warm_start.steps=4",
            "model.warm_start.batch_size=4", "model.warm_start.lr=2e-3",
            "model.warm_start.save_every=2", f"run.root={tmp_path}", f"run.name={name}",
            "logging.wandb=disabled", "logging.progress=false", "placement.roles={policy: {}}",
            "trainer.micro_batch_tokens=4096", "generator.max_model_len=1024",
            "generator.max_num_batched_tokens=2048"])

    Driver(cfg("first")).run()
    first = tmp_path / "first"
    nll = [m["sft/nll"] for m in read_metrics(first / "warm_start/metrics.jsonl")
           if "sft/nll" in m]
    print("warm-start nll: " + " ".join(f"{x:.2f}" for x in nll))
    assert len(nll) == 4 and nll[-1] < 0.8 * nll[0]
    assert not (first / "warm_start/ckpt").exists()  # done: only its hf/ is read
    assert json.loads((first / "state.json").read_text())["base"] == "warm_start/hf"
    provenance = json.loads((first / "iter_0001/policy/provenance.json").read_text())
    assert provenance == {"policy": "warm_start/hf"}
    key = (first / "warm_start/DONE").read_text().strip()
    assert (cache_root() / key / "DONE").exists()

    second = tmp_path / "second"
    second_cfg = cfg("second")
    hf = warm_start(second_cfg, build_recipe(second_cfg), run_dir=second, engines=None,
                    placement=None)
    assert hf == second / "warm_start/hf" and not (second / "warm_start/metrics.jsonl").exists()
    assert (second / "warm_start/DONE").read_text().strip() == key
    a = load_file(first / "warm_start/hf/model.safetensors")
    b = load_file(hf / "model.safetensors")
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_heldout_figures_avoid_the_warm_start_figures():
    seen = frozenset(fig.svg for _, fig in mw.warm_figures(256, 0))
    plain = mw.heldout_figures(24, 0)
    held = mw.heldout_figures(24, 0, seen)
    assert any(fig.svg in seen for fig in plain)  # small figure space: draws coincide
    assert not any(fig.svg in seen for fig in held)
