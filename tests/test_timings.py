"""``coevolve plan --timings``: a layout's step time from a run's timings, by hand."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipelines.config import dump_config, load_config
from pipelines.layouts import resolve_layout
from pipelines.runtime.timings import predict, read_timings, timings_report

ROOT = Path(__file__).resolve().parents[1]


def fake_run(tmp_path: Path, steps: list[dict], *overrides: str) -> Path:
    """A run directory as the driver leaves it: config.yaml and one phase's metrics."""
    cfg = load_config(ROOT / "configs/simple/tiny-cpu.yaml", list(overrides))
    run = tmp_path / "run"
    (run / "iter_0001/policy").mkdir(parents=True)
    (run / "config.yaml").write_text(dump_config(cfg))
    lines = [json.dumps({"step": i + 1, "phase": "policy", **{f"timing/{k}": v
                                                               for k, v in s.items()}})
             for i, s in enumerate(steps)]
    lines.append(json.dumps({"step": len(steps), "phase": "policy", "timing/export": 9.0}))
    (run / "iter_0001/policy/metrics.jsonl").write_text("\n".join(lines) + "\n")
    return run


STEPS = [  # medians: generate 8, reward 1, logprobs + update 12, rest 1 + 0.5 + 0.5 = 2
    {"step": 23.0, "generate": 8.0, "reward": 1.0, "update": 12.0, "weight_sync": 1.0,
     "save": 0.5, "overhead": 0.5},
    {"step": 25.0, "generate": 9.0, "reward": 1.0, "logprobs": 1.0, "update": 12.0,
     "weight_sync": 1.0, "save": 0.5, "overhead": 0.5},
    {"step": 21.0, "generate": 7.0, "reward": 1.0, "update": 11.0, "weight_sync": 1.0,
     "save": 1.0, "overhead": 0.0},
]


def test_medians_and_the_scaling_to_another_layout(tmp_path):
    run = fake_run(tmp_path, STEPS, "placement.trainer_ranks=2")
    [(phase, t)] = read_timings(run).items()
    assert phase == "policy" and t.steps == 3  # the export line is not a step
    assert (t.generate, t.reward, t.train, t.rest, t.step) == (8.0, 1.0, 12.0, 2.0, 23.0)
    run_layout = resolve_layout(load_config(run / "config.yaml").placement, None, ("policy",))
    as_run = predict(t, run_layout, "policy", run_layout)
    assert (as_run.sequential, as_run.overlapped) == (23.0, 14.0)  # 8+1+12+2; max(9, 12)+2
    bigger = resolve_layout(load_config(ROOT / "configs/simple/tiny-cpu.yaml", [
        "placement.trainer_ranks=6", "placement.roles.policy.engines=4",
        "placement.cpu_threads=reserved"]).placement, None, ("policy",))
    p = predict(t, run_layout, "policy", bigger)
    # generation 8 x 1/4 = 2; train 12 x 2/6 = 4; in turns 2+1+4+2 = 9; overlap max(3, 4)+2
    assert (p.generate, p.train, p.sequential, p.overlapped) == (2.0, 4.0, 9.0, 6.0)


def test_colocated_phases_cannot_overlap_and_the_report_names_both_layouts(tmp_path):
    run = fake_run(tmp_path, STEPS)
    cfg = load_config(ROOT / "configs/simple/tiny-cpu.yaml", [
        "placement.colocate=[policy]", "placement.cpus_per_rank=1"])
    t = read_timings(run)["policy"]
    layout = resolve_layout(cfg.placement, None, ("policy",))
    assert predict(t, layout, "policy", layout).overlapped is None
    text = timings_report(cfg, str(run))
    assert "as run: 1 ranks, 1 policy engine" in text
    assert "planned: 1 ranks, 1 policy engine (coloc.)" in text
    assert "23.00" in text and "1.64x" in text  # as run: 23 in turns, 14 overlapped


def test_a_folder_without_timings_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="no steps with timings"):
        read_timings(tmp_path)
    with pytest.raises(ValueError, match="no config.yaml"):
        timings_report(load_config(None), str(tmp_path))
