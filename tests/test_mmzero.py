"""The README's main job's code path end to end: MM-Zero on a tiny model, resumed and
continued.

Real vLLM engines for the three roles, 2 FSDP2 trainer ranks, the sandboxed
renderer and the grader; `configs/mmzero/tiny-cpu.yaml` with 1 step per phase on
the random tiny model without the warm start (its minutes of SFT are the README
command's, docs/warm_start.md; tests/test_warm_start.py covers the warm start):
nothing parses, so the machinery's every fallback is exercised with known figures.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from ray.util import placement_group_table

from pipelines.config import ConfigError, load_config
from pipelines.runtime.driver import Driver
from pipelines.runtime.metrics import read_metrics
from pipelines.runtime.rundir import RoleState
from pipelines.runtime.status import render_status

ROOT = Path(__file__).resolve().parents[1]
PHASES = ("proposer", "codegen", "solver")
pytestmark = pytest.mark.slow


def config(tmp_path, *extra: str):
    return load_config(ROOT / "configs/mmzero/tiny-cpu.yaml", [
        f"run.root={tmp_path}", "run.name=mmz", "mmzero.train_steps=1", "logging.progress=false",
        "logging.wandb=offline", "run.iterations=1",
        # the real Qwen vocabulary (152,064 rows): the run a 7B model makes, at tiny width
        "model.path=tiny://qwen2.5-vl?tokenizer=qwen",
        "model.warm_start.data=", "mmzero.max_tokens=64", "mmzero.bootstrap=4",
        "mmzero.eval_samples=4", "mmzero.solver_n=4", "mmzero.codegen_proposals=8",
        "mmzero.codegen_filter_samples=2", "mmzero.solver_proposals=8", "mmzero.heldout=2",
        *extra])


def snapshot(run: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*"))
            if p.is_file() and "wandb" not in p.parts and p.name != "state.json"}


def test_one_iteration_resume_and_a_second_iteration(ray_cluster, tmp_path):
    run = tmp_path / "mmz"
    state = Driver(config(tmp_path)).run()
    assert state.finished and state.order == [f"iter_0001/{p}" for p in PHASES]
    for phase in PHASES:
        folder = run / "iter_0001" / phase
        assert (folder / "DONE").exists() and (folder / "hf/model.safetensors").exists()
        # relative to the run directory: a resume from another working directory finds it
        assert state.roles[phase] == RoleState(f"iter_0001/{phase}/hf", iteration=1, version=1)
        table = pq.read_table(folder / "rollouts-000001.parquet")
        assert table.num_rows == {"proposer": 2 * 4, "codegen": 2 * 4, "solver": 2 * 4}[phase]

    # One wandb run for the whole coevolve run (offline here): every phase resumed it.
    wandb_id = (run / "wandb_id").read_text().strip()
    offline = list((run / "wandb").glob("offline-run-*"))
    assert offline and all(f"-{wandb_id}" in p.name for p in offline)

    # A random model writes nothing parsable: every proposal scores -1 and is counted.
    proposer = [m for m in read_metrics(run / "iter_0001/proposer/metrics.jsonl")
                if "reward/mean" in m][0]
    assert proposer["reward/mean"] == -1.0 and proposer["reward/parse_rate"] == 0.0
    assert proposer["reward/timeouts"] == 0.0 and proposer["reward/answers_too_long"] == 0.0
    rollouts = pq.read_table(run / "iter_0001/proposer/rollouts-000001.parquet").to_pylist()
    assert {r["reward"] for r in rollouts} == {-1.0} and not any(r["parsed"] for r in rollouts)
    # Nothing survives the filters: the bootstrap examples fill both data sets.
    codegen = json.loads((run / "iter_0001/codegen/data.json").read_text())
    assert codegen["metrics"] == {"proposals": 8.0, "parsed": 0.0, "filter_render_rate": 0.0,
                                  "kept": 0.0, "bootstrap": 4.0}
    solver = pq.read_table(run / "iter_0001/solver/data.parquet").to_pylist()
    assert len(solver) == 4 and all(item["bootstrap"] for item in solver)
    assert sorted(item["label"] for item in solver) == ["12", "5", "5", "97"]  # the 4 examples
    coevo = json.loads((run / "iter_0001/coevo.json").read_text())
    assert coevo["funnel"] == {"proposals": 8, "parsed": 0, "rendered": 0, "evaluated": 0,
                               "kept": 0}
    assert (run / "iter_0001/coevo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (run / "coevo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # the run's curves
    # the held-out Solver set (2 figures, 4 questions) before and after the Solver phase;
    # every phase's rewards: constant -1 proposals, so no learning signal
    assert coevo["heldout_accuracy_before"] == coevo["heldout_accuracy"] == 0.0
    assert (coevo["proposer_reward_mean"], coevo["proposer_reward_std"]) == (-1.0, 0.0)

    # The same command again: nothing is redone.
    before = snapshot(run)
    assert Driver(config(tmp_path)).run().finished
    assert snapshot(run) == before

    # One more iteration, now without bootstrap (the original's behaviour): every role
    # starts from its iteration-1 export (loaded by vLLM and by the trainer); the empty
    # CodeGen and Solver data sets train no step and export their starting weights.
    # The run goes on with 1 trainer rank instead of 2 (placement is a setting a resume
    # may change): the Proposer trains from its export on the other rank count. The
    # Solver phase gets a layout with Solver engines only (as MM-Zero's per-phase layout
    # on 8 GPUs): its data, which takes Proposer and CodeGen engines, is made under the
    # top-level layout first (DATA marker); then the top-level layout's placement groups
    # are released, and its engines stopped, before the phase's own are created.
    # bootstrap decides the data: a changed setting only with run.resume_changed
    with pytest.raises(ConfigError, match="mmzero.bootstrap: 4 -> 0"):
        Driver(config(tmp_path, "run.iterations=2", "mmzero.bootstrap=0")).run()
    state = Driver(config(tmp_path, "run.iterations=2", "mmzero.bootstrap=0",
                          "run.resume_changed=true",
                          "placement.trainer_ranks=1",
                          "placement.phases.solver.roles={solver: {engines: 1}}")).run()
    assert state.finished and len(state.order) == 6
    assert "bootstrap: 4" in (run / "config.1.yaml").read_text()
    groups = {g["name"]: g["state"] for g in placement_group_table().values()
              if g["name"].startswith("coevolve/mmz/")}
    assert groups == {**{f"coevolve/mmz/all/{role}": "REMOVED"
                         for role in ("trainer", "proposer", "codegen", "solver")},
                      "coevolve/mmz/solver/trainer": "REMOVED",
                      "coevolve/mmz/solver/solver": "REMOVED"}
    assert (run / "iter_0002/solver/DATA").exists() and not (run / "iter_0001/solver/DATA").exists()
    assert {p: state.roles[p].version for p in PHASES} == {
        "proposer": 2, "codegen": 1, "solver": 1}
    for phase in PHASES:
        assert (run / "iter_0002" / phase / "DONE").exists()
    for phase in ("codegen", "solver"):
        assert not (run / "iter_0002" / phase / "metrics.jsonl").exists()
        assert ((run / "iter_0002" / phase / "hf/model.safetensors").read_bytes()
                == (run / "iter_0001" / phase / "hf/model.safetensors").read_bytes())
    assert json.loads((run / "iter_0002/codegen/data.json").read_text())["metrics"]["kept"] == 0
    # Which version judges and makes data (versions, not only roles): Proposer_2 is judged
    # by CodeGen_1 and Solver_1; CodeGen_2 learns on Proposer_2's proposals, judged by
    # Solver_1; the Solver's data come from Proposer_2 and CodeGen_2, its pseudo-labels
    # from Solver_1 (its own starting weights).
    served = {p: json.loads((run / "iter_0002" / p / "provenance.json").read_text())
              for p in PHASES}
    assert served == {
        "proposer": {"proposer": "iter_0001/proposer/hf", "codegen": "iter_0001/codegen/hf",
                     "solver": "iter_0001/solver/hf"},
        "codegen": {"codegen": "iter_0001/codegen/hf", "proposer": "iter_0002/proposer/hf",
                    "solver": "iter_0001/solver/hf"},
        "solver": {"solver": "iter_0001/solver/hf", "proposer": "iter_0002/proposer/hf",
                   "codegen": "iter_0002/codegen/hf"}}
    assert json.loads((run / "iter_0002/coevo.json").read_text())["iteration"] == 2
    text = render_status(run)
    assert "finished" in text and "iter_0002 co-evolution" in text
