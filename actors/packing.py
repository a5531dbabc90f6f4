"""Shared prompts: a group's samples scored in one packed row, the prompt run once.

A GRPO group's n samples share their prompt (and its images). Scored one row
per sample, the model runs the prompt and the vision tower n times; packed, a
row holds the prompt once followed by every sample's completion:

    [ prompt | completion 1 | completion 2 | ... | completion n | padding ]

with a block mask (each completion sees the prompt and its own earlier tokens,
never another completion) and positions that restart after the prompt for each
completion (multimodal RoPE: the prompt's from the model's ``get_rope_index``,
a completion's token k at the first completion position + k on every axis). The
hidden state at a packed position is then the one the flat row would have at
the same place, so each sample's log-probs come out as before (to fp32
rounding: tests/test_trainer.py), gathered back into the flat ``[B, L-1]``
layout the objective reads. Only the scoring forward changes: targets, masks,
advantages and the loss are the flat micro-batch's.
"""

from __future__ import annotations

import inspect

import numpy as np
import torch


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


def block_mask(segment: torch.Tensor) -> torch.Tensor:
    """[G, 1, W, W] boolean attention (True: attend): causal, within the prompt and
    each completion, plus every completion onto the prompt. A padding query sees
    only itself (an empty row would make the softmax NaN)."""
    q, k = segment[:, :, None], segment[:, None, :]
    width = segment.shape[1]
    causal = torch.ones(width, width, dtype=torch.bool, device=segment.device).tril()
    same = (q == k) & (q >= 0)
    onto_prompt = (k == 0) & (q > 0)
    mask = (same | onto_prompt) & causal
    mask |= torch.eye(width, dtype=torch.bool, device=segment.device)
    return mask[:, None]


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
