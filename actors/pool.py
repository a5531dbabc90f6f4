"""GeneratorPool: the engines of one role, as one object for the driver.

- ``generate(requests)`` spreads a request list over the engines (balanced
  by an estimate of each request's tokens), one call per engine so each
  vLLM engine batches its share, and returns the completions in request
  order.
- ``update_weights(buckets, version)`` and ``load_adapter(name, payload,
  version)`` put the weights in the object store once and send the same
  refs to every engine in parallel (all remote calls first, then one get).
- Failure handling: an engine whose actor dies (``RayActorError``), that
  reports itself broken (``EngineBroken``: a failed weight reload) or that
  hangs is recreated under the same name, brought to the pool's current
  weights and adapters (the pool keeps their refs for this; it costs one copy
  of the weights in the object store), and its in-flight requests are sent
  again. Each restart is paid from a ``RestartBudget`` (the run's, shared with
  its other pools and trainer groups).
- Bounded waits: while a ``generate`` runs, the pool asks every busy engine's
  ``health()`` (answered beside the running call) every few seconds; an
  engine that made no progress, or did not answer, for ``stall_timeout_s`` is
  hung and restarted. Every other call (weights, adapters, sleep, health) has
  ``call_timeout_s``, an engine start ``start_timeout_s``; an engine that runs
  past them is restarted too (a start that does not finish is an error).
  Every completion must carry the version the pool expects for it (the
  adapter's version for adapter requests, else the base version), checked
  on every result.

Actors are named ``coevolve/<run>/<role>/<i>`` (visible in the Ray
dashboard) and can be pinned to bundles of a placement group.
"""

from __future__ import annotations

import dataclasses
import heapq
import logging
import threading
import time
from collections.abc import Sequence
from typing import Any

from actors.generator import WATCH, GeneratorActor
from actors.restarts import RestartBudget
from actors.sampling import Completion, EngineBroken, EngineSpec, Request, cpu_engine_env

logger = logging.getLogger(__name__)
_RESOURCE_KEYS = {"num_cpus", "num_gpus", "memory", "resources", "accelerator_type"}


class StaleVersionError(RuntimeError):
    """A completion claims a weight version other than the one the pool serves."""


class GeneratorPool:
    def __init__(self, role: str, spec: EngineSpec, n_engines: int,
                 resources: dict | None = None, run: str = "default",
                 placement_group=None, bundle_indices: Sequence[int] | None = None,
                 threads: int | None = None, max_restarts: int = 3, wait: bool = True,
                 restarts: RestartBudget | None = None, stall_timeout_s: float = 600.0,
                 call_timeout_s: float = 600.0, start_timeout_s: float = 1800.0,
                 sync_timeout_s: float = 300.0):
        """Start ``n_engines`` engines of ``spec`` and wait until they are ready
        (``wait=False``: return at once; ``wait_ready()`` waits, so that several pools
        start side by side).

        ``resources``: Ray actor resources per engine, e.g. ``{"num_cpus": 1}``
        or ``{"num_gpus": 1}`` (default ``{"num_cpus": 1}``). On a CPU host
        (no ``num_gpus``) each engine gets the CPU environment of
        ``cpu_engine_env(threads)``; ``threads`` defaults to its ``num_cpus``.
        ``placement_group`` with ``bundle_indices`` (one per engine) pins
        engine i to bundle ``bundle_indices[i]``. ``restarts``: the budget engine
        restarts are paid from (a run's: ``run.max_restarts`` for all its pools and
        trainer groups); without one the pool has its own of ``max_restarts``.
        Timeouts: module doc.
        """
        if n_engines < 1:
            raise ValueError(f"n_engines must be at least 1, got {n_engines}")
        resources = dict(resources or {"num_cpus": 1})
        if set(resources) - _RESOURCE_KEYS:
            raise ValueError(f"unknown resource keys {sorted(set(resources) - _RESOURCE_KEYS)}; "
                             f"use {sorted(_RESOURCE_KEYS)}")
        if placement_group is not None:
            bundle_indices = list(bundle_indices if bundle_indices is not None else range(n_engines))
            if len(bundle_indices) != n_engines:
                raise ValueError(f"bundle_indices names {len(bundle_indices)} bundles "
                                 f"for {n_engines} engines")
        self.role, self.spec, self.run = role, spec, run
        self.resources = resources
        self.placement_group, self.bundle_indices = placement_group, bundle_indices
        on_cpu = not resources.get("num_gpus")
        threads = threads or max(1, int(resources.get("num_cpus", 1)))
        self._env = cpu_engine_env(threads) if on_cpu else {}
        self.budget = restarts if restarts is not None else RestartBudget(
            max_restarts, setting="GeneratorPool(max_restarts)")
        self.stall_timeout_s, self.call_timeout_s = stall_timeout_s, call_timeout_s
        self.start_timeout_s, self.sync_timeout_s = start_timeout_s, sync_timeout_s
        # push_from(): the trainer group whose weights the engines serve, its plan and
        # version; engine i's transfer group is open with that trainer (linked[i])
        self.source: tuple | None = None
        self.linked: dict[int, tuple] = {}
        self.version = 0
        self.restarts = 0  # this pool's restarts (a metric)
        # (bucket refs, version, WeightVersion or None) of the weights being served
        self._weights: tuple[list, int, Any] | None = None
        self._adapters: dict[str, tuple[Any, int]] = {}  # name -> (payload ref, version)
        self.default_adapter: str | None = None  # see generate()
        self.in_flight = [0] * n_engines  # requests sent to engine i and not returned yet
        self._lock = threading.Lock()
        self.actors = [self._start(i) for i in range(n_engines)]
        self._starting = [a.health.remote() for a in self.actors]
        if wait:
            self.wait_ready()

    def wait_ready(self) -> None:
        """Block until every engine of a pool started with ``wait=False`` has loaded."""
        import ray

        if self._starting:
            ready, _ = ray.wait(self._starting, num_returns=len(self._starting),
                                timeout=self.start_timeout_s)
            late = [self.name(i) for i, ref in enumerate(self._starting) if ref not in ready]
            if late:
                raise RuntimeError(f"engine(s) {', '.join(late)} did not start within "
                                   f"{self.start_timeout_s:.0f} s (generator.start_timeout_s)")
            ray.get(self._starting)
            self._starting = []

    def __len__(self) -> int:
        return len(self.actors)

    # -- verbs ---------------------------------------------------------------

    def generate(self, requests: Sequence[Request]) -> list[list[Completion]]:
        """Sample every request on the pool; result[i] holds request i's completions.

        A request without an adapter gets the pool's ``default_adapter`` when one is
        set (a phase training LoRA adapters serves its newest adapter to every user of
        the pool, judges and data makers included)."""

        import ray

        # the engines get neither a request's meta (the recipe's, for its scorer) nor a
        # default adapter the request did not name
        default = self.default_adapter
        requests = [dataclasses.replace(r, meta=None, adapter=r.adapter or default)
                    if r.meta is not None or (default is not None and r.adapter is None) else r
                    for r in requests]

        shares = balance([estimate_cost(r) for r in requests], len(self.actors))
        pending = {}
        for i, idxs in enumerate(shares):
            if idxs:
                pending[self._send(i, requests, idxs)] = (i, idxs)
        results: list[list[Completion] | None] = [None] * len(requests)
        watch = _Watch(self)
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1, timeout=watch.poll_s)
            if not done:  # nothing finished for a while: is a busy engine hung?
                for ref, (i, idxs) in list(pending.items()):
                    reason = watch.hung(i)
                    if reason is not None:
                        del pending[ref]
                        with self._lock:
                            self.in_flight[i] -= len(idxs)
                        self._restart(i, reason)
                        pending[self._send(i, requests, idxs)] = (i, idxs)
                continue
            ref = done[0]
            i, idxs = pending.pop(ref)
            try:
                out = ray.get(ref)
            except (ray.exceptions.RayActorError, EngineBroken) as exc:
                self._restart(i, exc)
                pending[self._send(i, requests, idxs)] = (i, idxs)
                continue
            finally:
                with self._lock:
                    self.in_flight[i] -= len(idxs)
            for j, samples in zip(idxs, out):
                self._check_versions(requests[j], samples, engine=i)
                results[j] = samples
        return results  # type: ignore[return-value]

    def update_weights(self, buckets: Sequence, version: int, manifest=None,
                       rollback: bool = False) -> list[dict]:
        """Load full weights into every engine; returns each engine's timing metrics.

        ``buckets``: buckets from ``make_buckets`` (put here, once each), or
        their refs (e.g. ``TrainerActor.weight_buckets()``), which every engine
        then fetches whole to check the names unless ``manifest`` (their
        ``WeightVersion``) is given. The same refs go to all engines in
        parallel. The pool serves ``version`` only once every engine has it; a
        name or shape error is raised before any engine changed. Versions must
        increase, except with ``rollback`` (a phase restored from a checkpoint
        after a trainer failure serves that checkpoint's version again).
        """
        import ray

        from actors.weights import WeightVersion, put_buckets

        if version <= self.version and not rollback:
            raise ValueError(f"weight versions must increase: {version} after {self.version}")
        if buckets and all(isinstance(b, ray.ObjectRef) for b in buckets):
            refs = list(buckets)
        else:
            manifest = WeightVersion.of(buckets, version)
            refs = put_buckets(buckets)
        new = (refs, version, manifest)
        metrics = self._broadcast(lambda a: a.update_weights.remote(refs, version, manifest),
                                  weights=new)
        self._weights, self.version, self.source = new, version, None
        return metrics

    def push_from(self, trainer, version: int, bucket_bytes: int = 1 << 30,
                  rollback: bool = False) -> list[dict]:
        """Full weights from a ``TrainerGroup`` straight to every engine over vLLM's
        weight-transfer protocol (actors/weight_push.py): the engines' dtype on the wire,
        one bucket of ``bucket_bytes`` gathered at a time; each engine's metrics."""
        from actors.weight_push import push

        return push(self, trainer, version, bucket_bytes, rollback=rollback)

    def rebase(self, model: str) -> None:
        """The engines now serve exactly the weights saved in ``model`` (e.g. the hf/
        export of the trainer that pushed them): a restarted engine loads that folder
        instead of the pushed buckets, whose owner (a trainer rank) may be gone."""

        self.spec = dataclasses.replace(self.spec, model=model, version=self.version)
        self._weights, self.source = None, None

    def load_adapter(self, name: str, payload, version: int) -> list[dict]:
        """Serve a LoRA adapter on every engine.

        ``payload``: ``actors.weights.adapter_payload(...)`` or its ObjectRef.
        """
        import ray

        ref = payload if isinstance(payload, ray.ObjectRef) else ray.put(payload)
        adapters = {**self._adapters, name: (ref, version)}
        metrics = self._broadcast(lambda a: a.load_adapter.remote(name, [ref], version),
                                  adapters=adapters)
        self._adapters = adapters
        return metrics

    def sleep(self, level: int = 1) -> list[dict]:
        """Every engine frees its device memory (``GeneratorActor.sleep`` at ``level``); a
        dead engine is restarted (awake)."""
        return self._broadcast(lambda a: a.sleep.remote(level))

    def wake_up(self) -> list[dict]:
        """Every engine takes its device memory back; a dead engine is restarted (awake)."""
        return self._broadcast(lambda a: a.wake_up.remote())

    def health(self) -> list[dict]:
        import ray

        return ray.get([a.health.options(concurrency_group="watch").remote()
                        for a in self.actors], timeout=self.call_timeout_s)

    def stats(self) -> dict:
        """Per-engine stats and pool totals (tokens, seconds, restarts)."""
        import ray

        engines = ray.get([a.stats.remote() for a in self.actors], timeout=self.call_timeout_s)
        tokens = sum(s["tokens"] for s in engines)
        return {"engines": engines, "tokens": tokens, "restarts": self.restarts,
                "version": self.version}

    def shutdown(self) -> None:
        """Kill the pool's engines and wait until Ray reports them dead (names free again)."""
        import ray

        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        for actor in self.actors:
            wait_dead(actor)

    # -- helpers -------------------------------------------------------------

    def name(self, i: int) -> str:
        return f"coevolve/{self.run}/{self.role}/{i}"

    def _start(self, i: int):
        import ray

        options: dict[str, Any] = {**self.resources, "name": self.name(i), "max_restarts": 0,
                                   "runtime_env": {"env_vars": self._env}}
        if self.placement_group is not None:
            from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

            options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                placement_group=self.placement_group,
                placement_group_bundle_index=self.bundle_indices[i])
        return ray.remote(concurrency_groups=WATCH)(GeneratorActor).options(**options).remote(
            self.spec, self.name(i))

    def _send(self, i: int, requests: Sequence[Request], idxs: list[int]):
        with self._lock:
            self.in_flight[i] += len(idxs)
        return self.actors[i].generate.remote([requests[j] for j in idxs])

    def restart(self, i: int, cause: BaseException | str) -> None:
        """Recreate engine i at the weights and adapters the pool serves now."""
        self._restart(i, cause)

    def _restart(self, i: int, cause: BaseException | str, weights=None, adapters=None) -> None:
        """Recreate engine i and bring it to ``weights`` and ``adapters`` (default: current),
        paid from the restart budget (``RestartsExhausted`` when it has none left)."""
        import ray

        weights = self._weights if weights is None else weights
        adapters = self._adapters if adapters is None else adapters
        self.budget.spend(f"engine {self.name(i)}", cause)
        self.restarts += 1
        ray.kill(self.actors[i], no_restart=True)
        wait_dead(self.actors[i])
        actor = self._start(i)
        calls = [actor.health.remote()]
        if weights is not None:
            refs, version, manifest = weights
            calls.append(actor.update_weights.remote(refs, version, manifest))
        for name, (ref, version) in adapters.items():
            calls.append(actor.load_adapter.remote(name, [ref], version))
        self.actors[i] = actor  # a failure below leaves it for shutdown()
        ready, _ = ray.wait(calls, num_returns=len(calls),
                            timeout=self.start_timeout_s + self.call_timeout_s)
        if len(ready) < len(calls):
            raise RuntimeError(f"{self.name(i)} was restarted ({cause}) but did not start and "
                               f"load its weights within {self.start_timeout_s:.0f} + "
                               f"{self.call_timeout_s:.0f} s")
        ray.get(calls)
        if weights is None and self.source is not None:  # the trainer pushes them again
            from actors.weight_push import send

            send(self, [i])

    def _broadcast(self, call, weights=None, adapters=None) -> list:
        """Run ``call(actor)`` on every engine in parallel; restart engines that die.

        A restarted engine is brought to ``weights`` / ``adapters`` (the state
        being installed) and the call is not repeated on it.
        """
        import ray

        refs = [call(a) for a in self.actors]
        # all finished (or failed) or out of time; then look at each
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=self.call_timeout_s)
        results: list = []
        for i, ref in enumerate(refs):
            if ref not in ready:
                self._restart(i, f"no answer within {self.call_timeout_s:.0f} s "
                                 "(generator.call_timeout_s)", weights=weights, adapters=adapters)
                results.append({"restarted": True})
                continue
            try:
                results.append(ray.get(ref))
            except (ray.exceptions.RayActorError, EngineBroken) as exc:
                self._restart(i, exc, weights=weights, adapters=adapters)
                results.append({"restarted": True})
        return results

    def _check_versions(self, request: Request, samples: list[Completion], engine: int) -> None:
        expected = self._adapters[request.adapter][1] if request.adapter else self.version
        for c in samples:
            if c.version != expected:
                raise StaleVersionError(
                    f"{self.name(engine)} returned version {c.version}, the pool serves "
                    f"{expected}" + (f" for adapter {request.adapter}" if request.adapter else ""))


class _Watch:
    """A pool's health probes of its busy engines during one ``generate``."""

    def __init__(self, pool: GeneratorPool):
        self.pool = pool
        self.poll_s = min(10.0, max(0.5, pool.stall_timeout_s / 4))
        self.probes: dict[int, tuple[Any, float, Any]] = {}  # engine -> (ref, sent, actor)

    def hung(self, i: int) -> str | None:
        """Why engine ``i`` counts as hung, or None; asks it again when it answered."""
        import ray

        actor, now, limit = self.pool.actors[i], time.monotonic(), self.pool.stall_timeout_s
        probe = self.probes.get(i)
        if probe is not None and probe[2] is actor:  # (else none yet, or a new engine)
            ref, sent, _ = probe
            if not ray.wait([ref], timeout=0)[0]:
                return (f"no answer to health() for {now - sent:.0f} s "
                        "(generator.stall_timeout_s)") if now - sent > limit else None
            try:
                health = ray.get(ref)
            except ray.exceptions.RayActorError:
                return None  # dead: its generate call fails and says so
            if health["busy"] and health["stalled_s"] > limit:
                return (f"no progress in {health['busy']} for {health['stalled_s']:.0f} s "
                        "(generator.stall_timeout_s)")
        self.probes[i] = (actor.health.options(concurrency_group="watch").remote(), now, actor)
        return None


def estimate_cost(request: Request) -> float:
    """Rough tokens an engine spends on a request: prompt once (prefix cache) + n samples."""
    chars = sum(len(p.get("text", "")) if isinstance(p, dict) else len(str(p))
                for m in request.messages
                for p in (m["content"] if isinstance(m["content"], list) else [m["content"]]))
    return chars / 4 + 64 * len(request.images) + request.sampling.n * request.sampling.max_tokens


def balance(costs: Sequence[float], n_bins: int) -> list[list[int]]:
    """Longest-processing-time-first: each index, costliest first, to the least-loaded bin.

    Returns the indices of each bin in ascending order.
    """
    heap = [(0.0, b) for b in range(n_bins)]
    bins: list[list[int]] = [[] for _ in range(n_bins)]
    for j in sorted(range(len(costs)), key=lambda j: -costs[j]):
        load, b = heapq.heappop(heap)
        bins[b].append(j)
        heapq.heappush(heap, (load + costs[j], b))
    return [sorted(b) for b in bins]


def wait_dead(actor, timeout: float = 60.0) -> None:
    """Block until calls to a killed actor fail, i.e. Ray has it dead and its name is free.

    ``ray.kill`` is asynchronous: a call sent just after it may still run.
    """

    import ray

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            ray.get(actor.__ray_ready__.remote())
        except ray.exceptions.RayActorError:
            return
    raise RuntimeError(f"actor still alive {timeout:.0f} s after ray.kill")
