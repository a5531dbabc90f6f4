"""FSDP2 trainer group on CPU (gloo): numerics against a bare single-process loop,
micro-batch invariance, reshardable resume, LoRA, the reference policy, export,
and the memory levers (CPU offload, chunked log-probs, bf16 reference) against group2.
The groups score tokens in chunks (the default) and bare_loop from full logits, so
the comparisons with it also check the chunked path; the LoRA group uses full logits.

Groups are expensive on 2 cores, so one 2-rank and one 1-rank group are shared
by the module; tests restore the state they start from (load a checkpoint).
"""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch
from conftest import make_train_batch

from actors.batching import InputBuilder
from actors.logprobs import token_logprobs
from actors.models import resolve_model
from actors.objectives import ObjectiveSpec, policy_objective
from actors.trainer import LoraSpec, TrainerSpec, lr_factor, merge_metrics
from actors.trainer_group import TrainerGroup

MODEL = "tiny://qwen2.5-vl"
# The trainer-vs-engine tests run the real Qwen vocabulary (152,064 rows): the log-prob
# chunks and the engines' sampling at the size a 7B model has.
REAL_VOCAB = "qwen3-vl?tokenizer=qwen"  # the session's engine of it (tests/test_tiny_models.py)
OBJECTIVE = ObjectiveSpec(kl_coef=0.01)  # PPO clip-higher + dual-clip + low-var KL (MM-Zero)
# Large enough that two steps move weights ~2e-4 (far past the 1e-5 tolerance), small
# enough that Adam's first steps, which scale gradients near eps=1e-8 up to ~lr, do not
# turn the ~1e-6 relative rounding differences of a sharded reduction into 1e-5 of
# weight: at lr 1e-3 that reaches 3.5e-5 on elements with near-zero gradients.
LR = 1e-4
ENV = {"env_vars": {"OMP_NUM_THREADS": "1"}}


def spec(**changes) -> TrainerSpec:
    base = TrainerSpec(model=MODEL, objective=OBJECTIVE, lr=LR, micro_batch_tokens=160,
                       gradient_checkpointing=True, threads=1)
    return dataclasses.replace(base, **changes)


@pytest.fixture(scope="module")
def path(ray_cluster):
    return resolve_model(MODEL)


@pytest.fixture(scope="module")
def batches(path):
    return [make_train_batch(path, n_prompts=3, n=2, seed=s) for s in range(4)]


@pytest.fixture(scope="module")
def group2(ray_cluster):
    group = TrainerGroup(spec(), 2, name="test/trainer2", runtime_env=ENV)
    yield group
    group.shutdown()


@pytest.fixture(scope="module")
def group1(ray_cluster):
    group = TrainerGroup(spec(), 1, name="test/trainer1", runtime_env=ENV)
    yield group
    group.shutdown()


def train_step(group, batch) -> tuple[dict, dict]:
    """One on-policy GRPO-style step: old and reference log-probs, then the update."""
    batch = batch.with_column(old_logprobs=group.compute_logprobs(batch),
                              ref_logprobs=group.compute_logprobs(batch, reference=True))
    return group.forward_backward(batch), group.optim_step()


def bare_loop(path, batches, lr=LR, grad_clip=1.0):
    """The same update in one process without FSDP, Ray or micro-batches."""
    from transformers import AutoModelForImageTextToText

    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32)
    ref = copy.deepcopy(model).eval()
    builder = InputBuilder.for_model(path)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8,
                            fused=True)  # the trainer's implementation
    history = []
    for key, batch in enumerate(batches):
        mb = builder.build(batch, list(range(len(batch))), key)
        with torch.no_grad():
            ref_lp = token_logprobs(ref(**mb["inputs"]).logits[:, :-1], mb["targets"])
            old = token_logprobs(model(**mb["inputs"]).logits[:, :-1], mb["targets"])
        logp = token_logprobs(model(**mb["inputs"]).logits[:, :-1], mb["targets"])
        loss, _ = policy_objective(OBJECTIVE, logp, mb["advantages"], mb["loss_mask"],
                                   old_logprobs=old, ref_logprobs=ref_lp)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        opt.step()
        opt.zero_grad()
        history.append((loss.item(), norm.item()))
    return history, {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float(np.abs(a[k] - b[k]).max()) for k in a)


@pytest.mark.slow
def test_two_rank_fsdp_matches_single_process(group2, path, batches, tmp_path_factory):
    start = tmp_path_factory.mktemp("ckpt") / "step0"
    group2.save(str(start))
    history, expected = bare_loop(path, batches[:2])
    for (loss, norm), batch in zip(history, batches[:2]):
        metrics, step = train_step(group2, batch)
        assert metrics["policy/loss"] == pytest.approx(loss, rel=1e-5)
        assert step["train/grad_norm"] == pytest.approx(norm, rel=1e-5)
    diff = max_diff(group2.parameters(), expected)
    print(f"2-rank FSDP vs single process after 2 steps: max |dparam| = {diff:.2e}")
    assert diff < 1e-5
    # Two steps move weights far beyond that tolerance: the check can fail.
    assert max_diff(group2.parameters(), bare_loop(path, [])[1]) > 1e-4
    group2.load(str(start))


@pytest.mark.slow
def test_micro_batch_split_does_not_change_the_gradient(group2, path):
    batch = make_train_batch(path, n_prompts=4, n=2, seed=5)  # 8 rows: 4 per rank
    batch = batch.with_column(old_logprobs=group2.compute_logprobs(batch),
                              ref_logprobs=group2.compute_logprobs(batch, reference=True))
    one = group2.forward_backward(batch, micro_batch_tokens=100_000)  # 1 micro-batch per rank
    grads_one = group2.gradients()
    group2.discard_gradients()
    longest = max(len(ids) for ids in batch.input_ids)
    four = group2.forward_backward(batch, micro_batch_tokens=longest)  # 1 row each: 4 per rank
    grads_four = group2.gradients()
    group2.discard_gradients()
    assert four["policy/loss"] == pytest.approx(one["policy/loss"], rel=1e-6)
    one_flat = np.concatenate([grads_one[k].ravel() for k in grads_one])
    four_flat = np.concatenate([grads_four[k].ravel() for k in grads_one])
    relative = float(np.linalg.norm(one_flat - four_flat) / np.linalg.norm(one_flat))
    worst = max(float(np.abs(grads_one[k] - grads_four[k]).max() / (np.abs(grads_one[k]).max() + 1e-12))
                for k in grads_one)
    print(f"1 vs 4 micro-batches per rank: |g1 - g4| / |g1| = {relative:.2e}; "
          f"worst element relative to its tensor's largest gradient {worst:.2e}")
    assert relative < 1e-6  # fp32 summation order is all that differs
    assert worst < 1e-5
    assert max(float(np.abs(g).max()) for g in grads_one.values()) > 1e-3  # real gradients


@pytest.mark.slow
def test_resume_matches_uninterrupted_also_across_rank_counts(group2, group1, batches, tmp_path):
    start = tmp_path / "start"
    group2.save(str(start))
    for batch in batches[:2]:
        train_step(group2, batch)
    mid = tmp_path / "step_2"
    group2.save(str(mid))
    for batch in batches[2:]:
        train_step(group2, batch)
    uninterrupted = group2.parameters()

    group2.load(str(mid))  # same rank count: bit-identical
    assert group2.load(str(mid))["step"] == 2
    for batch in batches[2:]:
        train_step(group2, batch)
    assert max_diff(group2.parameters(), uninterrupted) == 0.0

    group1.load(str(mid))  # saved by 2 ranks, loaded into 1
    for batch in batches[2:]:
        train_step(group1, batch)
    diff = max_diff(group1.parameters(), uninterrupted)
    print(f"2-rank checkpoint resumed on 1 rank: max |dparam| after step 4 = {diff:.2e}")
    assert diff < 1e-6

    one_rank = tmp_path / "one_rank"  # and back: saved by 1 rank, loaded into 2
    group1.load(str(mid))
    group1.save(str(one_rank))
    group2.load(str(one_rank))
    for batch in batches[2:]:
        train_step(group2, batch)
    assert max_diff(group2.parameters(), uninterrupted) < 1e-6
    group2.load(str(start))
    group1.load(str(start))


@pytest.mark.slow
def test_reference_is_the_frozen_start_not_the_policy(group1, batches, tmp_path):
    start = tmp_path / "start"
    group1.save(str(start))
    before = group1.compute_logprobs(batches[0])
    train_step(group1, batches[1])
    policy = group1.compute_logprobs(batches[0])
    reference = group1.compute_logprobs(batches[0], reference=True)
    assert all(np.array_equal(r, b) for r, b in zip(reference, before))
    assert max(float(np.abs(p - r).max()) for p, r in zip(policy, reference)) > 1e-3
    group1.load(str(start))


@pytest.mark.slow
@pytest.mark.parametrize("chunk", [2048, 5], ids=["offload", "offload+5-token-chunks"])
def test_memory_levers_in_the_two_rank_group(chunk, group2, batches, tmp_path):
    """CPU offload (FSDP2 CPUOffloadPolicy) and a bf16 reference in a 2-rank group, with
    group2's log-prob chunks (the default 2048: one holds a micro-batch) or 5-token chunks,
    against group2 (no offload, fp32 reference). Fed the same old and reference
    log-probs, two updates with offload alone are bit-identical; with 5-token chunks
    log-probs and gradients differ by fp32 summation order only. The bf16 reference is
    close to the fp32 one (fp32 compute on CPU)."""
    levers = TrainerGroup(spec(offload=True, logprob_chunk_tokens=chunk, reference_dtype="bfloat16"),
                          2, name="test/trainer-levers", runtime_env=ENV)
    start = tmp_path / "start"
    group2.save(str(start))
    try:
        initial = group2.parameters()
        assert max_diff(levers.parameters(), initial) == 0.0
        ref32 = group2.compute_logprobs(batches[0], reference=True)
        ref16 = levers.compute_logprobs(batches[0], reference=True)
        ref_diff = np.concatenate([np.abs(a - b) for a, b in zip(ref16, ref32)])
        policy = zip(levers.compute_logprobs(batches[0]), group2.compute_logprobs(batches[0]))
        lp_diff = max(float(np.abs(a - b).max()) for a, b in policy)
        print(f"bf16 vs fp32 reference (fp32 compute): max {ref_diff.max():.2e}, mean "
              f"{ref_diff.mean():.2e}; {chunk}-token chunks: max |dlogp| {lp_diff:.2e}")
        assert 0 < ref_diff.max() < 1e-2 and ref_diff.mean() < 3e-3  # measured 3.7e-3 / 1.2e-3
        assert lp_diff < 3e-6  # measured 4.8e-7 (5-token chunks), 0 (one chunk)
        for batch in batches[:2]:
            batch = batch.with_column(old_logprobs=group2.compute_logprobs(batch),
                                      ref_logprobs=group2.compute_logprobs(batch, reference=True))
            plain, lever = group2.forward_backward(batch), levers.forward_backward(batch)
            grads, lever_grads = group2.gradients(), levers.gradients()
            flat = np.concatenate([grads[k].ravel() for k in grads])
            lever_flat = np.concatenate([lever_grads[k].ravel() for k in grads])
            relative = float(np.linalg.norm(flat - lever_flat) / np.linalg.norm(flat))
            step, lever_step = group2.optim_step(), levers.optim_step()
            print(f"loss {lever['policy/loss']:.8f} vs {plain['policy/loss']:.8f}, |dg|/|g| {relative:.1e}")
            assert lever["policy/loss"] == pytest.approx(plain["policy/loss"], rel=1e-6)
            assert lever_step["train/grad_norm"] == pytest.approx(step["train/grad_norm"], rel=1e-6)
            assert relative < 5e-6  # measured 4.1e-7, then 1.2e-6 once the weights differ
        after = group2.parameters()
        diff = max_diff(levers.parameters(), after)
        print(f"after 2 steps: max |dparam| = {diff:.2e}")
        if chunk == 2048:
            assert lp_diff == 0.0 and diff == 0.0  # offload moves memory, not numbers
        else:
            # Adam turns ~1e-7 relative gradient differences on elements with near-zero
            # gradients into up to ~lr x 3e-2 (measured 3.0e-6; see LR above).
            assert diff < 1e-5
        assert max_diff(after, initial) > 1e-4  # two steps moved the weights past the tolerance
    finally:
        levers.shutdown()
        group2.load(str(start))


@pytest.mark.slow
def test_lora_trains_only_adapters_and_its_reference_is_the_base(ray_cluster, path, batches, tmp_path):
    from transformers import AutoModelForImageTextToText

    # Also the one group on the full-logits path (logprob_chunk_tokens 0); the others chunk.
    group = TrainerGroup(spec(lora=LoraSpec(rank=4, alpha=8, dropout=0.0), lr=1e-2,
                              logprob_chunk_tokens=0), 2,
                         name="test/trainer-lora", runtime_env=ENV)
    try:
        initial = group.parameters()
        for batch in batches[:2]:
            train_step(group, batch)
        after = group.parameters()
        changed = {k for k in after if not np.array_equal(after[k], initial[k])}
        assert changed and all("lora_B" in k or "lora_A" in k for k in changed)
        assert any("lora_B" in k for k in changed)
        # The reference is the base with adapters disabled: it equals a plain model.
        base = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32)
        builder = InputBuilder.for_model(path)
        mb = builder.build(batches[0], list(range(len(batches[0]))))
        with torch.no_grad():
            plain = token_logprobs(base(**mb["inputs"]).logits[:, :-1], mb["targets"])
        reference = group.compute_logprobs(batches[0], reference=True)
        policy = group.compute_logprobs(batches[0])
        for i, (ids, p) in enumerate(zip(batches[0].input_ids, batches[0].prompt_lens)):
            np.testing.assert_allclose(reference[i], plain[i, p - 1:len(ids) - 1].numpy(), atol=1e-5)
        assert max(float(np.abs(a - b).max()) for a, b in zip(policy, reference)) > 1e-4
        group.export_hf(str(tmp_path / "hf"))
        merged = AutoModelForImageTextToText.from_pretrained(tmp_path / "hf", dtype=torch.float32)
        with torch.no_grad():
            exported = token_logprobs(merged(**mb["inputs"]).logits[:, :-1], mb["targets"])
        for i, (ids, p) in enumerate(zip(batches[0].input_ids, batches[0].prompt_lens)):
            np.testing.assert_allclose(exported[i, p - 1:len(ids) - 1].numpy(), policy[i], atol=1e-5)
        assert (tmp_path / "hf" / "adapter" / "adapter_config.json").is_file()
    finally:
        group.shutdown()


@pytest.mark.slow
def test_export_hf_loads_in_transformers_with_the_trained_weights(group1, path, batches, tmp_path):
    from transformers import AutoModelForImageTextToText

    group1.export_hf(str(tmp_path / "hf"))
    model = AutoModelForImageTextToText.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    mb = InputBuilder.for_model(str(tmp_path / "hf")).build(batches[0], list(range(len(batches[0]))))
    with torch.no_grad():
        logp = token_logprobs(model(**mb["inputs"]).logits[:, :-1], mb["targets"])
    trained = group1.compute_logprobs(batches[0])
    for i, (ids, p) in enumerate(zip(batches[0].input_ids, batches[0].prompt_lens)):
        np.testing.assert_allclose(logp[i, p - 1:len(ids) - 1].numpy(), trained[i], atol=1e-5)


def concat(a, b):
    """Samples of a then b (b's prompts renumbered after a's)."""
    from actors.batching import TrainBatch

    return TrainBatch(
        input_ids=[*a.input_ids, *b.input_ids],
        prompt_lens=np.concatenate([a.prompt_lens, b.prompt_lens]),
        prompt_index=np.concatenate([a.prompt_index, b.prompt_index + len(a.images)]),
        images=[*a.images, *b.images],
        advantages=np.concatenate([a.advantages, b.advantages]))


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["text-only", "images on one rank only"])
def test_ranks_stay_in_step_without_images_on_some(kind, group2, group1, path):
    """FSDP all-gathers each unit per forward: a rank without images still runs the
    vision tower when another rank does, and the result equals the 1-rank gradient."""
    text = make_train_batch(path, n_prompts=2, n=2, seed=9, images=False)
    batch = text if kind == "text-only" else concat(
        make_train_batch(path, n_prompts=1, n=2, seed=8), text)
    grads = []
    for group in (group2, group1):
        b = batch.with_column(old_logprobs=group.compute_logprobs(batch),
                              ref_logprobs=group.compute_logprobs(batch, reference=True))
        metrics = group.forward_backward(b)
        assert metrics["train/tokens"] == batch.completion_tokens()
        grads.append(group.gradients())
        group.discard_gradients()
    worst = max(float(np.abs(grads[0][k] - grads[1][k]).max() / (np.abs(grads[1][k]).max() + 1e-12))
                for k in grads[1])
    assert worst < 1e-5
    vision = [k for k in grads[1] if ".visual." in k]
    if kind == "text-only":
        assert not vision  # the vision tower was never run
    else:
        assert max(float(np.abs(grads[1][k]).max()) for k in vision) > 0


def test_merge_metrics_sums_losses_and_weights_means():
    parts = [{"policy/loss": 0.5, "policy/kl": 1.0, "policy/ratio_max": 1.2, "train/tokens": 3.0},
             {"policy/loss": 0.25, "policy/kl": 3.0, "policy/ratio_max": 1.5, "train/tokens": 1.0}]
    merged = merge_metrics(parts)
    assert merged == {"policy/loss": 0.75, "policy/kl": (1.0 * 3 + 3.0 * 1) / 4,
                      "policy/ratio_max": 1.5, "train/tokens": 4.0}


@pytest.fixture(scope="module")
def real_group(ray_cluster):
    """A 1-rank group of the real-vocabulary Qwen3-VL, without KL, reference or
    checkpointing; its tests never step its optimizer (the weights stay the engine's)."""
    group = TrainerGroup(spec(model=f"tiny://{REAL_VOCAB}", objective=ObjectiveSpec(kl_coef=0.0),
                              reference=False, gradient_checkpointing=False,
                              micro_batch_tokens=4096), 1,
                         name="test/trainer-real-vocab", runtime_env=ENV)
    yield group
    group.shutdown()


def engine_batch(engines, pngs: list[bytes], question: str, **sampling):
    """The shared real-vocabulary tiny Qwen3-VL engine's samples for one question per
    image (request i seeded i), as (prompt index, completion) pairs and as a TrainBatch."""
    import ray

    from actors.batching import TrainBatch
    from actors.generator import Request, Sampling

    requests = [Request([{"role": "user", "content": [
        {"type": "image"}, {"type": "text", "text": question.format(i)}]}],
        images=[png], sampling=Sampling(seed=i, **sampling)) for i, png in enumerate(pngs)]
    results = ray.get(engines(REAL_VOCAB).generate.remote(requests))
    samples = [(p, s) for p, group in enumerate(results) for s in group]
    batch = TrainBatch(
        input_ids=[np.array(s.prompt_ids + s.token_ids) for _, s in samples],
        prompt_lens=np.array([len(s.prompt_ids) for _, s in samples]),
        prompt_index=np.array([p for p, _ in samples]),
        images=[[png] for png in pngs])
    return samples, batch


@pytest.mark.slow
def test_trainer_logprobs_match_the_engine_on_its_own_samples(real_group, engines):
    """The engine samples (temperature 1) with the starting weights; the trainer scores
    the same token sequences with the same weights: fp32 agreement."""
    from conftest import chart_png

    samples, batch = engine_batch(engines, [chart_png(1), chart_png(2)], "What is in chart {}?",
                                  n=2, temperature=1.0, max_tokens=12)
    trainer = real_group.compute_logprobs(batch)  # the untouched starting weights
    diffs = np.concatenate([np.abs(t - np.array(s.logprobs)) for t, (_, s) in zip(trainer, samples)])
    print(f"trainer vs engine log-probs on {diffs.size} sampled tokens: "
          f"max {diffs.max():.2e}, mean {diffs.mean():.2e}")
    assert diffs.size > 20 and diffs.max() < 1e-4


@pytest.mark.slow
def test_engine_behaviour_logprobs_give_the_trainers_update(real_group, engines):
    """algorithm.behaviour_logprobs: engine instead of trainer. The engine samples at
    temperature 0.7 (CodeGen's) with the trainer's weights; its log-probs are of the raw
    model (vLLM's raw_logprobs: before temperature and top-p), which is the policy the
    trainer scores. The same clipped update with either as the behaviour log-probs: the
    gradients agree to 1e-4 of the largest element in fp32 (measured: ~1e-6)."""
    from conftest import chart_png

    samples, batch = engine_batch(engines, [chart_png(0), chart_png(1)], "Draw chart {} again.",
                                  n=3, temperature=0.7, top_p=0.9, max_tokens=16)
    batch = batch.with_column(
        advantages=np.random.default_rng(3).normal(size=len(samples)).astype(np.float32))
    grads, losses = {}, {}
    trainer = real_group.compute_logprobs(batch)
    engine = [np.asarray(s.logprobs, dtype=np.float32) for _, s in samples]
    for source, old in (("trainer", trainer), ("engine", engine)):
        losses[source] = real_group.forward_backward(batch.with_column(old_logprobs=old))
        grads[source] = real_group.gradients()
        real_group.discard_gradients()
    worst = max(float(np.abs(grads["trainer"][k] - grads["engine"][k]).max()) for k in grads["trainer"])
    scale = max(float(np.abs(g).max()) for g in grads["trainer"].values())
    lp = np.concatenate([np.abs(t - e) for t, e in zip(trainer, engine)])
    print(f"engine vs trainer behaviour log-probs: max {lp.max():.1e}; gradients: max diff "
          f"{worst:.1e} of max {scale:.1e}")
    assert lp.size > 40 and lp.max() < 1e-4
    assert scale > 0 and worst < 1e-4 * scale
    assert losses["engine"]["policy/loss"] == pytest.approx(losses["trainer"]["policy/loss"],
                                                            rel=1e-4, abs=1e-7)


@pytest.mark.parametrize("schedule, step, expected", [
    ("constant", 7, 1.0),
    ("warmup", 0, 1 / 4),          # warm-up of 4 steps: (0 + 1) / 4
    ("warmup", 3, 4 / 4),
    ("warmup", 9, 1.0),
    ("cosine", 1, 2 / 4),          # still warming up
    ("cosine", 4, 1.0),            # progress 0: 0.5 * (1 + cos 0)
    ("cosine", 7, 0.5),            # progress (7 - 4) / (10 - 4) = 1/2: 0.5 * (1 + cos pi/2)
    ("cosine", 10, 0.0),           # progress 1: 0.5 * (1 + cos pi)
    ("cosine", 12, 0.0),           # past the end it stays at 0
])
def test_lr_schedules(schedule, step, expected):
    assert lr_factor(step, schedule, warmup_steps=4, total_steps=10) == pytest.approx(expected, abs=1e-12)


@pytest.mark.slow
def test_qwen3_vl_frozen_vision_and_engine_agreement(ray_cluster, engines, tmp_path):
    """Qwen3-VL batches (deepstack, interleaved M-RoPE) through the trainer: its log-probs
    equal the engine's, and freeze_vision keeps the vision tower (not the merger) fixed."""
    import ray
    from conftest import chart_png

    from actors.batching import TrainBatch
    from actors.generator import Request, Sampling

    group = TrainerGroup(spec(model="tiny://qwen3-vl", freeze_vision=True), 1,
                         name="test/trainer-qwen3", runtime_env=ENV)
    try:
        png = chart_png(3)
        request = Request([{"role": "user", "content": [
            {"type": "image"}, {"type": "text", "text": "What is in the chart?"}]}],
            images=[png], sampling=Sampling(n=4, temperature=1.0, max_tokens=12, seed=3))
        [samples] = ray.get(engines("qwen3-vl").generate.remote([request]))
        batch = TrainBatch(
            input_ids=[np.array(s.prompt_ids + s.token_ids) for s in samples],
            prompt_lens=np.array([len(s.prompt_ids) for s in samples]),
            prompt_index=np.zeros(len(samples), dtype=np.int64), images=[[png]],
            advantages=np.array([1.0, -1.0, 0.5, -0.5], dtype=np.float32))
        trainer = group.compute_logprobs(batch)
        diffs = np.concatenate([np.abs(t - np.array(s.logprobs)) for t, s in zip(trainer, samples)])
        print(f"qwen3-vl trainer vs engine: max {diffs.max():.2e}, mean {diffs.mean():.2e}")
        assert diffs.max() < 1e-4
        before = group.parameters()
        train_step(group, batch)
        after = group.parameters()
        changed = {k for k in after if not np.array_equal(after[k], before[k])}
        vision = {k for k in after if ".visual." in f".{k}" and "merger" not in k}
        assert vision and not (changed & vision)
        assert any("merger" in k for k in changed) and any("language_model" in k for k in changed)
    finally:
        group.shutdown()


@pytest.mark.slow
def test_exported_folder_serves_in_vllm(group1, batches, tmp_path):
    """export_hf after training: a vLLM engine on the folder scores like the trainer."""
    import ray
    from conftest import chart_png

    from actors.generator import EngineSpec, GeneratorActor, Request, Sampling, cpu_engine_env

    start = tmp_path / "start"
    group1.save(str(start))
    train_step(group1, batches[0])
    group1.export_hf(str(tmp_path / "hf"))
    actor = ray.remote(num_cpus=1, runtime_env={"env_vars": cpu_engine_env(2)})(GeneratorActor)
    engine = actor.remote(EngineSpec(model=str(tmp_path / "hf"), dtype="float32", max_model_len=2048,
                                     max_num_batched_tokens=4096), "exported")
    try:
        png = chart_png(4)
        request = Request([{"role": "user", "content": [
            {"type": "image"}, {"type": "text", "text": "Read the chart."}]}],
            images=[png], sampling=Sampling(n=2, temperature=1.0, max_tokens=10, seed=1))
        [samples] = ray.get(engine.generate.remote([request]))
    finally:
        ray.kill(engine)
    from actors.batching import TrainBatch

    batch = TrainBatch([np.array(s.prompt_ids + s.token_ids) for s in samples],
                       np.array([len(s.prompt_ids) for s in samples]), np.zeros(2, dtype=np.int64),
                       [[png]])
    trainer = group1.compute_logprobs(batch)
    diffs = np.concatenate([np.abs(t - np.array(s.logprobs)) for t, s in zip(trainer, samples)])
    assert diffs.max() < 1e-4
    group1.load(str(start))


@pytest.mark.slow
def test_second_update_on_one_generation_batch_sees_a_ratio_and_clips(group1, batches, tmp_path):
    """Several updates per generation batch: the behaviour log-probs are taken once, so
    the first update's ratio is 1 and the second's is not; on a constructed batch whose
    behaviour log-probs sit 0.5 below the policy's (ratio e^0.5 = 1.65 > 1 + clip_high),
    PPO's clip acts exactly on the tokens with positive advantages."""
    start = tmp_path / "start"
    group1.save(str(start))
    try:
        batch = batches[1]
        old = group1.compute_logprobs(batch)
        on_policy = batch.with_column(old_logprobs=old)
        first = group1.forward_backward(on_policy, kl_coef=0.0)  # no reference needed
        group1.optim_step()
        second = group1.forward_backward(on_policy, kl_coef=0.0)
        group1.discard_gradients()
        assert first["policy/ratio_max"] == pytest.approx(1.0, abs=1e-5)
        assert abs(second["policy/ratio_mean"] - 1.0) > 1e-5
        now = group1.compute_logprobs(batch)
        shifted = batch.with_column(old_logprobs=[lp - 0.5 for lp in now])
        clipped = group1.forward_backward(shifted, kl_coef=0.0)
        group1.discard_gradients()
        tokens = np.array([len(lp) for lp in now])
        positive = tokens[np.asarray(batch.advantages) > 0].sum() / tokens.sum()
        assert clipped["policy/ratio_mean"] == pytest.approx(np.exp(0.5), rel=1e-4)
        assert clipped["policy/clip_frac"] == pytest.approx(positive, abs=1e-6)
    finally:
        group1.load(str(start))


@pytest.mark.slow
def test_two_lora_adapters_on_one_backbone(batches, tmp_path):
    """Two policies as LoRA adapters on one backbone in one 2-rank group and one engine:
    each update changes only its own adapter and its own samples; each one's reference
    is the base with adapters disabled; a killed group's checkpoint restores both
    adapters and both optimizer states bit-identically."""
    import ray

    from actors.generator import EngineSpec, GeneratorActor, Request, Sampling, cpu_engine_env

    lora = LoraSpec(rank=4, alpha=8, dropout=0.0, adapters=("solver", "proposer"))
    two = spec(lora=lora, lr=1e-2, objective=ObjectiveSpec(kl_coef=0.0))

    def step(group, adapter, batch):
        batch = batch.with_column(old_logprobs=group.compute_logprobs(batch, adapter=adapter))
        group.forward_backward(batch, adapter=adapter)
        return group.optim_step(adapter)

    def changed(a, b):
        return {k for k in a if not np.array_equal(a[k], b[k])}

    actor = ray.remote(num_cpus=1, runtime_env={"env_vars": cpu_engine_env(1)})(GeneratorActor)
    engine = actor.remote(EngineSpec(model=MODEL, dtype="float32", max_model_len=1024,
                                     max_num_batched_tokens=2048, enable_lora=True,
                                     max_lora_rank=8, max_loras=2), "two-adapters")
    requests = {name: [Request([{"role": "user", "content": "Ask about a chart."}],
                               sampling=Sampling(n=2, max_tokens=8, seed=3), adapter=name)]
                for name in lora.adapters}

    def samples():  # seeded: the same tokens unless the adapter moved them
        return {name: [(c.token_ids, c.logprobs) for c in ray.get(engine.generate.remote(reqs))[0]]
                for name, reqs in requests.items()}

    group = TrainerGroup(two, 2, name="test/trainer-two-adapters", runtime_env=ENV)
    try:
        start = group.parameters()
        for version, name in enumerate(lora.adapters, 1):
            ray.get(engine.load_adapter.remote(name, [group.adapter(name)], version))
        before = samples()
        assert step(group, "solver", batches[0])["train/step"] == 1
        solver_moved = group.parameters()
        diff = changed(solver_moved, start)
        assert diff and all(".solver." in k for k in diff)
        ray.get(engine.load_adapter.remote("solver", [group.adapter("solver")], 3))
        after = samples()
        assert after["proposer"] == before["proposer"]
        assert after["solver"] != before["solver"]  # tokens or at least their log-probs
        # the untouched adapter (B = 0) computes exactly the base, which is the reference
        reference = group.compute_logprobs(batches[1], reference=True)
        proposer = group.compute_logprobs(batches[1], adapter="proposer")
        solver = group.compute_logprobs(batches[1], adapter="solver")
        assert all(np.array_equal(a, b) for a, b in zip(proposer, reference))
        assert max(float(np.abs(a - b).max()) for a, b in zip(solver, reference)) > 1e-4
        assert step(group, "proposer", batches[1])["train/step"] == 1  # its own schedule
        diff = changed(group.parameters(), solver_moved)
        assert diff and all(".proposer." in k for k in diff)
        group.save(str(tmp_path / "ckpt"))
        step(group, "solver", batches[2])
        step(group, "proposer", batches[3])
        continued = group.parameters()
        group.export_hf(str(tmp_path / "hf"), adapter="proposer")
    finally:
        group.kill()
        ray.kill(engine)
    # peft's layout: an adapter named other than "default" in a subfolder of its name
    assert (tmp_path / "hf/adapter/solver/adapter_config.json").is_file()
    assert (tmp_path / "hf/adapter/proposer/adapter_config.json").is_file()
    assert (tmp_path / "hf/model.safetensors").is_file()  # the base merged with the proposer
    again = TrainerGroup(two, 2, name="test/trainer-two-adapters", runtime_env=ENV)
    try:
        again.load(str(tmp_path / "ckpt"))
        assert step(again, "solver", batches[2])["train/step"] == 2
        step(again, "proposer", batches[3])
        assert not changed(again.parameters(), continued)
    finally:
        again.shutdown()


@pytest.mark.slow
def test_lora_kl_is_the_exact_kl_to_the_base_with_adapters_disabled(path, batches):
    """EvoLMM's KL: after a few updates of one adapter, the trainer's exact
    full-vocabulary KL equals KL(policy || base) computed here from the base model and
    that adapter's weights, the base being the model with adapters disabled."""
    import ray
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
    from transformers import AutoModelForImageTextToText

    from actors.objectives import full_kl, masked_mean
    from actors.weights import iter_bucket_tensors

    lora = LoraSpec(rank=4, alpha=8, dropout=0.0, adapters=("solver", "proposer"))
    objective = ObjectiveSpec(policy_loss="reinforce", kl_coef=1e-3, kl_estimator="full")
    group = TrainerGroup(spec(lora=lora, lr=1e-2, objective=objective, logprob_chunk_tokens=0,
                              micro_batch_tokens=100_000), 1,
                         name="test/trainer-kl-reference", runtime_env=ENV)
    try:
        for batch in batches[:3]:
            batch = batch.with_column(old_logprobs=group.compute_logprobs(batch, adapter="solver"))
            group.forward_backward(batch, adapter="solver")
            group.optim_step("solver")
        probe = batches[3].with_column(old_logprobs=group.compute_logprobs(batches[3],
                                                                           adapter="solver"))
        trainer_kl = group.forward_backward(probe, adapter="solver")["policy/kl"]
        group.discard_gradients()
        payload = ray.get(group.adapter("solver"))
    finally:
        group.shutdown()
    base = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32)
    config = {k: v for k, v in payload["config"].items() if k in (
        "r", "lora_alpha", "lora_dropout", "target_modules", "bias")}
    model = get_peft_model(base, LoraConfig(**config)).eval()
    set_peft_model_state_dict(model, dict(iter_bucket_tensors(payload["bucket"])))
    mb = InputBuilder.for_model(path).build(probe, list(range(len(probe))))
    with torch.no_grad():
        logits = model(**mb["inputs"]).logits[:, :-1]
        with model.disable_adapter():
            base_logits = model(**mb["inputs"]).logits[:, :-1]
    direct = float(masked_mean(full_kl(logits, base_logits), mb["loss_mask"]))
    print(f"KL to the base: trainer {trainer_kl:.6g}, direct {direct:.6g}")
    assert trainer_kl > 1e-4
    assert trainer_kl == pytest.approx(direct, rel=1e-4)


def test_a_dummy_image_row_gets_its_own_pixels_not_a_cached_prompts():
    """A micro-batch without images on a rank whose peers have some gets a dummy image
    row. Its prompt index is a sub-batch index that may name another prompt of the whole
    batch whose pixels are cached already: the dummy's pixels must still be the dummy's
    (the warm start once failed with "image tokens 4, features 12")."""
    from conftest import chart_png
    from transformers import AutoProcessor

    from pipelines.runtime.sft import SFTExample, sft_batch

    path = resolve_model("tiny://qwen2.5-vl")
    text = [{"role": "user", "content": "Say red."}]
    image = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Colour?"}]}]
    batch = sft_batch([SFTExample(text, "red"), SFTExample(text, "red"),
                       SFTExample(image, "blue", [chart_png(0, (224, 168))])],
                      AutoProcessor.from_pretrained(path))
    builder = InputBuilder.for_model(path)
    builder.build(batch, [2], 0)  # caches prompt 2's pixels under batch key 0
    mb = builder.build(batch, [0, 1], 0, ensure_image=True)  # dummy row: sub-batch prompt 2
    merge = builder.processor.image_processor.merge_size ** 2
    tokens = int((mb["inputs"]["input_ids"] == builder.image_token_id).sum())
    assert tokens == int(mb["inputs"]["image_grid_thw"].prod()) // merge == 4
    # MAYE's micro-token-mean weights travel with their rows; the dummy row weighs 0
    weighted = batch.with_column(loss_weights=np.array([0.5, 0.25, 1.0], np.float32))
    mb = builder.build(weighted.select([1, 0]), [0, 1], 1, ensure_image=True)
    assert mb["loss_weights"].tolist() == [0.25, 0.5, 0.0]
    assert builder.build(batch, [0, 1], 2)["loss_weights"] is None


@pytest.mark.slow
def test_a_rank_hung_inside_forward_backward_fails_the_group_after_the_call_timeout(
        ray_cluster, batches):
    """Rank 1 stops inside its backward pass (the test hook ``arm_fault("hang")``) while
    rank 0 waits for it in a collective: after ``call_timeout_s`` the group is killed
    and ``TrainerGroupFailed`` names the hung rank, the verb and the setting."""
    import time

    import ray

    from actors.trainer_group import TrainerGroupFailed

    group = TrainerGroup(spec(), 2, name="test/trainer-hung", runtime_env=ENV,
                         call_timeout_s=20)
    batch = batches[0].with_column(
        old_logprobs=group.compute_logprobs(batches[0]),
        ref_logprobs=group.compute_logprobs(batches[0], reference=True))
    ray.get(group.actors[1].arm_fault.remote("hang"))
    start = time.monotonic()
    with pytest.raises(TrainerGroupFailed, match=r"rank\(s\) \[.*1\] did not finish "
                       r"forward_backward within 20 s \(trainer.call_timeout_s\)"):
        group.forward_backward(batch)
    assert 20 <= time.monotonic() - start < 60
    with pytest.raises(ray.exceptions.RayActorError):  # killed: names free for a rebuild
        ray.get(group.actors[0].rendezvous_address.remote())
