"""One GRPO phase: the trainer group and the engines of one role, step by step.

A step, each part in a named timer logged as ``timing/<name>``:

    generate    the role's engines sample n completions per request
    reward      the recipe scores them (may call other roles' engines)
    logprobs    old (and reference) log-probs from the trainer ranks
    update      forward_backward over micro-batches, optim_step
    weight_sync full weights to every engine of the role, new version
    save        rollouts parquet; every run.save_every steps a checkpoint

``timing/overhead`` is the rest of the step's wall time (batch building,
serialisation, the driver's own work).

Before the first step the phase may ``prepare`` its data (MM-Zero builds the
CodeGen and Solver data sets with other roles' engines); a phase left with
no data trains no step and exports its starting weights unchanged.

Failures: a dead engine is restarted by its pool; a dead trainer rank kills
the group (``TrainerGroupFailed``), and the phase rebuilds it from its last
checkpoint (or its starting weights), brings the engines back to those
weights and takes the lost steps again, at most ``run.max_restarts`` times.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from actors.batching import TrainBatch
from actors.trainer_group import TrainerGroup, TrainerGroupFailed
from pipelines.algorithms.estimators import make_estimator, make_kl_controller
from pipelines.algorithms.grading import budget as grading_budget
from pipelines.algorithms.grading import grading_stats
from pipelines.contract import Rollout, phase_spec
from pipelines.runtime.metrics import MetricsSink, Timer
from pipelines.runtime.rundir import latest_checkpoint, link_tree, prune_checkpoints
from pipelines.runtime.specs import needs_reference, sleep_level, trainer_spec

logger = logging.getLogger(__name__)

UPCOMING = "upcoming.pkl"  # in a step checkpoint: the batch sampled for the next step (overlap)


@dataclass
class SampledBatch:
    """One step's rollouts as sampled and scored, with what sampling them took."""

    rollouts: list[Rollout]
    seconds: dict[str, float]  # generate and reward (or rollout)
    timeouts: float = 0.0  # answer checks cut by their time limit or the step's budget
    too_long: float = 0.0  # answers too long to check
    refused: float = 0.0  # requests the engines refused (dropped from the rollouts)


class PhaseRunner:
    """Runs one phase; also the ``ctx`` a recipe's hooks get (``pool``, ``dir``, ...)."""

    def __init__(self, cfg, phase, phase_dir: Path, *, run_dir: Path, seed_path: tuple[int, ...],
                 engines, placement, weights, base_version: int = 0):
        self.cfg, self.phase, self.dir = cfg, phase, Path(phase_dir)
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
        self.version = base_version
        self.group_restarts = 0
        self.data_metrics: dict[str, float] = {}
        self.group = None
        self.pool = None
        self._pending: dict[int, SampledBatch] = {}  # step -> its batch, sampled ahead (overlap)
        self._provenance: dict[str, str] | None = None  # role -> weights; provenance.json

    @property
    def iteration(self) -> int:
        return self.seed_path[1]

    @property
    def is_sft(self) -> bool:
        """The phase trains on a data set with the SFT objective (pipelines/runtime/sft.py)."""
        return self.spec.sft

    @property
    def needs_reference(self) -> bool:
        """The step needs the reference policy's log-probs (a KL loss or a KL reward)."""
        return needs_reference(self.cfg.algorithm)

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
        import json

        from pipelines.runtime.rundir import atomic_write

        path = Path(weights)
        label = str(path.relative_to(self.run_dir)) if path.is_relative_to(self.run_dir) \
            else weights
        file = self.dir / "provenance.json"
        if self._provenance is None:  # what an earlier runner of this phase recorded
            self._provenance = json.loads(file.read_text()) if file.exists() else {}
        known = self._provenance
        if known.get(role) != label:
            known[role] = label
            atomic_write(file, json.dumps(known, indent=1, sort_keys=True))

    def __enter__(self) -> PhaseRunner:
        self.dir.mkdir(parents=True, exist_ok=True)
        timer = Timer()
        with timer("engines"):  # its own engines and its judges', started side by side
            wanted = {} if self.is_sft else {self.phase.role: self.start_weights}
            for role in self.spec.uses:  # judges: started here, not in a step
                wanted[role] = self.weights(role)
            pools = self.engines.pools_for(wanted, self.placement)
            for role, weights in wanted.items():
                self._record_provenance(role, weights)
            self.pool = pools.get(self.phase.role)
        if self.spec.prepare is not None:
            with timer("prepare"):
                made = self.spec.prepare(self) or {}
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
            self.spec.prepare(self)

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
        sink = MetricsSink(self.dir / "metrics.jsonl", self.cfg, phase=self.phase.name,
                           truncate_after=step, total_steps=self.phase.steps,
                           run_dir=self.run_dir, role=self.phase.role, iteration=self.iteration)
        try:
            while True:
                try:
                    while step < self.phase.steps:
                        metrics = self.step(step)
                        if self.spec.after_step is not None:  # e.g. MAYE's evaluation
                            metrics.update(self.spec.after_step(step, self) or {})
                        sink.log(step + 1, metrics)
                        step += 1
                        if on_step is not None:
                            on_step(step)
                    timer = Timer()
                    with timer("export"):
                        self.group.export_hf(str(self.dir / "hf"))
                        for policy in self.policies[1:]:  # hf/ holds the first policy
                            self.group.export_hf(str(self.dir / f"hf-{policy}"), adapter=policy)
                    break
                except TrainerGroupFailed as err:
                    self.group_restarts += 1
                    if self.group_restarts > self.cfg.run.max_restarts:
                        raise
                    logger.warning("%s: %s; rebuilding the trainer group (restart %d of %d)",
                                   self.phase.name, err, self.group_restarts,
                                   self.cfg.run.max_restarts)
                    self.group = self._start_group()
                    step = self._resume(rollback=True)
                    sink.rewind(step)
            if self.is_sft:
                self.version = self.base_version + self.phase.steps  # the weights moved on
            elif self.cfg.run.sync_weights and self.cfg.trainer.lora.enabled:
                # Its engines hold the base plus the adapters; the next user of the role
                # starts fresh ones from the merged hf/ export (an adapter on top of
                # merged weights would count twice).
                self.engines.stop(self.phase.role)
            elif self.cfg.run.sync_weights and \
                    self.version == self.base_version + self.phase.steps:
                self.engines.served(self.phase.role, str(self.dir / "hf"), saved=True)
            sink.log(self.phase.steps, {"timing/export": timer.seconds["export"]})
        finally:
            sink.close()

    def step(self, step: int) -> dict:
        """One generation step and the updates of every policy it sampled for.

        With ``run.overlap`` the batch was sampled during the previous step (or, on the
        first step and after a resume without one saved, now), and the engines sample
        the next step's batch with the same weights while the trainer updates."""
        if self.is_sft:
            return self.sft_step(step)
        timer = Timer()
        inside = set()  # timers inside this step's wall time, for timing/overhead
        with timer("step"):
            batch = self._pending.pop(step, None)
            if batch is None:
                batch = self._sample(step)
                inside.update(batch.seconds)
            rollouts = batch.rollouts
            # Engines colocated with the trainer ranks free their devices for the updates.
            asleep = self.phase.role in self.placement.layout.colocate
            if asleep:
                with timer("sleep"):
                    self.pool.sleep(sleep_level(self.cfg))
            try:
                if self.cfg.run.overlap and step + 1 < self.phase.steps:
                    train_timer = Timer()
                    with timer("overlap"):
                        trained, self._pending[step + 1] = self._overlapped(
                            rollouts, step, train_timer)
                    timer.seconds.update(train_timer.seconds)
                else:
                    trained = [self._train(r, step, timer) for r in rollouts]
                    inside.update(k for k in timer.seconds if k != "step")
                if asleep:  # the engines wake into the memory the ranks cached in the update
                    self.group.release_memory()
            finally:
                if asleep:
                    with timer("wake"):
                        self.pool.wake_up()
            if self.cfg.run.sync_weights:
                with timer("weight_sync"):
                    for r in rollouts:
                        self._push(r.policy, self._versions[self._key(r.policy)] + 1)
            with timer("save"):
                self._write_rollouts(step, rollouts, trained)
                if (step + 1) % self.cfg.run.save_every == 0 or step + 1 == self.phase.steps:
                    self._save(step + 1)
            inside.update(("overlap", "sleep", "wake", "weight_sync", "save"))
        metrics = {}
        for r, (tb, rewards, _, train, adv_metrics, _) in zip(rollouts, trained):
            prefix = f"{r.policy}/" if r.policy else ""
            part = self._rollout_metrics(r, tb, rewards, train, adv_metrics)
            metrics.update({prefix + k: v for k, v in part.items()})
        sampled = sum(len(c.token_ids) for r in rollouts for g in r.completions for c in g)
        seconds = {**batch.seconds, **timer.seconds}
        generate = seconds.get("generate", seconds.get("rollout", 0.0))
        metrics.update({
            # answer checks cut by their time limit or the step's budget (counted wrong)
            "reward/timeouts": batch.timeouts,
            "reward/answers_too_long": batch.too_long,
            # requests vLLM refused (too long, too many images, bad image): dropped, logged
            "rollout/refused": batch.refused,
            "rollout/engine_restarts": float(self.pool.restarts),
            "train/group_restarts": float(self.group_restarts),
            **self.data_metrics,
            "perf/tokens_per_s": sampled / max(generate, 1e-9),
            **{f"timing/{k}": v for k, v in seconds.items()},
            "timing/overhead": timer.seconds["step"] - sum(
                v for k, v in seconds.items() if k in inside),
        })
        return metrics

    def _sample(self, step: int) -> SampledBatch:
        """The step's requests, sampled by the engines with the weights they serve now and
        scored by the recipe."""
        timer = Timer()
        rng = step_rng(self.seed_path, step)
        before = grading_stats()
        if self.policies:  # several policies: the recipe samples and scores for each
            with timer("rollout"), grading_budget(self.cfg.algorithm.reward_budget_s):
                rollouts = list(self.phase.rollout(step, rng, self))
        else:
            requests = self.phase.requests(step, rng)
            with timer("generate"):
                completions = self.pool.generate(requests)
            with timer("reward"), grading_budget(self.cfg.algorithm.reward_budget_s):
                scores = self.phase.score(requests, completions, self)
            rollouts = [Rollout(None, requests, completions, scores,
                                mini_batches=self.spec.mini_batches)]
        after = grading_stats()
        reasons = [why for r in rollouts for why in r.refused()]
        if reasons:
            rollouts = [a for a in (r.answered() for r in rollouts) if a.requests]
            if not rollouts:
                raise RuntimeError(f"{self.phase.name} step {step}: the engines refused every "
                                   f"request ({len(reasons)}), e.g. {reasons[0]}")
        return SampledBatch(
            rollouts, timer.seconds, refused=float(len(reasons)),
            timeouts=float(sum(after[k] - before[k] for k in
                               ("symbolic_timeouts", "symbolic_over_budget"))),
            too_long=float(after["too_long"] - before["too_long"]))

    def _overlapped(self, rollouts, step: int, timer: Timer) -> tuple[list, SampledBatch]:
        """The updates on this step's batch (in a thread: the trainer's calls wait on Ray)
        while this thread samples and scores the next step's batch with the engines'
        current weights (scoring may need the main thread: answer checks set alarms)."""
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(1, thread_name_prefix="coevolve-update") as worker:
            future = worker.submit(lambda: [self._train(r, step, timer) for r in rollouts])
            try:
                upcoming = self._sample(step + 1)
            finally:
                trained = future.result()  # the update's error first: it is the step's
        return trained, upcoming

    def _save(self, steps: int) -> None:
        """A checkpoint after ``steps`` steps, with the batch sampled for the next step
        (run.overlap), so that a resumed run trains on the same batch."""
        import pickle

        path = self.dir / "ckpt" / f"step_{steps:06d}"
        self.group.save(str(path), self._state())
        upcoming = self._pending.get(steps)
        if upcoming is not None:
            tmp = path / ".upcoming.pkl.tmp"
            tmp.write_bytes(pickle.dumps(upcoming))
            tmp.replace(path / UPCOMING)
        prune_checkpoints(self.dir / "ckpt", self.cfg.run.keep_checkpoints)

    def _train(self, rollout, step: int, timer) -> tuple:
        """Behaviour (and reference) log-probs, advantages and the updates of one policy."""
        key, adapter = self._key(rollout.policy), rollout.policy
        batch, rewards = self._batch(rollout.requests, rollout.completions,
                                     rollout.scores.rewards)
        source = self._behaviour_source(key, rollout.mini_batches)
        engine = [np.asarray(c.logprobs, dtype=np.float32)
                  for group in rollout.completions for c in group]
        if source != "trainer" or self.cfg.algorithm.tis_cap > 0:
            batch = batch.with_column(engine_logprobs=engine)
        with timer("logprobs"):
            # the behaviour policy's log-probs, before the first update: a trainer pass, the
            # engines' own, or none (one update: its own forward is the behaviour policy)
            if source == "trainer":
                batch = batch.with_column(old_logprobs=self.group.compute_logprobs(
                    batch, adapter=adapter))
            elif source == "engine":
                batch = batch.with_column(old_logprobs=engine)
            if self.needs_reference:
                batch = batch.with_column(ref_logprobs=self.group.compute_logprobs(
                    batch, reference=True, adapter=adapter))
        advantages, adv_metrics = self.estimators[key].advantages(
            rewards, batch.prompt_index, batch)
        batch = batch.with_column(advantages=advantages)
        with timer("update"):
            trained_from = self._versions[key]
            train = self._update(batch, step, key, adapter, rollout.mini_batches)
        train["train/behaviour_pass"] = float(source == "trainer")
        # weight versions between the engines' weights and the ones the update started from
        staleness = np.array([trained_from - c.version for g in rollout.completions for c in g])
        train["rollout/staleness"] = float(staleness.mean()) if staleness.size else 0.0
        train["rollout/staleness_max"] = float(staleness.max()) if staleness.size else 0.0
        return batch, rewards, advantages, train, adv_metrics, staleness

    def _behaviour_source(self, key: str, mini_batches: int | None) -> str:
        """``algorithm.behaviour_logprobs``, with auto resolved: "update" (no pass) when
        the batch gets one update whose forward runs exactly the sampling weights: the
        estimator needs no log-probs of its own and no dropout (LoRA's) perturbs it."""
        a, lora = self.cfg.algorithm, self.cfg.trainer.lora
        if a.behaviour_logprobs != "auto":
            return a.behaviour_logprobs
        if self.cfg.run.overlap:  # sampled one step earlier: the engines' weights
            return "engine"
        updates = (mini_batches or a.mini_batches) * a.epochs
        needs = getattr(self.estimators[key], "needs_reference", False)  # reinforce_pp's KL
        dropout = lora.enabled and lora.dropout > 0
        return "update" if updates == 1 and not needs and not dropout else "trainer"

    def _rollout_metrics(self, rollout, batch, rewards, train, adv_metrics) -> dict:
        tokens = [len(c.token_ids) for group in rollout.completions for c in group]
        return {
            **{k if "/" in k else f"train/{k}": v for k, v in train.items()},
            **{f"reward/{k}": v for k, v in rollout.scores.metrics.items()},
            **adv_metrics,
            "reward/mean": float(np.mean(rewards)), "reward/std": float(np.std(rewards)),
            "rollout/response_tokens": float(np.mean(tokens)),
            "rollout/truncated": float(np.mean([c.finish_reason == "length"
                                                for group in rollout.completions
                                                for c in group])),
            "rollout/version": float(self._versions[self._key(rollout.policy)]),
            # engine vs trainer log-probs of the sampled tokens: ~1e-6 in fp32 when the
            # engines serve the trainer's weights (or adapter), far more when they do not;
            # without a trainer pass, measured in the first update's forward
            "rollout/logprob_diff": _logprob_diff(rollout.completions, batch.old_logprobs)
            if train.get("train/behaviour_pass") else
            train.get("policy/engine_logprob_diff", float("nan")),
        }

    def sft_step(self, step: int) -> dict:
        from pipelines.runtime.sft import sft_batch

        timer = Timer()
        with timer("step"):
            examples = self.phase.batch_examples(step, self.seed_path)
            batch = sft_batch(examples, self.processor)
            with timer("update"):
                train = self.group.forward_backward(batch)
                train.update(self.group.optim_step())
            with timer("save"):
                if (step + 1) % self.cfg.run.save_every == 0 or step + 1 == self.phase.steps:
                    self.group.save(str(self.dir / "ckpt" / f"step_{step + 1:06d}"), {})
                    prune_checkpoints(self.dir / "ckpt", self.cfg.run.keep_checkpoints)
        return {**{k if "/" in k else f"train/{k}": v for k, v in train.items()},
                "sft/examples": float(len(examples)), **self.data_metrics,
                **{f"timing/{k}": v for k, v in timer.seconds.items()}}

    @property
    def processor(self):
        """The starting model's processor (chat template, image tokens), as the trainer's."""
        if getattr(self, "_processor", None) is None:
            from transformers import AutoProcessor

            from actors.models import resolve_model

            pixels = {"max_pixels": self.cfg.model.max_pixels} if self.cfg.model.max_pixels else {}
            self._processor = AutoProcessor.from_pretrained(resolve_model(self.start_weights),
                                                            **pixels)
        return self._processor

    # -- pieces ------------------------------------------------------------------

    def _start_group(self) -> TrainerGroup:
        cfg = self.cfg
        kwargs = self.placement.trainer_kwargs()
        threads = self.placement.rank_threads()
        spec = replace(trainer_spec(cfg, self.start_weights, self.phase.steps, sft=self.is_sft,
                                    adapters=self.policies,
                                    mini_batches=self.spec.mini_batches),
                       threads=threads)
        return TrainerGroup(spec,
                            self.placement.layout.trainer_ranks,
                            name=f"coevolve/{cfg.run.name}/trainer", **kwargs,
                            runtime_env={"env_vars": {"OMP_NUM_THREADS": str(threads)}})

    def _resume(self, rollback: bool = False) -> int:
        """Load the newest complete checkpoint into the group and the engines; its step.

        ``rollback`` (after a trainer failure): the engines may serve newer
        weights than the checkpoint, so they get the group's weights even
        without a checkpoint.
        """
        found = latest_checkpoint(self.dir / "ckpt")
        step = 0
        keys = self.policies or (self.phase.role,)
        self.estimators = {k: make_estimator(self.cfg.algorithm) for k in keys}
        self.kls = {k: make_kl_controller(self.cfg.algorithm) for k in keys}
        self.version = self.base_version
        self._pending = {}
        if found is not None:
            step, path = found
            state = self.group.load(str(path)).get("state", {})
            if self.cfg.run.overlap and (path / UPCOMING).exists():
                import pickle

                self._pending[step] = pickle.loads((path / UPCOMING).read_bytes())
            saved = state.get("policies", {})
            for k in keys:
                self.estimators[k].load_state_dict(saved.get(k, {}).get("estimator", {}))
                self.kls[k].load_state_dict(saved.get(k, {}).get("kl", self.kls[k].state_dict()))
                self._versions[k] = saved.get(k, {}).get("version", self.base_version + step)
        if self.is_sft or not self.cfg.run.sync_weights:
            return step
        if self.policies:  # every adapter, at its version (fresh ones: the base's)
            for k in keys:
                self._push(k, self._versions[k], rollback=True)
        elif found is not None or rollback:
            self._push_weights(self._versions[keys[0]], rollback=rollback)
        return step

    def _push(self, policy: str | None, version: int, rollback: bool = False) -> None:
        """One policy's new weights to the engines: its adapter, or the full weights."""
        if policy is None:
            self._push_weights(version, rollback=rollback)
            return
        self.pool.load_adapter(policy, self.group.adapter(policy), version)
        self._versions[policy] = version
        self.engines.served(self.phase.role, f"{self.dir}@" + ",".join(
            f"{k}:{v}" for k, v in sorted(self._versions.items())))

    def _push_weights(self, version: int, rollback: bool = False) -> None:
        """The trainer's weights to the phase's engines: the full weights, or with LoRA
        the adapter, which the pool then serves to every request (``default_adapter``)."""
        if self.cfg.trainer.lora.enabled:
            self.pool.load_adapter(self.phase.role, self.group.adapter(), version)
            self.pool.default_adapter = self.phase.role
        else:
            refs = self.group.weight_buckets(self.cfg.generator.bucket_mb << 20)
            self.pool.update_weights(refs, version, rollback=rollback)
        self.version = version
        self.engines.served(self.phase.role, f"{self.dir}@{version}")

    def _export_unchanged(self) -> None:
        """hf/ = the starting weights (hard links where the filesystem allows)."""
        from actors.models import resolve_model

        source = Path(resolve_model(self.start_weights))
        target = self.dir / "hf"
        if not source.is_dir():
            raise ValueError(f"{self.phase.name}: cannot export {self.start_weights}: not a folder")
        link_tree(source, target)
        self.engines.served(self.phase.role, str(target))

    def _batch(self, requests, completions, rewards):
        """The step's samples as a TrainBatch (no advantages yet) and their rewards."""
        flat, ids, prompt_lens, prompt_index = [], [], [], []
        for p, (samples, r) in enumerate(zip(completions, rewards)):
            if len(samples) != len(r):
                raise ValueError(f"the recipe scored {len(r)} of {len(samples)} samples of request {p}")
            for c, value in zip(samples, r):
                if not math.isfinite(value):
                    raise ValueError(f"reward {value} for request {p} is not finite")
                flat.append(value)
                ids.append(np.asarray(c.prompt_ids + c.token_ids, dtype=np.int64))
                prompt_lens.append(len(c.prompt_ids))
                prompt_index.append(p)
        batch = TrainBatch(ids, np.array(prompt_lens), np.array(prompt_index),
                           [list(r.images) for r in requests])
        return batch, np.array(flat)

    def _update(self, batch: TrainBatch, step: int, key: str = "", adapter=None,
                mini_batches: int | None = None) -> dict:
        """``algorithm.epochs`` passes over the batch in ``algorithm.mini_batches`` PPO
        updates each (whole prompt groups per mini-batch; the first pass in the batch's
        order, later ones shuffled from the step's seed); one optimizer step per
        mini-batch. The metrics are the
        updates' means (``train/updates`` counts them)."""
        a = self.cfg.algorithm
        kl = self.kls[key or self._key(None)]
        mini_batches = mini_batches or a.mini_batches
        if mini_batches == 1 and a.epochs == 1:
            train = self.group.forward_backward(batch, kl_coef=kl.beta, adapter=adapter)
            train.update(self.group.optim_step(adapter))
            train["train/kl_coef"] = kl.beta
            if "policy/kl" in train:  # the KL controller moves after every optimizer step
                kl.update(train["policy/kl"])
            return {**train, "train/updates": 1.0}
        prompts = np.unique(batch.prompt_index)
        if len(prompts) < mini_batches:
            raise ValueError(f"{mini_batches} mini-batches need as many prompts per step "
                             f"(algorithm.mini_batches), this step has {len(prompts)}")
        parts = []
        for epoch in range(a.epochs):
            # the first pass in the batch's own order (EvoLMM: one sample after another),
            # later passes in an order drawn from the step's seed
            order = prompts if epoch == 0 else np.random.default_rng(
                [*self.seed_path, step, epoch]).permutation(prompts)
            for chunk in np.array_split(order, mini_batches):
                rows = np.flatnonzero(np.isin(batch.prompt_index, chunk))
                metrics = self.group.forward_backward(batch.select(rows), kl_coef=kl.beta,
                                                      adapter=adapter)
                metrics.update(self.group.optim_step(adapter))
                metrics["train/kl_coef"] = kl.beta
                if "policy/kl" in metrics:
                    kl.update(metrics["policy/kl"])
                parts.append(metrics)
        merged = {k: float(np.mean([m[k] for m in parts if k in m])) for k in parts[-1]}
        if "policy/engine_logprob_diff" in parts[0]:  # before any optimizer step of the step
            merged["policy/engine_logprob_diff"] = parts[0]["policy/engine_logprob_diff"]
        merged["train/step"] = parts[-1]["train/step"]
        merged["train/updates"] = float(len(parts))
        return merged

    def _state(self) -> dict:
        """What a checkpoint keeps beside the trainer, per policy: the estimator's
        baseline, the KL coefficient and the version the engines serve."""
        return {"policies": {k: {"estimator": self.estimators[k].state_dict(),
                                 "kl": self.kls[k].state_dict(), "version": self._versions[k]}
                             for k in self.estimators}}

    def _key(self, policy: str | None) -> str:
        return policy or self.phase.role

    @property
    def version(self) -> int:
        """The weight version of the phase's main policy (the first, or the only one)."""
        return self._versions[self._key(self.policies[0] if self.policies else None)]

    @version.setter
    def version(self, value: int) -> None:
        self._versions = dict.fromkeys(self.policies or (self.phase.role,), value)

    def _write_rollouts(self, step, rollouts, trained) -> None:
        """rollouts-<step>.parquet: a row per sample of every policy of the step."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        tables = []
        for r, (_, rewards, advantages, _, _, staleness) in zip(rollouts, trained):
            rows = [(p, s, c) for p, group in enumerate(r.completions)
                    for s, c in enumerate(group)]
            columns = {
                "step": [step + 1] * len(rows),
                **({"policy": [r.policy] * len(rows)} if self.policies else {}),
                "prompt_index": [p for p, _, _ in rows],
                "sample_index": [s for _, s, _ in rows],
                "prompt": [_prompt_text(r.requests[p]) for p, _, _ in rows],
                "response": [c.text for _, _, c in rows],
                "response_tokens": [len(c.token_ids) for _, _, c in rows],
                "finish_reason": [c.finish_reason for _, _, c in rows],
                "version": [c.version for _, _, c in rows],
                "staleness": staleness.tolist(),
                "reward": rewards.tolist(),
                # per sample, or per completion token (reinforce_pp)
                "advantage": [a.tolist() if isinstance(a, np.ndarray) else float(a)
                              for a in advantages],
                **{name: [values[p][s] for p, s, _ in rows]
                   for name, values in r.scores.columns.items()},
            }
            tables.append(pa.table(columns))
        table = pa.concat_tables(tables, promote_options="permissive") if len(tables) > 1 \
            else tables[0]
        path = self.dir / f"rollouts-{step + 1:06d}.parquet"
        tmp = path.with_name(f".{path.name}.tmp")
        pq.write_table(table, tmp)
        tmp.replace(path)


def _logprob_diff(completions, old_logprobs) -> float:
    """Mean |engine - trainer| log-prob over every sampled token of the step."""
    engine = [np.asarray(c.logprobs, dtype=np.float64) for group in completions for c in group]
    diffs = [np.abs(e - np.asarray(t, dtype=np.float64)) for e, t in zip(engine, old_logprobs)
             if len(e) and len(e) == len(t)]
    return float(np.mean(np.concatenate(diffs))) if diffs else 0.0


def _prompt_text(request) -> str:
    parts = request.messages[-1]["content"]
    if isinstance(parts, str):
        return parts
    return " ".join(p.get("text", "<image>") for p in parts)


def step_rng(seed_path: tuple[int, ...], step: int) -> np.random.Generator:
    """The step's requests and sampling seeds: a pure function of (run.seed, iteration,
    phase, step), so a resumed run takes the same steps as an uninterrupted one."""
    return np.random.default_rng([*seed_path, step])
