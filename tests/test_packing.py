"""Shared prompts (actors/packing.py): the packed layout by hand, and its positions and
log-probs against the flat rows on the tiny models (no Ray)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_train_batch

from actors.batching import InputBuilder
from actors.packing import pack_groups, packed_positions, prompt_layout

P, IMG, VID = 0, 90, 91


def test_two_groups_by_hand():
    # samples 0, 1 answer prompt a = [5, 6, 7] (completions [8, 9], [10]); sample 2
    # answers prompt b = [5, 4] alone (completion [3, 2, 1])
    ids = [np.array([5, 6, 7, 8, 9]), np.array([5, 6, 7, 10]), np.array([5, 4, 3, 2, 1])]
    packed = pack_groups(ids, [3, 3, 2], ["a", "a", "b"], P, IMG, VID)
    assert packed["input_ids"].tolist() == [[5, 6, 7, 8, 9, 10], [5, 4, 3, 2, 1, P]]
    assert packed["segment"].tolist() == [[0, 0, 0, 1, 1, 2], [0, 0, 1, 1, 1, -1]]
    assert packed["group"].tolist() == [0, 0, 1]
    # flat t = p-1 predicts the first completion token from the prompt's last position;
    # t = p-1+k from the sample's own token k-1
    assert packed["pos"][0].tolist() == [0, 0, 2, 3]   # t=2 -> 2 (prompt end), t=3 -> 3
    assert packed["pos"][1].tolist() == [0, 0, 2, 0]   # one token: only t=2
    assert packed["pos"][2].tolist() == [0, 1, 2, 3]   # p=2: t=1 -> 1, t=2 -> 2, t=3 -> 3
    # compacted: row 0's 6 tokens, then row 1's 5 (its padding slot 11 dropped)
    layout = prompt_layout(packed["segment"])
    assert layout["tokens"].tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10]
    assert layout["prompt"].tolist() == [[0, 1, 2], [6, 7, 6]]  # padded with a real slot
    assert layout["completion"].tolist() == [[3, 4, 3], [5, 5, 5], [8, 9, 10]]
    assert layout["owner"].tolist() == [0, 0, 1]
    assert layout["prompt_mask"][1, 0].int().tolist() == [[1, 0, 0], [1, 1, 0], [1, 1, 0]]
    # keys: the owner's prompt (3 slots), then the completion's own (3 slots)
    assert layout["completion_mask"][1, 0].int().tolist() == [[1, 1, 1, 1, 0, 0]] * 3
    assert layout["completion_mask"][2, 0].int().tolist() == [[1, 1, 0, 1, 0, 0],
                                                              [1, 1, 0, 1, 1, 0],
                                                              [1, 1, 0, 1, 1, 1]]
    # attention outputs: 2 x 3 prompt slots, then 3 x 3 completion slots (from 6)
    assert layout["order"].tolist() == [0, 1, 2, 6, 7, 9, 3, 4, 12, 13, 14]


def test_shared_prompt_attention_is_the_block_masked_attention():
    """Against SDPA over each padded packed row with the dense block mask (each
    completion sees the prompt and itself, causally), outputs and input gradients on
    the compacted row, with GQA."""
    from types import SimpleNamespace

    from actors.packing import shared_prompt_attention

    segment = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2], [0, 0, 1, 1, 1, 2, -1, -1]])
    g, w, h, kv, d = 2, 8, 4, 2, 8
    real = (segment >= 0).flatten()
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(g, n, w, d, generator=gen, dtype=torch.float64, requires_grad=True)
               for n in (h, kv, kv))

    def compact(x):  # [G, heads, W, D] -> [1, heads, M, D]
        return x.transpose(0, 1).reshape(x.shape[1], g * w, d)[:, real][None]

    layout = prompt_layout(segment)
    # FSDP2's mixed precision passes a forward's keyword arguments through pytree's
    # tree_map, which rebuilds dicts and lists: the call count must survive that
    # (it did not as a list, and every bf16 GPU step refused the packed forward).
    from torch.utils._pytree import tree_map

    passed = tree_map(lambda x: x, {"prompt_layout": layout})["prompt_layout"]
    out, _ = shared_prompt_attention(SimpleNamespace(), compact(q), compact(k), compact(v),
                                     None, scaling=0.3, prompt_layout=passed)
    assert layout["calls"].n == 1
    sq, sk = segment[:, :, None], segment[:, None, :]
    mask = (((sq == sk) & (sq >= 0)) | ((sk == 0) & (sq > 0))) & torch.ones(w, w).tril().bool()
    want = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(h // kv, 1), v.repeat_interleave(h // kv, 1),
        attn_mask=mask[:, None] | torch.eye(w, dtype=torch.bool), scale=0.3)
    want = compact(want).transpose(1, 2)  # [1, M, H, D], like transformers' SDPA
    assert out.shape == (1, 14, h, d)
    assert torch.allclose(out, want, atol=1e-12)
    weights = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    grads = torch.autograd.grad((out * weights).sum(), (q, k, v))
    wants = torch.autograd.grad((want * weights).sum(), (q, k, v))
    for got, expected in zip(grads, wants):
        assert torch.allclose(got, expected, atol=1e-12)
    with pytest.raises(ValueError, match="one compacted row of 14 tokens"):
        shared_prompt_attention(SimpleNamespace(), q, k, v, None, prompt_layout=layout)


def test_nothing_to_share_stays_flat():
    ids = [np.array([5, 6, 7]), np.array([5, 4, 3])]
    assert pack_groups(ids, [2, 2], ["a", "b"], P, IMG, VID) is None


@pytest.mark.parametrize("family", ["qwen2-vl", "qwen2.5-vl?tokenizer=qwen",
                                    "qwen3-vl?tokenizer=qwen"])
def test_packed_positions_and_logprobs_equal_the_flat_rows(tiny_cache, family):
    """Each completion gets the multimodal RoPE positions its flat row has, and the
    packed forward gives the flat forward's log-probs (fp32), images included."""
    from transformers import AutoModelForImageTextToText

    from actors.logprobs import chunked_model_logprobs, token_logprobs
    from actors.models import resolve_model

    path = resolve_model(f"tiny://{family}")
    batch = make_train_batch(path, n_prompts=2, n=3, seed=4)
    builder = InputBuilder.for_model(path)
    mb = builder.build(batch, list(range(len(batch))), share=True)
    packed = mb["packed"]
    assert packed is not None and packed["input_ids"].shape[0] == 2
    assert packed["image_grid_thw"].shape[0] == 2  # each prompt's image once
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
    core = model.model
    flat = mb["inputs"]
    flat_pos, _ = core.get_rope_index(input_ids=flat["input_ids"],
                                      image_grid_thw=flat["image_grid_thw"],
                                      attention_mask=flat["attention_mask"],
                                      mm_token_type_ids=flat["mm_token_type_ids"])
    got = packed_positions(core, packed, packed["image_grid_thw"])
    for i in range(len(batch)):
        p, n = int(batch.prompt_lens[i]), len(batch.input_ids[i])
        g = int(packed["group"][i])
        where = (packed["segment"][g] > 0) & (packed["segment"][g] == 1 + list(
            np.flatnonzero(packed["group"].numpy() == g)).index(i))
        assert got[:, g, where].tolist() == flat_pos[:, i, p:n].tolist()
    with torch.no_grad():
        want = token_logprobs(model(**flat).logits[:, :-1], mb["targets"]) * mb["loss_mask"]
        shared, _ = chunked_model_logprobs(model, mb, chunk_tokens=64)
    assert float((shared - want).abs().max()) < 1e-5
