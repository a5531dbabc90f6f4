"""What a trainer rank is built from: ``TrainerSpec`` (model, objective, optimizer,
schedule, memory levers) and ``LoraSpec`` (the adapters a phase trains). Built from
the config by pipelines/runtime/specs.py; actors/trainer.py builds the rank."""

from __future__ import annotations

from dataclasses import dataclass, field

from actors.objectives import ObjectiveSpec


@dataclass
class LoraSpec:
    rank: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: [
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    # Adapters on the one backbone, each a policy of its own (optimizer, schedule,
    # checkpoint); the verbs take ``adapter=`` (default: the first).
    adapters: tuple[str, ...] = ("default",)


@dataclass
class TrainerSpec:
    """Everything a rank needs to build its model and optimizer (from the config)."""

    model: str  # hub id, folder or tiny:// reference: the phase's starting weights
    objective: ObjectiveSpec = field(default_factory=ObjectiveSpec)
    sft: bool = False  # run the masked NLL instead of the policy objective
    lr: float = 1e-6
    weight_decay: float = 1e-2
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 1.0
    schedule: str = "constant"  # constant | warmup | cosine
    warmup_steps: int = 0
    total_steps: int = 1  # for cosine
    micro_batch_tokens: int = 16384
    gradient_checkpointing: bool = True
    freeze_vision: bool = False
    freeze_projector: bool = False
    lora: LoraSpec | None = None
    reference: bool = True  # keep the frozen starting policy for KL
    mixed_precision: bool | None = None  # None: bf16 on GPU, fp32 on CPU
    # Memory levers (see pipelines/runtime/memory.py for what each saves):
    logprob_chunk_tokens: int = 2048  # score tokens from hidden states in chunks (0: full logits)
    share_prompts: bool = True  # with chunks: a prompt's samples in one packed row (packing.py)
    reference_dtype: str = "float32"  # float32 | bfloat16: storage of the frozen reference
    offload: bool = False  # FSDP2 CPUOffloadPolicy: parameter/gradient/AdamW shards in host memory
    max_pixels: int = 0  # the processor's image size limit, as the engines' (0: the model's own)
    seed: int = 0
    threads: int = 0  # torch threads on CPU (0: leave as is)

    def __post_init__(self) -> None:
        if self.logprob_chunk_tokens < 0:
            raise ValueError(f"logprob_chunk_tokens must be >= 0, got {self.logprob_chunk_tokens}")
        if self.reference_dtype not in ("float32", "bfloat16"):
            raise ValueError(f"reference_dtype must be float32 or bfloat16, got {self.reference_dtype!r}")
        if (self.logprob_chunk_tokens and not self.sft and self.objective.kl_estimator == "full"
                and self.objective.kl_coef > 0):
            raise ValueError("kl_estimator 'full' needs the whole-vocabulary logits of policy and "
                             "reference: set trainer.logprob_chunk_tokens: 0")
