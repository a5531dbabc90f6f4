"""TrainerGroup: N ``TrainerActor`` ranks (actors/trainer.py) as Ray actors, in lock-step.

Every verb is called on all ranks (a batch is split into contiguous shards by
completion tokens); the first failure kills the whole group and raises
``TrainerGroupFailed``, so a phase rebuilds it from its last checkpoint instead
of waiting for a collective's timeout. A surviving rank's error about a lost
peer (``peer_failure``) is such a failure too, whichever report comes first, and
so is a call that no rank finished within ``call_timeout_s`` (a hung rank).
"""

from __future__ import annotations

import os
import time

import numpy as np

from actors.batching import TrainBatch
from actors.trainer import TrainerActor, TrainerSpec, merge_metrics

# A rank on a CPU host frees and allocates the same activation buffers (gigabytes at
# a time) in every forward and backward. glibc hands a freed block of 32 MiB or more
# back to the OS at once (munmap), so each reuse faults every page in again: 40% of
# a 256-token update on a 2-core VM (benchmarks/vs_trl.py). Heap-only allocation
# without trimming keeps freed memory for the next allocation; a rank's resident
# memory then stays at its peak until the group ends. A value the user set wins.
KEEP_FREED_MEMORY = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(1 << 40)}


def cpu_rank_env(runtime_env: dict | None) -> dict:
    """``runtime_env`` for a trainer rank on a CPU host: glibc keeps freed memory."""
    runtime_env = dict(runtime_env or {})
    env_vars = dict(runtime_env.get("env_vars", {}))
    for key, value in KEEP_FREED_MEMORY.items():
        env_vars.setdefault(key, os.environ.get(key, value))
    return {**runtime_env, "env_vars": env_vars}


class TrainerGroupFailed(RuntimeError):
    """A trainer rank died; the group has been killed and must be rebuilt."""


# How a surviving rank sees a peer that died or hung inside a collective (gloo's TCP
# pairs, NCCL's watchdog): its own error, which can reach the driver before Ray
# reports the dead rank.
_PEER_FAILURES = ("connection closed by peer", "connection reset by peer", "broken pipe",
                  "timed out", "communicator was aborted", "collective operation timeout")


def peer_failure(err: BaseException) -> bool:
    """Whether a rank's error is another rank's failure seen through a collective (a
    group failure, rebuilt from the last checkpoint) rather than an error of its own."""
    import torch.distributed as dist

    from ray.exceptions import RayTaskError

    cause = err.cause if isinstance(err, RayTaskError) and err.cause is not None else err
    text = str(cause).lower()
    return isinstance(cause, dist.DistError) or any(s in text for s in _PEER_FAILURES)


class TrainerGroup:
    """N TrainerActor ranks as Ray actors, driven in lock-step."""

    def __init__(self, spec: TrainerSpec, world_size: int, name: str = "coevolve/trainer",
                 cpus_per_rank: float = 1, gpus_per_rank: float = 0, placement_group=None,
                 runtime_env: dict | None = None, timeout_s: float = 600.0,
                 call_timeout_s: float = 3600.0):
        """``timeout_s``: the ranks' start and their collectives' timeout (a rank whose
        peer died fails after it); ``call_timeout_s``: the longest wait for one verb."""
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        self.spec, self.world_size = spec, world_size
        self.call_timeout_s = call_timeout_s
        if not gpus_per_rank:
            runtime_env = cpu_rank_env(runtime_env)
        cls = ray.remote(TrainerActor)
        self.actors = []
        for rank in range(world_size):
            options = dict(num_cpus=cpus_per_rank, num_gpus=gpus_per_rank, name=f"{name}/{rank}",
                           runtime_env=runtime_env)
            if placement_group is not None:
                options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                    placement_group, placement_group_bundle_index=rank)
            self.actors.append(cls.options(**options).remote(spec, rank, world_size))
        self._wait_scheduled(timeout_s, cpus_per_rank, gpus_per_rank)
        host, port = ray.get(self.actors[0].rendezvous_address.remote(), timeout=timeout_s)
        self.info = self._all("setup", host, port, timeout_s)

    def _wait_scheduled(self, timeout_s: float, cpus: float, gpus: float) -> None:
        """Fail with the numbers when a rank cannot be placed (instead of a rendezvous hang)."""
        import ray

        pings = [a.rendezvous_address.remote() for a in self.actors]
        ready, _ = ray.wait(pings, num_returns=len(pings), timeout=timeout_s)
        if len(ready) < len(pings):
            for actor in self.actors:
                ray.kill(actor)
            raise RuntimeError(
                f"only {len(ready)} of {self.world_size} trainer ranks started within {timeout_s:.0f} s; "
                f"each needs {cpus} CPU and {gpus} GPU; cluster has {ray.cluster_resources()}, "
                f"free {ray.available_resources()}")

    def _all(self, verb: str, *args, per_rank: list | None = None) -> list:
        """Call ``verb`` on every rank; the results in rank order.

        Fails fast: when one rank dies, the others would wait in a collective
        until gloo's/NCCL's timeout, so the whole group is killed and
        ``TrainerGroupFailed`` raised at once (the phase rebuilds the group
        from its last checkpoint). A rank that raises an error kills the group
        too, and the error is raised as it is.
        """
        import ray

        calls = [getattr(a, verb).remote(*(per_rank[r],) if per_rank else (), *args)
                 for r, a in enumerate(self.actors)]
        pending = list(calls)
        deadline = time.monotonic() + self.call_timeout_s
        while pending:
            done, pending = ray.wait(pending, num_returns=1,
                                     timeout=max(0.0, deadline - time.monotonic()))
            if not done:
                ranks = [calls.index(ref) for ref in pending]
                self.kill()
                raise TrainerGroupFailed(
                    f"trainer rank(s) {ranks} did not finish {verb} within "
                    f"{self.call_timeout_s:.0f} s (trainer.call_timeout_s)")
            try:
                ray.get(done[0])
            except ray.exceptions.RayActorError as err:
                rank = calls.index(done[0])
                self.kill()
                raise TrainerGroupFailed(f"trainer rank {rank} died during {verb}: {err}") from err
            except Exception as err:
                # A rank raised: the others may wait for it in a collective forever, so the
                # group is killed before the error is passed on (a later shutdown is a no-op).
                self.kill()
                if peer_failure(err):
                    rank = calls.index(done[0])
                    raise TrainerGroupFailed(
                        f"trainer rank {rank} lost a peer during {verb}: {err}") from err
                raise
        return ray.get(calls)

    def compute_logprobs(self, batch: TrainBatch, reference: bool = False,
                         adapter: str | None = None) -> list[np.ndarray]:
        from actors.batching import split_for_ranks

        shards = split_for_ranks(batch, self.world_size)
        parts = self._all("compute_logprobs", reference, adapter, per_rank=shards)
        return [row for part in parts for row in part]

    def forward_backward(self, batch: TrainBatch, micro_batch_tokens: int | None = None,
                         kl_coef: float | None = None, adapter: str | None = None) -> dict:
        from actors.batching import split_for_ranks
        from actors.objectives import micro_token_weights

        objective = self.spec.objective
        if objective.loss_agg == "micro-token-mean":  # runs of the global batch's order
            batch = batch.with_column(loss_weights=micro_token_weights(
                [len(ids) - p for ids, p in zip(batch.input_ids, batch.prompt_lens)],
                objective.loss_agg_seqs))
        results = self._all("forward_backward", micro_batch_tokens, kl_coef, adapter,
                            per_rank=split_for_ranks(batch, self.world_size))
        return merge_metrics(results)

    def optim_step(self, adapter: str | None = None) -> dict:
        return self._all("optim_step", adapter)[0]

    def weight_buckets(self, bucket_bytes: int = 256 << 20, dtype: str | None = None) -> list:
        """Rank 0's object refs of the weight buckets, cast to ``dtype`` (the engines')."""
        return self._all("weight_buckets", bucket_bytes, dtype)[0]

    def transfer_plan(self, bucket_bytes: int, dtype: str):
        """The ``weight_transfer.Plan`` of a push in ``dtype`` (rank 0's)."""
        import ray

        return ray.get(self.actors[0].transfer_plan.remote(bucket_bytes, dtype),
                       timeout=self.call_timeout_s)

    def transfer_endpoint(self, key: str) -> tuple[str, int]:
        """Where engine ``key``'s workers join rank 0 (``join_transfer`` at the same time)."""
        import ray

        return ray.get(self.actors[0].transfer_endpoint.remote(key), timeout=self.call_timeout_s)

    def join_transfer(self, key: str, world_size: int, backend: str, timeout_s: float):
        """Rank 0 opens the transfer group with engine ``key``: the ObjectRef to wait on."""
        return self.actors[0].join_transfer.remote(key, world_size, backend, timeout_s)

    def send_weights(self, keys: list[str], plan) -> dict:
        """Every rank gathers, rank 0 sends to the engines ``keys`` (which receive at the
        same time); rank 0's bytes, seconds and the keys whose sends failed."""
        return self._all("send_weights", keys, plan)[0]

    def adapter(self, name: str | None = None, dtype: str | None = None):
        """ObjectRef of the LoRA adapter payload in ``dtype`` (``TrainerActor.adapter``)."""
        return self._all("adapter", name, dtype)[0][0]

    def embed_mean(self, token_lists: list[list[int]]) -> np.ndarray:
        """``TrainerActor.embed_mean`` (rank 0's result)."""
        return self._all("embed_mean", token_lists)[0]

    def save(self, directory: str, state: dict | None = None) -> None:
        self._all("save", directory, state)

    def load(self, directory: str) -> dict:
        return self._all("load", directory)[0]

    def export_hf(self, directory: str, merged: bool = True, adapter: str | None = None) -> None:
        self._all("export_hf", directory, merged, adapter)

    def parameters(self) -> dict[str, np.ndarray]:
        return self._all("parameters_digest")[0]

    def gradients(self) -> dict[str, np.ndarray]:
        return self._all("gradients")[0]

    def discard_gradients(self) -> None:
        self._all("discard_gradients")

    def release_memory(self) -> None:
        """Every rank returns its cached device memory (before colocated engines wake)."""
        self._all("release_memory")

    def shutdown(self) -> None:
        try:
            self._all("shutdown")
        except TrainerGroupFailed:
            pass  # already killed
        finally:
            self.kill()

    def kill(self) -> None:
        """Kill every rank and wait until Ray reports them dead (names and bundles free)."""
        import ray

        from actors.pool import wait_dead

        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        for actor in self.actors:
            wait_dead(actor)
