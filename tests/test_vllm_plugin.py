"""actors/vllm_plugin.py: vLLM finds it through its plugin entry point, and a deep copy
of vLLM's thread-safe tokenizer pool shares the pool instead of rebuilding it."""

from __future__ import annotations

import copy

from transformers import AutoTokenizer
from vllm.plugins import load_plugins_by_group
from vllm.tokenizers.hf import maybe_make_thread_pool

from actors.tiny import build_tiny
from actors.vllm_plugin import register


def test_vllm_loads_the_plugin_from_the_entry_point():
    plugins = load_plugins_by_group("vllm.general_plugins")
    assert plugins["coevolve"] is register


def test_a_deep_copy_of_the_tokenizer_pool_is_the_pool():
    register()
    tokenizer = AutoTokenizer.from_pretrained(build_tiny("tiny://qwen2.5-vl"))
    plain = copy.deepcopy(tokenizer)
    assert plain is not tokenizer and plain._tokenizer is not tokenizer._tokenizer
    pool = maybe_make_thread_pool(copy.copy(tokenizer), copies=2)
    # what transformers does with the tokenizer vLLM passes to a processor load
    kwargs = copy.deepcopy({"tokenizer": pool, "max_pixels": 3136})
    assert kwargs["tokenizer"] is pool and kwargs["max_pixels"] == 3136
    assert pool("two words")["input_ids"] == tokenizer("two words")["input_ids"]
