"""Trainer checkpoints: reshardable, atomic, with a completion marker.

Layout of ``step_000020/`` (shared storage on a cluster)::

    dcp/                  torch.distributed.checkpoint of {"model", "optim"} (sharded)
    extra.json            step, LR scheduler, counters (rank 0)
    rng/rank_<r>.pt       torch / numpy / python RNG states of each rank
    COMPLETE              written last: a folder without it does not count

The folder is written under a temporary name and renamed by rank 0 after a
barrier, so a crash leaves either nothing or a complete checkpoint. DCP
stores sharded tensors with their global layout, so a checkpoint saved by
2 ranks loads into 1 rank and vice versa. On a different rank count, rank r
restores ``rank_<r>.pt`` when it exists and rank 0's states otherwise.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from actors.lora import language_targets

MARKER = "COMPLETE"


def is_complete(directory: str | Path) -> bool:
    return (Path(directory) / MARKER).is_file()


def save_checkpoint(directory: str, model, optimizer, rank: int, extra: dict) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    final = Path(directory)
    tmp = final.with_name(final.name + ".tmp")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "rng").mkdir(parents=True)
    _barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp / "dcp"))
    torch.save(_rng_state(), tmp / "rng" / f"rank_{rank}.pt")
    if rank == 0:
        _write_json(tmp / "extra.json", extra)
    _barrier()
    if rank == 0:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        (final / MARKER).write_text("ok\n")
        _fsync_dir(final.parent)
    _barrier()


def load_checkpoint(directory: str, model, optimizer, rank: int) -> dict:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    path = Path(directory)
    if not is_complete(path):
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no {MARKER} marker)")
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=str(path / "dcp"))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    rng = path / "rng" / f"rank_{rank}.pt"
    _set_rng_state(torch.load(rng if rng.exists() else path / "rng" / "rank_0.pt", weights_only=False))
    return json.loads((path / "extra.json").read_text())


def export_hf(directory: str, model, base_path: str, rank: int, lora=None, merged: bool = True,
              adapter: str | None = None, dtype: torch.dtype = torch.float32) -> None:
    """Write a folder that loads with plain transformers and vLLM (and peft for adapters).

    The weights are written in ``dtype``: the model's compute dtype (bfloat16 on GPUs,
    half the disk of the fp32 training copy, which the step checkpoints keep).
    Full fine-tuning: the full weights with the base's config and processor.
    LoRA: ``merged=True`` writes the base merged with ``adapter`` (default: the
    first) and the adapters under ``adapter/`` (peft's layout: an adapter named
    ``default`` at the top, others in subfolders of their names); ``merged=False``
    only the adapter folder.
    """
    from actors.fsdp import full_state_dict

    state = full_state_dict(model)  # collective: every rank takes part
    if rank == 0:
        final = Path(directory)
        tmp = final.with_name(final.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        _write_hf(tmp, state, base_path, lora, merged, adapter, dtype)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    _barrier()


def _write_hf(out: Path, state: dict, base_path: str, lora, merged: bool,
              adapter: str | None = None, dtype: torch.dtype = torch.float32) -> None:
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    config = AutoConfig.from_pretrained(base_path)
    # load_state_dict below casts the gathered fp32 weights into the model's dtype
    model = AutoModelForImageTextToText.from_config(config, dtype=dtype)
    if lora is not None:
        from peft import LoraConfig, get_peft_model


        config = LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                            target_modules=language_targets(model, lora.target_modules))
        model = get_peft_model(model, config, adapter_name=lora.adapters[0])
        for name in lora.adapters[1:]:
            model.add_adapter(name, config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or [m for m in missing if "lora_" not in m or lora is None]:
        raise RuntimeError(f"export_hf: state does not match the model: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}")
    processor = AutoProcessor.from_pretrained(base_path)
    if lora is not None:
        model.save_pretrained(out / "adapter" if merged else out)
        if not merged:
            processor.save_pretrained(out)
            return
        model = model.merge_and_unload(adapter_names=[adapter or lora.adapters[0]])
    model.save_pretrained(out)
    processor.save_pretrained(out)
    gen = Path(base_path) / "generation_config.json"
    if gen.is_file() and not (out / "generation_config.json").exists():
        shutil.copy(gen, out / "generation_config.json")


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, default=_jsonable, indent=1))
    os.replace(tmp, path)


def _jsonable(value):
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON-serialisable: {type(value).__name__}")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
