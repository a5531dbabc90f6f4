"""``coevolve plan``: a layout checked against a cluster, with memory per device.

Nothing heavy starts: the cluster is declared (``--cluster FILE``, flags, or
``placement.cluster``) or read from the Ray cluster in ``RAY_ADDRESS``; the
placement is ``placement.simulate``; the model's sizes come from its
config.json (local folder, ``tiny://`` reference) or a built-in table of
public configs for hub ids (no download here).

Memory per device, in bytes (the estimate; every term is printed):

trainer rank (N ranks, FSDP2 full shard, P parameters of which T train; the
trainer loads fp32 weights and computes in bf16 through FSDP2's mixed
precision, as ``actors/trainer.py`` and ``actors/fsdp.py`` do):
  master       4 P / N          fp32 parameter shards           } host memory instead with
  grads        4 T / N          fp32 gradient shards            } trainer.offload (FSDP2
  adamw        8 T / N          two fp32 moments                } CPUOffloadPolicy)
  reference    r P / N          the frozen policy for the KL term (kl_coef > 0, not LoRA);
                                r = 4 (trainer.reference_dtype float32) or 2 (bfloat16)
  gathered     2 (R + 2 U)      bf16 unsharded copies: the root unit R (embeddings, final
                                norm, LM head) for the whole step, and two blocks in
                                flight (current + prefetched); U = largest unit (a decoder
                                block or the vision tower)
  grad buffers 2 (R + U')       bf16 unsharded gradients before reduce-scatter (U' = largest
                                trainable unit); LoRA: 2 T
  activations  with gradient checkpointing: 2 t H L + t a;  without: t a L
               a = 2 (4 H + 3 q + 3 kv + 4 I) bytes per token and block: the two
               norms' inputs and outputs, q/k/v with their rotary copies and the
               attention output, the MLP's gate, up, activation and product
  logits       k c V            peak of the log-prob head's backward, measured
                                (``python -m benchmarks.logprob_memory``: live tensor bytes,
                                bf16 logits): full logits (trainer.logprob_chunk_tokens 0):
                                c = t, k = 16 (the fp32 upcast autograd saves 4 + three fp32
                                [t, V] temporaries of its backward 12), +8 with the entropy
                                bonus, +10 with the "full" KL (reference logits, log-softmaxes);
                                chunked: c = min(chunk, t), k = 8 (bf16 logits 2 + one fp32
                                copy worked in place 4 + bf16 gradient 2), 24 with entropy
  context      1 GiB            CUDA context, allocator slack
  (t = trainer.micro_batch_tokens, H hidden, I MLP width, q = heads x head_dim,
  kv = kv_heads x head_dim, V vocabulary, L decoder blocks; vision-tower
  activations depend on the images and are not counted.)

engine (one vLLM engine, tensor_parallel p, per GPU; vLLM takes
gpu_memory_utilization u of the device and fills what the rest leaves with KV cache):
  weights      2 P / p
  activations  2 B (3 I / p + 4 H) + 6 S V   profile run over B =
               max_num_batched_tokens tokens, sampler logits of S = 256 sequences
  context      1 GiB
  KV cache     u D - the above;  per token 2 (K, V) x L x max(1, kv_heads / p) x head_dim x 2
  vLLM refuses to start when the KV cache holds less than one max_model_len sequence.

A colocated engine shares its trainer rank's device: rank + u D must fit D.

host memory (trainer.offload): each rank holds master + grads + adamw = 16 T / N
(+ 4 (P - T) / N) in host memory; the plan sums the ranks of each node. No
cluster field declares host memory, so it is reported, not checked; loading
adds a transient 4 P per rank (each rank reads the whole fp32 checkpoint before
sharding it). With offload, the shard copies for each unit's all-gather and the
gradient shards before their copy to the host are transient and not counted.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from pipelines.config import ClusterSpec, Config, ConfigError, config_from_dict
from pipelines.runtime.placement import (
    TRAINER,
    Layout,
    Node,
    PlacementError,
    Slot,
    cluster_nodes,
    describe_nodes,
    group_specs,
    resolve_layout,
    simulate,
)

GIB = 2**30
CONTEXT_BYTES = GIB
SAMPLER_SEQS = 256  # vLLM's default max_num_seqs: sampler logits in the profile run

# The public config.json of each model, reduced to the fields sizes are computed from.
BUILTIN_MODELS: dict[str, dict] = {
    "Qwen/Qwen3-VL-8B-Instruct": {
        "model_type": "qwen3_vl", "tie_word_embeddings": False,
        "text_config": {"hidden_size": 4096, "intermediate_size": 12288, "num_hidden_layers": 36,
                        "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
                        "vocab_size": 151936, "attention_bias": False},
        "vision_config": {"depth": 27, "hidden_size": 1152, "intermediate_size": 4304,
                          "num_heads": 16, "out_hidden_size": 4096, "patch_size": 16,
                          "spatial_merge_size": 2, "temporal_patch_size": 2, "in_channels": 3,
                          "num_position_embeddings": 2304, "deepstack_visual_indexes": [8, 16, 24]},
    },
    "Qwen/Qwen3-VL-4B-Instruct": {
        "model_type": "qwen3_vl", "tie_word_embeddings": True,
        "text_config": {"hidden_size": 2560, "intermediate_size": 9728, "num_hidden_layers": 36,
                        "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
                        "vocab_size": 151936, "attention_bias": False},
        "vision_config": {"depth": 24, "hidden_size": 1024, "intermediate_size": 4096,
                          "num_heads": 16, "out_hidden_size": 2560, "patch_size": 16,
                          "spatial_merge_size": 2, "temporal_patch_size": 2, "in_channels": 3,
                          "num_position_embeddings": 2304, "deepstack_visual_indexes": [5, 11, 17]},
    },
    "Qwen/Qwen2.5-VL-7B-Instruct": {
        "model_type": "qwen2_5_vl", "tie_word_embeddings": False,
        "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
        "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064,
        "vision_config": {"depth": 32, "hidden_size": 1280, "intermediate_size": 3420,
                          "num_heads": 16, "out_hidden_size": 3584, "patch_size": 14,
                          "spatial_merge_size": 2, "temporal_patch_size": 2, "in_chans": 3,
                          "window_size": 112, "fullatt_block_indexes": [7, 15, 23, 31]},
    },
}
# Same architecture, other weights.
BUILTIN_MODELS["Qwen/Qwen3-VL-8B-Thinking"] = BUILTIN_MODELS["Qwen/Qwen3-VL-8B-Instruct"]
BUILTIN_MODELS["Qwen/Qwen3-VL-4B-Thinking"] = BUILTIN_MODELS["Qwen/Qwen3-VL-4B-Instruct"]


# --------------------------------------------------------------------------
# Model sizes
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSizes:
    """Parameter counts by FSDP unit, and the shapes the memory terms need."""

    family: str
    vision: int      # vision tower incl. merger(s): one FSDP unit
    projector: int   # the merger(s) inside it
    root: int        # embeddings + final norm + LM head: the FSDP root unit
    layer: int       # one decoder block
    layers: int
    hidden: int
    intermediate: int
    q_dim: int       # heads x head_dim
    kv_dim: int      # kv_heads x head_dim
    kv_heads: int
    head_dim: int
    vocab: int

    @property
    def params(self) -> int:
        return self.vision + self.root + self.layers * self.layer


def model_sizes(config: dict) -> ModelSizes:
    """Sizes of a Qwen2-VL / Qwen2.5-VL / Qwen3-VL model from its config.json."""
    family = config.get("model_type")
    if family not in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl"):
        raise ValueError(f"cannot size model_type {family!r}: known qwen2_vl, qwen2_5_vl, qwen3_vl")
    text = {**{k: v for k, v in config.items() if k != "vision_config"}, **config.get("text_config", {})}
    h, i_size, n_layers = text["hidden_size"], text["intermediate_size"], text["num_hidden_layers"]
    heads, kv_heads, vocab = text["num_attention_heads"], text["num_key_value_heads"], text["vocab_size"]
    head_dim = text.get("head_dim") or h // heads
    q, kv = heads * head_dim, kv_heads * head_dim
    bias = text.get("attention_bias", family != "qwen3_vl")  # Qwen2 attention always has q/k/v bias
    layer = h * q + 2 * h * kv + q * h + 3 * h * i_size + 2 * h
    layer += (q + 2 * kv) if bias else 0
    layer += 2 * head_dim if family == "qwen3_vl" else 0  # q_norm, k_norm
    tied = config.get("tie_word_embeddings", text.get("tie_word_embeddings", False))
    root = vocab * h * (1 if tied else 2) + h
    vision, projector = _vision_sizes(family, config["vision_config"], h)
    return ModelSizes(family, vision, projector, root, layer, n_layers, h, i_size, q, kv,
                      kv_heads, head_dim, vocab)


def _vision_sizes(family: str, v: dict, text_hidden: int) -> tuple[int, int]:
    """(whole tower, mergers) parameter counts."""
    m2 = v.get("spatial_merge_size", 2) ** 2
    patch_in = v.get("in_channels", v.get("in_chans", 3)) * v.get("temporal_patch_size", 2) * v["patch_size"] ** 2
    if family == "qwen2_vl":
        d, out = v["embed_dim"], v.get("hidden_size", text_hidden)
        width = int(d * v.get("mlp_ratio", 4))
        block = 4 * d + (3 * d * d + 3 * d) + (d * d + d) + (d * width + width) + (width * d + d)
        merger = 2 * d + (d * m2 * d * m2 + d * m2) + (d * m2 * out + out)
        return patch_in * d + v["depth"] * block + merger, merger
    d, width, out = v["hidden_size"], v["intermediate_size"], v["out_hidden_size"]
    attn = (3 * d * d + 3 * d) + (d * d + d)
    fc = (d * m2 * d * m2 + d * m2) + (d * m2 * out + out)
    if family == "qwen2_5_vl":  # RMSNorm, gated MLP with biases, no patch bias
        block = 2 * d + attn + 2 * (d * width + width) + (width * d + d)
        merger = d + fc
        return patch_in * d + v["depth"] * block + merger, merger
    # qwen3_vl: LayerNorm, plain MLP, patch bias, learned position table, DeepStack mergers
    block = 4 * d + attn + (d * width + width) + (width * d + d)
    merger = 2 * d + fc
    deepstack = len(v.get("deepstack_visual_indexes", [])) * (2 * d * m2 + fc)
    embed = patch_in * d + d + v.get("num_position_embeddings", 0) * d
    return embed + v["depth"] * block + merger + deepstack, merger + deepstack


def load_model_config(ref: str) -> tuple[dict, str]:
    """(config.json as a dict, where it came from) for a model reference."""
    if ref.startswith("tiny://"):
        from actors.models import resolve_model

        folder = Path(resolve_model(ref))
        return json.loads((folder / "config.json").read_text()), f"config.json of {folder}"
    path = Path(ref).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ValueError(f"model folder {path} has no config.json")
        return json.loads((path / "config.json").read_text()), f"{path / 'config.json'}"
    for name, config in BUILTIN_MODELS.items():
        if ref.lower() in (name.lower(), name.split("/", 1)[1].lower()):
            return config, "built-in table (public config.json)"
    raise ValueError(f"no sizes for model {ref!r}: hub models are not downloaded here; built in: "
                     f"{', '.join(BUILTIN_MODELS)}; or give a local folder with its config.json")


LORA_SHAPES = {  # target -> (in, out) as functions of the sizes
    "q_proj": lambda m: (m.hidden, m.q_dim), "k_proj": lambda m: (m.hidden, m.kv_dim),
    "v_proj": lambda m: (m.hidden, m.kv_dim), "o_proj": lambda m: (m.q_dim, m.hidden),
    "gate_proj": lambda m: (m.hidden, m.intermediate), "up_proj": lambda m: (m.hidden, m.intermediate),
    "down_proj": lambda m: (m.intermediate, m.hidden),
}


def lora_params(m: ModelSizes, rank: int, targets: list[str]) -> int:
    """Adapter parameters on the language model's linear layers: r (in + out) each."""
    per_layer = sum(rank * sum(LORA_SHAPES[t](m)) for t in targets if t in LORA_SHAPES)
    return m.layers * per_layer


# --------------------------------------------------------------------------
# Memory estimates (pure; formulas in the module docstring)
# --------------------------------------------------------------------------


def activation_bytes_per_token(m: ModelSizes) -> int:
    """Saved activations of one decoder block per token, bf16."""
    return 2 * (4 * m.hidden + 3 * m.q_dim + 3 * m.kv_dim + 4 * m.intermediate)


# Peak bytes per logit of the log-prob head (module docstring), measured on CPU by
# benchmarks/logprob_memory.py (live tensor storage over forward + backward of the head).
LOGIT_BYTES_FULL = 16
LOGIT_BYTES_FULL_ENTROPY = 8
LOGIT_BYTES_FULL_KL = 10
LOGIT_BYTES_CHUNKED = 8
LOGIT_BYTES_CHUNKED_ENTROPY = 24


def logits_bytes(m: ModelSizes, micro_batch_tokens: int, chunk_tokens: int = 0,
                 entropy: bool = False, full_kl: bool = False) -> int:
    """Peak bytes of the log-prob head for one micro-batch (chunk_tokens 0: full logits)."""
    if chunk_tokens:
        if full_kl:
            raise ValueError("the full KL needs the full logits: chunk_tokens must be 0")
        per = LOGIT_BYTES_CHUNKED_ENTROPY if entropy else LOGIT_BYTES_CHUNKED
        return per * min(chunk_tokens, micro_batch_tokens) * m.vocab
    per = (LOGIT_BYTES_FULL + LOGIT_BYTES_FULL_ENTROPY * entropy + LOGIT_BYTES_FULL_KL * full_kl)
    return per * micro_batch_tokens * m.vocab


def _trained(m: ModelSizes, lora: int, freeze_vision: bool,
             freeze_projector: bool) -> tuple[int, int, int]:
    """(parameters held, parameters trained, unsharded gradient buffer bytes)."""
    if lora:
        return m.params + lora, lora, 2 * lora
    vision_trainable = m.projector if freeze_vision else m.vision
    if freeze_projector:
        vision_trainable -= m.projector
    trainable = m.params - (m.vision - vision_trainable)
    return m.params, trainable, 2 * (m.root + max(m.layer, vision_trainable))


def optimizer_state(m: ModelSizes, *, ranks: int, lora: int = 0, freeze_vision: bool = False,
                    freeze_projector: bool = False) -> dict[str, float]:
    """Bytes per rank of the fp32 parameter shards, gradient shards and AdamW moments:
    on the device, or in host memory with trainer.offload."""
    params, trainable, _ = _trained(m, lora, freeze_vision, freeze_projector)
    return {"master": 4 * params / ranks, "grads": 4 * trainable / ranks,
            "adamw": 8 * trainable / ranks}


def trainer_memory(m: ModelSizes, *, ranks: int, micro_batch_tokens: int, checkpointing: bool,
                   reference: bool, lora: int = 0, freeze_vision: bool = False,
                   freeze_projector: bool = False, logprob_chunk_tokens: int = 0,
                   entropy: bool = False, full_kl: bool = False, reference_bytes: int = 4,
                   offload: bool = False) -> dict[str, float]:
    """Bytes per trainer rank on its device, by term; ``lora`` = adapter parameters (0: full
    fine-tuning). With ``offload`` the master/grads/adamw terms are 0 here: they are host
    memory (``optimizer_state``)."""
    t = micro_batch_tokens
    frozen = dict(lora=lora, freeze_vision=freeze_vision, freeze_projector=freeze_projector)
    state = optimizer_state(m, ranks=ranks, **frozen)
    a = activation_bytes_per_token(m)
    if checkpointing:
        activations = 2 * t * m.hidden * m.layers + t * a
    else:
        activations = t * a * m.layers
    return {
        **{k: 0 if offload else v for k, v in state.items()},
        "reference": reference_bytes * m.params / ranks if reference and not lora else 0,
        "gathered": 2 * (m.root + 2 * max(m.layer, m.vision)),
        "grad buffers": _trained(m, **frozen)[2],
        "activations": activations,
        "logits": logits_bytes(m, t, logprob_chunk_tokens, entropy, full_kl),
        "context": CONTEXT_BYTES,
    }


@dataclass(frozen=True)
class EngineMemory:
    budget: float              # u x device bytes: what vLLM takes
    parts: dict[str, float]    # weights, activations, context, KV cache
    kv_bytes_per_token: int

    @property
    def kv_tokens(self) -> int:
        return max(0, int(self.parts["KV cache"] // self.kv_bytes_per_token))


def engine_memory(m: ModelSizes, *, tensor_parallel: int, device_bytes: float, utilization: float,
                  max_num_batched_tokens: int, dtype_bytes: int = 2) -> EngineMemory:
    """One engine's share of each of its GPUs."""
    p = tensor_parallel
    budget = utilization * device_bytes
    weights = dtype_bytes * m.params / p
    seqs = min(SAMPLER_SEQS, max_num_batched_tokens)
    activations = (2 * max_num_batched_tokens * (3 * m.intermediate / p + 4 * m.hidden)
                   + 6 * seqs * m.vocab)
    kv_per_token = 2 * m.layers * max(1, m.kv_heads // p) * m.head_dim * dtype_bytes
    parts = {"weights": weights, "activations": activations, "context": CONTEXT_BYTES}
    parts["KV cache"] = budget - sum(parts.values())
    return EngineMemory(budget, parts, kv_per_token)


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
    dtype_bytes = 4 if cfg.model.dtype == "float32" else 2
    specs = {g.role: g for g in group_specs(layout)}
    trainer, host = _trainer_terms(cfg, m, layout.trainer_ranks)
    utilization = layout.gpu_memory_utilization or cfg.generator.gpu_memory_utilization
    engines = {name: engine_memory(m, tensor_parallel=r.tensor_parallel, device_bytes=device_bytes,
                                   utilization=utilization,
                                   max_num_batched_tokens=cfg.generator.max_num_batched_tokens,
                                   dtype_bytes=dtype_bytes)
               for name, r in layout.roles.items()}
    known = device_bytes > 0
    plan.breakdown.append(f"trainer rank ({layout.trainer_ranks} ranks): " + _terms(trainer))
    if host:
        plan.breakdown.append("trainer rank host memory (trainer.offload): " + _terms(host))
    for name, e in engines.items():
        if known:
            plan.breakdown.append(f"{name} engine: {utilization:g} x "
                                  f"{device_bytes / GIB:.0f} = {e.budget / GIB:.1f} GiB: "
                                  + _terms(e.parts))
    max_len = cfg.generator.max_model_len
    for slot in plan.slots:
        if not slot.devices:
            continue
        spec = specs[slot.role]
        owner = next(i for i, members in enumerate(spec.members) if slot.bundle in members)
        if slot.role == TRAINER:
            total = sum(trainer.values()) + sum(engines[g].budget for g in layout.colocate)
            who = " + ".join([f"trainer rank {owner}"] + [f"{g} engine {owner}" for g in layout.colocate])
            note = f"over the {device_bytes / GIB:.0f} GiB device" if known and total > device_bytes else ""
            if known and layout.colocate and not note:
                e = engines[layout.colocate[0]]
                note = f"KV {e.parts['KV cache'] / GIB:.1f} GiB = {e.kv_tokens:,} tokens"
        else:
            tp = len(slot.devices)
            e = engines[slot.role]
            total = e.budget if known else 0.0
            note = (f"KV {e.parts['KV cache'] / GIB:.1f} GiB = {e.kv_tokens:,} tokens "
                    f"({e.kv_tokens / max_len:.1f} x max_model_len)") if known else ""
            for shard, device in enumerate(slot.devices):
                who = f"{slot.role} engine {owner}" + (f" (shard {shard}/{tp})" if tp > 1 else "")
                plan.rows.append(DeviceRow(slot.node, device, who, total, note))
            continue
        plan.rows.append(DeviceRow(slot.node, slot.devices[0], who, total, note))
    if host:
        plan.breakdown.extend(_host_lines(plan.slots, nodes, host, 4 * m.params))
    if known:
        _check_memory(plan, layout, trainer, engines, device_bytes, max_len)
    return plan


def _host_lines(slots: list[Slot], nodes: list[Node], host: dict, load_bytes: float) -> list[str]:
    """Host memory of the offloaded trainer state, per node (reported: no cluster field
    declares host memory to check it against)."""
    ranks: dict[int, int] = {}
    for slot in slots:
        if slot.role == TRAINER:
            ranks[slot.node] = ranks.get(slot.node, 0) + 1
    per_rank = sum(host.values())
    return [f"host memory {nodes[node].name}: {count} trainer rank{'s' * (count > 1)} x "
            f"{per_rank / GIB:.1f} = {count * per_rank / GIB:.1f} GiB offloaded state "
            f"(+ {load_bytes / GIB:.1f} GiB per rank while loading the fp32 checkpoint)"
            for node, count in sorted(ranks.items())]


def _check_memory(plan: PhasePlan, layout: Layout, trainer: dict, engines: dict,
                  device_bytes: float, max_model_len: int) -> None:
    dev = device_bytes / GIB
    rank = sum(trainer.values())
    guests = sum(engines[g].budget for g in layout.colocate)
    if rank + guests > device_bytes:
        extra = (f" + colocated engines {guests / GIB:.1f} GiB "
                 f"(gpu_memory_utilization)" if guests else "")
        plan.problems.append(
            f"phase {layout.name}: a trainer rank needs {rank / GIB:.1f} GiB{extra} on a "
            f"{dev:.0f} GiB device (over by {(rank + guests - device_bytes) / GIB:.1f} GiB): "
            + _terms(trainer))
    for name, e in engines.items():
        kv = e.parts["KV cache"]
        if kv < max_model_len * e.kv_bytes_per_token:
            plan.problems.append(
                f"phase {layout.name}: {name} engine: KV cache {kv / GIB:.2f} GiB holds "
                f"{e.kv_tokens} tokens, less than one max_model_len sequence ({max_model_len} "
                f"tokens = {max_model_len * e.kv_bytes_per_token / GIB:.2f} GiB) in its "
                f"{e.budget / GIB:.1f} GiB share; " + _terms(e.parts))


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
    from pipelines.recipes.base import build_recipe

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
    import sys

    from pipelines.recipes.base import build_recipe, check_layouts

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
    from pipelines.runtime.local_ray import ray_session
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
