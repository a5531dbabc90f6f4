"""The built-in warm start: a short SFT of the base model before the first iteration.

A tiny random model writes nothing a self-play reward can tell apart, so every
reward group is constant and nothing learns (docs/warm_start.md). The seeds
start from instruction-tuned VLMs that already write their formats; the warm
start gives a tiny model that starting point. ``model.warm_start.data`` names the
examples (``recipe``: the recipe's ``warm_start_examples(count, seed, cfg)``;
or ``package.module:function`` with the same signature), and the driver trains
them as one SFT phase on the run's trainer group (the SFT machinery of
pipelines/runtime/sft.py: checkpoints, resume, hf/ export) into
``<run>/warm_start/hf``, which every role then starts from.

The result is cached under ``$COEVOLVE_CACHE/warm/<key>`` like the tiny models:
the key hashes the base model reference, the dtype, the trainer layout, the SFT
settings, the seed and the examples themselves (token-for-token: messages,
targets, image bytes), so a changed generator or setting trains anew and an
unchanged one is copied in seconds.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from actors.tiny import BUILDER_VERSION, cached_folder
from actors.tiny import cache_root as tiny_cache_root
from pipelines.config import ConfigError
from pipelines.contract import recipe_spec
from pipelines.registry import load_reference
from pipelines.runtime.rundir import DONE, PhaseDir, RunDir
from pipelines.runtime.sft import SFTExample, SFTPhase

logger = logging.getLogger(__name__)

WARM_VERSION = 1  # bump when the same key would train different weights
FOLDER = "warm_start"  # in the run directory


def data_function(cfg, recipe) -> Callable[[int, int, object], list[SFTExample]]:
    """The function that makes the warm-start examples (``model.warm_start.data``)."""
    ref = cfg.model.warm_start.data
    if ref == "recipe":
        fn = recipe_spec(recipe).warm_start_examples
        if fn is None:
            raise ConfigError(f"model.warm_start.data: the recipe {cfg.run.recipe!r} has no "
                              "built-in warm-start examples; name a function "
                              "(package.module:function) or set it to ''")
        return fn

    fn = load_reference(ref, "model.warm_start.data", "'recipe' or mypackage.warm:examples")
    if not callable(fn):
        raise ConfigError(f"model.warm_start.data: {ref!r} is not a function")
    return fn


def cache_root() -> Path:
    return tiny_cache_root().parent / "warm"


def cache_key(cfg, examples: list[SFTExample]) -> str:
    """What decides the warm weights: base model, dtype, pixels, layout, SFT settings,
    seed and every example's messages, target and image bytes."""

    digest = hashlib.sha256()
    settings = {
        "v": WARM_VERSION, "model": cfg.model.path, "dtype": cfg.model.dtype,
        "max_pixels": cfg.model.max_pixels, "seed": cfg.run.seed,
        "warm": dataclasses.asdict(cfg.model.warm_start),
        "ranks": cfg.placement.trainer_ranks, "grad_clip": cfg.trainer.grad_clip,
        "micro_batch_tokens": cfg.trainer.micro_batch_tokens,
        "tiny": BUILDER_VERSION if cfg.model.path.startswith("tiny://") else None,
    }
    digest.update(json.dumps(settings, sort_keys=True).encode())
    for ex in examples:
        digest.update(json.dumps([ex.messages, ex.target], sort_keys=True).encode())
        for image in ex.images:
            digest.update(hashlib.sha256(image).digest())
    return digest.hexdigest()[:16]


def warm_cfg(cfg):
    """The run's config for the warm-start phase: its own learning rate (5% linear warm-up,
    then cosine decay to 0) and checkpoint cadence, full weights (a LoRA run puts its
    adapters on the warm model)."""
    w, t = cfg.model.warm_start, cfg.trainer
    trainer = dataclasses.replace(t, lr=w.lr, schedule="cosine", warmup_ratio=0.05,
                                  lora=dataclasses.replace(t.lora, enabled=False))
    run = dataclasses.replace(cfg.run, save_every=w.save_every)
    return dataclasses.replace(cfg, trainer=trainer, run=run)


def warm_start(cfg, recipe, *, run_dir: Path, engines, placement) -> Path:
    """Train (or copy from the cache) the warm model into ``run_dir/warm_start/hf``;
    resumable from its checkpoints like any phase. Returns the hf/ folder."""
    from pipelines.runtime.phase import PhaseRunner

    w = cfg.model.warm_start
    folder = RunDir(run_dir).warm_start
    examples = data_function(cfg, recipe)(w.examples, cfg.run.seed, cfg)
    if not examples:
        raise ValueError(f"model.warm_start.data {w.data!r} made no examples")
    key = cache_key(cfg, examples)
    cached = cache_root() / key
    hf = folder.hf()
    if PhaseDir(cached).has(DONE):
        logger.info("warm start: the cached model %s (%d examples, %d steps)", cached,
                    len(examples), w.steps)
        _copy(PhaseDir(cached).hf(), hf)
    else:
        logger.info("warm start: %d SFT steps on %d examples (cached afterwards as %s)",
                    w.steps, len(examples), cached)
        phase = SFTPhase(FOLDER, "base", examples, w.batch_size)
        phase.steps = w.steps  # batch_examples cycles epochs as far as the steps go
        with PhaseRunner(warm_cfg(cfg), phase, folder.path, run_dir=run_dir,
                         seed_path=(cfg.run.seed, 0, 0), engines=engines, placement=placement,
                         weights=lambda role: cfg.model.path) as runner:
            runner.run()
        cached_folder(cached, lambda tmp: shutil.copytree(hf, PhaseDir(tmp).hf()))
    folder.mark(DONE, key + "\n")
    return hf


def _copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".hf-", dir=dst.parent))
    try:
        shutil.copytree(src, tmp, dirs_exist_ok=True)
        shutil.rmtree(dst, ignore_errors=True)
        tmp.rename(dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


__all__ = ["FOLDER", "cache_key", "cache_root", "data_function", "warm_start"]
