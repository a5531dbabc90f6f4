"""Full-weight pushes from a trainer group to a pool's engines over vLLM's weight-transfer
protocol (actors/weight_transfer.py): no gather of the whole model on one host, no
object store, the engines' dtype on the wire.

``push(pool, trainer, version)``:

1. the plan (names, shapes, dtypes, buckets) from rank 0's shard metadata;
2. every engine not yet linked to this trainer group opens a process group with its
   rank 0 (one group per engine: 1 + tensor_parallel members; gloo on CPU hosts,
   NCCL on GPUs), kept for later pushes;
3. every engine receives (``GeneratorActor.receive_weights``: the plan checked
   against the model, vLLM's layerwise reload) while every trainer rank gathers
   bucket after bucket and rank 0 broadcasts them.

An engine whose receive fails, or does not finish within ``pool.sync_timeout_s``, is
restarted and then pushed to alone, before it serves again. The trainer never fails
because of an engine: rank 0 drops a failed engine from the push and keeps making
buckets, so its peers' gathers stay in step. The pool remembers the trainer group as
the source of its weights: an engine restarted later (a crash during ``generate``) is
brought to them the same way.
"""

from __future__ import annotations

import logging
from dataclasses import asdict

from actors.weight_transfer import init_info

logger = logging.getLogger(__name__)


def backend_of(pool) -> str:
    """gloo for CPU engines, nccl for GPU engines."""
    return "nccl" if pool.resources.get("num_gpus") else "gloo"


def push(pool, trainer, version: int, bucket_bytes: int, rollback: bool = False) -> list[dict]:
    """Push ``trainer``'s weights to every engine of ``pool`` as ``version``; each engine's
    metrics. Versions must increase, except with ``rollback`` (pool.update_weights)."""
    if version <= pool.version and not rollback:
        raise ValueError(f"weight versions must increase: {version} after {pool.version}")
    plan = trainer.transfer_plan(bucket_bytes, pool.spec.dtype)
    pool.source = (trainer, plan, version)
    pool._weights = None  # restarted engines now come from the trainer, not the object store
    metrics = send(pool, list(range(len(pool))))
    pool.version = version
    return metrics


def send(pool, engines: list[int]) -> list[dict]:
    """Bring ``engines`` of the pool to its source's weights (linking them first);
    engines that fail are restarted (which sends to them again)."""
    import ray

    from actors.sampling import EngineBroken

    trainer, plan, version = pool.source
    link(pool, trainer, engines)
    keys = [pool.name(i) for i in engines]
    receives = [pool.actors[i].receive_weights.remote(asdict(plan), version) for i in engines]
    sent = trainer.send_weights(keys, plan)
    ready, _ = ray.wait(receives, num_returns=len(receives), timeout=pool.sync_timeout_s)
    results: list[dict] = []
    for i, key, ref in zip(engines, keys, receives):
        cause = sent.get("failed", {}).get(key)
        if ref not in ready:
            cause = f"no weights within {pool.sync_timeout_s:.0f} s (generator.sync_timeout_s)"
        else:
            try:
                results.append({**ray.get(ref), "send_seconds": sent.get("seconds", 0.0),
                                "send_wait_seconds": sent.get("wait_seconds", 0.0)})
                continue
            except (ray.exceptions.RayActorError, EngineBroken) as err:
                cause = cause or err
        pool.linked.pop(i, None)
        trainer.actors[0].close_transfer.remote(key)
        pool._restart(i, f"weight push of version {version}: {cause}")  # sends again
        results.append({"restarted": True})
    return results


def link(pool, trainer, engines: list[int]) -> None:
    """Open the transfer groups of ``engines`` not linked to ``trainer`` yet."""
    import ray

    world = 1 + pool.spec.tensor_parallel
    for i in engines:
        actor = pool.actors[i]
        token = (trainer.actors[0]._ray_actor_id.hex(), actor._ray_actor_id.hex())
        if pool.linked.get(i) == token:
            continue
        key = pool.name(i)
        host, port = trainer.transfer_endpoint(key)
        info = init_info(host, port, world, backend_of(pool), pool.sync_timeout_s)
        calls = [actor.open_transfer.remote(info),
                 trainer.join_transfer(key, world, backend_of(pool), pool.sync_timeout_s)]
        ready, _ = ray.wait(calls, num_returns=2, timeout=pool.sync_timeout_s)
        if len(ready) < 2:
            raise RuntimeError(f"{key} and the trainer's rank 0 did not open their weight "
                               f"transfer group within {pool.sync_timeout_s:.0f} s")
        ray.get(calls)
        pool.linked[i] = token


# -- the probe after a push -------------------------------------------------------------

PROBE_TOKENS = 16


class SyncMismatch(RuntimeError):
    """An engine's log-probs of the probe differ from the trainer's past the tolerance:
    the weights it serves are not the ones the trainer sent."""


def probe_request(adapter: str | None = None):
    """The probe: a drawn picture and a fixed question (the vision tower's weights take
    part too), ``PROBE_TOKENS`` greedy tokens."""
    import io

    import numpy as np
    from PIL import Image

    from actors.sampling import Request, Sampling

    y, x = np.mgrid[0:64, 0:64]
    pixels = np.stack([x * 4, y * 4, (x + y) * 2], axis=-1).astype(np.uint8)
    png = io.BytesIO()
    Image.fromarray(pixels).save(png, format="PNG")
    question = [{"type": "image"}, {"type": "text", "text": "Describe this picture."}]
    return Request([{"role": "user", "content": question}], images=[png.getvalue()],
                   sampling=Sampling(temperature=0.0, max_tokens=PROBE_TOKENS),
                   adapter=adapter)


def check(pool, trainer, engine: int, tol: float, adapter: str | None = None) -> float:
    """The mean |engine - trainer| log-prob of the probe's tokens as engine ``engine``
    samples them and the trainer scores them (``adapter``: the policy both serve;
    None: the full weights, or the pool's default adapter). ``SyncMismatch`` naming the
    engine past ``tol``: in fp32 the two agree to ~1e-6, in bf16 to a few 1e-2, and
    weights that did not arrive as sent give far more."""
    import numpy as np
    import ray

    from actors.batching import TrainBatch

    request = probe_request(adapter or pool.default_adapter)
    [[sample]] = ray.get(pool.actors[engine].generate.remote([request]),
                         timeout=pool.call_timeout_s)
    if sample.refused or not sample.token_ids:
        raise SyncMismatch(f"{pool.name(engine)} gave no tokens for the sync probe "
                           f"({sample.finish_reason}: {sample.text[:200]})")
    ids = np.asarray(sample.prompt_ids + sample.token_ids, dtype=np.int64)
    rows = trainer.world_size  # every rank scores one copy
    batch = TrainBatch([ids] * rows, np.full(rows, len(sample.prompt_ids)),
                       np.zeros(rows, dtype=np.int64), [list(request.images)])
    scored = trainer.compute_logprobs(batch, adapter=adapter)[0]
    diff = np.abs(np.asarray(sample.logprobs, dtype=np.float64) - scored)
    mean = float(diff.mean())
    if not mean <= tol:
        raise SyncMismatch(
            f"{pool.name(engine)} serves weights version {sample.version} whose log-probs of "
            f"the sync probe differ from the trainer's by {mean:.3g} per token on average "
            f"(max {diff.max():.3g}; generator.sync_check_tol {tol}): the weights it "
            f"serves are not the ones the trainer sent")
    return mean
