"""TrainerActor: one FSDP2 rank of the policy trainer (``TrainerGroup``, in
actors/trainer_group.py, drives N of them).

The trainer does not know the recipe. A batch brings token ids, the prompt
lengths (the loss covers completion tokens), advantages (per sequence or per
token), old log-probs and optionally reference log-probs; the trainer runs
one generic masked objective (``actors.objectives.policy_objective``) or the
SFT loss. Verbs, called explicitly by the driver:

    compute_logprobs(batch, reference=False, adapter=None) -> per-sample completion log-probs
    forward_backward(batch, adapter=None) -> metrics   (accumulates gradients)
    optim_step(adapter=None) -> metrics     (clip, AdamW, LR schedule, zero grads)
    weight_buckets(bucket_bytes, dtype) -> refs  (object-store pushes; weight_transfer.py)
    transfer_plan / send_weights            (pushes over vLLM's weight-transfer protocol)
    adapter(name=None, dtype=None) -> [ref] (a LoRA adapter's peft payload)
    save(dir) / load(dir)                   (torch.distributed.checkpoint, reshardable)
    export_hf(dir)                          (a folder for transformers / vLLM / peft)

Gradients are the same whatever the micro-batch split and rank count: every
loss term is normalised by counts taken over the whole global batch (all
ranks), and the loss is multiplied by the world size because FSDP averages
gradients over ranks. All ranks run the same number of forward passes, each
touching the vision tower once, so FSDP's collectives stay aligned.
"""

from __future__ import annotations

import dataclasses
import os
import random

import numpy as np
import torch

from actors import fsdp
from actors.batching import InputBuilder, TrainBatch, micro_batches
from actors.logprobs import chunked_model_logprobs, token_logprobs
from actors.lora import adapter_of, language_targets, peft_name
from actors.models import resolve_model
from actors.objectives import merge_metrics, policy_objective, sft_loss
from actors.optim import init_adam_state, lr_factor, scheduler_state
from actors.trainer_spec import LoraSpec, TrainerSpec
from actors.weight_transfer import TrainerWeightSender

# re-exported: the specs are built from here by callers that predate trainer_spec.py
__all__ = ["LoraSpec", "TrainerActor", "TrainerSpec", "lr_factor", "merge_metrics"]


class TrainerActor(TrainerWeightSender):
    def __init__(self, spec: TrainerSpec, rank: int, world_size: int):
        self.spec, self.rank, self.world_size = spec, rank, world_size
        self.step = 0
        self._batches_seen = 0
        self._fault: str | None = None  # arm_fault(): what the next forward_backward does
        # Micro-batch tensors go where the model computes (FSDP2 moves only the model inputs).
        self.device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
        if spec.threads:
            torch.set_num_threads(spec.threads)

    def rendezvous_address(self) -> tuple[str, int]:
        return fsdp.free_address()

    def setup(self, host: str, port: int, timeout_s: float = 600.0) -> dict:
        """Join the process group, build the sharded policy, reference and optimizer."""

        # Resolve (and maybe build) the model before joining the process group:
        # transformers' save_pretrained writes nothing on ranks other than 0.
        self.path = resolve_model(self.spec.model)
        self.backend = fsdp.init_process_group(self.rank, self.world_size, host, port, timeout_s)
        _seed_everything(self.spec.seed)
        self.inputs = InputBuilder.for_model(self.path, self.spec.max_pixels)
        self.model = self._build_policy()
        self.reference = self._build_reference()
        # One optimizer and schedule per policy: the full weights, or each LoRA adapter.
        self.policies = list(self.spec.lora.adapters) if self.spec.lora else ["default"]
        self.optimizers, self.schedulers = {}, {}
        trainable = 0
        self._policy_params = {policy: self._params(policy) for policy in self.policies}
        for policy in self.policies:
            params = self._policy_params[policy]
            trainable += sum(p.numel() for p in params)
            # Fused: one kernel over all shards instead of ~10 ops per parameter. torch picks
            # its for-loop for DTensors, and with trainer.offload the step runs on the host's
            # shards (benchmarks/trainer.py times both).
            opt = torch.optim.AdamW(params, lr=self.spec.lr, betas=tuple(self.spec.betas),
                                    weight_decay=self.spec.weight_decay, eps=1e-8, fused=True)
            init_adam_state(opt)
            self.optimizers[policy] = opt
            self.schedulers[policy] = torch.optim.lr_scheduler.LambdaLR(opt, self._lr_factor)
        self.policy_steps = dict.fromkeys(self.policies, 0)
        return {"rank": self.rank, "backend": self.backend, "trainable_params": trainable}

    def _params(self, policy: str) -> list:
        """The trainable parameters of ``policy`` (all of them without adapters)."""
        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        if self.spec.lora is None or len(self.spec.lora.adapters) == 1:
            return [p for _, p in named]
        return [p for n, p in named if adapter_of(n) == policy]

    def _activate(self, adapter: str | None) -> str:
        """Route the forward pass through ``adapter`` (default: the first policy)."""
        policy = adapter or self.policies[0]
        if policy not in self.optimizers:
            raise ValueError(f"unknown policy {policy!r}; this trainer has {self.policies}")
        if self.spec.lora is not None and len(self.policies) > 1:
            from peft.tuners.tuners_utils import BaseTunerLayer

            # Set the active adapter without peft's set_adapter, which would also flip
            # requires_grad (every adapter stays trainable; an inactive one gets no grad).
            for module in self.model.modules():
                if isinstance(module, BaseTunerLayer):
                    module._active_adapter = [policy]
            # peft's disable_adapter() (the reference pass) re-runs set_adapter on exit,
            # which freezes every adapter but the active one: make them trainable again.
            for params in self._policy_params.values():
                for p in params:
                    p.requires_grad_(True)
        return policy

    # -- verbs ---------------------------------------------------------------

    @torch.no_grad()
    def compute_logprobs(self, batch: TrainBatch, reference: bool = False,
                         adapter: str | None = None) -> list[np.ndarray]:
        self._activate(adapter)
        # Scoring, not training: no dropout (LoRA dropout would make the behaviour
        # log-probs noisy and unlike the engine's, which never drops out).
        self.model.eval()
        model = self.reference if reference and self.reference is not None else self.model
        out: list[np.ndarray] = [np.zeros(0, np.float32)] * len(batch)
        key = self._new_batch_key()
        for rows, mb in self._aligned_micro_batches(batch, key):
            if reference and self.reference is None:  # LoRA: the base with adapters disabled
                with self.model.disable_adapter():
                    logp = self._logprobs(self.model, mb)
            else:
                logp = self._logprobs(model, mb)
            for i, r in enumerate(rows):
                p, n = int(batch.prompt_lens[r]), len(batch.input_ids[r])
                out[r] = logp[i, p - 1:n - 1].float().cpu().numpy()
        self.inputs.clear()
        return out

    def forward_backward(self, batch: TrainBatch, micro_batch_tokens: int | None = None,
                         kl_coef: float | None = None, adapter: str | None = None) -> dict:
        """Accumulate the gradient of this rank's share of the global-batch loss.

        ``kl_coef``: this call's KL coefficient instead of the spec's (an adaptive KL
        controller's current beta); the reference must exist (``spec.reference``).
        ``adapter``: the policy trained (LoRA adapters on one backbone)."""
        self._activate(adapter)
        self.model.train()

        masks = [len(ids) - p for ids, p in zip(batch.input_ids, batch.prompt_lens)]
        tokens, seqs = fsdp.all_reduce_sum([float(sum(masks)), float(sum(1 for m in masks if m))])
        key = self._new_batch_key()
        parts = []
        for rows, mb in self._aligned_micro_batches(batch, key, micro_batch_tokens):
            loss, metrics = self._loss(mb, global_tokens=tokens, global_seqs=seqs,
                                       kl_coef=kl_coef)
            scale = 0.0 if rows == [] else float(self.world_size)
            (loss * scale).backward()
            if self._fault is not None:  # a test hook: fail inside the call (arm_fault)
                self._fail_now()
            if rows:
                parts.append({**metrics, "train/tokens": float(mb["loss_mask"].sum())})
        self.inputs.clear()
        return merge_metrics(parts)

    def arm_fault(self, action: str) -> None:
        """A test hook: the next ``forward_backward`` fails inside its first micro-batch's
        backward pass (its peers are then inside a collective): ``die`` kills this rank's
        process (SIGKILL), ``hang`` stops it there for good."""
        if action not in ("die", "hang"):
            raise ValueError(f"arm_fault: 'die' or 'hang', got {action!r}")
        self._fault = action

    def _fail_now(self) -> None:
        import signal
        import time

        if self._fault == "die":
            os.kill(os.getpid(), signal.SIGKILL)
        while True:
            time.sleep(3600)

    def optim_step(self, adapter: str | None = None) -> dict:
        """One optimizer step of ``adapter``'s policy (its own AdamW state and schedule)."""
        policy = self._activate(adapter)
        optimizer, scheduler = self.optimizers[policy], self.schedulers[policy]
        params = [p for p in self._policy_params[policy] if p.grad is not None]
        norm = fsdp.total_norm([p.grad for p in params])
        if self.spec.grad_clip > 0:
            torch.nn.utils.clip_grads_with_norm_(params, self.spec.grad_clip, norm)
        lr = scheduler.get_last_lr()[0]
        finite = bool(torch.isfinite(norm))
        if finite:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        self.step += 1
        self.policy_steps[policy] += 1
        return {"train/grad_norm": float(norm), "train/lr": lr,
                "train/step": self.policy_steps[policy],
                "train/skipped_nonfinite": 0.0 if finite else 1.0}

    def adapter(self, name: str | None = None, dtype: str | None = None) -> list:
        """The LoRA adapter ``name`` (default: the first) for the engines: on rank 0
        ``[ObjectRef]`` of ``actors.weights.adapter_payload`` (peft's config, tensors under
        peft's file names, cast to ``dtype``, the engines', on the trainer's device; None:
        float32), ``[]`` elsewhere. Every rank must call it (the tensors are gathered)."""
        import ray
        from torch.distributed.tensor import DTensor

        from actors.weights import adapter_payload

        if self.spec.lora is None:
            raise ValueError("adapter(): this trainer trains full weights (no LoRA)")
        # Only the adapter's parameters are gathered (every rank, in the same order), not
        # the whole model: a few MB instead of the full weights each step.
        adapter = name or self.policies[0]
        if adapter not in self.policies:
            raise ValueError(f"unknown adapter {adapter!r}; this trainer has {self.policies}")
        tensors = []
        for param_name, p in self.model.named_parameters():
            if adapter_of(param_name) == adapter:
                full = p.full_tensor() if isinstance(p, DTensor) else p
                wire = getattr(torch, dtype or "float32")
                tensors.append((peft_name(param_name, adapter), full.detach().to(wire).cpu()))
        if self.rank != 0:
            return []
        config = self.model.peft_config[adapter].to_dict()
        return [ray.put(adapter_payload(config, tensors))]

    @torch.no_grad()
    def embed_mean(self, token_lists: list[list[int]]) -> np.ndarray | None:
        """Rank 0: per list, the mean of the model's input-embedding rows of its tokens,
        L2-normalised, [n, hidden] (PhaseRunner.embed); None elsewhere. Every
        rank must call it (the sharded table is gathered)."""
        from torch.distributed.tensor import DTensor

        weight = self.model.get_input_embeddings().weight
        table = weight.full_tensor() if isinstance(weight, DTensor) else weight
        if self.rank != 0:
            return None
        out = np.zeros((len(token_lists), table.shape[1]), dtype=np.float32)
        for i, ids in enumerate(token_lists):
            if ids:
                v = table[torch.tensor(ids, device=table.device)].float().mean(0)
                out[i] = (v / v.norm().clamp_min(1e-12)).cpu().numpy()
        return out

    def save(self, directory: str, state: dict | None = None) -> None:
        """Checkpoint the rank; ``state`` (JSON) is the caller's, saved atomically with it
        (a phase's estimator baselines and KL coefficient) and returned by ``load``."""
        from actors.checkpoint import save_checkpoint

        save_checkpoint(directory, self.model, list(self.optimizers.values()), self.rank,
                        extra={"step": self.step, "policy_steps": self.policy_steps,
                               "schedulers": {k: scheduler_state(v)
                                              for k, v in self.schedulers.items()},
                               "batches_seen": self._batches_seen, "state": state or {}})

    def load(self, directory: str) -> dict:
        from actors.checkpoint import load_checkpoint

        extra = load_checkpoint(directory, self.model, list(self.optimizers.values()), self.rank)
        self.step = extra["step"]
        self._batches_seen = extra.get("batches_seen", 0)
        # (checkpoints of one policy written before per-policy state: "scheduler")
        schedulers = extra.get("schedulers") or {self.policies[0]: extra["scheduler"]}
        for policy, sched in schedulers.items():
            self.schedulers[policy].load_state_dict({**sched, "lr_lambdas": [None]})
        self.policy_steps = {**dict.fromkeys(self.policies, 0),
                             **extra.get("policy_steps", {self.policies[0]: self.step})}
        return {"step": self.step, "state": extra.get("state", {})}

    def export_hf(self, directory: str, merged: bool = True, adapter: str | None = None) -> None:
        """hf/ of the policy ``adapter`` (default: the first): full weights, or with LoRA the
        base merged with that adapter plus every adapter in peft's format under adapter/;
        in the compute dtype (bfloat16 under mixed precision, else float32)."""
        from actors.checkpoint import export_hf

        export_hf(directory, self.model, self.path, self.rank, lora=self.spec.lora, merged=merged,
                  adapter=adapter or self.policies[0],
                  dtype=torch.bfloat16 if self._mixed_precision() else torch.float32)

    def parameters_digest(self) -> dict[str, np.ndarray]:
        """Full parameters as numpy on rank 0 (tests compare runs with it); copies, never
        views of the live weights (one rank's full state dict can share their memory)."""
        state = fsdp.full_state_dict(self.model)
        return {k: v.float().numpy().copy() for k, v in state.items()} if self.rank == 0 else {}

    def gradients(self) -> dict[str, np.ndarray]:
        """Accumulated full gradients on rank 0 (for tests); every rank must call it."""
        from torch.distributed.tensor import DTensor

        out = {}
        for name, p in self.model.named_parameters():
            if p.grad is not None:
                g = p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
                out[name] = g.float().numpy().copy()
        return out if self.rank == 0 else {}

    def discard_gradients(self) -> None:
        for optimizer in self.optimizers.values():
            optimizer.zero_grad(set_to_none=True)

    def release_memory(self) -> None:
        """Return the blocks torch's CUDA allocator keeps cached after the update to the
        device: an engine colocated on this GPU is another process and wakes into that
        memory (vLLM maps its weights and KV cache back on ``wake_up``). A no-op on CPU
        hosts, whose ranks keep freed memory on purpose (docs/architecture.md)."""
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def shutdown(self) -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()

    # -- model ---------------------------------------------------------------

    def _build_policy(self) -> torch.nn.Module:
        model = self._pretrained(torch.float32)
        if self.spec.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.config.use_cache = False
        visual = fsdp.vision_tower(model)
        projector = [m for n, m in visual.named_children() if "merger" in n]
        if self.spec.freeze_vision:
            for name, p in visual.named_parameters():
                if "merger" not in name:
                    p.requires_grad_(False)
        if self.spec.freeze_projector:
            for module in projector:
                module.requires_grad_(False)
        if self.spec.lora is not None:
            from peft import LoraConfig, get_peft_model

            lora = self.spec.lora
            config = LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                target_modules=language_targets(model, lora.target_modules))
            model = get_peft_model(model, config, adapter_name=lora.adapters[0])
            for name in lora.adapters[1:]:
                model.add_adapter(name, config)
            for name, p in model.named_parameters():  # every adapter trainable
                if adapter_of(name) is not None:
                    p.requires_grad_(True)
        return self._shard(model, offload=self.spec.offload)

    def _build_reference(self) -> torch.nn.Module | None:
        """The frozen starting policy; for LoRA, the base with adapters disabled (None).

        ``reference_dtype: bfloat16`` halves its memory. Under bf16 mixed precision
        (the GPU default) FSDP2 casts fp32 shards to bf16 before computing anyway,
        so the bf16 reference gives the same log-probs; in fp32 compute (CPU) it
        differs by bf16 rounding (tests/test_memory_levers.py pins both).
        """
        if not self.spec.reference or self.spec.lora is not None:
            return None
        ref = self._pretrained(getattr(torch, self.spec.reference_dtype))
        ref.requires_grad_(False)
        ref.eval()
        return self._shard(ref)

    def _pretrained(self, dtype: torch.dtype) -> torch.nn.Module:
        """The starting weights in host memory on rank 0; on the other ranks the same
        modules on the meta device, which hold no memory until ``_shard`` gives them
        their shards: N ranks of a node load one full copy, not N."""
        from transformers import AutoConfig, AutoModelForImageTextToText

        if self.rank == 0:
            return AutoModelForImageTextToText.from_pretrained(self.path, dtype=dtype)
        with torch.device("meta"):
            model = AutoModelForImageTextToText.from_config(AutoConfig.from_pretrained(self.path),
                                                            dtype=dtype)
        return model.eval()  # as from_pretrained leaves it

    def _shard(self, model: torch.nn.Module, offload: bool = False) -> torch.nn.Module:
        """FSDP2 over ``model``, every rank's shards filled from rank 0's weights (with LoRA,
        also its freshly initialised adapters; the full state is freed on return)."""
        full = model.state_dict() if self.rank == 0 else None
        model = fsdp.apply_fsdp(model, self._mixed_precision(), offload=offload)
        fsdp.load_full_state(model, full, self.device, offload=offload)
        return model

    def _mixed_precision(self) -> bool:
        mp = self.spec.mixed_precision
        return torch.cuda.is_available() if mp is None else mp

    def _lr_factor(self, step: int) -> float:
        return lr_factor(step, self.spec.schedule, self.spec.warmup_steps, self.spec.total_steps)

    # -- forward -------------------------------------------------------------

    def _new_batch_key(self) -> int:
        self._batches_seen += 1
        return self._batches_seen

    def _aligned_micro_batches(self, batch: TrainBatch, key: int, budget: int | None = None):
        """This rank's micro-batches, the same count and the same module calls on every rank.

        Ranks with fewer micro-batches re-run row 0 with zero weight; when any
        rank has images, every micro-batch runs the vision tower (a dummy image
        where it has none), since each FSDP unit's all-gather is a collective.
        """
        budget = budget or self.spec.micro_batch_tokens
        groups = micro_batches(batch, budget) if len(batch) else []
        if not groups:
            raise RuntimeError(f"rank {self.rank} has no samples; split batches so every rank has one")
        count = fsdp.all_reduce_max(len(groups))
        any_images = fsdp.all_reduce_max(int(any(bool(im) for im in batch.images)))
        for i in range(count):
            rows = groups[i] if i < len(groups) else []
            mb = self.inputs.build(batch, rows or [0], key, ensure_image=bool(any_images),
                                   share=self.spec.share_prompts
                                   and self.spec.logprob_chunk_tokens > 0)
            yield rows, _to_device(mb, self.device)

    def _forward_logits(self, model, mb: dict) -> torch.Tensor:
        return model(**mb["inputs"], use_cache=False).logits[:, :-1]

    def _logprobs(self, model, mb: dict) -> torch.Tensor:
        if self.spec.logprob_chunk_tokens:
            return chunked_model_logprobs(model, mb, self.spec.logprob_chunk_tokens)[0]
        return token_logprobs(self._forward_logits(model, mb), mb["targets"])

    def _loss(self, mb: dict, global_tokens: float, global_seqs: float,
              kl_coef: float | None = None):
        spec, mask = self.spec.objective, mb["loss_mask"]
        if kl_coef is not None:
            spec = dataclasses.replace(spec, kl_coef=kl_coef)
        if self.spec.sft:
            return sft_loss(self._logprobs(self.model, mb), mask, spec.loss_agg, global_tokens,
                            global_seqs, mb.get("loss_weights"))
        if mb["advantages"] is None:
            raise ValueError("a policy batch needs advantages")
        extra = {}
        if self.spec.logprob_chunk_tokens:
            logp, entropy = chunked_model_logprobs(self.model, mb, self.spec.logprob_chunk_tokens,
                                                   with_entropy=spec.entropy_coef > 0
                                                   or spec.log_entropy)
            if entropy is not None:
                extra["entropy"] = entropy
        else:
            logits = self._forward_logits(self.model, mb)
            logp = token_logprobs(logits, mb["targets"])
            if spec.kl_estimator == "full" and spec.kl_coef > 0:
                extra["logits"], extra["ref_logits"] = logits, self._reference_logits(mb)
            elif spec.entropy_coef > 0 or spec.log_entropy:
                extra["logits"] = logits
        old = mb["old_logprobs"] if mb["old_logprobs"] is not None else logp.detach()
        extra["engine_logprobs"] = mb.get("engine_logprobs")
        extra["seq_weights"] = mb.get("loss_weights")
        return policy_objective(spec, logp, mb["advantages"], mask, old_logprobs=old,
                                ref_logprobs=mb["ref_logprobs"], global_tokens=global_tokens,
                                global_seqs=global_seqs, **extra)

    @torch.no_grad()
    def _reference_logits(self, mb: dict) -> torch.Tensor:
        if self.reference is None:
            with self.model.disable_adapter():
                return self._forward_logits(self.model, mb)
        return self._forward_logits(self.reference, mb)


def _to_device(mb: dict, device: torch.device) -> dict:
    """The micro-batch's tensors on the compute device (a no-op on CPU)."""
    if device.type == "cpu":
        return mb
    def move(value):
        return value.to(device) if isinstance(value, torch.Tensor) else value

    return {k: ({n: move(t) for n, t in v.items()} if isinstance(v, dict) else move(v))
            for k, v in mb.items()}


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    os.environ.setdefault("PYTHONHASHSEED", str(seed))
