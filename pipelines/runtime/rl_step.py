"""The RL phase's steps: sample, score, estimate, update each policy, push the weights.

A step, each part in a named timer logged as ``timing/<name>``:

    generate    the role's engines sample n completions per request
    reward      the recipe scores them (may call other roles' engines)
    logprobs    old (and reference) log-probs from the trainer ranks
    update      forward_backward over micro-batches, optim_step
    weight_sync full weights (or adapters) to every engine of the role, new version
    save        rollouts parquet; every run.save_every steps a checkpoint

``timing/overhead`` is the rest of the step's wall time (batch building,
serialisation, the driver's own work). A multi-policy phase samples and scores
in one ``rollout`` timer (the recipe's ``rollout``), then trains each policy.

``RLSteps`` holds what a phase's policies carry from step to step
(``PolicyState``: estimator, KL control, weight version) and the batch sampled
ahead with ``run.overlap``; the runner (pipelines/runtime/phase.py) owns the
lifecycle, the trainer group, the engines and the checkpoints.
"""

from __future__ import annotations

import logging
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from actors.batching import TrainBatch
from pipelines.algorithms.estimators import make_estimator, make_kl_controller
from pipelines.algorithms.grading import budget as grading_budget
from pipelines.contract import Rollout
from pipelines.runtime.metrics import Timer
from pipelines.runtime.rundir import write_rollouts
from pipelines.runtime.specs import needs_reference, sleep_level

logger = logging.getLogger(__name__)


@dataclass
class SampledBatch:
    """One step's rollouts as sampled and scored, with what sampling them took."""

    rollouts: list[Rollout]
    seconds: dict[str, float]  # generate and reward (or rollout)
    timeouts: float = 0.0  # answer checks cut by their time limit or the step's budget
    too_long: float = 0.0  # answers too long to check
    refused: float = 0.0  # requests the engines refused (dropped from the rollouts)


@dataclass
class PolicyState:
    """What one policy carries from step to step (and in every checkpoint)."""

    adapter: str | None  # its LoRA adapter; None: the phase's single policy
    estimator: object  # pipelines/algorithms/estimators.py (its baseline state)
    kl: object  # its KL coefficient control
    version: int  # the weight version the engines serve for it

    def state_dict(self) -> dict:
        return {"estimator": self.estimator.state_dict(), "kl": self.kl.state_dict(),
                "version": self.version}


@dataclass
class TrainedRollout:
    """One policy's rollout as trained on: the batch, its rewards and advantages, and
    the update's figures."""

    batch: TrainBatch
    rewards: np.ndarray  # per sample, flat
    advantages: list  # per sample, or per completion token (reinforce_pp)
    metrics: dict[str, float]  # the update's (train/, policy/, rollout/staleness)
    advantage_metrics: dict[str, float]
    staleness: np.ndarray  # per sample: versions between its weights and the update's


class RLSteps:
    def __init__(self, runner):
        self.r = runner  # the phase runner: cfg, phase, group, pool, engines, dir, ctx
        self.policies: dict[str, PolicyState] = {}
        self.pending: dict[int, SampledBatch] = {}  # step -> its batch, sampled ahead
        self.pushes = 0  # weight pushes so far (the sync probe runs every few)
        self.probe_diff = float("nan")  # the probe's figure this step (NaN: none ran)
        self.restore({}, 0, None)

    # -- policy state ------------------------------------------------------------

    def restore(self, saved: dict, step: int, upcoming: SampledBatch | None) -> None:
        """Every policy's state from a checkpoint's (``saved``, at ``step``; {}: fresh),
        and the batch sampled ahead for ``step`` if the checkpoint kept one."""
        a, base = self.r.cfg.algorithm, self.r.base_version
        adapters = self.r.spec.policies or (None,)
        self.policies = {}
        for adapter in adapters:
            key = adapter or self.r.phase.role
            state = PolicyState(adapter, make_estimator(a), make_kl_controller(a), base + step)
            kept = saved.get("policies", {}).get(key, {})
            state.estimator.load_state_dict(kept.get("estimator", {}))
            state.kl.load_state_dict(kept.get("kl", state.kl.state_dict()))
            state.version = kept.get("version", state.version)
            self.policies[key] = state
        self.pending = {step: upcoming} if upcoming is not None else {}

    def upcoming(self, step: int) -> SampledBatch | None:
        """The batch already sampled for step ``step`` (run.overlap), for the checkpoint."""
        return self.pending.get(step)

    def state(self) -> dict:
        """What a checkpoint keeps beside the trainer."""
        return {"policies": {k: p.state_dict() for k, p in self.policies.items()}}

    @property
    def version(self) -> int:
        """The weight version of the phase's main policy (the first, or the only one)."""
        return next(iter(self.policies.values())).version

    def policy(self, adapter: str | None) -> PolicyState:
        return self.policies[adapter or self.r.phase.role]

    def sync(self, resumed: bool, rollback: bool) -> None:
        """Bring the engines to the policies' weights after a resume (or a rollback: the
        engines may serve newer weights than the checkpoint)."""
        if not self.r.cfg.run.sync_weights:
            return
        if self.r.spec.policies:  # every adapter, at its version (fresh ones: the base's)
            for p in self.policies.values():
                self.push(p, p.version, rollback=True)
        elif resumed or rollback:
            self.push(self.policy(None), self.version, rollback=rollback)

    @property
    def transfer(self) -> bool:
        """Full weights go from the trainer's rank 0 to the engines' workers over vLLM's
        weight-transfer protocol (actors/weight_push.py), except where the engines may
        need them while the trainer updates (``run.overlap``: a restarted engine could
        not be brought back to the weights it served) or share the trainer's devices
        (colocated; NCCL does not connect two processes on one GPU): there the object
        store carries them, on every host alike."""
        r = self.r
        return not r.cfg.run.overlap and r.phase.role not in r.placement.layout.colocate

    def push(self, policy: PolicyState, version: int, rollback: bool = False) -> None:
        """One policy's new weights to the engines: its adapter, or the full weights (with
        LoRA: the role's adapter, which the pool then serves to every request)."""
        r = self.r
        dtype = r.pool.spec.dtype  # what leaves the trainer: the engines' dtype
        if policy.adapter is not None:
            r.pool.load_adapter(policy.adapter, r.group.adapter(policy.adapter, dtype), version)
            policy.version = version
            r.engines.served(r.phase.role, f"{r.dir}@" + ",".join(
                f"{k}:{p.version}" for k, p in sorted(self.policies.items())))
            self.verify(policy.adapter)
            return
        if r.cfg.trainer.lora.enabled:
            r.pool.load_adapter(r.phase.role, r.group.adapter(dtype=dtype), version)
            r.pool.default_adapter = r.phase.role
        elif self.transfer:
            r.pool.push_from(r.group, version, bucket_bytes=r.cfg.generator.bucket_mb << 20,
                             rollback=rollback)
        else:
            refs = r.group.weight_buckets(r.cfg.generator.bucket_mb << 20, dtype)
            r.pool.update_weights(refs, version, rollback=rollback)
        policy.version = version
        r.engines.served(r.phase.role, f"{r.dir}@{version}")
        self.verify(None)

    def verify(self, adapter: str | None) -> None:
        """After every ``generator.sync_check_every``-th push: the sync probe on the next
        engine in turn (actors/weight_push.py, ``check``). A mismatch restarts the engine
        (it reloads what the pool serves); a second one fails the step, naming it."""
        from actors.weight_push import SyncMismatch, check

        r, every = self.r, self.r.cfg.generator.sync_check_every
        self.pushes += 1
        if not every or self.pushes % every:
            return
        engine = (self.pushes // every - 1) % len(r.pool)
        tol = r.cfg.generator.sync_check_tol
        try:
            self.probe_diff = check(r.pool, r.group, engine, tol, adapter)
        except SyncMismatch as err:
            logger.warning("%s: restarting it", err)
            r.pool.restart(engine, err)
            self.probe_diff = check(r.pool, r.group, engine, tol, adapter)

    def finish(self) -> None:
        """After the export: what the role's engines serve now."""
        r = self.r
        if r.cfg.run.sync_weights and r.cfg.trainer.lora.enabled:
            # Its engines hold the base plus the adapters; the next user of the role
            # starts fresh ones from the merged hf/ export (an adapter on top of
            # merged weights would count twice).
            r.engines.stop(r.phase.role)
        elif r.cfg.run.sync_weights and self.version == r.base_version + r.phase.steps:
            r.engines.served(r.phase.role, str(r.dirs.hf()), saved=True)

    # -- the step ----------------------------------------------------------------

    def step(self, step: int) -> dict:
        """One generation step and the updates of every policy it sampled for.

        With ``run.overlap`` the batch was sampled during the previous step (or, on the
        first step and after a resume without one saved, now), and the engines sample
        the next step's batch with the same weights while the trainer updates."""
        r, timer = self.r, Timer()
        inside = set()  # timers inside this step's wall time, for timing/overhead
        self.probe_diff = float("nan")
        with timer("step"):
            batch = self.pending.pop(step, None)
            if batch is None:
                batch = self.sample(step)
                inside.update(batch.seconds)
            trained = self._train_all(batch.rollouts, step, timer, inside)
            if r.cfg.run.sync_weights:
                with timer("weight_sync"):
                    for rollout in batch.rollouts:
                        policy = self.policy(rollout.policy)
                        self.push(policy, policy.version + 1)
            with timer("save"):
                write_rollouts(r.dirs.rollouts(step + 1), step + 1,
                               batch.rollouts, trained, with_policy=bool(r.spec.policies))
            inside.update(("overlap", "sleep", "wake", "weight_sync", "save"))
        return self._metrics(batch, trained, timer, inside)

    def _train_all(self, rollouts, step: int, timer: Timer, inside: set) -> list:
        """Every policy's update on its rollout; engines colocated with the trainer ranks
        sleep through it; with ``run.overlap`` the next batch is sampled meanwhile."""
        r = self.r
        asleep = r.phase.role in r.placement.layout.colocate
        if asleep:
            with timer("sleep"):
                r.pool.sleep(sleep_level(r.cfg))
        try:
            if r.cfg.run.overlap and step + 1 < r.phase.steps:
                train_timer = Timer()
                with timer("overlap"):
                    trained, self.pending[step + 1] = self._overlapped(rollouts, step,
                                                                       train_timer)
                timer.seconds.update(train_timer.seconds)
            else:
                trained = [self.train(rollout, step, timer) for rollout in rollouts]
                inside.update(k for k in timer.seconds if k != "step")
            if asleep:  # the engines wake into the memory the ranks cached in the update
                r.group.release_memory()
        finally:
            if asleep:
                with timer("wake"):
                    r.pool.wake_up()
        return trained

    def _metrics(self, batch: SampledBatch, trained: list[TrainedRollout], timer: Timer,
                 inside: set) -> dict:
        r = self.r
        metrics = {}
        for rollout, t in zip(batch.rollouts, trained):
            prefix = f"{rollout.policy}/" if rollout.policy else ""
            metrics.update({prefix + k: v for k, v in self.rollout_metrics(rollout, t).items()})
        sampled = sum(len(c.token_ids) for ro in batch.rollouts for g in ro.completions
                      for c in g)
        seconds = {**batch.seconds, **timer.seconds}
        generate = seconds.get("generate", seconds.get("rollout", 0.0))
        metrics.update({
            # answer checks cut by their time limit or the step's budget (counted wrong)
            "reward/timeouts": batch.timeouts,
            "reward/answers_too_long": batch.too_long,
            # requests vLLM refused (too long, too many images, bad image): dropped, logged
            "rollout/refused": batch.refused,
            "rollout/engine_restarts": float(r.pool.restarts),
            # mean |engine - trainer| log-prob of the sync probe after this step's push
            # (generator.sync_check_every; NaN in steps without one)
            "sync/probe_logprob_diff": self.probe_diff,
            "train/group_restarts": float(r.group_restarts),
            **r.data_metrics,
            "perf/tokens_per_s": sampled / max(generate, 1e-9),
            **{f"timing/{k}": v for k, v in seconds.items()},
            "timing/overhead": timer.seconds["step"] - sum(
                v for k, v in seconds.items() if k in inside),
        })
        return metrics

    def sample(self, step: int) -> SampledBatch:
        """The step's requests, sampled by the engines with the weights they serve now and
        scored by the recipe."""
        r, timer = self.r, Timer()
        rng = step_rng(r.seed_path, step)
        if r.spec.policies:  # several policies: the recipe samples and scores for each
            with timer("rollout"), grading_budget(r.cfg.algorithm.reward_budget_s) as graded:
                rollouts = list(r.phase.rollout(step, rng, r.ctx))
        else:
            requests = r.phase.requests(step, rng)
            with timer("generate"):
                completions = r.pool.generate(requests)
            with timer("reward"), grading_budget(r.cfg.algorithm.reward_budget_s) as graded:
                scores = r.phase.score(requests, completions, r.ctx)
            rollouts = [Rollout(None, requests, completions, scores,
                                mini_batches=r.spec.mini_batches)]
        reasons = [why for ro in rollouts for why in ro.refused()]
        if reasons:
            rollouts = [a for a in (ro.answered() for ro in rollouts) if a.requests]
            if not rollouts:
                raise RuntimeError(f"{r.phase.name} step {step}: the engines refused every "
                                   f"request ({len(reasons)}), e.g. {reasons[0]}")
        return SampledBatch(
            rollouts, timer.seconds, refused=float(len(reasons)),
            timeouts=float(graded["symbolic_timeouts"] + graded["symbolic_over_budget"]),
            too_long=float(graded["too_long"]))

    def _overlapped(self, rollouts, step: int, timer: Timer) -> tuple[list, SampledBatch]:
        """The updates on this step's batch (in a thread: the trainer's calls wait on Ray)
        while this thread samples and scores the next step's batch with the engines'
        current weights (scoring may need the main thread: answer checks set alarms)."""
        with ThreadPoolExecutor(1, thread_name_prefix="coevolve-update") as worker:
            future = worker.submit(lambda: [self.train(ro, step, timer) for ro in rollouts])
            try:
                upcoming = self.sample(step + 1)
            finally:
                trained = future.result()  # the update's error first: it is the step's
        return trained, upcoming

    # -- one policy's update -----------------------------------------------------

    def train(self, rollout: Rollout, step: int, timer: Timer) -> TrainedRollout:
        """Behaviour (and reference) log-probs, advantages and the updates of one policy."""
        r, policy = self.r, self.policy(rollout.policy)
        adapter = policy.adapter
        batch, rewards = train_batch(rollout.requests, rollout.completions,
                                     rollout.scores.rewards)
        source = self.behaviour_source(policy, rollout.mini_batches)
        engine = [np.asarray(c.logprobs, dtype=np.float32)
                  for group in rollout.completions for c in group]
        if source != "trainer" or r.cfg.algorithm.tis_cap > 0:
            batch = batch.with_column(engine_logprobs=engine)
        with timer("logprobs"):
            # the behaviour policy's log-probs, before the first update: a trainer pass, the
            # engines' own, or none (one update: its own forward is the behaviour policy)
            if source == "trainer":
                batch = batch.with_column(old_logprobs=r.group.compute_logprobs(
                    batch, adapter=adapter))
            elif source == "engine":
                batch = batch.with_column(old_logprobs=engine)
            if needs_reference(r.cfg.algorithm):
                batch = batch.with_column(ref_logprobs=r.group.compute_logprobs(
                    batch, reference=True, adapter=adapter))
        advantages, adv_metrics = policy.estimator.advantages(rewards, batch.prompt_index,
                                                              batch)
        batch = batch.with_column(advantages=advantages)
        with timer("update"):
            trained_from = policy.version
            train = self.update(batch, step, policy, rollout.mini_batches)
        train["train/behaviour_pass"] = float(source == "trainer")
        # weight versions between the engines' weights and the ones the update started from
        staleness = np.array([trained_from - c.version for g in rollout.completions for c in g])
        train["rollout/staleness"] = float(staleness.mean()) if staleness.size else 0.0
        train["rollout/staleness_max"] = float(staleness.max()) if staleness.size else 0.0
        return TrainedRollout(batch, rewards, advantages, train, adv_metrics, staleness)

    def behaviour_source(self, policy: PolicyState, mini_batches: int | None) -> str:
        """``algorithm.behaviour_logprobs``, with auto resolved: "update" (no pass) when
        the batch gets one update whose forward runs exactly the sampling weights: the
        estimator needs no log-probs of its own and no dropout (LoRA's) perturbs it."""
        a, lora = self.r.cfg.algorithm, self.r.cfg.trainer.lora
        if a.behaviour_logprobs != "auto":
            return a.behaviour_logprobs
        if self.r.cfg.run.overlap:  # sampled one step earlier: the engines' weights
            return "engine"
        updates = (mini_batches or a.mini_batches) * a.epochs
        needs = policy.estimator.needs_reference  # reinforce_pp's KL reward
        dropout = lora.enabled and lora.dropout > 0
        return "update" if updates == 1 and not needs and not dropout else "trainer"

    def update(self, batch: TrainBatch, step: int, policy: PolicyState,
               mini_batches: int | None = None) -> dict:
        """``algorithm.epochs`` passes over the batch in ``mini_batches`` PPO updates each
        (whole prompt groups per mini-batch; the first pass in the batch's order, later
        ones shuffled from the step's seed); one optimizer step per mini-batch. The
        metrics are the updates' means (``train/updates`` counts them)."""
        a, group = self.r.cfg.algorithm, self.r.group
        mini_batches = mini_batches or a.mini_batches
        prompts = np.unique(batch.prompt_index)
        if len(prompts) < mini_batches:
            raise ValueError(f"{mini_batches} mini-batches need as many prompts per step "
                             f"(algorithm.mini_batches), this step has {len(prompts)}")
        parts = []
        for epoch in range(a.epochs):
            # the first pass in the batch's own order (EvoLMM: one sample after another),
            # later passes in an order drawn from the step's seed
            order = prompts if epoch == 0 else np.random.default_rng(
                [*self.r.seed_path, step, epoch]).permutation(prompts)
            for chunk in np.array_split(order, mini_batches):
                part = batch if mini_batches == 1 else \
                    batch.select(np.flatnonzero(np.isin(batch.prompt_index, chunk)))
                metrics = group.forward_backward(part, kl_coef=policy.kl.beta,
                                                 adapter=policy.adapter)
                metrics.update(group.optim_step(policy.adapter))
                metrics["train/kl_coef"] = policy.kl.beta
                if "policy/kl" in metrics:  # the KL control moves after every optimizer step
                    policy.kl.update(metrics["policy/kl"])
                parts.append(metrics)
        merged = {k: float(np.mean([m[k] for m in parts if k in m])) for k in parts[-1]}
        if "policy/engine_logprob_diff" in parts[0]:  # before any optimizer step of the step
            merged["policy/engine_logprob_diff"] = parts[0]["policy/engine_logprob_diff"]
        merged["train/step"] = parts[-1]["train/step"]
        merged["train/updates"] = float(len(parts))
        return merged

    def rollout_metrics(self, rollout: Rollout, t: TrainedRollout) -> dict:
        tokens = [len(c.token_ids) for group in rollout.completions for c in group]
        return {
            **{k if "/" in k else f"train/{k}": v for k, v in t.metrics.items()},
            **{f"reward/{k}": v for k, v in rollout.scores.metrics.items()},
            **t.advantage_metrics,
            "reward/mean": float(np.mean(t.rewards)), "reward/std": float(np.std(t.rewards)),
            "rollout/response_tokens": float(np.mean(tokens)),
            "rollout/truncated": float(np.mean([c.finish_reason == "length"
                                                for group in rollout.completions
                                                for c in group])),
            "rollout/version": float(self.policy(rollout.policy).version),
            # engine vs trainer log-probs of the sampled tokens: ~1e-6 in fp32 when the
            # engines serve the trainer's weights (or adapter), far more when they do not;
            # without a trainer pass, measured in the first update's forward
            "rollout/logprob_diff": logprob_diff(rollout.completions, t.batch.old_logprobs)
            if t.metrics.get("train/behaviour_pass") else
            t.metrics.get("policy/engine_logprob_diff", float("nan")),
        }


def train_batch(requests, completions, rewards) -> tuple[TrainBatch, np.ndarray]:
    """The step's samples as a TrainBatch (no advantages yet) and their rewards."""
    flat, ids, prompt_lens, prompt_index = [], [], [], []
    for p, (samples, r) in enumerate(zip(completions, rewards)):
        if len(samples) != len(r):
            raise ValueError(f"the recipe scored {len(r)} of {len(samples)} samples of "
                             f"request {p}")
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


def logprob_diff(completions, old_logprobs) -> float:
    """Mean |engine - trainer| log-prob over every sampled token of the step."""
    engine = [np.asarray(c.logprobs, dtype=np.float64) for group in completions for c in group]
    diffs = [np.abs(e - np.asarray(t, dtype=np.float64)) for e, t in zip(engine, old_logprobs)
             if len(e) and len(e) == len(t)]
    return float(np.mean(np.concatenate(diffs))) if diffs else 0.0


def step_rng(seed_path: tuple[int, ...], step: int) -> np.random.Generator:
    """The step's requests and sampling seeds: a pure function of (run.seed, iteration,
    phase, step), so a resumed run takes the same steps as an uninterrupted one."""
    return np.random.default_rng([*seed_path, step])
