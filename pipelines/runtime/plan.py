"""``coevolve plan``: a layout checked against a cluster, with memory per device.

Nothing heavy starts: the cluster is declared (``--cluster FILE``, flags, or
``placement.cluster``) or read from the Ray cluster in ``RAY_ADDRESS``; the
placement is ``placement.simulate``; the model's sizes come from its
config.json (local folder, ``tiny://`` reference) or a built-in table of
public configs for hub ids (no download here).

The memory model (every term of it printed: per device, and host memory per
node) is in ``pipelines/runtime/memory.py``; the disk a run fills (step
checkpoints, hf/ exports) in ``pipelines/runtime/disk.py``.
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from pipelines.config import ClusterSpec, Config, ConfigError, config_from_dict
from pipelines.layouts import (
    TRAINER,
    Layout,
    PlacementError,
    check_layouts,
    group_specs,
    host_cores,
    resolve_layout,
    thread_counts,
)
from pipelines.registry import build_recipe
from pipelines.runtime.local_ray import ray_session
from pipelines.runtime.memory import (
    CONTEXT_BYTES,
    GIB,
    EngineMemory,
    ModelSizes,
    engine_memory,
    image_tokens,
    load_model_config,
    lora_params,
    model_sizes,
    optimizer_state,
    rank0_host_peak,
    resident,
    trainer_memory,
    vllm_max_num_seqs,
)
from pipelines.simulation import Node, Slot, cluster_nodes, describe_nodes, simulate

# --------------------------------------------------------------------------
# The plan
# --------------------------------------------------------------------------


@dataclass
class DeviceRow:
    node: int
    device: int | None
    who: str         # "trainer rank 0", "proposer engine 1 (shard 0)", ...
    total: float     # bytes this device would hold
    note: str = ""


@dataclass
class PhasePlan:
    layout: Layout
    slots: list[Slot] = field(default_factory=list)
    rows: list[DeviceRow] = field(default_factory=list)
    breakdown: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def _trainer_terms(cfg: Config, m: ModelSizes, ranks: int) -> tuple[dict[str, float], dict[str, float]]:
    """(device bytes per rank by term, host bytes per rank by term: empty without offload)."""
    tr, alg = cfg.trainer, cfg.algorithm
    lora = lora_params(m, tr.lora.rank, tr.lora.target_modules) if tr.lora.enabled else 0
    frozen = dict(lora=lora, freeze_vision=tr.freeze_vision, freeze_projector=tr.freeze_projector)
    device = trainer_memory(m, ranks=ranks, micro_batch_tokens=tr.micro_batch_tokens,
                            checkpointing=tr.gradient_checkpointing, reference=alg.kl_coef > 0,
                            logprob_chunk_tokens=tr.logprob_chunk_tokens,
                            entropy=alg.entropy_coef > 0,
                            full_kl=alg.kl_estimator == "full" and alg.kl_coef > 0,
                            reference_bytes=2 if tr.reference_dtype == "bfloat16" else 4,
                            offload=tr.offload, **frozen)
    host = optimizer_state(m, ranks=ranks, **frozen) if tr.offload else {}
    return device, host


def plan_phase(cfg: Config, layout: Layout, nodes: list[Node], device_bytes: float,
               m: ModelSizes | None) -> PhasePlan:
    """Placement and per-device memory of one phase; problems listed, not raised."""
    plan = PhasePlan(layout)
    try:
        plan.slots = simulate(layout, nodes)
    except PlacementError as err:
        plan.problems.append(str(err))
        return plan
    if not layout.uses_gpus or m is None:
        return plan
    trainer, host = _trainer_terms(cfg, m, layout.trainer_ranks)
    utilization = layout.gpu_memory_utilization or cfg.generator.gpu_memory_utilization
    engines = {name: _engine(cfg, m, r.tensor_parallel, device_bytes, utilization)
               for name, r in layout.roles.items()}
    known = device_bytes > 0
    plan.breakdown.append(f"trainer rank ({layout.trainer_ranks} ranks): " + _terms(trainer))
    if layout.colocate:
        plan.breakdown.extend(_turn_lines(trainer, [engines[g] for g in layout.colocate]))
    if host:
        plan.breakdown.append("trainer rank host memory (trainer.offload): " + _terms(host))
    max_len = cfg.generator.max_model_len
    for name, e in engines.items():
        if known:
            plan.breakdown.append(f"{name} engine: {utilization:g} x {device_bytes / GIB:.0f} = "
                                  f"{e.budget / GIB:.1f} GiB (max_num_seqs {e.max_num_seqs}): "
                                  + _terms(e.parts) + f"; the KV cache holds {e.kv_tokens:,} "
                                  f"tokens = {e.sequences(max_len):.1f} sequences of {max_len:,}")
    specs = {g.role: g for g in group_specs(layout)}
    for slot in plan.slots:
        if not slot.devices:
            continue
        spec = specs[slot.role]
        owner = next(i for i, members in enumerate(spec.members) if slot.bundle in members)
        if slot.role == TRAINER:
            total = max(_turns(trainer, [engines[g] for g in layout.colocate]).values())
            who = " + ".join([f"trainer rank {owner}"] + [f"{g} engine {owner}" for g in layout.colocate])
            note = f"over the {device_bytes / GIB:.0f} GiB device" if known and total > device_bytes else ""
            if known and layout.colocate and not note:
                note = _kv_note(engines[layout.colocate[0]], max_len)
        else:
            tp = len(slot.devices)
            e = engines[slot.role]
            total = e.budget if known else 0.0
            note = _kv_note(e, max_len) if known else ""
            for shard, device in enumerate(slot.devices):
                who = f"{slot.role} engine {owner}" + (f" (shard {shard}/{tp})" if tp > 1 else "")
                plan.rows.append(DeviceRow(slot.node, device, who, total, note))
            continue
        plan.rows.append(DeviceRow(slot.node, slot.devices[0], who, total, note))
    _host_memory(plan, cfg, m, nodes, host, engines)
    if known:
        _check_memory(plan, layout, trainer, engines, device_bytes, cfg.generator)
    return plan


def _engine(cfg: Config, m: ModelSizes, tensor_parallel: int, device_bytes: float,
            utilization: float) -> EngineMemory:
    """One engine's memory, from the EngineSpec the run builds (pipelines/runtime/engines.py)."""
    from pipelines.runtime.specs import engine_spec

    spec = engine_spec(cfg, cfg.model.path, tensor_parallel)
    return engine_memory(m, tensor_parallel=tensor_parallel, device_bytes=device_bytes,
                         utilization=utilization,
                         max_num_batched_tokens=spec.max_num_batched_tokens,
                         max_model_len=spec.max_model_len,
                         max_num_seqs=vllm_max_num_seqs(device_bytes),
                         image_tokens=image_tokens(m, cfg.model.max_pixels),
                         images_per_prompt=spec.max_images_per_prompt,
                         cuda_graphs=not spec.enforce_eager,
                         dtype_bytes=4 if cfg.model.dtype == "float32" else 2)


def _kv_note(e: EngineMemory, max_len: int) -> str:
    return (f"KV {e.parts['KV cache'] / GIB:.1f} GiB = {e.kv_tokens:,} tokens = "
            f"{e.sequences(max_len):.1f} sequences of {max_len:,}")


def _turns(trainer: dict, guests: list[EngineMemory]) -> dict[str, float]:
    """Bytes on a trainer rank's device in each turn. Alone: the update. With colocated
    engines (vLLM sleep mode): they generate beside the rank's resident state, and
    sleep through the update keeping their context."""
    if not guests:
        return {"update": sum(trainer.values())}
    return {"generate": sum(resident(trainer).values()) + sum(e.budget for e in guests),
            "update": sum(trainer.values()) + CONTEXT_BYTES * len(guests)}


def _turn_lines(trainer: dict, guests: list[EngineMemory]) -> list[str]:
    turns, kept = _turns(trainer, guests), resident(trainer)
    return ["trainer rank between updates (engines awake): " + _terms(kept),
            f"a trainer GPU by turns: generate {sum(kept.values()) / GIB:.1f} + engines "
            f"{sum(e.budget for e in guests) / GIB:.1f} = {turns['generate'] / GIB:.1f} GiB; "
            f"update {sum(trainer.values()) / GIB:.1f} + sleeping engines "
            f"{CONTEXT_BYTES * len(guests) / GIB:.1f} = {turns['update'] / GIB:.1f} GiB"]


def _host_memory(plan: PhasePlan, cfg: Config, m: ModelSizes, nodes: list[Node], host: dict,
                 engines: dict[str, EngineMemory]) -> None:
    """Host memory per node (module docstring of memory.py): breakdown lines, and a
    problem where a node declares less."""
    from pipelines.runtime.specs import sleep_level

    layout = plan.layout
    ranks: dict[int, int] = {}
    rank0 = None
    for slot in plan.slots:
        if slot.role == TRAINER:
            ranks[slot.node] = ranks.get(slot.node, 0) + 1
            rank0 = slot.node if slot.bundle == 0 else rank0
    lora = lora_params(m, cfg.trainer.lora.rank, cfg.trainer.lora.target_modules) \
        if cfg.trainer.lora.enabled else 0
    peak = rank0_host_peak(m, full_sync=cfg.run.sync_weights and not lora,
                           export_bytes=2 if cfg.model.dtype != "float32" else 4, lora=lora)
    occasion = max(peak, key=peak.get)
    asleep = sum(engines[g].parts["weights"] for g in layout.colocate) \
        if layout.colocate and sleep_level(cfg) == 1 else 0.0
    for node, count in sorted(ranks.items()):
        terms = {}
        if host:
            terms[f"{count} x {sum(host.values()) / GIB:.1f} offloaded"] = count * sum(host.values())
        if node == rank0:
            terms[f"rank 0's {occasion}"] = peak[occasion]
        if asleep:
            terms[f"{count} x {asleep / GIB:.1f} weights of level-1 sleeping engines"] = count * asleep
        total, limit = sum(terms.values()), nodes[node].host_memory
        of = f" of {limit / GIB:.0f} GiB" if limit else " (host memory not declared)"
        plan.breakdown.append(f"host memory {nodes[node].name} ({count} trainer rank"
                              f"{'s' * (count > 1)}): " + (_terms(terms) if terms else "0 GiB")
                              + of)
        if limit and total > limit:
            plan.problems.append(
                f"phase {layout.name}: host memory of {nodes[node].name}: {total / GIB:.1f} GiB "
                f"over its {limit / GIB:.0f} GiB (placement.cluster.host_memory_gib): "
                + _terms(terms))
    plan.breakdown.append(
        "  (rank 0 for a moment: loading {:.1f}, weight sync {:.1f}, export {:.1f} GiB; "
        "the other ranks build on the meta device and receive their shards)".format(
            peak["loading"] / GIB, peak["weight sync"] / GIB, peak["export"] / GIB))


def _check_memory(plan: PhasePlan, layout: Layout, trainer: dict, engines: dict,
                  device_bytes: float, generator) -> None:
    dev = device_bytes / GIB
    guests = [engines[g] for g in layout.colocate]
    turns = _turns(trainer, guests)
    rank = sum(trainer.values())
    if turns["update"] > device_bytes:
        extra = f" + sleeping colocated engines {CONTEXT_BYTES * len(guests) / GIB:.1f} GiB" \
            if guests else ""
        plan.problems.append(
            f"phase {layout.name}: a trainer rank needs {rank / GIB:.1f} GiB{extra} on a "
            f"{dev:.0f} GiB device (over by {(turns['update'] - device_bytes) / GIB:.1f} GiB): "
            + _terms(trainer))
    if guests and turns["generate"] > device_bytes:
        plan.problems.append(
            f"phase {layout.name}: while the colocated engines generate, a trainer rank keeps "
            f"{_terms(resident(trainer))} and the engines take "
            f"{sum(e.budget for e in guests) / GIB:.1f} GiB (gpu_memory_utilization): "
            f"{turns['generate'] / GIB:.1f} GiB on a {dev:.0f} GiB device; lower this phase's "
            "gpu_memory_utilization or move the rank's state (trainer.offload)")
    max_len, need = generator.max_model_len, generator.min_kv_sequences
    for name, e in engines.items():
        if e.kv_tokens < need * max_len:
            plan.problems.append(
                f"phase {layout.name}: {name} engine: its KV cache of "
                f"{max(e.parts['KV cache'], 0) / GIB:.2f} GiB holds {e.kv_tokens:,} tokens = "
                f"{e.sequences(max_len):.1f} sequences of max_model_len {max_len:,}, fewer than "
                f"generator.min_kv_sequences {need} ({need * max_len * e.kv_bytes_per_token / GIB:.2f}"
                f" GiB) in its {e.budget / GIB:.1f} GiB share: " + _terms(e.parts))


def _threads_lines(layout: Layout, nodes: list[Node]) -> list[str]:
    """How many threads each rank and engine of a CPU layout runs, and why."""
    cores = int(nodes[0].cpus) if len(nodes) == 1 and math.isfinite(nodes[0].cpus) \
        else host_cores()
    threads = thread_counts(layout, cores)
    counts = ", ".join([f"trainer {layout.trainer_ranks} x {threads[TRAINER]}"]
                       + [f"{n} {r.engines} x {threads[n]}" for n, r in layout.roles.items()])
    if layout.cpu_threads == "reserved":
        return [f"threads (cpu_threads: reserved): {counts}, each its reserved CPUs"]
    return [f"threads (cpu_threads: all, {cores} cores): {counts}. The trainer and the engines "
            "take turns (generate, then update), so each works with all the cores while the "
            "others wait idle; the Ray CPUs above only place the actors (coevolve run's local "
            "Ray advertises at least their sum)"]


def _terms(parts: dict) -> str:
    shown = [f"{k} {v / GIB:.1f}" for k, v in parts.items() if v]
    return " + ".join(shown) + f" = {sum(parts.values()) / GIB:.1f} GiB"


# --------------------------------------------------------------------------
# Command
# --------------------------------------------------------------------------


def cluster_from_file(path: str) -> ClusterSpec:
    """A ClusterSpec YAML (configs/cluster/*.yaml), validated like the config section."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"cluster file not found: {path}")
    data = yaml.safe_load(p.read_text()) or {}
    try:
        return config_from_dict({"placement": {"cluster": data, "roles": {}}}).placement.cluster
    except ConfigError as err:
        raise ConfigError(f"{path}: {str(err).removeprefix('placement.cluster.')}") from None


def resolve_cluster(cfg: Config, cluster_file: str | None = None, nodes: int | None = None,
                    gpus_per_node: int | None = None, gpu_memory_gib: float | None = None,
                    cpus_per_node: int | None = None) -> tuple[list[Node], float, str]:
    """(nodes, bytes per GPU or 0 if unknown, where the cluster came from)."""
    flags = (nodes, gpus_per_node, cpus_per_node)
    if cluster_file:
        spec, source = cluster_from_file(cluster_file), cluster_file
    elif any(f is not None for f in flags):
        spec = ClusterSpec(nodes=nodes or 1, gpus_per_node=gpus_per_node or 0,
                           cpus_per_node=cpus_per_node or 0, gpu_memory_gib=gpu_memory_gib or 0.0)
        source = "command line"
    elif cfg.placement.cluster.declared:
        spec, source = cfg.placement.cluster, "placement.cluster in the config"
    elif os.environ.get("RAY_ADDRESS"):
        return _ray_nodes(), (gpu_memory_gib or 0.0) * GIB, f"Ray cluster at {os.environ['RAY_ADDRESS']}"
    elif not any(layout.uses_gpus for layout in _layouts(cfg)):
        return [Node("local", 0)], 0.0, "this host (CPU layout; CPUs not checked)"
    else:
        raise ValueError("which cluster? give --cluster FILE (configs/cluster/), --gpus-per-node N "
                         "[--nodes N --gpu-memory-gib G], declare placement.cluster, or set RAY_ADDRESS")
    memory = gpu_memory_gib if gpu_memory_gib is not None else spec.gpu_memory_gib
    return cluster_nodes(spec), memory * GIB, source


def _ray_nodes() -> list[Node]:
    import ray

    from pipelines.runtime.placement import live_nodes

    ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=False)
    try:
        return live_nodes()
    finally:
        ray.shutdown()  # a driver attached to someone's cluster: this only disconnects


def _layouts(cfg: Config) -> list[Layout]:
    """The phases to show: each declared phase, else the one layout of every phase;
    only the roles the recipe runs engines for."""

    roles = build_recipe(cfg).roles
    if cfg.placement.phases:
        return [resolve_layout(cfg.placement, p, roles) for p in cfg.placement.phases]
    return [resolve_layout(cfg.placement, None, roles)]


def build_plan(cfg: Config, nodes: list[Node], device_bytes: float,
               m: ModelSizes | None) -> list[PhasePlan]:
    return [plan_phase(cfg, layout, nodes, device_bytes, m) for layout in _layouts(cfg)]


def render(cfg: Config, plans: list[PhasePlan], nodes: list[Node], device_bytes: float,
           source: str, m: ModelSizes | None, model_source: str) -> str:
    lines = []
    if m is not None:
        lines.append(f"model     {cfg.model.path}: {m.params / 1e9:.2f} B parameters (vision "
                     f"{m.vision / 1e9:.2f} B, {m.layers} blocks x {m.layer / 1e9:.3f} B, embeddings"
                     f" + LM head {m.root / 1e9:.2f} B); sizes from {model_source}")
    memory = f" x {device_bytes / GIB:g} GiB" if device_bytes else " (GPU memory unknown: not checked)"
    lines.append(f"cluster   {describe_nodes(nodes)}{memory if any(n.gpus for n in nodes) else ''}"
                 f", from {source}")
    lines.append(f"placement {cfg.placement.strategy}; node and device indices from a simulation "
                 f"of Ray's placement (Ray assigns the real ids)")
    for plan in plans:
        layout = plan.layout
        title = f"phase {layout.phase}" if layout.phase else "every phase"
        lines.append("")
        lines.append(f"{title}: trainer {layout.trainer_ranks} ranks, "
                     + ", ".join(f"{n} {r.engines} engines" + (" (colocated)" if n in layout.colocate else "")
                                 for n, r in layout.roles.items())
                     + f"; {layout.gpus():g} GPUs, {layout.cpus():g} CPUs")
        if layout.uses_gpus and plan.rows:
            lines.append(f"  {'node':<7}{'gpu':>4}  {'holds':<44}{'GiB':>7}")
            for row in plan.rows:
                gib = f"{row.total / GIB:.1f}" if row.total else "-"
                lines.append(f"  {nodes[row.node].name[:6]:<7}{row.device:>4}  {row.who:<44}{gib:>7}"
                             + (f"  {row.note}" if row.note else ""))
            for text in plan.breakdown:
                lines.append(f"  {text}")
        elif plan.slots:
            for g in group_specs(layout):
                if g.bundles:
                    lines.append(f"  {g.role}: {len(g.bundles)} x bundle "
                                 + ", ".join(f"{k} {v:g}" for k, v in g.bundles[0].items()))
            lines.extend(f"  {text}" for text in _threads_lines(layout, nodes))
    if m is not None:
        from pipelines.runtime.disk import describe, disk_plan

        lines.append("")
        lines.extend(describe(disk_plan(cfg, m, gpu=True)))
    problems = [p for plan in plans for p in plan.problems]
    lines.append("")
    if problems:
        lines.append("does not fit:")
        lines.extend(f"  - {p}" for p in problems)
        if any("trainer rank needs" in p for p in problems):
            lines.append("  (trainer levers: trainer.offload (master, grads, adamw to host memory), "
                         "trainer.reference_dtype=bfloat16, trainer.logprob_chunk_tokens (logits), "
                         "trainer.micro_batch_tokens (activations, logits), more ranks, "
                         "trainer.lora.enabled, a smaller model)")
    else:
        lines.append("fits" + ("" if device_bytes or not any(n.gpus for n in nodes)
                               else " (placement only: give --gpu-memory-gib for memory)"))
    return "\n".join(lines) + "\n"


def run_plan(cfg: Config, *, cluster_file: str | None = None, nodes: int | None = None,
             gpus_per_node: int | None = None, gpu_memory_gib: float | None = None,
             cpus_per_node: int | None = None, probe: bool = False, out=None) -> int:
    """Print the plan; 0 if it fits, 2 if not (the numbers are printed)."""

    out = out or sys.stdout
    check_layouts(cfg, build_recipe(cfg))  # a phase without engines it needs: refused first
    node_list, device_bytes, source = resolve_cluster(cfg, cluster_file, nodes, gpus_per_node,
                                                      gpu_memory_gib, cpus_per_node)
    m, model_source = None, ""
    if any(layout.uses_gpus for layout in _layouts(cfg)):
        config, model_source = load_model_config(cfg.model.path)
        m = model_sizes(config)
    plans = build_plan(cfg, node_list, device_bytes, m)
    out.write(render(cfg, plans, node_list, device_bytes, source, m, model_source))
    failed = any(p.problems for p in plans)
    if probe and not any(p.slots == [] for p in plans):
        out.write(probe_placement(cfg, node_list))
    return 2 if failed else 0


def probe_placement(cfg: Config, nodes: list[Node]) -> str:
    """Create each phase's placement groups on Ray, report where they landed, release.

    Attaches to ``RAY_ADDRESS``; without it starts a private Ray on loopback
    with the declared node's logical GPUs (one node only).
    """
    from pipelines.runtime.placement import PlacementManager, bundle_report

    kwargs = {}
    if not os.environ.get("RAY_ADDRESS"):
        if len(nodes) != 1:
            raise ValueError("--probe without RAY_ADDRESS simulates one node only; "
                             f"this cluster has {len(nodes)}")
        need = max(layout.cpus() for layout in _layouts(cfg))
        kwargs = {"num_gpus": nodes[0].gpus, "num_cpus": int(max(need, 1))}
    lines = ["", "probe: placement groups created on Ray (real node and GPU ids)"]
    with ray_session(**kwargs), PlacementManager(cfg.placement, run=cfg.run.name,
                                                 timeout_s=60) as places:
        for layout in _layouts(cfg):
            placement = places.enter(layout.phase)
            guests = "".join(f" + {g} engine" for g in layout.colocate)
            lines.append(f"  phase {layout.name}:")
            for r in bundle_report(placement):
                who = f"{r.role}/{r.bundle}" + (guests if r.role == TRAINER else "")
                lines.append(f"    {who:<30} node {r.node_id[:12]}  GPU {','.join(r.gpu_ids) or '-'}")
    return "\n".join(lines) + "\n"
