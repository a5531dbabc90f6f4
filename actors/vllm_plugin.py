"""coevolve's vLLM plugin: run in every process vLLM starts (its engine front end,
engine core and workers), through the ``vllm.general_plugins`` entry point in
pyproject.toml, and by ``GeneratorActor`` before it builds an engine (a source
checkout that was never pip-installed has no entry points).

What it changes: deep copies of vLLM's thread-safe tokenizer pool are the pool
itself. vLLM hands its tokenizer (a ``TokenizerPool``: calls go to one of
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


def _share_pool(self, memo):
    return self


def register() -> None:
    """Idempotent (vLLM loads plugins once per process, GeneratorActor again)."""
    from vllm.tokenizers.hf import ThreadSafeHFTokenizerMixin

    ThreadSafeHFTokenizerMixin.__deepcopy__ = _share_pool
