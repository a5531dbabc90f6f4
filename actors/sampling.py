"""What a request to an engine is and what comes back, and the vLLM sampling
parameters built from it: ``Sampling``, ``Request``, ``Completion``, the engine's
``EngineSpec``; the banned ids (vision placeholders, vocabulary padding) as a
logit bias that does not grow with the vocabulary. Recipes, pools and the engine
actor share these; ``actors/generator.py`` runs the engine."""

from __future__ import annotations

import io
import os
from dataclasses import dataclass, field
from typing import Any

# Token ids a completion must never contain: the model's vision placeholders.
# A random tiny model samples them freely, and a completion holding an image
# pad cannot be replayed by the trainer (the processor would expect an image).
VISION_PLACEHOLDERS = ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>",
                       "<|vision_pad|>")


@dataclass
class Sampling:
    """Sampling parameters of one request (vLLM semantics)."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    repetition_penalty: float = 1.0  # 1 = off (vLLM's: seen tokens' logits divided by it)
    max_tokens: int = 256
    stop: list[str] = field(default_factory=list)
    seed: int | None = None


@dataclass
class Request:
    """One chat request.

    ``messages`` follow the Hugging Face chat format; an image part is
    ``{"type": "image"}`` and takes the next entry of ``images`` (PNG/JPEG
    bytes or a PIL image), in order. ``meta``: what the recipe's scorer reads back
    with the request (the item it asks, its label); never sent to an engine.
    """

    messages: list[dict]
    images: list[Any] = field(default_factory=list)
    sampling: Sampling = field(default_factory=Sampling)
    adapter: str | None = None
    meta: Any = None


REFUSED = "refused"  # Completion.finish_reason of a request the engine refused


@dataclass
class Completion:
    text: str  # for a refused request: why
    prompt_ids: list[int]
    token_ids: list[int]
    logprobs: list[float]  # log-prob of each sampled token under the engine's weights
    finish_reason: str  # "stop" | "length" | ... | REFUSED
    version: int  # weight version that produced it

    @property
    def refused(self) -> bool:
        return self.finish_reason == REFUSED


@dataclass
class EngineSpec:
    """How to build one engine; filled from the config by the pool."""

    model: str  # hub id, folder or tiny:// reference
    dtype: str = "float32"
    max_model_len: int = 4096
    max_num_batched_tokens: int = 8192
    gpu_memory_utilization: float = 0.6
    cpu_kvcache_gib: int = 1
    tensor_parallel: int = 1
    enforce_eager: bool = True
    seed: int = 0
    max_images_per_prompt: int = 4
    max_pixels: int = 0  # the processor's image size limit; 0 = the model folder's own
    enable_lora: bool = False
    max_lora_rank: int = 16
    max_loras: int = 2
    version: int = 0  # the weight version ``model`` holds (a pool rebased on an export)
    # vLLM's engine core in its own process (True), or in the actor's (False: starts in
    # ~3 s instead of ~20 s on CPU). None: in-process on a CPU host with tensor_parallel 1,
    # multiprocess otherwise. Tensor parallel > 1 is always multiprocess (mp executor).
    multiprocess: bool | None = None
    # Colocated with a trainer rank: ``sleep()`` frees the device for the update
    # (vLLM sleep mode, built in only on CUDA; on CPU the same calls pause scheduling
    # and vLLM's CPU worker has no device memory to free).
    sleep_mode: bool = False

    def runs_multiprocess(self, on_cpu: bool) -> bool:
        if self.tensor_parallel > 1:
            if self.multiprocess is False:
                raise ValueError("tensor_parallel > 1 needs a multiprocess engine "
                                 "(multiprocess: false given)")
            return True
        return (not on_cpu) if self.multiprocess is None else self.multiprocess


def cpu_engine_env(threads: int) -> dict[str, str]:
    """Environment for a vLLM engine process on a CPU host (set before importing vllm).

    ``threads`` is the engine's whole share; a tensor-parallel engine's ranks split it
    (``GeneratorActor`` sets each rank's count)."""
    return {
        # vLLM binds OpenMP threads to cores itself unless told not to; with
        # several engines on a small host they would all land on one core.
        "VLLM_CPU_OMP_THREADS_BIND": "nobind",
        "OMP_NUM_THREADS": str(threads),
        "VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "WARNING"),
    }


class EngineBroken(RuntimeError):
    """The engine failed half-way through changing its weights, or its core died: it
    must be restarted."""


# vLLM's floor for a logit bias (SamplingParams clamps to [-100, 100]).
BAN = -100.0


def banned_token_ids(tokenizer, vocab_size: int) -> list[int]:
    """Ids a completion must never hold: the vision placeholders, and the rows past the
    tokenizer (vocabulary padding, which decodes to nothing). A few hundred ids at most
    for the real Qwen models (152,064 rows, 151,665 tokens), whatever the vocabulary."""
    placeholders = {tokenizer.convert_tokens_to_ids(t) for t in VISION_PLACEHOLDERS}
    return sorted(placeholders | set(range(len(tokenizer), vocab_size)))


def sampling_params(s: Sampling, banned: list[int]):
    """vLLM SamplingParams of one request: the engine's raw log-prob of each sampled
    token, the banned ids as a logit bias."""
    from vllm import SamplingParams

    return SamplingParams(
        n=s.n, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k,
        repetition_penalty=s.repetition_penalty, max_tokens=s.max_tokens,
        stop=list(s.stop) or None, seed=s.seed, logprobs=0,
        logit_bias=dict.fromkeys(banned, BAN) if banned else None,
    )


def check_image_parts(req: Request) -> None:
    n_parts = sum(
        1 for m in req.messages if isinstance(m.get("content"), list)
        for part in m["content"] if part.get("type") == "image"
    )
    if n_parts != len(req.images):
        raise ValueError(f"request has {n_parts} image parts but {len(req.images)} images")


def to_pil(image: Any):
    """PNG/JPEG bytes or a PIL image -> an RGB PIL image."""
    from PIL import Image

    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, (bytes, bytearray, memoryview)):
        return Image.open(io.BytesIO(bytes(image))).convert("RGB")
    raise TypeError(f"an image must be encoded bytes or a PIL image, got {type(image).__name__}")
