"""The shipped GPU presets against the originals' values, kept here as a table (read off
the originals' training scripts and the issue that checked them line by line), not
derived from the code: a preset that drifts from its original fails here."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipelines.config import load_config

ROOT = Path(__file__).resolve().parents[1]

# preset -> {setting: the original's value}
ORIGINALS = {
    "configs/evolmm/qwen2.5-vl-7b-2gpu.yaml": {  # mbzuai-oryx/EvoLMM src/train.py
        "model.path": "Qwen/Qwen2.5-VL-7B-Instruct", "run.seed": 42, "evolmm.steps": 16180,
        "evolmm.solver_samples": 5, "evolmm.proposer_update_freq": 5, "trainer.lr": 1e-6,
        "trainer.lora.rank": 16, "trainer.lora.alpha": 32, "trainer.lora.dropout": 0.05,
        "algorithm.kl_coef": 1e-3},
    "configs/ireasoner/qwen2.5-vl-7b-2gpu.yaml": {  # meghanaasunil/iReasoner
        "model.path": "Qwen/Qwen2.5-VL-7B-Instruct", "ireasoner.steps": 2500,
        "ireasoner.max_tokens": 256, "ireasoner.solver_samples": 5, "trainer.lr": 1e-6,
        "trainer.lora.rank": 16, "trainer.lora.alpha": 32, "algorithm.kl_coef": 1e-3},
}


def setting(cfg, dotted: str):
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


@pytest.mark.parametrize("preset", sorted(ORIGINALS))
def test_a_preset_keeps_its_originals_values(preset):
    cfg = load_config(ROOT / preset)
    got = {key: setting(cfg, key) for key in ORIGINALS[preset]}
    assert got == ORIGINALS[preset]
