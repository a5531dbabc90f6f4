"""The engine side of ``actors/weight_transfer.py``: vLLM's ``WeightTransferEngine`` for
the ``coevolve`` backend, built by every worker of an engine (one per tensor-parallel
rank) when the engine was started with ``weight_transfer_config={"backend":
"coevolve"}``. Imported by vLLM's factory inside its worker processes only."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from vllm.distributed.weight_transfer.base import (
    WeightTransferEngine,
    WeightTransferInitInfo,
    WeightTransferUpdateInfo,
)

from actors.weight_transfer import Plan, broadcast, open_group, split_bucket


@dataclass
class CoevolveInitInfo(WeightTransferInitInfo):
    master_address: str
    master_port: int
    world_size: int  # 1 (the trainer's rank 0) + the engine's workers
    backend: str  # gloo | nccl
    timeout_s: float = 600.0


@dataclass
class CoevolveUpdateInfo(WeightTransferUpdateInfo, Plan):
    pass


class CoevolveTransferEngine(WeightTransferEngine[CoevolveInitInfo, CoevolveUpdateInfo]):
    init_info_cls = CoevolveInitInfo
    update_info_cls = CoevolveUpdateInfo

    def __init__(self, config, vllm_config, device: torch.device, model: torch.nn.Module):
        super().__init__(config, vllm_config, device, model)
        self.group = None

    def init_transfer_engine(self, init_info: CoevolveInitInfo) -> None:
        self.shutdown()
        rank = 1 + self.parallel_config.rank  # the trainer's rank 0 is the group's rank 0
        self.group = open_group(init_info.master_address, init_info.master_port, rank,
                                init_info.world_size, init_info.backend, init_info.timeout_s)

    def start_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

        initialize_layerwise_reload(self.model)

    def finish_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

        finalize_layerwise_reload(self.model, self.model_config)

    def update_weights(self, update_info: dict) -> None:
        self.receive_weights(self.parse_update_info(update_info))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def receive_weights(self, update_info: CoevolveUpdateInfo) -> None:
        if self.group is None:
            raise RuntimeError("weight transfer not initialized: init_weight_transfer_engine "
                               "first")
        # bucket k+1 arrives (the group's own thread) while bucket k loads here
        received = None
        for entries in update_info.buckets():
            nbytes = sum(torch.Size(shape).numel() * dtype.itemsize
                         for _, shape, dtype in entries)
            # a fresh buffer per bucket: the layerwise reload keeps its tensors
            buffer = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
            work = broadcast(self.group, buffer)
            if received is not None:
                self.model.load_weights(split_bucket(*received))
            work.wait()
            received = (buffer, entries)
        if received is not None:
            self.model.load_weights(split_bucket(*received))

    def shutdown(self) -> None:
        self.group = None  # the backend object closes its connections when freed
