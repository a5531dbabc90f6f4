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
import os
import shutil
from pathlib import Path

import numpy as np

from actors.batching import TrainBatch
from actors.objectives import ObjectiveSpec
from actors.trainer import LoraSpec, TrainerGroup, TrainerGroupFailed, TrainerSpec
from pipelines.algorithms.estimators import make_estimator, make_kl_controller
from pipelines.algorithms.grading import budget as grading_budget
from pipelines.algorithms.grading import grading_stats
from pipelines.runtime.metrics import MetricsSink, Timer
from pipelines.runtime.rundir import latest_checkpoint, prune_checkpoints

logger = logging.getLogger(__name__)


class PhaseRunner:
    """Runs one phase; also the ``ctx`` a recipe's hooks get (``pool``, ``dir``, ...)."""

    def __init__(self, cfg, phase, phase_dir: Path, *, run_dir: Path, seed_path: tuple[int, ...],
                 engines, placement, weights, base_version: int = 0):
        self.cfg, self.phase, self.dir = cfg, phase, Path(phase_dir)
        self.run_dir, self.seed_path = run_dir, seed_path
        self.engines, self.placement, self.weights = engines, placement, weights
        self.start_weights = weights(phase.role)
        self.base_version = base_version  # the role's version before this phase
        self.version = base_version
        self.group_restarts = 0
        self.data_metrics: dict[str, float] = {}
        self.group = None
        self.pool = None

    @property
    def iteration(self) -> int:
        return self.seed_path[1]

    @property
    def is_sft(self) -> bool:
        """The phase trains on a data set with the SFT objective (pipelines/runtime/sft.py)."""
        return getattr(self.phase, "objective", "rl") == "sft"

    @property
    def needs_reference(self) -> bool:
        """The step needs the reference policy's log-probs (a KL loss or a KL reward)."""
        return needs_reference(self.cfg.algorithm)

    def other_pool(self, role: str):
        """The engines of ``role`` (its newest weights) for scoring or data making."""
        if role == self.phase.role:
            return self.pool
        return self.engines.pool(role, self.weights(role), self.placement)

    def __enter__(self) -> PhaseRunner:
        self.dir.mkdir(parents=True, exist_ok=True)
        timer = Timer()
        with timer("engines"):
            if not self.is_sft:  # an SFT phase samples nothing
                self.pool = self.engines.pool(self.phase.role, self.start_weights, self.placement)
            for role in getattr(self.phase, "uses", ()):  # judges: started here, not in a step
                self.other_pool(role)
        prepare = getattr(self.phase, "prepare", None)
        if prepare is not None:
            with timer("prepare"):
                self.data_metrics = {f"data/{k}": v for k, v in (prepare(self) or {}).items()}
        self.data_metrics.update({f"phase/{k}_seconds": v for k, v in timer.seconds.items()})
        if self.phase.steps > 0:
            self.group = self._start_group()
        return self

    def make_data(self) -> None:
        """Only the phase's data (``prepare``), under this runner's placement, which must
        serve the phase's ``data_roles``; no trainer group is started."""
        self.dir.mkdir(parents=True, exist_ok=True)
        if self.phase.role in getattr(self.phase, "data_roles", ()):
            self.pool = self.engines.pool(self.phase.role, self.start_weights, self.placement)
        self.phase.prepare(self)

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
                        sink.log(step + 1, metrics)
                        step += 1
                        if on_step is not None:
                            on_step(step)
                    timer = Timer()
                    with timer("export"):
                        self.group.export_hf(str(self.dir / "hf"))
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
            elif self.cfg.run.sync_weights and \
                    self.version == self.base_version + self.phase.steps:
                if self.cfg.trainer.lora.enabled:
                    # Its engines hold the base plus the adapter; the next user of the role
                    # starts fresh ones from the merged hf/ export (an adapter on top of
                    # merged weights would count twice).
                    self.engines.stop(self.phase.role)
                else:
                    self.engines.served(self.phase.role, str(self.dir / "hf"), saved=True)
            sink.log(self.phase.steps, {"timing/export": timer.seconds["export"]})
        finally:
            sink.close()

    def step(self, step: int) -> dict:
        if self.is_sft:
            return self.sft_step(step)
        timer = Timer()
        with timer("step"):
            requests = self.phase.requests(step, step_rng(self.seed_path, step))
            with timer("generate"):
                completions = self.pool.generate(requests)
            with timer("reward"):
                before = grading_stats()
                with grading_budget(self.cfg.algorithm.reward_budget_s):
                    scores = self.phase.score(requests, completions, self)
                after = grading_stats()
            batch, rewards = self._batch(requests, completions, scores.rewards)
            # Engines colocated with the trainer ranks free their devices for the update.
            asleep = self.phase.role in self.placement.layout.colocate
            if asleep:
                with timer("sleep"):
                    self.pool.sleep()
            try:
                with timer("logprobs"):
                    # the behaviour policy's log-probs, once, before the first update
                    batch = batch.with_column(old_logprobs=self.group.compute_logprobs(batch))
                    if self.needs_reference:
                        batch = batch.with_column(
                            ref_logprobs=self.group.compute_logprobs(batch, reference=True))
                advantages, adv_metrics = self.estimator.advantages(
                    rewards, batch.prompt_index, batch)
                batch = batch.with_column(advantages=advantages)
                with timer("update"):
                    train = self._update(batch, step)
            finally:
                if asleep:
                    with timer("wake"):
                        self.pool.wake_up()
            train["train/kl_coef"] = self.kl.beta
            if "policy/kl" in train:
                self.kl.update(train["policy/kl"])
            if self.cfg.run.sync_weights:
                with timer("weight_sync"):
                    self._push_weights(self.base_version + step + 1)
            with timer("save"):
                self._write_rollouts(step, requests, completions, rewards, advantages,
                                     scores.columns)
                if (step + 1) % self.cfg.run.save_every == 0 or step + 1 == self.phase.steps:
                    self.group.save(str(self.dir / "ckpt" / f"step_{step + 1:06d}"),
                                    self._state())
                    prune_checkpoints(self.dir / "ckpt", self.cfg.run.keep_checkpoints)
        tokens = [len(c.token_ids) for group in completions for c in group]
        metrics = {
            **{k if "/" in k else f"train/{k}": v for k, v in train.items()},
            **{f"reward/{k}": v for k, v in scores.metrics.items()},
            **adv_metrics,
            "reward/mean": float(np.mean(rewards)), "reward/std": float(np.std(rewards)),
            # answer checks cut by their time limit or the step's budget (counted wrong)
            "reward/timeouts": float(sum(after[k] - before[k] for k in
                                         ("symbolic_timeouts", "symbolic_over_budget"))),
            "reward/answers_too_long": float(after["too_long"] - before["too_long"]),
            "rollout/response_tokens": float(np.mean(tokens)),
            "rollout/truncated": float(np.mean([c.finish_reason == "length"
                                                for group in completions for c in group])),
            "rollout/version": float(self.version),
            "rollout/engine_restarts": float(self.pool.restarts),
            # engine vs trainer log-probs of the sampled tokens: ~1e-6 in fp32 when the
            # engines serve the trainer's weights (or adapter), far more when they do not
            "rollout/logprob_diff": _logprob_diff(completions, batch.old_logprobs),
            "train/group_restarts": float(self.group_restarts),
            **self.data_metrics,
            "perf/tokens_per_s": sum(tokens) / max(timer.seconds["generate"], 1e-9),
            **{f"timing/{k}": v for k, v in timer.seconds.items()},
            "timing/overhead": timer.seconds["step"] - sum(
                v for k, v in timer.seconds.items() if k != "step"),
        }
        return metrics

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
        threads = max(1, int(kwargs["cpus_per_rank"]))
        return TrainerGroup(trainer_spec(cfg, self.start_weights, self.phase.steps, sft=self.is_sft),
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
        self.estimator = make_estimator(self.cfg.algorithm)
        self.kl = make_kl_controller(self.cfg.algorithm)
        if found is not None:
            step, path = found
            state = self.group.load(str(path)).get("state", {})
            self.estimator.load_state_dict(state.get("estimator", {}))
            self.kl.load_state_dict(state.get("kl", self.kl.state_dict()))
        if (found is not None or rollback) and self.cfg.run.sync_weights and not self.is_sft:
            self._push_weights(self.base_version + step, rollback=rollback)
        return step

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
        tmp = target.with_name(".hf.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(target, ignore_errors=True)

        def link(src, dst):
            try:
                os.link(src, dst)
            except OSError:
                shutil.copy2(src, dst)

        shutil.copytree(source, tmp, copy_function=link)
        tmp.replace(target)
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

    def _update(self, batch: TrainBatch, step: int) -> dict:
        """``algorithm.epochs`` passes over the batch in ``algorithm.mini_batches`` PPO
        updates each (whole prompt groups per mini-batch, in an order drawn from the
        step's seed per epoch); one optimizer step per mini-batch. The metrics are the
        updates' means (``train/updates`` counts them)."""
        a = self.cfg.algorithm
        if a.mini_batches == 1 and a.epochs == 1:
            train = self.group.forward_backward(batch, kl_coef=self.kl.beta)
            train.update(self.group.optim_step())
            return {**train, "train/updates": 1.0}
        prompts = np.unique(batch.prompt_index)
        if len(prompts) < a.mini_batches:
            raise ValueError(f"algorithm.mini_batches: {a.mini_batches} mini-batches need as "
                             f"many prompts per step, this step has {len(prompts)}")
        parts = []
        for epoch in range(a.epochs):
            order = np.random.default_rng([*self.seed_path, step, 1 + epoch]).permutation(prompts)
            for chunk in np.array_split(order, a.mini_batches):
                rows = np.flatnonzero(np.isin(batch.prompt_index, chunk))
                metrics = self.group.forward_backward(batch.select(rows), kl_coef=self.kl.beta)
                metrics.update(self.group.optim_step())
                parts.append(metrics)
        merged = {k: float(np.mean([m[k] for m in parts if k in m])) for k in parts[-1]}
        merged["train/step"] = parts[-1]["train/step"]
        merged["train/updates"] = float(len(parts))
        return merged

    def _state(self) -> dict:
        """What a checkpoint keeps beside the trainer: baselines and the KL coefficient."""
        return {"estimator": self.estimator.state_dict(), "kl": self.kl.state_dict()}

    def _write_rollouts(self, step, requests, completions, rewards, advantages,
                        columns: dict) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        rows = [(p, s, c) for p, group in enumerate(completions) for s, c in enumerate(group)]
        table = pa.table({
            "step": [step + 1] * len(rows),
            "prompt_index": [p for p, _, _ in rows],
            "sample_index": [s for _, s, _ in rows],
            "prompt": [_prompt_text(requests[p]) for p, _, _ in rows],
            "response": [c.text for _, _, c in rows],
            "response_tokens": [len(c.token_ids) for _, _, c in rows],
            "finish_reason": [c.finish_reason for _, _, c in rows],
            "version": [c.version for _, _, c in rows],
            "reward": rewards.tolist(),
            # per sample, or per completion token (reinforce_pp)
            "advantage": [a.tolist() if isinstance(a, np.ndarray) else float(a)
                          for a in advantages],
            **{name: [values[p][s] for p, s, _ in rows] for name, values in columns.items()},
        })
        path = self.dir / f"rollouts-{step + 1:06d}.parquet"
        tmp = path.with_name(f".{path.name}.tmp")
        pq.write_table(table, tmp)
        tmp.replace(path)


def trainer_spec(cfg, start_weights: str, steps: int, sft: bool = False) -> TrainerSpec:
    """How the config builds the trainer group of a phase of ``steps`` optimizer steps
    that starts from ``start_weights`` (no actor started); ``sft``: the SFT objective."""
    t, a = cfg.trainer, cfg.algorithm
    lora = t.lora
    if not sft:
        steps *= a.mini_batches * a.epochs  # optimizer steps: the schedule's length
    return TrainerSpec(
        model=start_weights,
        objective=ObjectiveSpec(policy_loss=a.loss, clip_low=a.clip_low, clip_high=a.clip_high,
                                dual_clip=a.dual_clip or None, loss_agg=a.loss_agg,
                                kl_coef=a.kl_coef, kl_estimator=a.kl_estimator,
                                entropy_coef=a.entropy_coef),
        lr=t.lr, weight_decay=t.weight_decay, betas=tuple(t.betas), grad_clip=t.grad_clip,
        schedule=t.schedule, warmup_steps=int(round(t.warmup_ratio * steps)),
        total_steps=steps, micro_batch_tokens=t.micro_batch_tokens,
        gradient_checkpointing=t.gradient_checkpointing, freeze_vision=t.freeze_vision,
        freeze_projector=t.freeze_projector,
        logprob_chunk_tokens=t.logprob_chunk_tokens, reference_dtype=t.reference_dtype,
        offload=t.offload, max_pixels=cfg.model.max_pixels,
        mixed_precision={"auto": None, "bfloat16": True, "float32": False}[cfg.model.dtype],
        lora=LoraSpec(lora.rank, lora.alpha, lora.dropout, list(lora.target_modules))
        if lora.enabled else None,
        reference=needs_reference(a) and not sft, sft=sft, seed=cfg.run.seed,
        threads=max(1, cfg.placement.cpus_per_rank))


def needs_reference(algorithm) -> bool:
    """A KL loss (fixed or adaptive coefficient) or reinforce_pp's KL reward."""
    return algorithm.kl_coef > 0 or (algorithm.advantage == "reinforce_pp"
                                     and algorithm.kl_in_reward > 0)


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
