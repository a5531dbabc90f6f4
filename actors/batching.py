"""Training batches: columnar rollouts, rank shards, token-budget micro-batches.

A ``TrainBatch`` is what the driver hands the trainer group: one row per
sample (prompt + completion token ids), with the prompt's images stored once
per prompt, not once per sample (a GRPO group of n samples shares one image
set). Advantages are per sequence [S] or per completion token (a list of [T_i]
arrays); old and reference log-probs are per completion token.

``model_inputs`` turns a micro-batch into the tensors a Qwen-VL forward needs:
right-padded ids, the attention mask, ``mm_token_type_ids`` (without it
transformers 5 silently falls back to 1-D positions instead of multimodal
RoPE), pixel values and image grid sizes from the model's own image
processor, and the loss mask / aligned per-token inputs.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field, replace

import numpy as np
import torch


@dataclass
class TrainBatch:
    input_ids: list[np.ndarray]  # [S] int arrays: prompt + completion
    prompt_lens: np.ndarray  # [S] int
    prompt_index: np.ndarray  # [S] int, row of `images`
    images: list[list[bytes]] = field(default_factory=list)  # [P] encoded images per prompt
    advantages: np.ndarray | list[np.ndarray] | None = None  # [S] or [S][T_i]
    old_logprobs: list[np.ndarray] | None = None  # [S][T_i]
    ref_logprobs: list[np.ndarray] | None = None  # [S][T_i]
    # the sampling engine's log-probs of the completion tokens (the behaviour policy as the
    # engine computed it): the engine-trainer mismatch and truncated importance sampling
    engine_logprobs: list[np.ndarray] | None = None  # [S][T_i]
    # per-sequence weight of its summed token loss (loss_agg micro-token-mean), set on the
    # global batch before it is split (objectives.micro_token_weights)
    loss_weights: np.ndarray | None = None  # [S]

    def __len__(self) -> int:
        return len(self.input_ids)

    def completion_tokens(self) -> int:
        return int(sum(len(ids) - p for ids, p in zip(self.input_ids, self.prompt_lens)))

    def select(self, rows: list[int] | np.ndarray) -> "TrainBatch":
        """The sub-batch of these sample rows, with only the prompts (images) they use."""
        rows = [int(r) for r in rows]
        used = sorted({int(self.prompt_index[r]) for r in rows})
        remap = {p: i for i, p in enumerate(used)}

        def pick(column):
            if column is None:
                return None
            if isinstance(column, np.ndarray):
                return column[rows]
            return [column[r] for r in rows]

        return TrainBatch(
            input_ids=[self.input_ids[r] for r in rows],
            prompt_lens=self.prompt_lens[rows],
            prompt_index=np.array([remap[int(self.prompt_index[r])] for r in rows], dtype=np.int64),
            images=[self.images[p] for p in used] if self.images else [],
            advantages=pick(self.advantages),
            old_logprobs=pick(self.old_logprobs),
            ref_logprobs=pick(self.ref_logprobs),
            engine_logprobs=pick(self.engine_logprobs),
            loss_weights=pick(self.loss_weights),
        )

    def with_column(self, **columns) -> "TrainBatch":
        return replace(self, **columns)


def split_for_ranks(batch: TrainBatch, world_size: int) -> list[TrainBatch]:
    """Contiguous, near-equal shards by completion tokens (keeps GRPO groups together)."""
    if len(batch) < world_size:
        raise ValueError(f"a batch of {len(batch)} samples cannot feed {world_size} trainer ranks")
    cost = np.array([len(ids) for ids in batch.input_ids], dtype=np.float64)
    bounds = np.searchsorted(np.cumsum(cost), np.arange(1, world_size) * cost.sum() / world_size)
    bounds = np.clip(bounds, 1, len(batch) - 1)
    # Every rank gets at least one sample.
    for i in range(len(bounds)):
        low = (bounds[i - 1] + 1) if i else 1
        bounds[i] = min(max(bounds[i], low), len(batch) - (world_size - 1 - i))
    edges = [0, *bounds.tolist(), len(batch)]
    return [batch.select(range(edges[r], edges[r + 1])) for r in range(world_size)]


def micro_batches(batch: TrainBatch, token_budget: int) -> list[list[int]]:
    """Rows grouped in order so that rows x longest row <= token_budget (>= 1 row each)."""
    groups: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for row, ids in enumerate(batch.input_ids):
        longest_if = max(longest, len(ids))
        if current and longest_if * (len(current) + 1) > token_budget:
            groups.append(current)
            current, longest_if = [], len(ids)
        current.append(row)
        longest = longest_if
    if current:
        groups.append(current)
    return groups


class InputBuilder:
    """Builds model inputs with the model's own image processor (cached per prompt)."""

    def __init__(self, processor, image_token_id: int, video_token_id: int, pad_id: int):
        self.processor = processor
        self.image_token_id = image_token_id
        self.video_token_id = video_token_id
        self.pad_id = pad_id
        self._pixels: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}

    @classmethod
    def for_model(cls, path: str, max_pixels: int = 0) -> "InputBuilder":
        """The model folder's processor; ``max_pixels`` (if set) overrides its image size
        limit, as the engines' ``mm_processor_kwargs`` do, so both count the same tokens."""
        from transformers import AutoConfig, AutoProcessor

        processor = AutoProcessor.from_pretrained(path, **({"max_pixels": max_pixels}
                                                           if max_pixels else {}))
        config = AutoConfig.from_pretrained(path)
        pad = processor.tokenizer.pad_token_id
        return cls(processor, config.image_token_id, config.video_token_id, 0 if pad is None else pad)

    def clear(self) -> None:
        self._pixels.clear()

    def build(self, batch: TrainBatch, rows: list[int], batch_key: int = 0,
              ensure_image: bool = False, share: bool = False) -> dict:
        """Tensors for rows of batch. Log-prob-aligned tensors are [B, L-1].

        ``ensure_image``: when none of the rows has an image, append one extra
        row holding only a tiny dummy image (zero loss weight), so that the
        vision tower runs inside this forward exactly where it runs on ranks
        whose micro-batch has images (FSDP's collectives must match).
        ``share``: also the packed rows of the samples that share a prompt
        (``packed``, actors/packing.py), when some do.
        """
        has_image = bool(batch.images) and any(batch.images[int(batch.prompt_index[r])] for r in rows)
        dummy = ensure_image and not has_image
        if dummy:
            batch, rows = self._with_dummy_row(batch, rows)
        columns = self._token_columns(batch, rows)
        ids = columns.pop("input_ids")
        row_pixels: list[tuple | None] = [None] * len(rows)
        for i, r in enumerate(rows):
            images = batch.images[int(batch.prompt_index[r])] if batch.images else None
            if images:
                # the dummy row's prompt index is one of the sub-batch's, which may name
                # another prompt of the whole batch: its pixels have a key of their own
                key = ("dummy",) if dummy and i == len(rows) - 1 else batch_key
                row_pixels[i] = self._prompt_pixels(key, int(batch.prompt_index[r]), images)
        mm_types = (ids == self.image_token_id).long() + 2 * (ids == self.video_token_id).long()
        inputs = {"input_ids": ids, "attention_mask": columns.pop("attention_mask"),
                  "mm_token_type_ids": mm_types}
        _add_pixels(inputs, [x for x in row_pixels if x is not None])
        packed = self._packed(batch, rows, dummy, row_pixels) if share else None
        return {"packed": packed, "inputs": inputs, "targets": ids[:, 1:], **columns}

    def _token_columns(self, batch: TrainBatch, rows: list[int]) -> dict:
        """The rows' ids and attention, and the log-prob-aligned [B, L-1] columns (loss
        mask, behaviour / reference / engine log-probs, advantages; None where the batch
        has no such column)."""
        lengths = [len(batch.input_ids[r]) for r in rows]
        width = max(lengths)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        attention = torch.zeros((len(rows), width), dtype=torch.long)
        loss_mask = torch.zeros((len(rows), width - 1), dtype=torch.float32)
        per_token_adv = isinstance(batch.advantages, list)
        aligned = {name: torch.zeros_like(loss_mask) if getattr(batch, name) is not None else None
                   for name in ("old_logprobs", "ref_logprobs", "engine_logprobs")}
        adv = None if batch.advantages is None else torch.zeros_like(loss_mask) \
            if per_token_adv else torch.zeros(len(rows), dtype=torch.float32)
        for i, r in enumerate(rows):
            seq = torch.tensor(np.asarray(batch.input_ids[r]), dtype=torch.long)  # copies read-only refs
            n, p = len(seq), int(batch.prompt_lens[r])
            ids[i, :n] = seq
            attention[i, :n] = 1
            loss_mask[i, p - 1:n - 1] = 1.0  # logits at t-1 predict the token at t
            for name, column in aligned.items():
                if column is not None:
                    column[i, p - 1:n - 1] = torch.tensor(getattr(batch, name)[r],
                                                          dtype=torch.float32)
            if adv is not None:
                if per_token_adv:
                    adv[i, p - 1:n - 1] = torch.tensor(batch.advantages[r], dtype=torch.float32)
                else:
                    adv[i] = float(batch.advantages[r])
        weights = None if batch.loss_weights is None else torch.tensor(
            [float(batch.loss_weights[r]) for r in rows], dtype=torch.float32)
        return {"input_ids": ids, "attention_mask": attention, "loss_mask": loss_mask,
                **aligned, "advantages": adv, "loss_weights": weights}

    def _packed(self, batch: TrainBatch, rows: list[int], dummy: bool,
                row_pixels: list) -> dict | None:
        """The rows packed so that samples sharing a prompt run it once (actors/packing.py),
        each group's images once, in group order; None when no two rows share one."""
        from actors.packing import pack_groups

        keys = [("dummy",) if dummy and i == len(rows) - 1 else
                (int(batch.prompt_index[r]),
                 np.asarray(batch.input_ids[r][:int(batch.prompt_lens[r])]).tobytes())
                for i, r in enumerate(rows)]
        packed = pack_groups([batch.input_ids[r] for r in rows],
                             [int(batch.prompt_lens[r]) for r in rows], keys, self.pad_id,
                             self.image_token_id, self.video_token_id)
        if packed is not None:
            first = {}
            for i, g in enumerate(packed["group"].tolist()):
                first.setdefault(g, i)
            _add_pixels(packed, [row_pixels[first[g]] for g in sorted(first)
                                 if row_pixels[first[g]] is not None])
        return packed

    def _prompt_pixels(self, batch_key, prompt: int, images: list[bytes]):
        key = (batch_key, prompt)
        if key not in self._pixels:
            from PIL import Image

            pil = [Image.open(io.BytesIO(b)).convert("RGB") for b in images]
            out = self.processor.image_processor(images=pil, return_tensors="pt")
            self._pixels[key] = (out["pixel_values"], out["image_grid_thw"])
        return self._pixels[key]

    def _with_dummy_row(self, batch: TrainBatch, rows: list[int]) -> tuple[TrainBatch, list[int]]:
        """batch + one row that is just a tiny image (no completion tokens, so no loss)."""
        from PIL import Image

        image = Image.new("RGB", (8, 8))
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        grid = self.processor.image_processor(images=[image], return_tensors="pt")["image_grid_thw"]
        n_tokens = int(grid.prod()) // self.processor.image_processor.merge_size ** 2
        tok = self.processor.tokenizer
        ids = np.array([tok.convert_tokens_to_ids("<|vision_start|>")] + [self.image_token_id] * n_tokens
                       + [tok.convert_tokens_to_ids("<|vision_end|>")], dtype=np.int64)
        sub = batch.select(rows)

        def extend(column, value):
            if column is None:
                return None
            if isinstance(column, np.ndarray):
                return np.concatenate([column, np.array([value], dtype=column.dtype)])
            return [*column, value]

        per_token = isinstance(sub.advantages, list)
        dummy = TrainBatch(
            input_ids=[*sub.input_ids, ids],
            prompt_lens=np.concatenate([sub.prompt_lens, [len(ids)]]),
            prompt_index=np.concatenate([sub.prompt_index, [len(sub.images)]]),
            images=[*(sub.images or [[] for _ in rows]), [buf.getvalue()]],
            advantages=extend(sub.advantages, np.zeros(0, np.float32) if per_token else 0.0),
            old_logprobs=extend(sub.old_logprobs, np.zeros(0, np.float32)),
            ref_logprobs=extend(sub.ref_logprobs, np.zeros(0, np.float32)),
            engine_logprobs=extend(sub.engine_logprobs, np.zeros(0, np.float32)),
            loss_weights=extend(sub.loss_weights, 0.0),
        )
        return dummy, list(range(len(rows) + 1))


def _add_pixels(inputs: dict, pixels: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """The rows' (pixel values, grid sizes), in row order, as the model's inputs."""
    if pixels:
        inputs["pixel_values"] = torch.cat([pv for pv, _ in pixels])
        inputs["image_grid_thw"] = torch.cat([grid for _, grid in pixels])
