"""Generation engines: weight buckets, a pool of real vLLM engines in Ray actors.

The engine tests share one pool of two fp32 engines of
tiny://qwen2.5-vl?tokenizer=qwen (the real Qwen vocabulary, 152,064 rows; LoRA enabled), started once for the module; every test that changes the
pool's weights puts the base weights back before it ends. References come
from transformers forward passes of the same weights in this process (vLLM
itself only ever runs inside the Ray actors).
"""

from __future__ import annotations

import io
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image

from actors.generator import Completion, EngineSpec, Request, Sampling
from actors.pool import balance
from actors.weights import (
    WeightVersion,
    adapter_payload,
    bucket_checksum,
    iter_bucket_tensors,
    make_buckets,
    put_buckets,
)

MODEL = "tiny://qwen2.5-vl?tokenizer=qwen"
SMALL = "tiny://qwen2.5-vl"  # the 1,024-token vocabulary, where a test needs no real one
IMAGE_TOKENS = 12  # 120x90 chart -> 112x84 pixels -> 8x6 patches of 14 -> 48 / 2x2 merge


def chart_png() -> bytes:
    """The 120x90 three-bar chart the image-token count above is pinned for."""
    from PIL import ImageDraw

    image = Image.new("RGB", (120, 90), "white")
    draw = ImageDraw.Draw(image)
    for i, height in enumerate([30, 60, 45]):
        draw.rectangle([10 + 35 * i, 80 - height, 35 + 35 * i, 80], fill=(40 * i, 90, 200))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


# --------------------------------------------------------------------------
# Buckets (no engine)
# --------------------------------------------------------------------------


def _tensors() -> list[tuple[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [
        ("a.fp32", torch.randn(3, 4, generator=g)),                          # 48 bytes
        ("b.bf16", torch.randn(5, generator=g).to(torch.bfloat16)),          # 10 bytes
        ("c.int64", torch.arange(4).reshape(2, 2)),                          # 32 bytes
        ("d.fp16.T", torch.randn(4, 3, generator=g).half().T),               # 24, not contiguous
        ("e.big", torch.randn(50, generator=g)),                             # 200 bytes
        ("f.fp8", torch.tensor([0.5, -2.0, 448.0]).to(torch.float8_e4m3fn)),  # 3 bytes
    ]


def test_buckets_group_in_order_up_to_the_byte_size():
    buckets = make_buckets(_tensors(), bucket_bytes=64)
    assert [[n for n, _ in b] for b in buckets] == [
        ["a.fp32", "b.bf16"], ["c.int64", "d.fp16.T"], ["e.big"], ["f.fp8"]]
    manifest = WeightVersion.of(buckets, version=3)
    assert manifest.total_bytes == 48 + 10 + 32 + 24 + 200 + 3
    assert manifest.dtypes == ("float32", "bfloat16", "int64", "float16", "float32",
                               "float8_e4m3fn")
    assert manifest.shapes[3] == (3, 4)
    with pytest.raises(ValueError, match="appears twice"):
        make_buckets([("x", torch.ones(1)), ("x", torch.ones(1))])


def test_buckets_are_zero_copy_and_restore_every_dtype_bit_for_bit(ray_cluster):
    import ray

    source = _tensors()
    buckets = make_buckets(source, bucket_bytes=64)
    arrays = dict(a for b in buckets for a in b)
    for name, tensor in source:
        shared = arrays[name].ctypes.data == tensor.data_ptr()
        assert shared == tensor.is_contiguous(), name  # a view unless it had to be copied
    assert arrays["b.bf16"].dtype == np.dtype([("bfloat16", "<i2")])

    checksum = bucket_checksum(buckets)
    fetched = ray.get(put_buckets(buckets))
    assert bucket_checksum(fetched) == checksum
    received = dict(t for b in fetched for t in iter_bucket_tensors(b))
    for name, tensor in source:
        got = received[name]
        assert got.dtype == tensor.dtype and got.shape == tensor.shape, name
        assert torch.equal(got.view(torch.uint8), tensor.contiguous().view(torch.uint8)), name
    # Read-only arrays mapped from the object store: the tensors are views, not copies.
    [(_, big)] = fetched[2]
    assert not big.flags.writeable
    assert received["e.big"].data_ptr() == big.ctypes.data


def test_adapters_on_the_vision_tower_are_refused(tiny_cache):
    """peft's gate_proj on Qwen2.5-VL also matches the vision MLP, which vLLM would ignore."""
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
    from transformers import AutoModelForImageTextToText

    from actors.models import resolve_model

    model = AutoModelForImageTextToText.from_pretrained(resolve_model(MODEL), dtype=torch.float32)
    config = LoraConfig(r=4, target_modules=["gate_proj", "up_proj", "down_proj"])
    peft = get_peft_model(model, config)
    with pytest.raises(ValueError, match="vision tower"):
        adapter_payload(peft.peft_config["default"].to_dict(),
                        get_peft_model_state_dict(peft).items())
    language_only = LoraConfig(r=4, target_modules=r".*language_model.*\.(gate_proj|up_proj)")
    peft = get_peft_model(
        AutoModelForImageTextToText.from_pretrained(resolve_model(MODEL), dtype=torch.float32),
        language_only)
    payload = adapter_payload(peft.peft_config["default"].to_dict(),
                              get_peft_model_state_dict(peft).items())
    assert len(payload["bucket"]) == 2 * 2 * 2  # 2 layers x 2 modules x (A, B)


@pytest.mark.parametrize("family, banned", [("qwen2.5-vl", 152064 - 151665 + 5),
                                            ("qwen3-vl", 151936 - 151669 + 5)])
def test_no_request_carries_vocabulary_sized_state(family, banned, tiny_cache):
    """The banned ids (placeholders, vocabulary padding) of a real-vocabulary model fit
    vLLM's V2 GPU sampler: its own checks pass on every kind of request the recipes
    make, and refuse the allowed-id list of the whole vocabulary that the engines sent
    before (151,660 ids against a cap of 1,024)."""
    from transformers import AutoConfig, AutoTokenizer
    from vllm import SamplingParams

    from actors.sampling import BAN, banned_token_ids, sampling_params
    from actors.models import resolve_model
    from actors.vllm_limits import check_gpu_sampler_limits

    path = resolve_model(f"tiny://{family}?tokenizer=qwen")
    tokenizer = AutoTokenizer.from_pretrained(path)
    rows = AutoConfig.from_pretrained(path).text_config.vocab_size
    ids = banned_token_ids(tokenizer, rows)
    assert len(ids) == banned and ids[:5] == [151652, 151653, 151654, 151655, 151656]
    assert ids[5:] == list(range(len(tokenizer), rows))
    variants = [Sampling(), Sampling(n=8, temperature=0.7, top_p=0.9, max_tokens=1024),
                Sampling(temperature=0.0, stop=["</answer>", "\n\n"], seed=3),
                Sampling(n=4, top_k=50, seed=1 << 30),
                Sampling(n=5, top_k=1, repetition_penalty=1.05)]  # EvoLMM's original's
    for s in variants:
        params = sampling_params(s, ids)
        assert params.repetition_penalty == s.repetition_penalty
        assert params.top_k == s.top_k or not s.top_k
        assert params.logit_bias == dict.fromkeys(ids, BAN) and not params.allowed_token_ids
        check_gpu_sampler_limits(params)
    everything_else = [i for i in range(len(tokenizer)) if i not in set(ids)]
    with pytest.raises(ValueError, match="Too many allowed token IDs: 151660"):
        check_gpu_sampler_limits(SamplingParams(allowed_token_ids=everything_else[:151660]))
    with pytest.raises(ValueError, match="Too many logit bias tokens"):
        check_gpu_sampler_limits(SamplingParams(logit_bias=dict.fromkeys(range(1025), BAN)))


def test_balance_is_longest_first_to_the_least_loaded_engine():
    assert balance([5, 1, 4, 2, 3], 2) == [[0, 1, 3], [2, 4]]
    assert balance([1, 1, 1], 4) == [[0], [1], [2], []]


# --------------------------------------------------------------------------
# Engines
# --------------------------------------------------------------------------


def image_request(question="How many bars are in the chart?", **sampling) -> Request:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    return Request(messages, images=[chart_png()], sampling=Sampling(**sampling))


def text_request(text="Write a short question about a bar chart.", **sampling) -> Request:
    return Request([{"role": "user", "content": text}], sampling=Sampling(**sampling))


@pytest.fixture(scope="module")
def pool(ray_cluster):
    from actors.pool import GeneratorPool

    spec = EngineSpec(model=MODEL, dtype="float32", max_model_len=2048,
                      max_num_batched_tokens=16384, enable_lora=True, max_lora_rank=8,
                      max_loras=2)
    pool = GeneratorPool("test", spec, n_engines=2, resources={"num_cpus": 1}, threads=1,
                         run="test-generator")
    yield pool
    pool.shutdown()


class HF:
    """transformers reference for the pool's model: processor, models by seed, log-probs."""

    def __init__(self, model: str = MODEL):
        from transformers import AutoProcessor

        from actors.models import resolve_model

        self.name = model
        self.processor = AutoProcessor.from_pretrained(resolve_model(model))
        self._models: dict[int, torch.nn.Module] = {}

    def model(self, seed: int = 0):
        from transformers import AutoModelForImageTextToText

        from actors.models import resolve_model

        if seed not in self._models:
            joiner = "&" if "?" in self.name else "?"
            path = resolve_model(f"{self.name}{joiner}seed={seed}" if seed else self.name)
            self._models[seed] = AutoModelForImageTextToText.from_pretrained(
                path, dtype=torch.float32).eval()
        return self._models[seed]

    def inputs(self, request: Request) -> dict:
        text = self.processor.apply_chat_template(request.messages, tokenize=False,
                                                  add_generation_prompt=True)
        images = [Image.open(io.BytesIO(im)) for im in request.images] or None
        return self.processor(text=[text], images=images, return_tensors="pt")

    def logprobs(self, model, request: Request, sample: Completion) -> torch.Tensor:
        """log p(sampled token) per completion position, one forward pass; shape [T]."""
        inputs = self.inputs(request)
        assert inputs["input_ids"][0].tolist() == sample.prompt_ids  # same template and image tokens
        completion = torch.tensor([sample.token_ids])
        ids = torch.cat([inputs["input_ids"], completion], dim=1)
        extra = {k: inputs[k] for k in ("pixel_values", "image_grid_thw") if k in inputs}
        mm_types = torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(completion)], dim=1)
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids),
                           mm_token_type_ids=mm_types, **extra).logits
        start = inputs["input_ids"].shape[1] - 1
        logp = torch.log_softmax(logits[0, start:start + completion.shape[1]].float(), dim=-1)
        return logp.gather(-1, completion.T).squeeze(-1)


@pytest.fixture(scope="module")
def hf():
    return HF()


def max_logprob_diff(hf, model, request, samples) -> tuple[float, float]:
    diffs = torch.cat([(hf.logprobs(model, request, s) - torch.tensor(s.logprobs)).abs()
                       for s in samples])
    return float(diffs.max()), float(diffs.mean())


def state_buckets(model, bucket_bytes=1 << 20) -> list:
    return make_buckets(model.state_dict().items(), bucket_bytes=bucket_bytes)


@pytest.mark.slow
def test_image_and_text_requests_sample_n4_with_logprobs_in_request_order(pool, hf):
    requests = [image_request(n=4, temperature=1.0, max_tokens=16, seed=3),
                text_request(n=4, temperature=1.0, max_tokens=16, seed=3),
                image_request("What colour is the first bar?", n=4, max_tokens=16, seed=3)]
    results = pool.generate(requests)
    tokenizer = hf.processor.tokenizer
    pad = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    for request, samples in zip(requests, results):
        # Request order: each result's prompt is its own request's prompt.
        assert samples[0].prompt_ids == hf.inputs(request)["input_ids"][0].tolist()
        assert samples[0].prompt_ids.count(pad) == (IMAGE_TOKENS if request.images else 0)
        assert len(samples) == 4 and len({tuple(s.token_ids) for s in samples}) == 4
        for s in samples:
            assert len(s.logprobs) == len(s.token_ids)
            assert s.finish_reason == "length" and len(s.token_ids) == 16 or (
                s.finish_reason == "stop" and s.token_ids[-1] == tokenizer.convert_tokens_to_ids(
                    "<|im_end|>"))
            assert all(-30 < lp <= 0 for lp in s.logprobs)
            decoded = tokenizer.decode(s.token_ids, skip_special_tokens=True)
            # Byte-level BPE: random tokens can end inside a UTF-8 character, which
            # vLLM's incremental detokenizer holds back where transformers writes U+FFFD.
            assert s.text == decoded or s.text == decoded.rstrip("\ufffd")
            assert s.version == pool.version
    # A random tiny model is close to uniform over its 152,064 rows: log-probs near
    # -ln(152064) = -11.9.
    mean = np.mean([lp for samples in results for s in samples for lp in s.logprobs])
    print(f"mean sampled log-prob {mean:.3f}")
    assert -13.0 < mean < -11.0


@pytest.mark.slow
def test_refused_requests_fail_alone_and_are_counted(pool, hf):
    """A prompt past max_model_len, more images than the engine takes and an image that
    does not decode are refused one by one; the requests around them are sampled as
    they would be alone."""
    good = image_request(n=2, temperature=1.0, max_tokens=8, seed=21)
    long_text = text_request("count: " + " ".join(str(i) for i in range(1500)), max_tokens=4)
    messages = [{"role": "user", "content": [{"type": "image"}] * 5 + [
        {"type": "text", "text": "Compare the charts."}]}]
    too_many_images = Request(messages, images=[chart_png()] * 5, sampling=Sampling(n=2))
    broken = image_request(n=3, max_tokens=4)
    broken.images = [b"\x89PNG not really"]
    [alone] = pool.generate([good])
    refused_before = sum(e["refused"] for e in pool.stats()["engines"])
    out = pool.generate([long_text, good, too_many_images, broken, good])
    assert [s.token_ids for s in out[1]] == [s.token_ids for s in alone] == [
        s.token_ids for s in out[4]]
    reasons = [group[0].text for group in (out[0], out[2], out[3])]
    assert [len(g) for g in out] == [1, 2, 2, 3, 2]
    assert all(c.refused and c.token_ids == [] for g in (out[0], out[2], out[3]) for c in g)
    assert "maximum context length is 2048" in reasons[0], reasons[0]
    assert "At most 4 image(s)" in reasons[1], reasons[1]
    assert reasons[2].startswith("UnidentifiedImageError: cannot identify image file"), reasons[2]
    assert sum(e["refused"] for e in pool.stats()["engines"]) == refused_before + 3


@pytest.mark.slow
def test_seeded_requests_reproduce_on_either_engine(pool):
    request = image_request(n=2, temperature=1.0, max_tokens=12, seed=11)
    # Two copies of equal cost go to different engines.
    first, second = pool.generate([request, request])
    assert [s.token_ids for s in first] == [s.token_ids for s in second]
    assert [s.logprobs for s in first] == [s.logprobs for s in second]
    [again] = pool.generate([request])
    assert [s.token_ids for s in again] == [s.token_ids for s in first]
    [other] = pool.generate([image_request(n=2, temperature=1.0, max_tokens=12, seed=12)])
    assert [s.token_ids for s in other] != [s.token_ids for s in first]


@pytest.mark.slow
def test_logprobs_of_own_samples_match_transformers(pool, hf):
    """The engines' log-probs are of the model's own distribution (raw logits: before
    temperature, top-p and the allowed-token mask), as the trainer computes them, also
    for samples drawn at T 0.7 with top-p 0.9 (CodeGen's sampling)."""
    requests = [image_request(n=3, temperature=1.0, max_tokens=24, seed=5),
                text_request(n=3, temperature=1.0, max_tokens=24, seed=5),
                image_request(n=3, temperature=0.7, max_tokens=24, seed=5)]
    requests[2].sampling.top_p = 0.9
    results = pool.generate(requests)
    model = hf.model(0)
    for request, samples in zip(requests, results):
        worst, mean = max_logprob_diff(hf, model, request, samples)
        kind = ("image" if request.images else "text") + f" T {request.sampling.temperature}"
        print(f"{kind}: max |engine - transformers| log-prob = {worst:.2e}, mean = {mean:.2e}")
        assert worst < 5e-6 and mean < 1e-6


@pytest.mark.slow
def test_weight_update_changes_output_and_restoring_is_bit_identical(pool, hf):
    # The long prompt fills whole KV blocks (128 tokens on CPU), which the
    # prefix cache keeps: stale after an update unless the cache is reset.
    long_question = "Describe the chart, bar by bar, then compare the bars. " * 40
    requests = [image_request(long_question, max_tokens=16, temperature=0.0),
                text_request(max_tokens=16, temperature=0.0)]
    assert len(hf.inputs(requests[0])["input_ids"][0]) > 2 * 128
    before = pool.generate(requests + requests)  # the copies land on both engines
    other = hf.model(seed=1)
    v = pool.version
    metrics = pool.update_weights(state_buckets(other), version=v + 1)
    assert [m["version"] for m in metrics] == [v + 1, v + 1]
    assert metrics[0]["bytes"] == sum(t.nbytes for t in other.state_dict().values())
    try:
        after = pool.generate(requests + requests)
        for request, b, a in zip(requests + requests, before, after):
            assert a[0].version == v + 1 and b[0].version == v
            assert a[0].token_ids != b[0].token_ids
            # The engine now computes exactly what the seed=1 model computes
            # (vision tower included: the image request).
            worst, _ = max_logprob_diff(hf, other, request, a)
            assert worst < 2e-5
    finally:
        # As refs (what TrainerActor.weight_buckets returns): the engines check the names.
        pool.update_weights(put_buckets(state_buckets(hf.model(0))), version=v + 2)
    restored = pool.generate(requests + requests)
    for b, r in zip(before, restored):
        assert r[0].version == v + 2
        assert r[0].token_ids == b[0].token_ids and r[0].logprobs == b[0].logprobs


@pytest.mark.slow
def test_weight_update_reaches_a_compiled_engine(ray_cluster):
    """``enforce_eager=False`` (torch.compile on CPU, CUDA graphs too on GPUs; vLLM
    compiles only without LoRA on CPU): the compiled model reads the synced weights,
    computing what the seed=1 model computes after the update. The small vocabulary:
    compilation does not depend on it, and the real one adds seconds of tokenizer
    loading to the engine start."""
    import ray

    from actors.generator import GeneratorActor, cpu_engine_env

    hf = HF(SMALL)
    spec = EngineSpec(model=SMALL, dtype="float32", max_model_len=1024,
                      max_num_batched_tokens=2048, enforce_eager=False)
    engine = ray.remote(num_cpus=1, runtime_env={"env_vars": cpu_engine_env(1)})(
        GeneratorActor).options(name="test/compiled").remote(spec, "compiled")
    requests = [image_request(max_tokens=16, temperature=0.0),
                text_request(max_tokens=16, temperature=0.0)]
    try:
        assert ray.get(engine.health.remote())["compiled"]
        before = ray.get(engine.generate.remote(requests))
        for request, samples in zip(requests, before):
            assert max_logprob_diff(hf, hf.model(0), request, samples)[0] < 5e-6
        other = hf.model(seed=1)
        ray.get(engine.update_weights.remote(put_buckets(state_buckets(other)), 1))
        after = ray.get(engine.generate.remote(requests))
    finally:
        ray.kill(engine)
    for request, b, a in zip(requests, before, after):
        assert a[0].version == 1 and a[0].token_ids != b[0].token_ids
        assert max_logprob_diff(hf, other, request, a)[0] < 2e-5


@pytest.mark.slow
def test_bad_weights_are_refused_before_the_engine_changes(pool, hf):
    request = image_request(max_tokens=8, temperature=0.0)
    [[before]] = pool.generate([request])
    state = list(hf.model(0).state_dict().items())
    renamed = [("model.language_model.bogus.weight" if i == 3 else n, t)
               for i, (n, t) in enumerate(state)]
    with pytest.raises(ValueError, match="1 missing .* 1 unknown"):
        pool.update_weights(make_buckets(renamed), version=pool.version + 1)
    reshaped = [(n, t[:-1] if n == "lm_head.weight" else t) for n, t in state]
    with pytest.raises(ValueError, match="wrong shape"):
        pool.update_weights(make_buckets(reshaped), version=pool.version + 1)
    [[after]] = pool.generate([request])
    assert after.version == before.version and after.token_ids == before.token_ids


def lora_payload(hf, seed: int) -> tuple[dict, torch.nn.Module]:
    """A peft LoRA on the base model with random non-zero B; returns (payload, peft model)."""
    import copy

    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

    # Attention and MLP of the language model (vLLM packs q/k/v and gate/up).
    config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                        target_modules=r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj"
                                       r"|gate_proj|up_proj|down_proj)")
    model = get_peft_model(copy.deepcopy(hf.model(0)), config).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=g) * 0.3)
    payload = adapter_payload(model.peft_config["default"].to_dict(),
                              get_peft_model_state_dict(model).items())
    return payload, model


@pytest.mark.slow
def test_lora_adapters_change_output_and_updates_take_effect(pool, hf):
    base_request = image_request(max_tokens=16, temperature=0.0)
    [[base]] = pool.generate([base_request])

    def with_adapter(name):
        r = image_request(max_tokens=16, temperature=0.0)
        r.adapter = name
        return r

    solver1, solver1_ref = lora_payload(hf, seed=1)
    proposer, proposer_ref = lora_payload(hf, seed=2)
    pool.load_adapter("solver", solver1, version=1)
    pool.load_adapter("proposer", proposer, version=1)
    # One batch, every engine: base, solver and proposer requests side by side.
    batch = [base_request, with_adapter("solver"), with_adapter("proposer")] * 2
    out = pool.generate(batch)
    assert out[0][0].token_ids == out[3][0].token_ids == base.token_ids
    assert out[1][0].token_ids != base.token_ids and out[2][0].token_ids != base.token_ids
    assert out[1][0].token_ids != out[2][0].token_ids
    for request, samples, ref in [(batch[1], out[1], solver1_ref), (batch[2], out[2], proposer_ref)]:
        assert samples[0].version == 1
        worst, mean = max_logprob_diff(hf, ref, request, samples)
        print(f"adapter {request.adapter}: max |dlogp| = {worst:.2e}, mean = {mean:.2e}")
        assert worst < 2e-5  # a wrong scaling or a missing module moves them by > 1e-2

    solver2, solver2_ref = lora_payload(hf, seed=3)
    pool.load_adapter("solver", solver2, version=2)
    out2 = pool.generate(batch)
    assert out2[1][0].version == 2 and out2[2][0].version == 1
    assert out2[1][0].token_ids != out[1][0].token_ids  # the new solver is in use
    assert out2[2][0].token_ids == out[2][0].token_ids  # the proposer is untouched
    assert out2[0][0].token_ids == base.token_ids
    worst, _ = max_logprob_diff(hf, solver2_ref, batch[1], out2[1])
    assert worst < 2e-5


def _wait_until(condition, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not reached")
        time.sleep(0.01)


@pytest.mark.slow
def test_killed_engine_is_restarted_at_the_current_version_and_its_requests_resent(pool, hf):
    import ray

    v = pool.version
    pool.update_weights(state_buckets(hf.model(seed=1)), version=v + 1)
    try:
        # ~6k sampled tokens of the real vocabulary: seconds per engine on 2 cores.
        requests = [image_request(f"Question {i}: how tall is bar {i % 3}?", n=4,
                                  temperature=1.0, max_tokens=64, seed=100 + i)
                    for i in range(24)]
        reference = pool.generate(requests)
        restarts = pool.restarts
        killed_pid = ray.get(pool.actors[0].health.remote())["pid"]
        box: dict = {}
        worker = threading.Thread(target=lambda: box.update(out=pool.generate(requests)))
        worker.start()
        _wait_until(lambda: pool.in_flight[0] > 0)
        time.sleep(0.5)  # let engine 0 get into its batch
        assert pool.in_flight[0] > 0, "engine 0 finished before it could be killed"
        ray.kill(pool.actors[0], no_restart=True)
        worker.join(timeout=300)
        out = box["out"]
        assert pool.restarts == restarts + 1
        assert ray.get(pool.actors[0].health.remote())["pid"] != killed_pid
        assert len(out) == len(requests)
        for ref, samples in zip(reference, out):
            assert [s.version for s in samples] == [v + 1] * 4
            # Same seeded samples as before the kill: the new engine has the seed=1 weights.
            assert [s.token_ids for s in samples] == [s.token_ids for s in ref]
            np.testing.assert_allclose([lp for s in samples for lp in s.logprobs],
                                       [lp for s in ref for lp in s.logprobs], atol=1e-5)
    finally:
        pool.update_weights(state_buckets(hf.model(0)), version=pool.version + 1)


@pytest.mark.slow
def test_broken_engine_is_restarted_before_it_serves_again(pool, hf):
    import ray

    from actors.generator import EngineBroken

    request = image_request(max_tokens=8, temperature=0.0)
    before = pool.generate([request, request])
    # A manifest that names the weights in a different order than the buckets
    # hold them passes the name check but fails half-way through the reload.
    buckets = state_buckets(hf.model(0))
    manifest = WeightVersion.of(buckets, version=pool.version)
    refs = put_buckets(list(reversed(buckets)))
    with pytest.raises(EngineBroken):
        ray.get(pool.actors[1].update_weights.remote(refs, pool.version, manifest))
    assert "failed" in ray.get(pool.actors[1].health.remote())["broken"]
    restarts = pool.restarts
    after = pool.generate([request, request])
    assert pool.restarts == restarts + 1
    assert [a[0].token_ids for a in after] == [b[0].token_ids for b in before]
    assert not any(h["broken"] for h in pool.health())


@pytest.mark.slow
def test_max_pixels_gives_engine_and_trainer_the_same_image_tokens(ray_cluster):
    """``model.max_pixels`` reaches the engine (vLLM ``mm_processor_kwargs``) and the
    trainer's processor alike: the same prompt ids, fewer image tokens than the
    model folder's own limit (a 400x300 image: a 6x10 patch grid, 15 tokens after the
    2x2 merge, at 16384 pixels; 14x20, 70 tokens, at the folder's 65536)."""
    import ray

    from actors.batching import InputBuilder
    from actors.generator import GeneratorActor, cpu_engine_env
    from actors.models import resolve_model

    buf = io.BytesIO()
    Image.new("RGB", (400, 300), "white").save(buf, format="PNG")
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi?"}]}]
    request = Request(messages, images=[buf.getvalue()], sampling=Sampling(max_tokens=1))
    spec = EngineSpec(model=SMALL, dtype="float32", max_model_len=2048,
                      max_num_batched_tokens=4096, max_pixels=16384)
    engine = ray.remote(num_cpus=1, runtime_env={"env_vars": cpu_engine_env(1)})(
        GeneratorActor).options(name="test/max-pixels").remote(spec, "max-pixels")
    try:
        [samples] = ray.get(engine.generate.remote([request]))
    finally:
        ray.kill(engine)
    path = resolve_model(SMALL)
    counts = {}
    for limit in (16384, 0):
        processor = InputBuilder.for_model(path, limit).processor
        text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = processor(text=[text], images=[Image.open(io.BytesIO(request.images[0]))])[
            "input_ids"][0]
        ids = list(np.asarray(ids).tolist())
        counts[limit] = ids.count(processor.tokenizer.convert_tokens_to_ids("<|image_pad|>"))
        if limit:
            assert samples[0].prompt_ids == ids
    assert counts == {16384: 15, 0: 70}
