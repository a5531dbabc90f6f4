"""benchmarks/label_free.py: its task family, noisy warm start and table, without runs."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks import label_free as lf
from pipelines.recipes.evolmm.data import ImageFolder


def test_folders_carry_their_answers_and_the_warm_start_is_wrong_at_the_noise_rate(tmp_path):
    folder = ImageFolder(lf.write_folder(tmp_path / "train", 6, [0, 21]))
    assert folder.stats()["answered_images"] == 6
    rng = np.random.default_rng([0, 21])
    truth = {f"spot_{i:03d}.png": lf.draw(rng)[1] for i in range(6)}
    for i, path in enumerate(folder.paths):
        [(question, answer)] = folder.known(i)
        assert truth[path.name] == {question: answer} and answer in lf.COLOURS
    examples = lf.warm_examples(400, 0, None)
    wrong = [f"<answer>{painted(e.images[0])}</answer>" not in e.target for e in examples]
    assert np.mean(wrong) == pytest.approx(lf.NOISE, abs=0.06)


def painted(png: bytes) -> str:
    """The colour name of the one shape in ``png`` (its non-white pixels)."""
    import io

    from PIL import Image, ImageColor

    pixels = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).reshape(-1, 3)
    shape = pixels[(pixels != 255).any(axis=1)]
    colour = tuple(np.median(shape, axis=0).astype(int))
    return next(c for c in lf.COLOURS if ImageColor.getrgb(c) == colour)


def test_the_table_and_the_gains_by_hand():
    rows = [{"recipe": "evolmm", "seed": s, "arm": arm, "greedy_before": 0.9,
             "greedy_after": 0.85, "sampled_before": 0.5, "sampled_after": after,
             "majority_before": 0.75, "majority_after": 0.8, "pseudo_label_first": 0.5,
             "pseudo_label_last": 0.75}
            for s, arm, after in ((0, "soft", 0.9), (1, "soft", 0.8), (0, "shuffled", 0.4))]
    text = lf.table(rows)
    assert "evolmm     0 soft      0.900->0.850 0.500->0.900 0.750->0.800 0.500->0.750" in text
    assert "soft      held-out sampled-accuracy gain: mean +0.350, spread +0.300 .. +0.400 " \
           "over 2 seeds" in text
    assert "shuffled  held-out sampled-accuracy gain: mean -0.100" in text
