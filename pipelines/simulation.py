"""Where Ray's PACK / SPREAD would put each bundle of a layout: a pure model
(best-fit PACK, lowest free device index first), used by config validation
(``check_cluster``) and ``coevolve plan``. Ray's own choice of node and device
ids may differ, never the counts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from pipelines.config_yaml import ConfigError
from pipelines.layouts import (
    GroupSpec,
    Layout,
    PlacementConfig,
    PlacementError,
    group_specs,
    phase_layouts,
)


def check_cluster(placement: PlacementConfig) -> None:
    """Each layout (top level and phases) fits the cluster ``placement.cluster``
    declares, if it declares one; ConfigError naming the layout."""
    if not placement.cluster.declared:
        return
    nodes = cluster_nodes(placement.cluster)
    for layout in phase_layouts(placement):
        try:
            simulate(layout, nodes)
        except PlacementError as err:
            prefix = f"phases.{layout.phase}" if layout.phase else "cluster"
            raise ConfigError(f"placement.{prefix}: {err} (placement.cluster declares "
                              f"{describe_nodes(nodes)})") from None


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
