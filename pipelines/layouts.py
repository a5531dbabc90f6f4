"""Layouts: the ``placement`` section of the config and what it means, without Ray.

The settings (``PlacementConfig``: devices per role, per-phase layouts, the
cluster a layout is meant for), their resolution into the effective devices of
one phase (``resolve_layout``), the placement-group bundles each layout asks
for (``group_specs``), the checks run when a config loads, and ``simulate``: a
pure model of where Ray's PACK / SPREAD would put each bundle (best-fit PACK,
lowest free device index first), used by config validation and ``coevolve
plan``. Ray's own choice of node and device ids may differ, never the counts.
pipelines/runtime/placement.py creates the live placement groups.
"""

from __future__ import annotations

import os
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Literal

from pipelines.config_yaml import ConfigError, param
from pipelines.contract import Recipe, phase_spec

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
# Validation (PlacementConfig.check, on load)
# --------------------------------------------------------------------------


def check_placement(placement: PlacementConfig) -> None:
    """Each layout (top level and phases) is consistent; whether it fits a declared
    cluster is pipelines/simulation.py's ``check_cluster``, run by the config's check.

    Raises ConfigError with the path relative to the placement section.
    """
    for layout in phase_layouts(placement):
        _check_layout(layout, f"phases.{layout.phase}." if layout.phase else "")


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
# The recipe's phases against the layouts
# --------------------------------------------------------------------------


def check_layouts(cfg, recipe: Recipe) -> None:
    """Refuse a placement that leaves a phase without engines it needs, before any work.

    A phase's own layout must serve its role and the roles that score it
    (``uses``); the roles it makes data with (``data_roles``) must be in its own
    layout or in the top-level one, where the driver then makes the data first.
    """

    def serving(phase: str | None) -> set[str]:
        layout = resolve_layout(cfg.placement, phase, recipe.roles)
        return {role for role, r in layout.roles.items() if r.engines > 0}

    top = serving(None)
    for phase in recipe.phases(1):
        own = serving(phase.name)
        where = f"placement.phases.{phase.name}" if phase.name in cfg.placement.phases \
            else "placement"
        spec = phase_spec(phase)
        missing = sorted({*([spec.role] if spec.samples else []), *spec.uses} - own)
        if missing:
            raise ConfigError(f"{where}: phase {spec.name} trains {spec.role} and is scored "
                              f"with {', '.join(spec.uses) or 'no other role'}, "
                              f"but its layout has no engines for {', '.join(missing)}")
        data = set(spec.data_roles)
        if not (data <= own or data <= top):  # the data is made under one layout or the other
            raise ConfigError(f"placement: phase {phase.name} makes its data with "
                              f"{', '.join(sorted(data))} under one layout, but its own lacks "
                              f"{', '.join(sorted(data - own))} and the top-level one lacks "
                              f"{', '.join(sorted(data - top))}")


# --------------------------------------------------------------------------
# Settings (the config's placement section)
# --------------------------------------------------------------------------


@dataclass
class RoleLayout:
    engines: int = param(1, "Number of vLLM engines serving this role.", ge=0)
    gpus_per_engine: int = param(0, "GPUs per engine (0 on a CPU host).", ge=0)
    tensor_parallel: int = param(1, "Tensor-parallel size of each engine.", ge=1)
    cpus_per_engine: int = param(1, "CPUs reserved per engine.", ge=0)

    def check(self) -> None:
        if self.gpus_per_engine and self.gpus_per_engine < self.tensor_parallel:
            raise ConfigError(
                f"gpus_per_engine: must be >= tensor_parallel ({self.tensor_parallel}), "
                f"got {self.gpus_per_engine}"
            )


@dataclass
class ClusterSpec:
    nodes: int = param(0, "Nodes of the cluster the layout targets (0 = not declared).", ge=0)
    gpus_per_node: int = param(0, "GPUs per node.", ge=0)
    cpus_per_node: int = param(0, "CPUs per node (0 = not checked).", ge=0)
    gpu_memory_gib: float = param(0.0, "Memory of one GPU in GiB (0 = unknown: no memory check).", ge=0)
    host_memory_gib: float = param(
        1024.0, "Host memory of one node in GiB, which coevolve plan checks the trainer ranks' "
                "and sleeping engines' host memory against (default 1 TiB; 0 = not checked).",
        ge=0)

    @property
    def declared(self) -> bool:
        return self.nodes > 0

    def check(self) -> None:
        if self.declared and self.gpus_per_node == 0 and self.gpu_memory_gib:
            raise ConfigError("gpu_memory_gib: set only with gpus_per_node > 0")


@dataclass
class PhaseLayout:
    trainer_ranks: int | None = param(
        None, "Trainer ranks in this phase (default: placement.trainer_ranks).", ge=1)
    roles: dict[str, RoleLayout] = param(
        {}, "Engines per role in this phase; when given it replaces placement.roles "
            "(a role left out runs no engine in this phase).")
    colocate: list[str] | None = param(
        None, "Roles whose engines share the trainer ranks' GPUs in this phase, one engine "
              "per rank (default: placement.colocate).")
    gpu_memory_utilization: float | None = param(
        None, "vLLM's share of each engine GPU in this phase (default: "
              "generator.gpu_memory_utilization); lower it when engines share the trainer's GPUs.",
        gt=0, le=1)


@dataclass
class PlacementConfig:
    trainer_ranks: int = param(1, "FSDP trainer ranks (one device each on a GPU host).", ge=1)
    gpus_per_rank: int = param(0, "GPUs per trainer rank (0 on a CPU host, else 1).", ge=0, le=1)
    cpus_per_rank: int = param(1, "CPUs reserved per trainer rank.", ge=0)
    cpu_threads: Literal["reserved", "all"] = param(
        "reserved", "CPU hosts: the threads of each trainer rank and engine. reserved: its "
        "cpus_per_rank / cpus_per_engine. all: the whole host's cores, split evenly between "
        "the trainer ranks and between the engines of one role, because the trainer and the "
        "engines take turns (generate, then update): each works with every core while the "
        "others wait without spinning. Not with run.overlap, where they work at once. "
        "docs/architecture.md#all-cores")
    roles: dict[str, RoleLayout] = param(
        {}, "Engine layout per generating role (e.g. policy for the simple recipe; proposer, "
            "codegen and solver for MM-Zero); each role the recipe samples from needs one.",
    )
    colocate: list[str] = param(
        [], "Roles whose engines share the trainer ranks' GPUs, one engine per rank.")
    strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = param(
        "PACK", "Ray placement strategy of each role's placement group (PACK: few nodes; "
                "SPREAD: across nodes).")
    phases: dict[str, PhaseLayout] = param(
        {}, "Per-phase layouts by phase name (e.g. proposer, codegen, solver); placement "
            "groups are released and re-created between phases whose layouts differ.")
    cluster: ClusterSpec = param(
        ClusterSpec(), "The cluster this layout is meant for; checked on load when declared.")

    def check(self) -> None:
        """Cross-field rules (GPU/CPU consistency, colocation, cluster size), on load."""
        check_placement(self)
