"""GeneratorActor: one vLLM engine that samples completions for a role.

Runs inside a Ray actor (``ray.remote(GeneratorActor)`` at the call site, so
importing this module has no side effects). Verbs:

- ``generate(requests) -> list[list[Completion]]``: chat requests with zero
  or more images; per sample the text, the prompt and completion token ids,
  the log-prob of every sampled token, the finish reason and the weight
  version that produced it.
- ``health()``, ``stats()``.

Prompts are rendered with the model's own chat template and processor
(``apply_chat_template`` of the Hugging Face processor saved with the model),
and vLLM expands the image placeholders with the same processor, so a trainer
that runs the processor on the same text and images rebuilds the identical
token sequence (``prompt_ids`` here).

vLLM on CPU (facts checked on a 2-core host, see docs/architecture.md):
``VLLM_CPU_KVCACHE_SPACE`` must be set; ``VLLM_ENABLE_V1_MULTIPROCESSING=0``
starts an engine in seconds instead of ~20 s; a per-request seed crashes when
a prefill is split across steps, so ``max_num_batched_tokens`` is kept above
the longest prompt.
"""

from __future__ import annotations

import io
import os
import time
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
    max_tokens: int = 256
    stop: list[str] = field(default_factory=list)
    seed: int | None = None


@dataclass
class Request:
    """One chat request.

    ``messages`` follow the Hugging Face chat format; an image part is
    ``{"type": "image"}`` and takes the next entry of ``images`` (PNG/JPEG
    bytes or a PIL image), in order.
    """

    messages: list[dict]
    images: list[Any] = field(default_factory=list)
    sampling: Sampling = field(default_factory=Sampling)
    adapter: str | None = None


@dataclass
class Completion:
    text: str
    prompt_ids: list[int]
    token_ids: list[int]
    logprobs: list[float]  # log-prob of each sampled token under the engine's weights
    finish_reason: str  # "stop" | "length" | ...
    version: int  # weight version that produced it


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
    enable_lora: bool = False
    max_lora_rank: int = 16
    max_loras: int = 2


def cpu_engine_env(threads: int) -> dict[str, str]:
    """Environment for a vLLM engine process on a CPU host (set before importing vllm)."""
    return {
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        # vLLM binds OpenMP threads to cores itself unless told not to; with
        # several engines on a small host they would all land on one core.
        "VLLM_CPU_OMP_THREADS_BIND": "nobind",
        "OMP_NUM_THREADS": str(threads),
        "VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "WARNING"),
    }


class GeneratorActor:
    def __init__(self, spec: EngineSpec, name: str = "generator"):
        from pipelines.models import resolve_model

        self.spec = spec
        self.name = name
        self.version = 0
        self._counters = {"requests": 0, "samples": 0, "prompt_tokens": 0, "tokens": 0,
                          "seconds": 0.0}
        path = resolve_model(spec.model)
        on_cpu = not _has_cuda()
        if on_cpu:
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(spec.cpu_kvcache_gib))
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        from transformers import AutoProcessor
        from vllm import LLM

        self.processor = AutoProcessor.from_pretrained(path)
        self.llm = LLM(
            model=path,
            dtype=spec.dtype,
            seed=spec.seed,
            max_model_len=spec.max_model_len,
            max_num_batched_tokens=spec.max_num_batched_tokens,
            gpu_memory_utilization=spec.gpu_memory_utilization,
            tensor_parallel_size=spec.tensor_parallel,
            enforce_eager=spec.enforce_eager,
            limit_mm_per_prompt={"image": spec.max_images_per_prompt, "video": 0},
            enable_lora=spec.enable_lora,
            max_lora_rank=spec.max_lora_rank,
            max_loras=spec.max_loras,
        )
        tokenizer = self.processor.tokenizer
        banned = {tokenizer.convert_tokens_to_ids(t) for t in VISION_PLACEHOLDERS}
        vocab = self.llm.llm_engine.model_config.get_vocab_size()
        # Ids past the tokenizer (vocabulary padding) decode to nothing: ban them too.
        self._allowed = [i for i in range(min(vocab, len(tokenizer))) if i not in banned]

    # -- verbs ---------------------------------------------------------------

    def generate(self, requests: list[Request]) -> list[list[Completion]]:
        """Sample every request; result[i] holds request i's n completions."""
        from vllm import SamplingParams

        prompts, params = [], []
        for req in requests:
            prompts.append(self._prompt(req))
            s = req.sampling
            params.append(SamplingParams(
                n=s.n, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k,
                max_tokens=s.max_tokens, stop=list(s.stop) or None, seed=s.seed, logprobs=0,
                allowed_token_ids=self._allowed,
            ))
        start = time.perf_counter()
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        elapsed = time.perf_counter() - start
        results = []
        for out in outputs:
            prompt_ids = list(out.prompt_token_ids)
            samples = []
            for c in out.outputs:
                token_ids = list(c.token_ids)
                logprobs = [step[tok].logprob for step, tok in zip(c.logprobs, token_ids)]
                samples.append(Completion(c.text, prompt_ids, token_ids, logprobs,
                                          str(c.finish_reason), self.version))
                self._counters["tokens"] += len(token_ids)
            self._counters["prompt_tokens"] += len(prompt_ids)
            self._counters["samples"] += len(samples)
            results.append(samples)
        self._counters["requests"] += len(requests)
        self._counters["seconds"] += elapsed
        return results

    def health(self) -> dict:
        return {"name": self.name, "version": self.version, "pid": os.getpid()}

    def stats(self) -> dict:
        c = self._counters
        return {**c, "version": self.version,
                "tokens_per_s": c["tokens"] / c["seconds"] if c["seconds"] else 0.0}

    # -- helpers -------------------------------------------------------------

    def _prompt(self, req: Request) -> dict:
        n_parts = sum(
            1 for m in req.messages if isinstance(m.get("content"), list)
            for part in m["content"] if part.get("type") == "image"
        )
        if n_parts != len(req.images):
            raise ValueError(f"request has {n_parts} image parts but {len(req.images)} images")
        text = self.processor.apply_chat_template(
            req.messages, tokenize=False, add_generation_prompt=True)
        prompt: dict[str, Any] = {"prompt": text}
        if req.images:
            prompt["multi_modal_data"] = {"image": [to_pil(im) for im in req.images]}
        return prompt


def to_pil(image: Any):
    """PNG/JPEG bytes or a PIL image -> an RGB PIL image."""
    from PIL import Image

    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, (bytes, bytearray, memoryview)):
        return Image.open(io.BytesIO(bytes(image))).convert("RGB")
    raise TypeError(f"an image must be encoded bytes or a PIL image, got {type(image).__name__}")


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()
