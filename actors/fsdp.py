"""Distribution in one place: process groups and FSDP2 wrapping of a Qwen-VL model.

Model and algorithm code elsewhere read like single-device code; this module
is the only one that knows about process groups, DTensors and sharding.
FSDP2 (``fully_shard``) runs over gloo on CPU and NCCL on GPU (FSDP1 does not
work on CPU; FSDP2's CPU offload does, without pinned memory). The vision
tower is one FSDP unit, each decoder block another, and the root holds
embeddings, final norm and LM head.
"""

from __future__ import annotations

import datetime
import os
import socket

import torch
import torch.distributed as dist


def free_address() -> tuple[str, int]:
    """An address this host can be reached at, and a free TCP port (rank 0's rendezvous)."""
    host = os.environ.get("COEVOLVE_RENDEZVOUS_HOST") or _node_ip()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return host, s.getsockname()[1]


def _node_ip() -> str:
    try:
        import ray

        if ray.is_initialized():
            return ray.util.get_node_ip_address()
    except ImportError:
        pass
    return "127.0.0.1"


def init_process_group(rank: int, world_size: int, host: str, port: int,
                       timeout_s: float = 600.0) -> str:
    """Join the trainer group's process group; returns the backend used."""
    # On GPU hosts NCCL for CUDA tensors and gloo for CPU ones: the small CPU
    # all-reduces below and FSDP2's CPU offload (gradients, hence the gradient norm,
    # live in host memory) need a CPU backend too; NCCL alone refuses CPU tensors.
    backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(0)  # Ray exposes exactly this rank's GPU as device 0
    dist.init_process_group(
        backend=backend,
        init_method=f"tcp://{host}:{port}",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
    )
    return backend


def hf_core(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model under an optional peft wrapper."""
    base = getattr(model, "base_model", None)
    inner = getattr(base, "model", None)
    return inner if inner is not None and hasattr(inner, "model") else model


def vision_tower(model: torch.nn.Module) -> torch.nn.Module:
    return hf_core(model).model.visual


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    return list(hf_core(model).model.language_model.layers)


def apply_fsdp(model: torch.nn.Module, mixed_precision: bool, offload: bool = False) -> torch.nn.Module:
    """Shard the vision tower as one unit, each decoder block, then the root.

    ``offload``: FSDP2's CPUOffloadPolicy. The parameter shards, their
    gradients and therefore AdamW's moments live in host memory; each unit's
    shards are copied to the device for its all-gather, gradients are copied
    back after the reduce-scatter, and the optimizer step runs on the CPU.
    Pinned host memory (faster, overlapped copies) needs CUDA; on a CPU-only
    host the policy still runs (every "device" is the CPU), which is what the
    tests check.
    """
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    kwargs = {}
    if mixed_precision:
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16,
                                                   reduce_dtype=torch.float32)
    if offload:
        kwargs["offload_policy"] = CPUOffloadPolicy(pin_memory=torch.cuda.is_available())
    if mixed_precision:
        # LoRA adapters compute and keep their gradients in fp32, each in a unit of
        # its own: inside a bf16 decoder unit FSDP2 (torch 2.11, one rank) handed the
        # adapters bf16 gradients that their fp32 parameters refuse. peft casts the
        # layer input to the adapter's dtype and the adapter's output back.
        fp32 = {**kwargs, "mp_policy": MixedPrecisionPolicy(param_dtype=torch.float32,
                                                            reduce_dtype=torch.float32)}
        for name, module in model.named_modules():
            if name.rsplit(".", 2)[-2:-1] in (["lora_A"], ["lora_B"]):
                fully_shard(module, **fp32)
    fully_shard(vision_tower(model), **kwargs)
    for layer in decoder_layers(model):
        fully_shard(layer, **kwargs)
    fully_shard(model, **kwargs)
    return model


def load_full_state(model: torch.nn.Module, full_state: dict[str, torch.Tensor] | None,
                    device: torch.device, offload: bool = False) -> None:
    """Fill the shards of a model sharded by ``apply_fsdp`` with rank 0's weights.

    Rank 0 built the model from its checkpoint and passes ``model.state_dict()``
    taken before sharding (the one full copy in the group, freed by the caller
    afterwards); every other rank built it on the meta device and passes None.
    Their shards are allocated here where FSDP2 keeps them (host memory under
    ``offload``, else ``device``) and receive rank 0's tensors one at a time
    (``broadcast_from_rank0``, as torchtitan and verl load): a rank never holds
    more than its shards and one full tensor. Buffers are in no state dict (the
    rotary embeddings' inv_freq is non-persistent) and a meta rank's are
    uninitialised memory, so they are broadcast from rank 0 as they are.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    assert (full_state is None) == (dist.get_rank() != 0), "only rank 0 passes the weights"
    if full_state is None:
        model.to_empty(device=torch.device("cpu") if offload else device)
        # fully_shard moved rank 0's buffers to the compute device, offloaded or not.
        for module in model.modules():
            for name, buffer in module.named_buffers(recurse=False):
                setattr(module, name, torch.empty_like(buffer, device=device))
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_model_state_dict(model, full_state or {}, options=options)
    for buffer in model.buffers():
        dist.broadcast(buffer, src=0)


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Unsharded CPU tensors on rank 0 (empty dict elsewhere); every rank must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options)


def total_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """Global L2 norm of possibly sharded gradients."""
    from torch.distributed.tensor import DTensor

    norm = torch.nn.utils.get_total_norm(grads, norm_type=2.0)
    return norm.full_tensor() if isinstance(norm, DTensor) else norm


def all_reduce_sum(values: list[float]) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64)
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def all_reduce_max(value: int) -> int:
    t = torch.tensor([value], dtype=torch.int64)
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())
