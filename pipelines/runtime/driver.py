"""The resumable driver: iterations x phases, each phase a GRPO run.

    warm start (model.warm_start: an SFT of the base model, cached)
    for iteration in 1..I:
        for phase in recipe.phases(iteration):
            skip if its DONE marker exists
            resume from its newest complete step checkpoint, or start fresh
            for step: generate -> reward -> advantages -> log-probs -> update -> weight sync
            checkpoint every run.save_every steps; export hf/; write DONE

Run directory (see docs/architecture.md), always absolute; on a Ray cluster
``run.root`` must be absolute and shared by every node, which is checked
before a phase starts (pipelines/runtime/storage.py)::

    runs/<name>/config.yaml  state.json
    runs/<name>/iter_0001/<phase>/rollouts-000001.parquet  metrics.jsonl  ckpt/step_000002/  hf/  DONE

Determinism: the requests and sampling seeds of a step are a pure function of
(run.seed, iteration, phase, step); the trainer restores its RNG states and
optimizer from the checkpoint, and the engines get the checkpoint's weights,
so a resumed run takes the same steps as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import logging
import os
import shutil
import time
from pathlib import Path

from pipelines.config import Config, ConfigError, config_to_dict, dump_config
from pipelines.contract import Phase, phase_spec, recipe_spec
from pipelines.layouts import check_layouts, resolve_layout
from pipelines.registry import build_recipe, eval_role
from pipelines.runtime.rundir import DATA, DONE, PhaseDir, RoleState, RunDir, RunState, atomic_write

logger = logging.getLogger(__name__)


class Driver:
    def __init__(self, cfg: Config):
        from pipelines.runtime.storage import attached_to_cluster, run_root

        self.cfg = cfg
        self.on_cluster = attached_to_cluster()
        # Absolute: actors on other nodes and later resumes from another working
        # directory must find the same folder (docs/architecture.md, Run directories).
        self.run_dir = run_root(cfg.run.root, self.on_cluster) / cfg.run.name
        self.dirs = RunDir(self.run_dir)
        self._shared_nodes: set[str] = set()  # nodes proven to share run.root
        self.recipe = build_recipe(cfg)
        self.state = RunState.read(self.dirs.state)

    # -- the story -------------------------------------------------------------

    def run(self) -> RunState:
        import ray

        check_layouts(self.cfg, self.recipe)  # a phase without the engines it needs: fail now
        if self.on_cluster:  # the driver's node first: it writes state.json and reads checkpoints
            self._check_shared({ray.get_runtime_context().get_node_id()})
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with run_lock(self.run_dir):  # one driver per run directory
            return self._run()

    def _run(self) -> RunState:
        from pipelines.runtime.engines import Engines
        from pipelines.runtime.placement import PlacementManager

        check_resume_config(self.dirs.config, self.cfg)
        atomic_write(self.dirs.config, dump_config(self.cfg))
        # e.g. run.iterations raised after a finished run; this launch's start, so that
        # `coevolve status` can tell how long it took to get to its first step
        self._update_state(finished=False, launched=time.time(), first_step_s=None)
        engines = Engines(self.cfg)
        places = PlacementManager(self.cfg.placement, run=self.cfg.run.name,
                                  roles_used=self.recipe.roles)
        try:
            self._warm_start(engines, places)
            for iteration in range(1, self.cfg.run.iterations + 1):
                for index, phase in enumerate(self.recipe.phases(iteration)):
                    phase_dir = self.dirs.phase(iteration, phase.name)
                    if self._exported_before_done(phase, phase_dir):
                        phase_dir.mark(DONE)  # a kill between state.json and DONE
                    if phase_dir.has(DONE):
                        self._prune(iteration, phase)  # a launch that stopped before it did
                        continue
                    order = self.state.order
                    name = self.dirs.relative(phase_dir.path)
                    self._update_state(iteration=iteration, phase=phase.name, step=0,
                                       order=order if name in order else [*order, name])
                    self._make_data_first(iteration, index, phase, phase_dir, engines, places)
                    placement = self._enter(places, phase.name, engines)
                    self.run_phase(iteration, index, phase, phase_dir, engines, placement)
                    phase_dir.mark(DONE)
                    self._prune(iteration, phase)
        finally:
            from pipelines.runtime.metrics import finish_wandb

            finish_wandb()
            engines.shutdown()
            places.release()
            close = recipe_spec(self.recipe).close
            if close is not None:
                close()
        self._update_state(finished=True)
        return self.state

    def _warm_start(self, engines, places) -> None:
        """``model.warm_start``: an SFT of the base model that every role starts from
        (pipelines/runtime/warm_start.py); done once, before iteration 1."""
        from pipelines.runtime.warm_start import FOLDER, warm_start

        if not self.cfg.model.warm_start.data or self.state.base:
            return
        if not self.dirs.warm_start.has(DONE):
            self._update_state(iteration=0, phase=FOLDER, step=0)
            warm_start(self.cfg, self.recipe, run_dir=self.run_dir, engines=engines,
                       placement=self._enter(places, None, engines))
        shutil.rmtree(self.dirs.warm_start.ckpt, ignore_errors=True)  # done: hf/ is kept
        self._update_state(base=self.dirs.relative(self.dirs.warm_start.hf()))

    def _prune(self, iteration: int, phase: Phase) -> None:
        """What a finished phase leaves on disk: its step checkpoints go (a resume skips a
        phase with DONE, and the next phases and ``coevolve export`` read its hf/); with
        run.keep_exports K, the exports of its role's phases older than the newest K go too
        (the driver and export read only the newest: state.json's roles), except the
        role ``coevolve eval`` evaluates after every iteration."""
        shutil.rmtree(self.dirs.phase(iteration, phase.name).ckpt, ignore_errors=True)
        keep = self.cfg.run.keep_exports
        if not keep or phase.role == eval_role(self.recipe):
            return
        done = [self.dirs.phase(i, p.name) for i in range(1, iteration + 1)
                for p in self.recipe.phases(i) if p.role == phase.role]
        for folder in [d for d in done if d.has(DONE)][:-keep]:
            for export in folder.exports():
                shutil.rmtree(export, ignore_errors=True)

    def _enter(self, places, phase: str | None, engines):
        """The placement of ``phase`` (None: the top-level layout), its nodes checked."""
        if not places.keeps(phase):
            engines.shutdown()  # removing a placement group kills its actors
        placement = places.enter(phase)
        if self.on_cluster:
            from pipelines.runtime.storage import placement_nodes

            self._check_shared(placement_nodes(placement))
        return placement

    def _make_data_first(self, iteration: int, index: int, phase: Phase, phase_dir: PhaseDir,
                         engines, places) -> None:
        """Make the phase's data under the top-level layout when the phase's own layout
        lacks engines the data needs (MM-Zero's Solver may train on every GPU, but its
        data takes Proposer and CodeGen engines). The phase then loads it as a resume
        would; ``DATA`` marks it made."""
        from pipelines.runtime.phase import PhaseRunner

        needs = set(phase_spec(phase).data_roles)
        own = resolve_layout(self.cfg.placement, phase.name, self.recipe.roles).roles
        if not needs - {r for r, layout in own.items() if layout.engines > 0} \
                or phase_dir.has(DATA):
            return
        placement = self._enter(places, None, engines)
        PhaseRunner(self.cfg, phase, phase_dir.path, run_dir=self.run_dir,
                    seed_path=(self.cfg.run.seed, iteration, index), engines=engines,
                    placement=placement, weights=self.weights).make_data()
        phase_dir.mark(DATA)

    def _check_shared(self, nodes: set[str]) -> None:
        """Prove that ``nodes`` (with the ones proven before) share run.root."""
        from pipelines.runtime.storage import alive_nodes, check_shared

        self._shared_nodes &= set(alive_nodes())  # a node that left is not asked again
        if nodes - self._shared_nodes:
            check_shared(self.run_dir.parent, nodes | self._shared_nodes)
            self._shared_nodes |= nodes

    def weights(self, role: str | None) -> str:
        """The newest weights of ``role``: its last phase's hf/ export, else the warm start
        (``model.warm_start``), else the base model; ``None``: the latter two.

        state.json records exports relative to the run directory, so a run moved or
        resumed from another working directory still finds them.
        """
        known = self.state.roles.get(role) if role else None
        path = (known.path if known else None) or self.state.base
        return str(self.run_dir / path) if path else self.cfg.model.path

    def run_phase(self, iteration: int, index: int, phase: Phase, phase_dir: PhaseDir,
                  engines, placement) -> None:
        from pipelines.runtime.phase import PhaseRunner

        role = self.state.roles.get(phase.role, RoleState())
        with PhaseRunner(self.cfg, phase, phase_dir.path, run_dir=self.run_dir,
                         seed_path=(self.cfg.run.seed, iteration, index), engines=engines,
                         placement=placement, weights=self.weights,
                         base_version=role.version) as runner:
            runner.run(on_step=self._on_step)
            finish = phase_spec(phase).finish
            if finish is not None:
                finish(runner.ctx)
            roles = {**self.state.roles, phase.role: RoleState(
                self.dirs.relative(phase_dir.hf()), iteration, runner.version)}
            self._update_state(roles=roles)

    def _exported_before_done(self, phase: Phase, phase_dir: PhaseDir) -> bool:
        """The phase finished (its export, ``finish`` and the role's new weights in
        state.json, which come last before DONE) but a kill came before its DONE marker.
        Running it again would count its weight versions twice and start it from its
        own export."""
        role = self.state.roles.get(phase.role)
        return (not phase_dir.has(DONE) and role is not None
                and role.path == self.dirs.relative(phase_dir.hf()))

    def _on_step(self, step: int) -> None:
        changes = {"step": step}
        if self.state.first_step_s is None and self.state.launched is not None:
            changes["first_step_s"] = round(time.time() - self.state.launched, 1)
        self._update_state(**changes)

    # -- state.json ----------------------------------------------------------

    def _update_state(self, **changes) -> None:
        self.state = dataclasses.replace(self.state, **changes, updated=time.time())
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.state.write(self.dirs.state)


# Settings a resumed run may change: how long it runs, how it is laid out and logged,
# memory levers that leave the numbers as they are. Everything else decides what the
# run computes, and a resume with another value would mix two experiments in one folder.
RESUMABLE = ("run.iterations", "run.root", "run.resume_changed", "run.save_every", "run.keep_checkpoints",
             "run.keep_exports", "run.max_restarts", "generator.", "placement.", "logging.",
             "trainer.micro_batch_tokens", "trainer.gradient_checkpointing",
             "trainer.logprob_chunk_tokens", "trainer.share_prompts", "trainer.offload")


def check_resume_config(saved: Path, cfg: Config) -> None:
    """Refuse to continue a run directory under settings other than the ones it was made
    with (``RESUMABLE`` may change). The fix: a new run.name, or the old values; or
    run.resume_changed, which keeps the old config.yaml as config.N.yaml."""
    import yaml

    if not saved.exists():
        return
    old, new = _flat(yaml.safe_load(saved.read_text()) or {}), _flat(config_to_dict(cfg))
    changed = [k for k in sorted(old.keys() | new.keys())
               if old.get(k) != new.get(k) and not k.startswith(RESUMABLE)]
    if not changed:
        return
    shown = "; ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed[:6])
    shown += "; ..." if len(changed) > 6 else ""
    if not cfg.run.resume_changed:
        raise ConfigError(
            f"{saved.parent} was made with other settings ({shown}): resuming would mix two "
            "experiments. Use a new run.name, set these back to the run's values (its "
            "config.yaml), or continue under the new ones with run.resume_changed=true "
            "(coevolve run --force-config).")
    n = 1
    while saved.with_name(f"config.{n}.yaml").exists():
        n += 1
    os.replace(saved, saved.with_name(f"config.{n}.yaml"))
    logger.warning("resuming %s with changed settings (%s); the earlier config is config.%d.yaml",
                   saved.parent, shown, n)


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


@contextlib.contextmanager
def run_lock(run_dir: Path):
    """An exclusive lock on the run directory while a driver runs it (released by the OS
    if the process dies); a second driver on the same directory stops with the holder's
    pid. An advisory lock (flock): drivers on one host, or on hosts whose shared
    filesystem implements it."""

    handle = open(run_dir / ".driver.lock", "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "unknown"
        handle.close()
        raise ConfigError(f"another driver (pid {holder}) is running {run_dir}; wait for it "
                          "to finish or stop it first") from None
    try:
        handle.truncate(0)
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        yield
    finally:
        handle.close()
