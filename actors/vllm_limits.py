"""vLLM's GPU sampler limits, checked on any host.

On CUDA, vLLM 0.32 runs its V2 model runner, whose sampler keeps per-request
state in fixed-size device buffers and refuses a request that does not fit:
at most 1,024 allowed token ids, 1,024 logit-bias entries, 128 stop token
ids (with ``min_tokens``), ``VLLM_MAX_NUM_BAD_WORDS`` bad words and 1,024
logprob token ids (``vllm/v1/worker/gpu/sample/``). It raises inside the
engine's worker, at the first ``generate()`` of a GPU run. The CPU build
runs the V1 runner (V2 needs Triton kernels), which has no such limits, so a
request that works on every CPU test could fail on the first GPU step.

``check_gpu_sampler_limits`` runs the V2 sampler's own ``add_request`` code
on a request's ``SamplingParams`` with its device buffers replaced by
stand-ins that record nothing, so the checks are vLLM's, not a copy of them.
``GeneratorActor.generate`` calls it for every request, on every host.
"""

from __future__ import annotations

import functools
from typing import Any


class _Sink:
    """Stands in for the V2 states' buffers (``UvaBackedTensor``, ``StagedWriteTensor``,
    numpy arrays): indexing gives 0, writes go nowhere."""

    @property
    def np(self) -> _Sink:
        return self

    def __getitem__(self, index) -> int:
        return 0

    def __setitem__(self, index, value) -> None:
        pass

    def stage_write(self, *args, **kwargs) -> None:
        pass


@functools.cache
def _unbuffered(state_cls: type) -> Any:
    """An instance of a V2 sampler state whose every buffer is a ``_Sink``, built without
    its ``__init__`` (which allocates device memory); one per class: it keeps no state."""
    replay = type(f"Replay{state_cls.__name__}", (state_cls,),
                  {"__getattr__": lambda self, name: _Sink()})
    return object.__new__(replay)


def check_gpu_sampler_limits(params) -> None:
    """Raise vLLM's own ValueError if the V2 GPU sampler would refuse ``params``."""
    from vllm.v1.worker.gpu.sample.bad_words import BadWordsState
    from vllm.v1.worker.gpu.sample.logit_bias import LogitBiasState
    from vllm.v1.worker.gpu.sample.logprob import LogprobTokenIdsState

    for state_cls in (LogitBiasState, BadWordsState, LogprobTokenIdsState):
        _unbuffered(state_cls).add_request(0, params)
