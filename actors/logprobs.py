"""Token log-probs and entropies from a model's logits, or from its final hidden
states and LM head in chunks (never the whole [B, T, V] logits at once), in fp32:
what the trainer scores samples with (docs/architecture.md, "Trainer numerics")."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from actors import fsdp


def upcast(x: Tensor) -> Tensor:
    """At least fp32 (bf16/fp16 -> fp32; fp64 stays fp64 for exact tests)."""
    return x if x.dtype == torch.float64 else x.float()


def token_logprobs(logits: Tensor, target_ids: Tensor, temperature: float = 1.0) -> Tensor:
    """Log-probability of each target token, in fp32.

    logits [B, T, V] (any float dtype), target_ids [B, T] (long) -> [B, T] in
    fp32 (fp64 if the logits are fp64).
    logits at position t must already be the prediction for target_ids[:, t]
    (the caller does the usual shift by one). Computed as
    `z[target] - logsumexp(z)` with z = logits / temperature in fp32, which
    equals log_softmax + gather without materialising a [B, T, V] result.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    z = upcast(logits)
    if temperature != 1.0:  # a copy of [B, T, V] in fp32: skip it when it changes nothing
        z = z / temperature
    picked = z.gather(-1, target_ids.long().unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(z, dim=-1)


class _TargetLogprob(torch.autograd.Function):
    """``token_logprobs`` (temperature 1) with a backward that keeps one fp32 copy.

    The same numbers as autograd through ``token_logprobs``: the forward is
    z[target] - logsumexp(z) with z = fp32 logits, the backward PyTorch's own
    formula g * (onehot(target) - exp(z - logsumexp z)), in the same order of
    operations. Autograd would save the fp32 upcast and allocate three more
    [N, V] fp32 temporaries in the backward (peak 16 bytes per bf16 logit,
    ``benchmarks/logprob_memory.py``); here only the input logits and
    logsumexp [N] are saved and the backward works in place on one fp32 copy
    (peak 8 bytes per bf16 logit).
    """

    @staticmethod
    def forward(ctx, logits: Tensor, target_ids: Tensor) -> Tensor:  # [N, V], [N] -> [N]
        z = upcast(logits)
        lse = torch.logsumexp(z, dim=-1)
        picked = z.gather(-1, target_ids.unsqueeze(-1)).squeeze(-1)
        ctx.save_for_backward(logits, target_ids, lse)
        return picked - lse

    @staticmethod
    def backward(ctx, grad: Tensor):
        logits, target_ids, lse = ctx.saved_tensors
        g = logits.to(lse.dtype, copy=True).sub_(lse.unsqueeze(-1)).exp_()  # softmax
        g.mul_(-grad.unsqueeze(-1))
        g.scatter_add_(-1, target_ids.unsqueeze(-1), grad.unsqueeze(-1))
        return g.to(logits.dtype), None


def _head_chunk(hidden: Tensor, weight: Tensor, target_ids: Tensor,
                with_entropy: bool) -> tuple[Tensor, Tensor]:
    """One chunk of `chunked_token_logprobs`: [N, H] x [V, H] -> ([N], [N] or [0])."""
    logits = F.linear(hidden, weight)  # the LM head (no bias), in the weights' dtype
    if not with_entropy:
        return _TargetLogprob.apply(logits, target_ids.long()), logits.new_zeros(0, dtype=torch.float32)
    return token_logprobs(logits, target_ids), entropy_from_logits(logits)


def chunked_token_logprobs(
    hidden: Tensor,
    weight: Tensor,
    target_ids: Tensor,
    chunk_tokens: int,
    with_entropy: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """Token log-probs (and entropies) from final hidden states and the LM head, by chunks.

    hidden [N, H] (the final norm's output at the scored positions), weight
    [V, H] (the LM head), target_ids [N] -> (log-probs [N], entropies [N] or
    None), fp32. Equals ``token_logprobs(hidden @ weight.T, target_ids)`` (and
    ``entropy_from_logits``) but never holds more than chunk_tokens x V logits:
    with gradients on, each chunk runs under ``torch.utils.checkpoint``, which
    keeps only the chunk's inputs and recomputes its logits in the backward
    (Liger's / verl's chunked linear cross-entropy, without a fused kernel).
    N = 0 still runs one empty chunk, so the head's weight always gets a
    gradient (FSDP reduces it on every rank).
    """
    from torch.utils.checkpoint import checkpoint

    if chunk_tokens <= 0:
        raise ValueError(f"chunk_tokens must be > 0, got {chunk_tokens}")
    grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    logps, entropies = [], []
    for start in range(0, max(1, hidden.shape[0]), chunk_tokens):
        args = (hidden[start:start + chunk_tokens], weight,
                target_ids[start:start + chunk_tokens], with_entropy)
        logp, entropy = checkpoint(_head_chunk, *args, use_reentrant=False) if grad else _head_chunk(*args)
        logps.append(logp)
        entropies.append(entropy)
    return torch.cat(logps), (torch.cat(entropies) if with_entropy else None)


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy of the token distribution, logits [B, T, V] -> [B, T] fp32 (nats).

    H = logsumexp(z) - sum_v softmax(z)_v z_v, the stable form verl uses.
    """
    z = upcast(logits)
    return torch.logsumexp(z, dim=-1) - (F.softmax(z, dim=-1) * z).sum(-1)


def chunked_model_logprobs(model, mb: dict, chunk_tokens: int, with_entropy: bool = False):
    """Log-probs [B, L-1] (and entropies) of a micro-batch at its loss-mask positions, 0 elsewhere.

    Never builds [tokens, vocabulary] logits: a forward pre-hook on the LM
    head takes its input (the final norm's output [B, L, H]), scores the
    loss-mask positions in chunks with the head's weight
    (``chunked_token_logprobs``: each chunk recomputed in the backward), and
    hands the head an empty slice, so transformers computes no logits. The
    scoring runs inside the model's forward, where FSDP has the root unit
    (embeddings, final norm, head) gathered, in the head's compute dtype like
    the full-logits path.
    """
    mask = mb["loss_mask"]
    where = mask.nonzero(as_tuple=True)
    out = {}

    def score(head, args):
        # [M, H]: the hidden state at t-1 predicts the token at t (packed: where it sits)
        hidden = args[0][:, :-1][where] if predicting is None else args[0][predicting]
        logp, entropy = chunked_token_logprobs(hidden, head.weight, mb["targets"][where],
                                               chunk_tokens, with_entropy)
        out["logp"] = mask.new_zeros(mask.shape).index_put(where, logp)
        if entropy is not None:
            out["entropy"] = mask.new_zeros(mask.shape).index_put(where, entropy)
        return (args[0][:, :0],)

    packed = mb.get("packed")
    if packed is None:
        inputs, predicting = mb["inputs"], None
    else:  # the samples of one prompt in one row (actors/packing.py)
        from actors.packing import packed_positions, prompt_layout, use_shared_prompt_attention

        core = fsdp.hf_core(model)
        use_shared_prompt_attention(core)
        # the rows compacted into one sequence of their real tokens: no padding computed
        layout = prompt_layout(packed["segment"])
        tokens = layout["tokens"]
        positions = packed_positions(core.model, packed, packed.get("image_grid_thw"))
        inputs = {"input_ids": packed["input_ids"].flatten()[tokens][None],
                  "position_ids": positions.flatten(1)[:, tokens][:, None],
                  "mm_token_type_ids": packed["mm_token_type_ids"].flatten()[tokens][None],
                  "prompt_layout": layout}
        inputs.update({k: packed[k] for k in ("pixel_values", "image_grid_thw") if k in packed})
        compact = torch.full((packed["segment"].numel(),), -1, dtype=torch.long,
                             device=tokens.device)
        compact[tokens] = torch.arange(len(tokens), device=tokens.device)
        width = packed["segment"].shape[1]
        at = compact[packed["group"][where[0]] * width + packed["pos"][where]]
        predicting = (torch.zeros_like(at), at)
    handle = fsdp.hf_core(model).lm_head.register_forward_pre_hook(score)
    try:
        model(**inputs, use_cache=False)
    finally:
        handle.remove()
    if packed is not None and layout["calls"].n == 0:  # never silently causal over the row
        raise RuntimeError("the packed forward did not reach shared_prompt_attention; "
                           "set trainer.share_prompts: false")
    return out["logp"], out.get("entropy")
