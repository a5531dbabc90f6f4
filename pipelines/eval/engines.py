"""The engines an evaluation samples with, and the weights it loads into them: a
pool built from the run's engine settings (pipelines/runtime/specs.py), a model
folder's weights as buckets for a live pool, a peft adapter folder as an adapter
payload. Used by ``coevolve eval`` (harness.py), the lmms-eval model
(lmms_model.py) and recipes that evaluate between steps (R3V)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from actors.models import resolve_model


def start_pool(cfg, role: str, model: str, engines: int = 1, lora: bool = False):
    """A generator pool of ``engines`` engines serving ``model`` with the config's engine
    settings (on a CPU host each engine gets an equal share of the cores)."""

    import torch

    from actors.pool import GeneratorPool
    from pipelines.runtime.specs import engine_spec

    spec = engine_spec(cfg, model, lora=lora)
    if torch.cuda.is_available():
        return GeneratorPool(role, spec, engines, resources={"num_gpus": 1}, run=cfg.run.name)
    threads = max(1, (os.cpu_count() or 1) // engines)
    return GeneratorPool(role, spec, engines, resources={"num_cpus": 1}, run=cfg.run.name,
                         threads=threads)


def same_architecture(a: str | None, b: str) -> bool:
    """Whether the model folders ``a`` and ``b`` hold the same architecture and shapes
    (their config.json equal but for names and dtype), so weights of one load into the other."""

    if a is None:
        return False
    try:
        ca, cb = (json.loads((Path(resolve_model(x)) / "config.json").read_text()) for x in (a, b))
    except (OSError, ValueError):
        return False
    ignore = {"_name_or_path", "name_or_path", "torch_dtype", "dtype", "transformers_version"}
    return ({k: v for k, v in ca.items() if k not in ignore}
            == {k: v for k, v in cb.items() if k not in ignore})


def read_weights(folder: str | Path) -> list:
    """The safetensors weights of a model folder as buckets for ``GeneratorPool.update_weights``
    (the saved names, which the engines accept as they accept the trainer's)."""
    from safetensors import safe_open

    from actors.weights import make_buckets

    files = sorted(Path(resolve_model(str(folder))).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder}: no *.safetensors weights")

    def tensors():
        for file in files:
            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                    yield name, f.get_tensor(name)

    return make_buckets(tensors())


def read_adapter(folder: str | Path) -> dict:
    """A peft adapter folder as ``actors.weights.adapter_payload``."""
    from safetensors.torch import load_file

    from actors.weights import adapter_payload

    folder = Path(folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    return adapter_payload(config, sorted(tensors.items()))
