"""The memory model of ``coevolve plan``: model sizes, and bytes per device.

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

engine (one vLLM 0.32 engine, tensor_parallel p, per GPU; vLLM takes
gpu_memory_utilization u of the device, runs a profile pass and fills what the
pass leaves with KV cache):
  weights        2 P / p
  activations    2 B (3 I / p + 4 H)     the text model's profile over B =
                                          generator.max_num_batched_tokens tokens
  sampler        6 S V                   bf16 logits and their fp32 copy for S =
                                          max_num_seqs sequences: vLLM's default, 1,024
                                          on GPUs of 70 GiB or more, 256 below
                                          (capped at B)
  vision encoder 2 n m^2 (3 Iv / p + 4 Hv)  the encoder's profile over the largest
                                          images that fill max(B, one image's tokens):
                                          n merged tokens of m x m patches each
                                          (model.max_pixels, else the processor's
                                          default), Hv the vision width, Iv its MLP
  encoder outputs 2 n H (1 + D)          kept through the text profile (D: Qwen3-VL's
                                          DeepStack levels)
  cuda graphs    2 GiB                   generator.enforce_eager false: an allowance
                                          for what vLLM measures and sets aside
  context        1 GiB
  KV cache       u D - the above;  per token 2 (K, V) x L x max(1, kv_heads / p) x head_dim x 2
  The profile's terms are summed, an upper bound of the peak vLLM measures. vLLM
  refuses to start below one max_model_len sequence of KV cache; the plan refuses
  fewer than generator.min_kv_sequences.

A colocated engine shares its trainer rank's device and takes turns with it
(vLLM sleep mode): while it generates, the rank keeps only its resident terms
(master, adamw, reference, context: the update's working memory was returned
by release_memory) and the engine its u D; while the rank updates, the
sleeping engine keeps its context. Both turns must fit D.

host memory, per node: with trainer.offload each rank holds master + grads +
adamw = 16 T / N (+ 4 (P - T) / N); trainer rank 0 holds, for a moment, one
full fp32 copy while loading (the other ranks build on the meta device and
receive their shards), 8 P during a full weight sync (the gathered fp32 state
and its copy in Ray's object store) and (4 + e) P while exporting hf/ in e
bytes per parameter: the largest counts; engines that sleep at level 1 (LoRA,
or no weight sync) keep their weights, 2 P / p each, in host memory. The sum
is checked against placement.cluster.host_memory_gib. Each process's own
runtime (CUDA, Python, vLLM) is not counted.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from actors.models import resolve_model

GIB = 2**30
CONTEXT_BYTES = GIB

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
    "Qwen/Qwen2-VL-7B-Instruct": {
        "model_type": "qwen2_vl", "tie_word_embeddings": False,
        "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
        "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064,
        "vision_config": {"depth": 32, "embed_dim": 1280, "mlp_ratio": 4, "num_heads": 16,
                          "hidden_size": 3584, "patch_size": 14, "spatial_merge_size": 2,
                          "temporal_patch_size": 2, "in_chans": 3},
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
    # the vision tower's shapes, for vLLM's encoder profile (0: not known)
    vision_width: int = 0    # hidden size of a vision block
    vision_mlp: int = 0      # width of its MLP
    vision_out: int = 0      # width of a merged image token (the text model's hidden size)
    vision_outputs: int = 1  # encoder outputs per image token: 1 + Qwen3-VL's DeepStack levels
    patch: int = 14          # pixels per patch side
    merge: int = 2           # patches per merged token side

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
                      kv_heads, head_dim, vocab, **_vision_shape(family, config["vision_config"], h))


def _vision_shape(family: str, v: dict, text_hidden: int) -> dict:
    """The shapes of the vision tower that its activations scale with."""
    if family == "qwen2_vl":
        width = v["embed_dim"]
        shape = dict(vision_width=width, vision_mlp=int(width * v.get("mlp_ratio", 4)),
                     vision_out=v.get("hidden_size", text_hidden))
    else:
        shape = dict(vision_width=v["hidden_size"], vision_mlp=v["intermediate_size"],
                     vision_out=v["out_hidden_size"])
    return {**shape, "vision_outputs": 1 + len(v.get("deepstack_visual_indexes", [])),
            "patch": v["patch_size"], "merge": v.get("spatial_merge_size", 2)}


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


# What a rank keeps on its device between updates, once ``release_memory`` has returned
# the allocator's cache: its parameter and AdamW shards (zero_grad(set_to_none) freed
# the gradients), the reference, the context. The rest is the update's working memory.
RESIDENT_TERMS = ("master", "adamw", "reference", "context")


def resident(parts: dict[str, float]) -> dict[str, float]:
    """The terms of ``trainer_memory`` that stay on the device between updates."""
    return {k: v for k, v in parts.items() if k in RESIDENT_TERMS}


# --------------------------------------------------------------------------
# vLLM engines (vLLM 0.32 on CUDA)
# --------------------------------------------------------------------------


def vllm_max_num_seqs(device_bytes: float) -> int:
    """vLLM's max_num_seqs for the LLM class when the engine leaves it unset, as
    ``EngineArgs.get_batch_defaults`` picks it: 1,024 on a GPU of 70 GiB or more, 256
    below. (vLLM gives an 80 GB A100 256 by its name, which the plan does not know: it
    counts the larger sampler.)"""
    return 1024 if device_bytes >= 70 * GIB else 256


# The public processors' default pixel limit when model.max_pixels is 0: Qwen2-VL and
# Qwen2.5-VL max_pixels 12,845,056 (16,384 tokens of 28 x 28 pixels), Qwen3-VL
# size.longest_edge 16,777,216 (16,384 tokens of 32 x 32).
DEFAULT_MAX_PIXELS = {"qwen2_vl": 12_845_056, "qwen2_5_vl": 12_845_056, "qwen3_vl": 16_777_216}


def image_tokens(m: ModelSizes, max_pixels: int) -> int:
    """Merged tokens of the largest image the processor makes (vLLM profiles with it:
    ``get_image_size_with_most_features``); ``max_pixels`` 0: the family's default."""
    unit = m.patch * m.merge
    return (max_pixels or DEFAULT_MAX_PIXELS[m.family]) // (unit * unit)


def encoder_profile(m: ModelSizes, *, image_tokens: int, max_num_batched_tokens: int,
                    max_num_seqs: int, images_per_prompt: int, max_model_len: int,
                    tensor_parallel: int = 1) -> dict[str, float]:
    """Peak bytes of vLLM's profile run of the vision encoder (``MultiModalBudget``,
    ``EncoderRunner.profile_encoder_cache``): the largest images fill the encoder budget
    max(max_num_batched_tokens, one image's tokens); the tower's activations over their
    patches, and its outputs, which stay cached through the text model's profile."""
    if not image_tokens or not m.vision_width:
        return {}
    budget = max(max_num_batched_tokens, image_tokens)
    per_prompt = max(1, min(images_per_prompt, max_model_len // image_tokens))
    images = max(1, min(budget // image_tokens, max_num_seqs * per_prompt))
    tokens = images * image_tokens
    patches = tokens * m.merge ** 2
    return {"vision encoder": 2 * patches * (3 * m.vision_mlp / tensor_parallel + 4 * m.vision_width),
            "encoder outputs": 2 * tokens * m.vision_out * m.vision_outputs}


SAMPLER_BYTES_PER_LOGIT = 6  # the sampler's bf16 logits and their fp32 copy
# vLLM measures its CUDA graphs at start-up and takes them from the KV cache
# (VLLM_MEMORY_PROFILER_ESTIMATE_CUDAGRAPHS, on by default); logged figures for 7-8B
# models run 0.4-1.6 GiB, so the plan sets aside 2.
CUDA_GRAPH_BYTES = 2 * GIB


@dataclass(frozen=True)
class EngineMemory:
    budget: float              # u x device bytes: what vLLM takes
    parts: dict[str, float]    # weights, profile peaks, context, KV cache
    kv_bytes_per_token: int
    max_num_seqs: int

    @property
    def kv_tokens(self) -> int:
        return max(0, int(self.parts["KV cache"] // self.kv_bytes_per_token))

    def sequences(self, max_model_len: int) -> float:
        """Whole max_model_len sequences the KV cache holds."""
        return self.kv_tokens / max_model_len


def engine_memory(m: ModelSizes, *, tensor_parallel: int, device_bytes: float, utilization: float,
                  max_num_batched_tokens: int, max_model_len: int, max_num_seqs: int,
                  image_tokens: int = 0, images_per_prompt: int = 1, cuda_graphs: bool = False,
                  dtype_bytes: int = 2) -> EngineMemory:
    """One engine's share of each of its GPUs; ``max_num_seqs`` as vLLM sets it
    (``vllm_max_num_seqs``), ``image_tokens`` of the largest image (0: no vision profile),
    ``cuda_graphs``: not enforce_eager."""
    p = tensor_parallel
    seqs = min(max_num_seqs, max_num_batched_tokens)  # vLLM's cap on a default it chose
    parts = {
        "weights": dtype_bytes * m.params / p,
        "activations": 2 * max_num_batched_tokens * (3 * m.intermediate / p + 4 * m.hidden),
        "sampler": SAMPLER_BYTES_PER_LOGIT * seqs * m.vocab,
        **encoder_profile(m, image_tokens=image_tokens, max_num_batched_tokens=max_num_batched_tokens,
                          max_num_seqs=seqs, images_per_prompt=images_per_prompt,
                          max_model_len=max_model_len, tensor_parallel=p),
        "cuda graphs": CUDA_GRAPH_BYTES if cuda_graphs else 0,
        "context": CONTEXT_BYTES,
    }
    budget = utilization * device_bytes
    parts["KV cache"] = budget - sum(parts.values())
    kv_per_token = 2 * m.layers * max(1, m.kv_heads // p) * m.head_dim * dtype_bytes
    return EngineMemory(budget, parts, kv_per_token, seqs)


# --------------------------------------------------------------------------
# Host memory (per node)
# --------------------------------------------------------------------------


def rank0_host_peak(m: ModelSizes, *, full_sync: bool, export_bytes: int,
                    lora: int = 0) -> dict[str, float]:
    """Host bytes trainer rank 0 holds for a moment, by occasion (the largest counts):
    loading (one full fp32 copy, sharded from there to every rank), the weight sync of
    full weights (the gathered fp32 state and its copy in Ray's object store), the hf/
    export (the gathered fp32 state and the model written in ``export_bytes`` per
    parameter)."""
    params = m.params + lora
    return {"loading": 4 * params, "weight sync": 8 * params if full_sync else 0,
            "export": (4 + export_bytes) * params}
