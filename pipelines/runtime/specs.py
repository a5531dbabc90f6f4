"""The one place a config becomes the specs of the actors a run starts: vLLM engines
(``EngineSpec``) and trainer groups (``TrainerSpec``). Phases, ``coevolve
generate``, ``coevolve eval`` and ``coevolve plan`` all build them here, so an
engine sampled by hand is the engine a run samples with.
"""

from __future__ import annotations

import torch

from actors.objectives import ObjectiveSpec
from actors.sampling import EngineSpec
from actors.trainer_spec import LoraSpec, TrainerSpec


def engine_spec(cfg, model: str, tensor_parallel: int = 1,
                gpu_memory_utilization: float | None = None, sleep_mode: bool = False,
                lora: bool | None = None) -> EngineSpec:
    """How the config builds one engine serving ``model`` (no actor started);
    ``gpu_memory_utilization``: a phase layout's own share (colocated engines);
    ``sleep_mode``: the engine shares its device with a trainer rank; ``lora``: serve
    adapters (default: trainer.lora.enabled; an engine sampling the base model: False)."""
    g = cfg.generator
    dtype = cfg.model.dtype
    if dtype == "auto":
        dtype = "bfloat16" if torch.cuda.is_available() else "float32"
    return EngineSpec(model=model, dtype=dtype, max_model_len=g.max_model_len,
                      max_num_batched_tokens=g.max_num_batched_tokens,
                      gpu_memory_utilization=gpu_memory_utilization or g.gpu_memory_utilization,
                      cpu_kvcache_gib=g.cpu_kvcache_gib, tensor_parallel=tensor_parallel,
                      enforce_eager=g.enforce_eager, seed=cfg.run.seed,
                      max_pixels=cfg.model.max_pixels,
                      enable_lora=cfg.trainer.lora.enabled if lora is None else lora,
                      max_lora_rank=vllm_lora_rank(cfg.trainer.lora.rank),
                      multiprocess={"auto": None, "always": True, "never": False}[g.multiprocess],
                      sleep_mode=sleep_mode)


def sleep_level(cfg) -> int:
    """vLLM sleep level of engines colocated with the trainer ranks during an update: 2
    (weights discarded) when the weight sync overwrites every weight right after they
    wake; 1 (weights to host memory and back) when they must survive: LoRA serves
    adapters on the base weights, and without run.sync_weights nothing replaces them."""
    return 2 if cfg.run.sync_weights and not cfg.trainer.lora.enabled else 1


# The adapter ranks vLLM accepts as max_lora_rank (an adapter may have any rank up to it).
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def vllm_lora_rank(rank: int) -> int:
    """The smallest max_lora_rank vLLM accepts that holds adapters of ``rank``."""
    for allowed in VLLM_LORA_RANKS:
        if rank <= allowed:
            return allowed
    raise ValueError(f"trainer.lora.rank: {rank} is over vLLM's largest ({VLLM_LORA_RANKS[-1]})")


def role_engine_spec(cfg, layout, role: str, weights: str) -> EngineSpec:
    """An engine of ``role`` serving ``weights`` in a resolved placement ``layout``
    (pipelines/layouts.py): its tensor parallelism, memory share, sleep mode."""
    return engine_spec(cfg, weights, layout.roles[role].tensor_parallel,
                       gpu_memory_utilization=layout.gpu_memory_utilization,
                       sleep_mode=role in layout.colocate)


def trainer_spec(cfg, start_weights: str, steps: int, sft: bool = False,
                 adapters: tuple[str, ...] = (), mini_batches: int | None = None) -> TrainerSpec:
    """How the config builds the trainer group of a phase of ``steps`` generation steps
    (SFT: optimizer steps) that starts from ``start_weights`` (no actor started); ``sft``:
    the SFT objective; ``adapters``: the LoRA adapters a phase trains as policies (default:
    one); ``mini_batches``: the phase's updates per generation step, if it sets its own."""
    t, a = cfg.trainer, cfg.algorithm
    lora = t.lora
    if not sft:  # optimizer steps: the schedule's length
        steps *= (mini_batches or a.mini_batches) * a.epochs
    return TrainerSpec(
        model=start_weights,
        objective=ObjectiveSpec(policy_loss=a.loss, clip_low=a.clip_low, clip_high=a.clip_high,
                                dual_clip=a.dual_clip or None, loss_agg=a.loss_agg,
                                loss_agg_seqs=a.loss_agg_seqs,
                                kl_coef=a.kl_coef, kl_estimator=a.kl_estimator,
                                entropy_coef=a.entropy_coef, log_entropy=a.log_entropy,
                                tis_cap=a.tis_cap),
        lr=t.lr, weight_decay=t.weight_decay, betas=tuple(t.betas), grad_clip=t.grad_clip,
        schedule=t.schedule, warmup_steps=int(round(t.warmup_ratio * steps)),
        total_steps=steps, micro_batch_tokens=t.micro_batch_tokens,
        gradient_checkpointing=t.gradient_checkpointing, freeze_vision=t.freeze_vision,
        freeze_projector=t.freeze_projector,
        logprob_chunk_tokens=t.logprob_chunk_tokens, reference_dtype=t.reference_dtype,
        share_prompts=t.share_prompts,
        offload=t.offload, max_pixels=cfg.model.max_pixels,
        mixed_precision={"auto": None, "bfloat16": True, "float32": False}[cfg.model.dtype],
        lora=LoraSpec(lora.rank, lora.alpha, lora.dropout, list(lora.target_modules),
                      adapters=tuple(adapters) or ("default",))
        if lora.enabled else None,
        reference=needs_reference(a) and not sft, sft=sft, seed=cfg.run.seed,
        threads=max(1, cfg.placement.cpus_per_rank))


def needs_reference(algorithm) -> bool:
    """A KL loss (fixed or adaptive coefficient) or reinforce_pp's KL reward."""
    return algorithm.kl_coef > 0 or (algorithm.advantage == "reinforce_pp"
                                     and algorithm.kl_in_reward > 0)
