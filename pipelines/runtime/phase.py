"""One phase: the trainer group and the engines of one role, step by step.

The runner owns the phase's lifecycle: the engines it samples from and is judged
by (started side by side), the data ``prepare`` makes, the trainer group, the
step loop with its metrics, checkpoints and resume, the hf/ export. What a step
does is its kind's: ``rl_step.RLSteps`` (sample, score, estimate, update each
policy, push the weights) or ``sft.SFTSteps`` (one SFT update), chosen when the
phase is built (pipelines/contract.py).

Before the first step the phase may ``prepare`` its data (MM-Zero builds the
CodeGen and Solver data sets with other roles' engines); a phase left with
no data trains no step and exports its starting weights unchanged.

Failures: a dead or hung engine is restarted by its pool; a trainer rank that
dies, hangs past ``trainer.call_timeout_s`` or loses a peer fails the group
(``TrainerGroupFailed``), and the phase rebuilds it from its last checkpoint
(or its starting weights), brings the engines back to those weights and takes
the lost steps again. Both are paid from the run's restart budget
(``run.max_restarts``, actors/restarts.py), kept by ``engines``.
"""

from __future__ import annotations

import json
import logging
import pickle
from dataclasses import replace
from pathlib import Path

from actors.models import resolve_model
from actors.trainer_group import TrainerGroup, TrainerGroupFailed
from pipelines.contract import phase_spec
from pipelines.runtime.context import RunnerContext
from pipelines.runtime.metrics import MetricsSink, Timer
from pipelines.runtime.rl_step import RLSteps, SampledBatch
from pipelines.runtime.rundir import (
    PhaseDir,
    atomic_json,
    atomic_write,
    latest_checkpoint,
    link_tree,
    prune_checkpoints,
)
from pipelines.runtime.sft import SFTSteps
from pipelines.runtime.specs import trainer_spec

logger = logging.getLogger(__name__)

UPCOMING = "upcoming.pkl"  # in a step checkpoint of older versions (now ckpt/step_N.upcoming.pkl)
ROW = "metrics_row"  # in a checkpoint's state: the metrics row of the step it ends
# the upcoming.pkl of checkpoints written before rl_step.py existed names SampledBatch here
__all__ = ["UPCOMING", "PhaseRunner", "SampledBatch"]


class PhaseRunner:
    """Runs one phase: its engines, trainer group, step loop, checkpoints and export."""

    def __init__(self, cfg, phase, phase_dir: Path, *, run_dir: Path, seed_path: tuple[int, ...],
                 engines, placement, weights, base_version: int = 0):
        self.cfg, self.phase, self.dir = cfg, phase, Path(phase_dir)
        self.dirs = PhaseDir(self.dir)  # hf/, ckpt/step_N, rollouts-N.parquet, markers
        self.spec = phase_spec(phase)  # its kind, optional members and hooks (contract.py)
        self.run_dir, self.seed_path = run_dir, seed_path
        self.engines, self.placement, self.weights = engines, placement, weights
        # the role's newest weights, or the run's base model for a phase that says
        # ``from_base`` (R3V trains each iteration's model from the base)
        self.start_weights = weights(None if self.spec.from_base else phase.role)
        self.base_version = base_version  # the role's version before this phase
        # LoRA adapters this phase trains as policies of their own (one backbone, one
        # trainer group, one engine pool); none: the phase trains its role's weights.
        self.policies = self.spec.policies
        if self.policies and not cfg.trainer.lora.enabled:
            raise ValueError(f"phase {phase.name} trains the policies {self.policies} as LoRA "
                             "adapters of one backbone: set trainer.lora.enabled=true")
        self.group_restarts = 0
        self.data_metrics: dict[str, float] = {}
        self.group = None
        self.pool = None
        self._provenance: dict[str, str] | None = None  # role -> weights; provenance.json
        self._processor = None
        self._saved_row: dict | None = None  # the checkpoint's row, for _replay_row
        self.steps = SFTSteps(self) if self.spec.sft else RLSteps(self)
        self.ctx = RunnerContext(self)  # what the recipe's code gets

    @property
    def version(self) -> int:
        """The weight version of the phase's main policy (the first, or the only one)."""
        return self.steps.version

    def step(self, step: int) -> dict:
        """One step of the phase's kind (rl_step.RLSteps or sft.SFTSteps); its metrics."""
        return self.steps.step(step)

    @property
    def iteration(self) -> int:
        return self.seed_path[1]

    def other_pool(self, role: str):
        """The engines of ``role`` (its newest weights) for scoring or data making; the
        phase's own role: its pool, or (an SFT phase, which has none) the newest weights."""
        if role == self.phase.role and self.pool is not None:
            return self.pool
        weights = self.weights(role)
        self._record_provenance(role, weights)
        return self.engines.pool(role, weights, self.placement)

    def _own_pool(self):
        self._record_provenance(self.phase.role, self.start_weights)
        return self.engines.pool(self.phase.role, self.start_weights, self.placement)

    def _record_provenance(self, role: str, weights: str) -> None:
        """``provenance.json`` in the phase folder: which weights served each role the phase
        sampled from (relative to the run directory), e.g. that MM-Zero's Proposer_i was
        judged by CodeGen_{i-1} and Solver_{i-1}. The phase's own role: its starting weights."""
        path = Path(weights)
        label = str(path.relative_to(self.run_dir)) if path.is_relative_to(self.run_dir) \
            else weights
        file = self.dir / "provenance.json"
        if self._provenance is None:  # what an earlier runner of this phase recorded
            self._provenance = json.loads(file.read_text()) if file.exists() else {}
        known = self._provenance
        if known.get(role) != label:
            known[role] = label
            atomic_json(file, known, indent=1, sort_keys=True)

    def __enter__(self) -> PhaseRunner:
        self.dir.mkdir(parents=True, exist_ok=True)
        timer = Timer()
        with timer("engines"):  # its own engines and its judges', started side by side
            wanted = {} if self.spec.sft else {self.phase.role: self.start_weights}
            for role in self.spec.uses:  # judges: started here, not in a step
                wanted[role] = self.weights(role)
            pools = self.engines.pools_for(wanted, self.placement)
            for role, weights in wanted.items():
                self._record_provenance(role, weights)
            self.pool = pools.get(self.phase.role)
        if self.spec.prepare is not None:
            with timer("prepare"):
                made = self.spec.prepare(self.ctx) or {}
                self.data_metrics = {f"data/{k}": v for k, v in made.items()}
        self.data_metrics.update({f"phase/{k}_seconds": v for k, v in timer.seconds.items()})
        if self.phase.steps > 0:
            self.group = self._start_group()
        return self

    def make_data(self) -> None:
        """Only the phase's data (``prepare``), under this runner's placement, which must
        serve the phase's ``data_roles``; no trainer group is started."""
        self.dir.mkdir(parents=True, exist_ok=True)
        if self.phase.role in self.spec.data_roles:
            self.pool = self._own_pool()
        if self.spec.prepare is not None:
            self.spec.prepare(self.ctx)

    def __exit__(self, *exc) -> None:
        if self.group is not None:
            self.group.shutdown()

    # -- the loop --------------------------------------------------------------

    def run(self, on_step=None) -> None:
        if self.phase.steps == 0:
            logger.warning("%s: no data to train on; exporting the starting weights unchanged",
                           self.phase.name)
            self._export_unchanged()
            return
        step = self._resume()
        sink = self.metrics_sink(step)
        try:
            while True:
                try:
                    while step < self.phase.steps:
                        self.advance(step, sink)
                        step += 1
                        if on_step is not None:
                            on_step(step)
                    timer = Timer()
                    with timer("export"):
                        self.group.export_hf(str(self.dirs.hf()))
                        for policy in self.policies[1:]:  # hf/ holds the first policy
                            self.group.export_hf(str(self.dirs.hf(policy)), adapter=policy)
                    break
                except TrainerGroupFailed as err:
                    self.engines.restarts.spend(f"trainer group of {self.phase.name}", err)
                    self.group_restarts += 1
                    self.group = self._start_group()
                    step = self._resume(rollback=True)
                    sink.rewind(step)
                    self._replay_row(sink, step)
            self.steps.finish()
            sink.log(self.phase.steps, {"timing/export": timer.seconds["export"]})
        finally:
            sink.close()

    def metrics_sink(self, step: int) -> MetricsSink:
        """The phase's metrics.jsonl resumed at ``step`` (later rows dropped, the
        checkpoint's row replayed if a kill lost it)."""
        sink = MetricsSink(self.dir / "metrics.jsonl", self.cfg, phase=self.phase.name,
                           truncate_after=step, total_steps=self.phase.steps,
                           run_dir=self.run_dir, role=self.phase.role, iteration=self.iteration)
        self._replay_row(sink, step)
        return sink

    def advance(self, step: int, sink: MetricsSink) -> dict:
        """Step ``step`` to its end: the step, ``after_step`` (e.g. MAYE's evaluation),
        the checkpoint (every ``run.save_every`` steps and the last), the metrics row.
        The checkpoint holds the row, and its completion marker is the last thing it
        writes: a kill before it redoes the step from the previous checkpoint, one after
        it finds the row there (``_replay_row``). Each row is written once either way."""
        metrics = self.step(step)
        if self.spec.after_step is not None:
            metrics.update(self.spec.after_step(step, self.ctx) or {})
        done = step + 1
        if done % self.cfg.run.save_every == 0 or done == self.phase.steps:
            timer = Timer()
            with timer("checkpoint"):
                self.save(done, self.steps.state(), row=metrics,
                          upcoming=self.steps.upcoming(done))
            metrics["timing/checkpoint"] = timer.seconds["checkpoint"]
        sink.log(done, metrics)
        return metrics

    def _replay_row(self, sink: MetricsSink, step: int) -> None:
        """The metrics row of the checkpoint resumed from, if a kill came between the
        checkpoint and the row."""
        if self._saved_row is not None and sink.last_step() < step:
            sink.log(step, self._saved_row)

    @property
    def processor(self):
        """The starting model's processor (chat template, image tokens), as the trainer's."""
        if self._processor is None:
            from transformers import AutoProcessor

            pixels = {"max_pixels": self.cfg.model.max_pixels} if self.cfg.model.max_pixels else {}
            self._processor = AutoProcessor.from_pretrained(resolve_model(self.start_weights),
                                                            **pixels)
        return self._processor

    # -- pieces ------------------------------------------------------------------

    def _start_group(self) -> TrainerGroup:
        cfg = self.cfg
        kwargs = self.placement.trainer_kwargs()
        threads = self.placement.rank_threads()
        spec = replace(trainer_spec(cfg, self.start_weights, self.phase.steps, sft=self.spec.sft,
                                    adapters=self.policies, mini_batches=self.spec.mini_batches),
                       threads=threads)
        return TrainerGroup(spec,
                            self.placement.layout.trainer_ranks,
                            name=f"coevolve/{cfg.run.name}/trainer", **kwargs,
                            runtime_env={"env_vars": {"OMP_NUM_THREADS": str(threads)}},
                            timeout_s=cfg.trainer.collective_timeout_s,
                            call_timeout_s=cfg.trainer.call_timeout_s)

    def _resume(self, rollback: bool = False) -> int:
        """Load the newest complete checkpoint into the group, the steps' state and the
        engines; its step.

        ``rollback`` (after a trainer failure): the engines may serve newer
        weights than the checkpoint, so they get the group's weights even
        without a checkpoint.
        """
        found = latest_checkpoint(self.dirs.ckpt)
        step, saved, upcoming = 0, {}, None
        if found is not None:
            step, path = found
            saved = self.group.load(str(path)).get("state", {})
            # beside the folder since the marker is written last; inside it before
            for file in (self.dirs.upcoming(step), path / UPCOMING):
                if self.cfg.run.overlap and file.exists():
                    upcoming = pickle.loads(file.read_bytes())
                    break
        self._saved_row = saved.pop(ROW, None)
        self.steps.restore(saved, step, upcoming)
        self.steps.sync(resumed=found is not None, rollback=rollback)
        return step

    def save(self, steps: int, state: dict, row: dict | None = None, upcoming=None) -> None:
        """A checkpoint after ``steps`` steps with the steps' ``state`` and the step's
        metrics ``row``; the batch sampled for the next step (run.overlap) is written
        first, beside it, so that a resumed run trains on it. The group's save writes the
        completion marker last."""
        if upcoming is not None:
            atomic_write(self.dirs.upcoming(steps), pickle.dumps(upcoming))
        self.group.save(str(self.dirs.checkpoint(steps)),
                        {**state, ROW: row} if row is not None else state)
        prune_checkpoints(self.dirs.ckpt, self.cfg.run.keep_checkpoints)

    def _export_unchanged(self) -> None:
        """hf/ = the starting weights (hard links where the filesystem allows)."""

        source = Path(resolve_model(self.start_weights))
        target = self.dirs.hf()
        if not source.is_dir():
            raise ValueError(f"{self.phase.name}: cannot export {self.start_weights}: not a folder")
        link_tree(source, target)
        self.engines.served(self.phase.role, str(target))
