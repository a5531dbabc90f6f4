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
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

from actors.batching import TrainBatch
from actors.generator import EngineSpec
from actors.objectives import ObjectiveSpec
from actors.trainer import LoraSpec, TrainerGroup, TrainerSpec
from pipelines.advantages import grpo_advantages
from pipelines.driver import Timer, atomic_write, latest_checkpoint, prune_checkpoints, step_rng
from pipelines.metrics import MetricsSink


class PhaseRunner:
    def __init__(self, cfg, phase, phase_dir: Path, start_weights: str, run_dir: Path,
                 seed_path: tuple[int, ...]):
        self.cfg, self.phase, self.dir = cfg, phase, Path(phase_dir)
        self.start_weights, self.run_dir, self.seed_path = start_weights, run_dir, seed_path
        self.version = 0
        self.group = None
        self.pool = None

    def __enter__(self) -> "PhaseRunner":
        from actors.pool import GeneratorPool

        cfg = self.cfg
        self.dir.mkdir(parents=True, exist_ok=True)
        run = cfg.run.name
        self.group = TrainerGroup(
            self._trainer_spec(), cfg.placement.trainer_ranks, name=f"coevolve/{run}/trainer",
            cpus_per_rank=cfg.placement.cpus_per_rank, gpus_per_rank=cfg.placement.gpus_per_rank,
            runtime_env={"env_vars": {"OMP_NUM_THREADS": str(max(1, cfg.placement.cpus_per_rank))}})
        layout = cfg.placement.roles.get(self.phase.role)
        if layout is None:
            raise ValueError(f"placement.roles has no layout for role {self.phase.role!r}; "
                             f"add placement.roles.{self.phase.role}.engines=1")
        resources = ({"num_gpus": layout.gpus_per_engine} if layout.gpus_per_engine
                     else {"num_cpus": max(1, layout.cpus_per_engine)})
        self.pool = GeneratorPool(self.phase.role, self._engine_spec(layout), layout.engines,
                                  resources=resources, run=run)
        return self

    def __exit__(self, *exc) -> None:
        if self.pool is not None:
            self.pool.shutdown()
        if self.group is not None:
            self.group.shutdown()

    # -- the loop --------------------------------------------------------------

    def run(self, on_step=None) -> None:
        start = self._resume()
        sink = MetricsSink(self.dir / "metrics.jsonl", self.cfg, phase=self.phase.name,
                           truncate_after=start, total_steps=self.phase.steps)
        try:
            for step in range(start, self.phase.steps):
                metrics = self.step(step)
                sink.log(step + 1, metrics)
                if on_step is not None:
                    on_step(step + 1)
            timer = Timer()
            with timer("export"):
                self.group.export_hf(str(self.dir / "hf"))
            sink.log(self.phase.steps, {"timing/export": timer.seconds["export"]})
        finally:
            sink.close()

    def step(self, step: int) -> dict:
        timer = Timer()
        with timer("step"):
            requests = self.phase.requests(step, step_rng(self.seed_path, step))
            with timer("generate"):
                completions = self.pool.generate(requests)
            with timer("reward"):
                scores = self.phase.score(requests, completions, self)
            batch, rewards, advantages = self._batch(requests, completions, scores.rewards)
            with timer("logprobs"):
                batch = batch.with_column(old_logprobs=self.group.compute_logprobs(batch))
                if self.cfg.algorithm.kl_coef > 0:
                    batch = batch.with_column(
                        ref_logprobs=self.group.compute_logprobs(batch, reference=True))
            with timer("update"):
                train = self.group.forward_backward(batch)
                train.update(self.group.optim_step())
            if self.cfg.run.sync_weights:
                with timer("weight_sync"):
                    refs = self.group.weight_buckets(self.cfg.generator.bucket_mb << 20)
                    self.pool.update_weights(refs, step + 1)
                    self.version = step + 1
            with timer("save"):
                self._write_rollouts(step, requests, completions, rewards, advantages)
                if (step + 1) % self.cfg.run.save_every == 0 or step + 1 == self.phase.steps:
                    self.group.save(str(self.dir / "ckpt" / f"step_{step + 1:06d}"))
                    prune_checkpoints(self.dir / "ckpt", self.cfg.run.keep_checkpoints)
        tokens = [len(c.token_ids) for group in completions for c in group]
        metrics = {
            **{k if "/" in k else f"train/{k}": v for k, v in train.items()},
            **{f"reward/{k}": v for k, v in scores.metrics.items()},
            "reward/mean": float(np.mean(rewards)), "reward/std": float(np.std(rewards)),
            "rollout/response_tokens": float(np.mean(tokens)),
            "rollout/truncated": float(np.mean([c.finish_reason == "length"
                                                for group in completions for c in group])),
            "rollout/version": float(self.version),
            "perf/tokens_per_s": sum(tokens) / max(timer.seconds["generate"], 1e-9),
            **{f"timing/{k}": v for k, v in timer.seconds.items()},
            "timing/overhead": timer.seconds["step"] - sum(
                v for k, v in timer.seconds.items() if k != "step"),
        }
        return metrics

    # -- pieces ------------------------------------------------------------------

    def _resume(self) -> int:
        found = latest_checkpoint(self.dir / "ckpt")
        if found is None:
            return 0
        step, path = found
        self.group.load(str(path))
        if self.cfg.run.sync_weights:
            self.pool.update_weights(self.group.weight_buckets(self.cfg.generator.bucket_mb << 20), step)
            self.version = step
        return step

    def _batch(self, requests, completions, rewards):
        flat, groups, ids, prompt_lens, prompt_index = [], [], [], [], []
        for p, (samples, r) in enumerate(zip(completions, rewards)):
            if len(samples) != len(r):
                raise ValueError(f"the recipe scored {len(r)} of {len(samples)} samples of request {p}")
            for c, value in zip(samples, r):
                if not math.isfinite(value):
                    raise ValueError(f"reward {value} for request {p} is not finite")
                flat.append(value)
                groups.append(p)
                ids.append(np.asarray(c.prompt_ids + c.token_ids, dtype=np.int64))
                prompt_lens.append(len(c.prompt_ids))
                prompt_index.append(p)
        adv, _ = grpo_advantages(torch.tensor(flat, dtype=torch.float64), groups)
        advantages = adv.float().numpy()
        batch = TrainBatch(ids, np.array(prompt_lens), np.array(prompt_index),
                           [list(r.images) for r in requests], advantages)
        return batch, np.array(flat), advantages

    def _write_rollouts(self, step, requests, completions, rewards, advantages) -> None:
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
            "advantage": advantages.tolist(),
        })
        path = self.dir / f"rollouts-{step + 1:06d}.parquet"
        tmp = path.with_name(f".{path.name}.tmp")
        pq.write_table(table, tmp)
        tmp.replace(path)

    def _trainer_spec(self) -> TrainerSpec:
        t, a = self.cfg.trainer, self.cfg.algorithm
        lora = t.lora
        return TrainerSpec(
            model=self.start_weights,
            objective=ObjectiveSpec(policy_loss=a.loss, clip_low=a.clip_low, clip_high=a.clip_high,
                                    dual_clip=a.dual_clip, loss_agg=a.loss_agg, kl_coef=a.kl_coef,
                                    kl_estimator=a.kl_estimator, entropy_coef=a.entropy_coef),
            lr=t.lr, weight_decay=t.weight_decay, betas=tuple(t.betas), grad_clip=t.grad_clip,
            schedule=t.schedule, warmup_steps=int(round(t.warmup_ratio * self.phase.steps)),
            total_steps=self.phase.steps, micro_batch_tokens=t.micro_batch_tokens,
            gradient_checkpointing=t.gradient_checkpointing, freeze_vision=t.freeze_vision,
            freeze_projector=t.freeze_projector,
            lora=LoraSpec(lora.rank, lora.alpha, lora.dropout, list(lora.target_modules))
            if lora.enabled else None,
            reference=a.kl_coef > 0, seed=self.cfg.run.seed,
            threads=max(1, self.cfg.placement.cpus_per_rank))

    def _engine_spec(self, layout) -> EngineSpec:
        g = self.cfg.generator
        dtype = self.cfg.model.dtype
        if dtype == "auto":
            dtype = "bfloat16" if torch.cuda.is_available() else "float32"
        return EngineSpec(model=self.start_weights, dtype=dtype, max_model_len=g.max_model_len,
                          max_num_batched_tokens=g.max_num_batched_tokens,
                          gpu_memory_utilization=g.gpu_memory_utilization,
                          cpu_kvcache_gib=g.cpu_kvcache_gib, tensor_parallel=layout.tensor_parallel,
                          enforce_eager=g.enforce_eager, seed=self.cfg.run.seed)


def _prompt_text(request) -> str:
    parts = request.messages[-1]["content"]
    if isinstance(parts, str):
        return parts
    return " ".join(p.get("text", "<image>") for p in parts)
