"""tiny:// models: offline build, transformers load, and exact agreement with vLLM.

The agreement test is the one that catches silent config mismatches between
the two stacks (chat template, image token count, multimodal RoPE layout):
in fp32, vLLM's greedy tokens and their log-probs must equal a transformers
forward pass of the same weights on the same token sequence.
"""

from __future__ import annotations

import hashlib
import io
import time

import pytest
import torch
from conftest import chart_png
from PIL import Image

from actors.models import resolve_model
from actors.tiny import build_tiny, parse_tiny

FAMILIES = ["qwen2-vl", "qwen2.5-vl", "qwen3-vl"]
# The real Qwen vocabulary and embedding rows (152,064 / 151,936), tiny depth and width.
REAL_VOCAB = ["qwen2.5-vl?tokenizer=qwen", "qwen3-vl?tokenizer=qwen"]
QUESTION = "How many bars are in the chart? Answer with a number."


def image_messages() -> list[dict]:
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]


def _weights_digest(folder) -> str:
    return hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()


@pytest.mark.parametrize("family", FAMILIES)
def test_build_is_fast_deterministic_and_cached(family, tmp_path, tiny_cache):
    start = time.perf_counter()
    first = build_tiny(f"tiny://{family}", root=tmp_path / "a")
    elapsed = time.perf_counter() - start
    assert elapsed < 30, f"building tiny://{family} took {elapsed:.1f} s"
    again = build_tiny(f"tiny://{family}", root=tmp_path / "b")
    assert _weights_digest(first) == _weights_digest(again)
    assert build_tiny(f"tiny://{family}", root=tmp_path / "a") == first  # cached: same folder
    other_seed = build_tiny(f"tiny://{family}?seed=1", root=tmp_path / "a")
    assert other_seed != first and _weights_digest(other_seed) != _weights_digest(first)


def test_sizes_come_from_the_reference(tiny_cache):
    from transformers import AutoConfig

    path = resolve_model("tiny://qwen2.5-vl?hidden=256&layers=3&heads=8&kv_heads=4")
    config = AutoConfig.from_pretrained(path)
    assert (config.text_config.hidden_size, config.text_config.num_hidden_layers) == (256, 3)
    assert config.vision_config.out_hidden_size == 256  # merger output feeds the text model
    # mrope sections cover half the head dim (256 / 8 = 32 -> 16), in the 16/24/24 shape
    assert config.text_config.rope_parameters["mrope_section"] == [4, 6, 6]


@pytest.mark.parametrize("family, rows, added", [
    ("qwen2.5-vl", 152064, 151665), ("qwen3-vl", 151936, 151669)])
def test_the_real_vocabulary_has_the_real_ids_and_rows(family, rows, added, tiny_cache):
    from transformers import AutoConfig, AutoTokenizer

    path = resolve_model(f"tiny://{family}?tokenizer=qwen")
    config = AutoConfig.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert config.text_config.vocab_size == rows and len(tokenizer) == added
    assert config.tie_word_embeddings is False  # as Qwen2.5-VL-7B and Qwen3-VL-8B
    assert tokenizer.convert_tokens_to_ids(
        ["<|endoftext|>", "<|im_end|>", "<|vision_start|>", "<|image_pad|>"]) == [
        151643, 151645, 151652, 151655]
    assert config.image_token_id == 151655 and config.vision_start_token_id == 151652
    # Qwen's real BPE: "Hello world" is two tokens, with their real ids.
    assert tokenizer("Hello world")["input_ids"] == [9707, 1879]
    tied = AutoConfig.from_pretrained(resolve_model(f"tiny://{family}?tokenizer=qwen&tie=1"))
    assert tied.tie_word_embeddings is True


@pytest.mark.parametrize("ref, message", [
    ("tiny://llama", "unknown tiny family"),
    ("tiny://qwen2.5-vl?tokenizer=gpt2", "tokenizer must be one of tiny, qwen"),
    ("tiny://qwen2.5-vl?tie=2", "tie must be 0 or 1"),
    ("tiny://qwen2.5-vl?hiden=64", "unknown size 'hiden'"),
    ("tiny://qwen2.5-vl?hidden=abc", "hidden must be an integer"),
    ("tiny://qwen2.5-vl?hidden=100&heads=3", "hidden must divide by heads"),
])
def test_bad_references_name_the_problem(ref, message):
    with pytest.raises(ValueError, match=message):
        parse_tiny(ref)


def test_missing_local_model_folder_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        resolve_model("./no/such/model")
    with pytest.raises(ValueError, match="no config.json"):
        resolve_model(str(tmp_path))


@pytest.mark.parametrize("family", FAMILIES + REAL_VOCAB)
def test_loads_in_transformers_and_generates_from_an_image(family, tiny_cache):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    path = resolve_model(f"tiny://{family}")
    processor = AutoProcessor.from_pretrained(path)
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32)
    text = processor.apply_chat_template(image_messages(), add_generation_prompt=True, tokenize=False)
    image = Image.open(io.BytesIO(chart_png()))
    inputs = processor(text=[text], images=[image], return_tensors="pt")
    merge = processor.image_processor.merge_size
    n_image_tokens = int(inputs["image_grid_thw"].prod()) // merge**2
    pad_id = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert int((inputs["input_ids"] == pad_id).sum()) == n_image_tokens
    assert int(inputs["mm_token_type_ids"].sum()) == n_image_tokens
    out = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 6 or out[0, -1].item() in (
        model.generation_config.eos_token_id)


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_vllm_samples_n4_with_logprobs_from_image_prompt(family, engines):
    import ray

    from actors.generator import Request, Sampling

    request = Request(image_messages(), images=[chart_png()],
                      sampling=Sampling(n=4, temperature=1.0, max_tokens=12, seed=7))
    [samples] = ray.get(engines(family).generate.remote([request]))
    assert len(samples) == 4
    assert len({tuple(s.token_ids) for s in samples}) > 1  # four distinct random samples
    for s in samples:
        assert len(s.logprobs) == len(s.token_ids) > 0
        assert all(lp <= 0 for lp in s.logprobs)
        assert s.version == 0 and s.finish_reason in ("stop", "length")
    # The same seed gives the same samples.
    [again] = ray.get(engines(family).generate.remote([request]))
    assert [s.token_ids for s in again] == [s.token_ids for s in samples]


@pytest.mark.slow
# the real vocabulary of Qwen2.5-VL: tests/test_generator.py, on the same model
@pytest.mark.parametrize("family", FAMILIES + ["qwen3-vl?tokenizer=qwen"])
def test_vllm_greedy_equals_transformers_in_fp32(family, engines):
    import ray
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from actors.generator import Request, Sampling

    png = chart_png()
    request = Request(image_messages(), images=[png],
                      sampling=Sampling(n=1, temperature=0.0, max_tokens=16))
    [[sample]] = ray.get(engines(family).generate.remote([request]))

    path = resolve_model(f"tiny://{family}")
    processor = AutoProcessor.from_pretrained(path)
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
    text = processor.apply_chat_template(image_messages(), add_generation_prompt=True, tokenize=False)
    inputs = processor(text=[text], images=[Image.open(io.BytesIO(png))], return_tensors="pt")
    # Same template, same image token count: the trainer rebuilds the engine's prompt exactly.
    assert inputs["input_ids"][0].tolist() == sample.prompt_ids

    completion = torch.tensor([sample.token_ids])
    ids = torch.cat([inputs["input_ids"], completion], dim=1)
    mm_types = torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(completion)], dim=1)

    def completion_logprobs(**extra) -> torch.Tensor:
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids),
                           pixel_values=inputs["pixel_values"],
                           image_grid_thw=inputs["image_grid_thw"], **extra).logits
        start = inputs["input_ids"].shape[1] - 1
        logp = torch.log_softmax(logits[0, start:start + completion.shape[1]].float(), dim=-1)
        return logp

    logp = completion_logprobs(mm_token_type_ids=mm_types)
    # Greedy: each engine token is transformers' argmax (up to exact ties).
    hf_greedy = logp.argmax(-1).tolist()
    assert hf_greedy == sample.token_ids
    hf = logp.gather(-1, completion.T).squeeze(-1)
    diff = (hf - torch.tensor(sample.logprobs)).abs()
    print(f"{family}: max |dlogp| = {diff.max():.2e}, mean = {diff.mean():.2e}")
    assert diff.max() < 1e-4

    # The check is sensitive to multimodal RoPE: 1-D text positions for the image
    # tokens (what a missing or wrong mm_token_type_ids silently gives) move the
    # log-probs far past the tolerance.
    flat = completion_logprobs(mm_token_type_ids=torch.zeros_like(ids)).gather(-1, completion.T)
    flat = flat.squeeze(-1)
    assert (flat - torch.tensor(sample.logprobs)).abs().max() > 1e-3
