"""Shared prompts: a group's samples scored in one packed row, the prompt run once.

A GRPO group's n samples share their prompt (and its images). Scored one row
per sample, the model runs the prompt and the vision tower n times; packed, a
row holds the prompt once followed by every sample's completion:

    [ prompt | completion 1 | completion 2 | ... | completion n | padding ]

with positions that restart after the prompt for each completion (multimodal
RoPE: the prompt's from the model's ``get_rope_index``, a completion's token k
at the first completion position + k on every axis), and attention in which
each completion sees the prompt and its own earlier tokens, never another
completion. The hidden state at a packed position is then the one the flat row
would have at the same place, so each sample's log-probs come out as before (to
fp32 rounding: tests/test_packing.py), gathered back into the flat ``[B, L-1]``
layout the objective reads. Only the scoring forward changes: targets, masks,
advantages and the loss are the flat micro-batch's.

The linear layers (most of the compute) run on the prompt once instead of n
times. Attention does not go through one [W, W] mask over the packed row, whose
cost grows with (prompt + n x completion)^2: ``shared_prompt_attention`` (the
text model's attention implementation in the trainer) gathers each
completion's queries and attends them to its prompt's keys and its own, n x
completion x (prompt + completion) pairs, fewer than the flat rows' n x
(prompt + completion)^2.
"""

from __future__ import annotations

import inspect

import numpy as np
import torch
import torch.nn.functional as F

ATTENTION = "coevolve_shared_prompt"  # the trainer's text attention (shared_prompt_attention)


def pack_groups(input_ids: list[np.ndarray], prompt_lens: list[int], keys: list,
                pad_id: int, image_token_id: int, video_token_id: int) -> dict | None:
    """The packed rows of a micro-batch's samples (``keys``: which prompt each sample
    answers, equal keys = same prompt ids and images), or None when no two samples
    share a prompt (nothing to gain).

    Returns the packed ``input_ids`` [G, W], ``mm_token_type_ids``, ``segment`` [G, W]
    (0: prompt, j: sample j's completion, -1: padding), the ``group`` of each sample
    (its packed row; groups in first-appearance order, which is the order their images
    are given to the model), and ``pos`` [S, L-1]: where in its group's row the hidden
    state predicting each flat (sample, t) token sits.
    """
    order: dict = {}
    for k in keys:
        order.setdefault(k, len(order))
    if len(order) == len(keys):
        return None
    members: list[list[int]] = [[] for _ in order]
    for i, k in enumerate(keys):
        members[order[k]].append(i)
    lengths = [int(prompt_lens[m[0]]) + sum(len(input_ids[i]) - int(prompt_lens[i]) for i in m)
               for m in members]
    width = max(lengths)
    flat_width = max(len(ids) for ids in input_ids)
    ids = torch.full((len(members), width), pad_id, dtype=torch.long)
    segment = torch.full((len(members), width), -1, dtype=torch.long)
    pos = torch.zeros((len(keys), flat_width - 1), dtype=torch.long)
    group = torch.zeros(len(keys), dtype=torch.long)
    for g, m in enumerate(members):
        p = int(prompt_lens[m[0]])
        # torch.tensor copies: the arrays may be Ray's read-only views
        ids[g, :p] = torch.tensor(np.asarray(input_ids[m[0]][:p]), dtype=torch.long)
        segment[g, :p] = 0
        start = p
        for j, i in enumerate(m, start=1):
            completion = np.asarray(input_ids[i][p:])
            n = len(completion)
            ids[g, start:start + n] = torch.tensor(completion, dtype=torch.long)
            segment[g, start:start + n] = j
            group[i] = g
            if n:
                # flat t = p - 1 predicts the first completion token: the prompt's last
                # position; flat t = p - 1 + k (k >= 1): the sample's token k - 1
                pos[i, p - 1] = p - 1
                pos[i, p:p + n - 1] = torch.arange(start, start + n - 1)
            start += n
    mm_types = (ids == image_token_id).long() + 2 * (ids == video_token_id).long()
    return {"input_ids": ids, "mm_token_type_ids": mm_types, "segment": segment,
            "group": group, "pos": pos}


def packed_positions(core, packed: dict, image_grid_thw: torch.Tensor | None) -> torch.Tensor:
    """[3, G, W] multimodal RoPE positions of the packed rows: the prompt's from the
    model's ``get_rope_index``, each completion's token k at the first completion
    position + k (the positions a flat row of that sample has)."""
    ids, segment = packed["input_ids"], packed["segment"]
    prompt = segment == 0
    kwargs = {"input_ids": torch.where(prompt, ids, torch.zeros_like(ids)),
              "image_grid_thw": image_grid_thw, "video_grid_thw": None,
              "attention_mask": prompt.long(),
              "mm_token_type_ids": packed["mm_token_type_ids"] * prompt.long()}
    accepted = inspect.signature(core.get_rope_index).parameters
    positions, _ = core.get_rope_index(**{k: v for k, v in kwargs.items() if k in accepted})
    positions = positions.clone()
    first = positions.masked_fill(~prompt[None], -1).amax(dim=-1) + 1  # [3, G]
    # k = how many tokens of its own completion come before a position
    completion = segment > 0
    starts = torch.ones_like(segment, dtype=torch.bool)
    starts[:, 1:] = segment[:, 1:] != segment[:, :-1]
    index = torch.arange(segment.shape[1], device=segment.device).expand_as(segment)
    begin = torch.cummax(torch.where(starts, index, torch.zeros_like(index)), dim=1).values
    k = index - begin
    text = first[:, :, None] + k[None]
    return torch.where(completion[None], text, positions).to(positions.dtype)


class Calls:
    """How many attention layers took the layout. Not a list: FSDP2's mixed precision
    rebuilds the containers in a forward's keyword arguments (casting their tensors),
    so a count kept in a list would grow in a copy."""

    def __init__(self):
        self.n = 0


def prompt_layout(segment: torch.Tensor) -> dict:
    """Where the prompts and completions of packed rows ``segment`` [G, W] sit once
    the rows are compacted into one sequence of their real tokens (row after row,
    padding dropped: ``tokens`` [M], the flat slots row x W + column kept), for
    ``shared_prompt_attention``: the compact positions of each row's prompt
    (``prompt`` [G, P], P the longest prompt) and of each completion
    (``completion`` [C, N], N the longest; ``owner`` [C]: its row), the boolean
    attention of the prompt queries (``prompt_mask`` [G, 1, P, P]: causal) and of
    the completion queries (``completion_mask`` [C, 1, N, P + N]: the whole prompt,
    then causal over the completion), and ``order``: which attention output each
    compact position takes. Slots past the end of a prompt or completion repeat
    its first position and are masked out as keys; as queries they still see their
    prompt's first token (no empty softmax row) and are dropped.
    """
    device = segment.device
    tokens = (segment >= 0).flatten().nonzero().squeeze(1)
    prompts, completions, owner = [], [], []
    at = 0
    for g, row in enumerate(segment.tolist()):
        spans: dict[int, list[int]] = {}
        for s in row:
            if s >= 0:
                spans.setdefault(s, []).append(at)
                at += 1
        prompts.append(spans.pop(0, []))
        completions += spans.values()
        owner += [g] * len(spans)

    def padded(lists):
        size = max([1] + [len(x) for x in lists])
        index = torch.tensor([x + x[:1] * (size - len(x)) for x in lists], dtype=torch.long,
                             device=device).reshape(len(lists), size)
        keep = torch.tensor([[True] * len(x) + [False] * (size - len(x)) for x in lists],
                            dtype=torch.bool, device=device).reshape(len(lists), size)
        return index, keep

    if not all(prompts):
        raise ValueError("every packed row starts with its prompt")
    prompt, prompt_keep = padded(prompts)
    completion, completion_keep = padded(completions)
    owner = torch.tensor(owner, dtype=torch.long, device=device)
    p, n = prompt.shape[1], completion.shape[1]
    causal_p = torch.ones(p, p, dtype=torch.bool, device=device).tril()
    causal_n = torch.ones(n, n, dtype=torch.bool, device=device).tril()
    prompt_mask = causal_p[None] & prompt_keep[:, None, :]
    completion_mask = torch.cat([prompt_keep[owner][:, None, :].expand(-1, n, -1),
                                 causal_n[None] & completion_keep[:, None, :]], dim=-1)
    # the prompts' outputs, then the completions': which one lands at each position
    dest = torch.cat([prompt[prompt_keep], completion[completion_keep]])
    src = torch.cat([prompt_keep.flatten().nonzero().squeeze(1),
                     prompt.numel() + completion_keep.flatten().nonzero().squeeze(1)])
    order = torch.empty_like(src)
    order[dest] = src
    return {"tokens": tokens, "prompt": prompt, "completion": completion, "owner": owner,
            "prompt_mask": prompt_mask[:, None], "completion_mask": completion_mask[:, None],
            "order": order, "calls": Calls()}


def shared_prompt_attention(module, query, key, value, attention_mask, dropout: float = 0.0,
                            scaling: float | None = None, prompt_layout: dict | None = None,
                            **kwargs):
    """A transformers attention implementation: SDPA, or with ``prompt_layout``
    (packed rows compacted into one sequence, ``chunked_model_logprobs``) each prompt
    attended causally on its own and each completion onto its prompt and its own
    earlier tokens.

    With a layout: query [1, H, M, D], key/value [1, Hkv, M, D] (M = the layout's
    tokens) -> ([1, M, H, D], None), like transformers' SDPA. Without one (flat
    rows, generation) it is transformers' SDPA.
    """
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    if prompt_layout is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    if kwargs.get("sliding_window") is not None:
        raise ValueError("shared prompts do not support sliding-window attention; "
                         "set trainer.share_prompts: false")
    layout = prompt_layout
    b, h, m, d = query.shape
    if b != 1 or m != len(layout["order"]):
        raise ValueError(f"shared_prompt_attention expects one compacted row of "
                         f"{len(layout['order'])} tokens, got {b} x {m}")
    layout["calls"].n += 1
    groups = h // key.shape[1]

    def rows(x, index):  # [1, heads, M, D] -> [len(index), heads, index width, D]
        return x[0].transpose(0, 1)[index].transpose(1, 2)

    def attend(q, k, v, mask):
        k, v = repeat_kv(k, groups), repeat_kv(v, groups)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout,
                                              scale=scaling)

    prompt, completion, owner = layout["prompt"], layout["completion"], layout["owner"]
    kp, vp = rows(key, prompt), rows(value, prompt)
    out_p = attend(rows(query, prompt), kp, vp, layout["prompt_mask"])
    out_c = attend(rows(query, completion), torch.cat([kp[owner], rows(key, completion)], 2),
                   torch.cat([vp[owner], rows(value, completion)], 2), layout["completion_mask"])
    outputs = torch.cat([out_p.transpose(1, 2).reshape(-1, h, d),
                         out_c.transpose(1, 2).reshape(-1, h, d)])
    return outputs[layout["order"]][None], None


def use_shared_prompt_attention(core) -> None:
    """Make ``shared_prompt_attention`` the text model's attention implementation of
    ``core`` (a transformers VLM; the vision tower keeps its own). Idempotent. Without
    a layout it runs transformers' SDPA, so flat rows and the reference model are
    unchanged."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    if ATTENTION not in AttentionInterface._global_mapping:
        AttentionInterface.register(ATTENTION, shared_prompt_attention)
        ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION, sdpa_mask)
    text = core.config.get_text_config()
    if text._attn_implementation != ATTENTION:
        text._attn_implementation = ATTENTION
