"""The metrics sink: Ray gauges tagged so runs on one cluster never share a series, the
Grafana dashboard reading exactly those gauges, and one wandb run per coevolve run,
resumed by every phase and every resume."""

from __future__ import annotations

import json
import re
from pathlib import Path

from pipelines.config import load_config
from pipelines.runtime import metrics
from pipelines.runtime.metrics import TAG_KEYS, MetricsSink, read_metrics

ROOT = Path(__file__).resolve().parents[1]


class FakeGauge:
    """Records what a ray.util.metrics.Gauge would export (a unit-test stand-in)."""

    def __init__(self):
        self.series: dict[tuple, float] = {}

    def set(self, value: float, tags: dict) -> None:
        assert set(tags) == set(TAG_KEYS)
        self.series[tuple(sorted(tags.items()))] = value


def test_two_runs_on_one_cluster_keep_their_own_series(tmp_path, monkeypatch):
    gauge = FakeGauge()
    monkeypatch.setattr(metrics, "_ray_gauges", lambda: {"reward/mean": gauge})
    for run, reward in (("a", 0.25), ("b", 0.75)):
        cfg = load_config(None, [f"run.name={run}", "logging.wandb=disabled",
                                 "logging.progress=false"])
        sink = MetricsSink(tmp_path / f"{run}.jsonl", cfg, phase="solver", total_steps=4,
                           role="solver", iteration=2)
        sink.log(1, {"reward/mean": reward})
        sink.close()
        assert read_metrics(tmp_path / f"{run}.jsonl") == [
            {"step": 1, "phase": "solver", "reward/mean": reward}]
    assert sorted(gauge.series.values()) == [0.25, 0.75]
    assert {dict(k)["run"] for k in gauge.series} == {"a", "b"}
    assert {dict(k)["iteration"] for k in gauge.series} == {"2"}


def test_a_line_cut_by_a_kill_is_dropped_before_the_next_row(tmp_path):
    """A kill or a full disk during log() leaves half a line; readers skip it and the
    resumed phase's sink cuts it off, so its next row starts on a line of its own."""
    cfg = load_config(None, ["logging.wandb=disabled", "logging.progress=false"])
    path = tmp_path / "metrics.jsonl"
    sink = MetricsSink(path, cfg, phase="solver")
    sink.log(1, {"reward/mean": 0.5})
    sink.close()
    with open(path, "a") as f:
        f.write('{"step": 2, "phase": "solver", "rew')
    assert read_metrics(path) == [{"step": 1, "phase": "solver", "reward/mean": 0.5}]
    sink = MetricsSink(path, cfg, phase="solver", truncate_after=1)
    sink.log(2, {"reward/mean": 0.75})
    sink.close()
    assert path.read_text().splitlines() == [
        '{"step": 1, "phase": "solver", "reward/mean": 0.5}',
        '{"step": 2, "phase": "solver", "reward/mean": 0.75}']
    with open(path, "a") as f:  # without a resume point too (a phase's first sink)
        f.write('{"step": 3')
    MetricsSink(path, cfg, phase="solver").close()
    assert path.read_text().endswith('0.75}\n')


def test_grafana_dashboard_reads_the_gauges_the_driver_sets():
    board = json.loads((ROOT / "cluster/grafana-coevolve.json").read_text())
    exprs = [t["expr"] for p in board["panels"] for t in p["targets"]]
    source = (ROOT / "pipelines/runtime/metrics.py").read_text()
    gauges = set(re.findall(r'"(coevolve_[a-z_]+)"', source))
    assert {re.match(r"ray_(coevolve_\w+)", e).group(1) for e in exprs} == gauges
    for expr in exprs:  # every panel filters by run (two runs never mix)
        assert 'run=~"$run"' in expr
    labels = {label for p in board["panels"] for t in p["targets"]
              for label in re.findall(r"\{\{(\w+)\}\}", t["legendFormat"])}
    assert labels <= set(TAG_KEYS)


def test_one_wandb_run_per_coevolve_run_across_phases_and_resumes(tmp_path, monkeypatch):
    """A driver process opens the run's wandb run once for all its phases; a resumed
    driver (another process: here after finish_wandb) reuses the run's id."""
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = load_config(None, ["run.name=w", "logging.wandb=offline", "logging.progress=false"])
    for process in range(2):
        for phase, iteration in (("proposer", 1), ("solver", 1), ("proposer", 2)):
            sink = MetricsSink(tmp_path / f"{phase}{iteration}.jsonl", cfg, phase=phase,
                               total_steps=2, run_dir=tmp_path, role=phase, iteration=iteration)
            sink.log(1, {"reward/mean": 0.5})
            sink.close()
        metrics.finish_wandb()
        folders = list((tmp_path / "wandb").glob("offline-run-*"))
        assert len(folders) == process + 1  # offline: one folder per driver process
    run_id = (tmp_path / "wandb_id").read_text().strip()
    assert all(f"-{run_id}" in f.name for f in folders)
