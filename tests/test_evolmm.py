"""EvoLMM: the reward formulas with hand-computed numbers, the image folder, the recipe."""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import pytest
from conftest import driver_cli, sigkill_after_step
from PIL import Image

from pipelines.recipes.evolmm.data import ImageFolder
from pipelines.recipes.evolmm.rewards import (
    FALLBACK_QUESTION,
    answer_entropy,
    discrete_rewards,
    final_answer,
    parse_question,
    proposer_reward,
    soft_rewards,
    words_before_answer,
)

ROOT = Path(__file__).resolve().parents[1]


def test_soft_reward_share_to_the_gamma_with_the_length_penalty():
    answers = ["<answer>3</answer>", "3", " 3 ", "4", "Five"]
    finals = ["3", "3", "3", "4", "five"]
    # shares 3/5, 3/5, 3/5, 1/5, 1/5; words 2, 6, 9, 12, 20 against T = 6, lambda = 0.1:
    # penalties clip((w - 6) / 6, 0, 1) = 0, 0, 0.5, 1, 1
    rewards = soft_rewards(finals, [2, 6, 9, 12, 20], gamma=0.7, length_lambda=0.1,
                           length_target=6)
    assert rewards == pytest.approx([0.6 ** 0.7, 0.6 ** 0.7, 0.6 ** 0.7 * 0.95,
                                     0.2 ** 0.7 * 0.9, 0.2 ** 0.7 * 0.9])
    assert rewards[0] == pytest.approx(0.699368, abs=1e-6)  # exp(0.7 ln 0.6)
    assert final_answer(answers[0]) == "3"
    # voting normalisation: case, commas, spaces, punctuation at the ends
    assert soft_rewards(["1,000.", " 1000", "Yes!", "yes"], [0] * 4, gamma=1.0) == \
        pytest.approx([0.5, 0.5, 0.5, 0.5])


def test_proposer_entropy_band_and_the_discrete_ablation():
    # two answers 3 vs 2: H = -(0.6 ln 0.6 + 0.4 ln 0.4) = 0.673012
    answers = ["a", "a", "a", "b", "b"]
    assert answer_entropy(answers) == pytest.approx(0.673012, abs=1e-6)
    assert proposer_reward(answers, target=0.9, sigma=0.35) == pytest.approx(
        0.810340, abs=1e-6)  # exp(-(0.673012 - 0.9)^2 / (2 * 0.35^2))
    assert proposer_reward(["x"] * 5) == pytest.approx(math.exp(-0.81 / 0.245), abs=1e-9)
    assert discrete_rewards(["b", "a", "a", "b", "c"]) == [1.0, 0.0, 0.0, 1.0, 0.0]  # tie: first


def test_parsing_model_output():
    assert parse_question("<question> How many\\nbars? </question><rationale>x</rationale>") == \
        ("How many\\nbars?", False)
    assert parse_question("How many\nbars are there?") == ("How many bars are there?", False)
    assert parse_question("  \n ") == (FALLBACK_QUESTION, True)
    assert parse_question(None) == (FALLBACK_QUESTION, True)
    assert final_answer("I think\nthe answer is 7\n\n") == "the answer is 7"
    assert final_answer("") == "unknown"
    assert words_before_answer("Step 1: two bars. <ANSWER>2</ANSWER>") == 4
    assert words_before_answer("no tags at all here") == 5


def test_image_folder_walks_as_the_original_and_skips_and_counts_bad_files(tmp_path):
    """Every first-level subfolder recursively; the top-level files only when there is no
    subfolder; hidden names skipped at every level; bad files skipped and counted; a
    deterministic order."""
    def png(path, colour):
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), colour).save(path)

    png(tmp_path / "a.png", "red")  # top level, beside subfolders: not read
    png(tmp_path / "sub1" / "b.JPG", "blue")  # extension case does not matter
    png(tmp_path / "sub1" / "c.webp", "green")
    png(tmp_path / "sub2" / "d.bmp", "white")
    png(tmp_path / "sub1" / "deep" / "e.png", "black")  # below the first level: read
    png(tmp_path / "sub1" / ".hidden.png", "black")
    png(tmp_path / "sub1" / ".cache" / "f.png", "black")
    png(tmp_path / ".thumbs" / "g.png", "black")
    (tmp_path / "sub1" / "empty.png").write_bytes(b"")
    (tmp_path / "sub2" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (tmp_path / "sub2" / "notes.txt").write_text("not an image")
    (tmp_path / "sub2" / "text.png").write_text("a text file named .png")
    folder = ImageFolder(tmp_path, seed=3)
    assert sorted(p.name for p in folder.paths) == ["b.JPG", "c.webp", "d.bmp", "e.png"]
    assert folder.stats()["skipped"] == 3 and folder.skipped == {"empty": 1, "corrupt": 2}
    assert [p.name for p in ImageFolder(tmp_path, seed=3).paths] == \
        [p.name for p in folder.paths]
    assert Image.open(__import__("io").BytesIO(folder.image(5))).mode == "RGB"
    only = ImageFolder(tmp_path, include_subfolders=["sub2"], seed=0)
    assert sorted(p.name for p in only.paths) == ["d.bmp"]
    flat = tmp_path / "flat"  # no subfolder: the top-level files
    png(flat / "x.png", "red")
    png(flat / ".y.png", "red")
    assert [p.name for p in ImageFolder(flat).paths] == ["x.png"]
    with pytest.raises(ValueError, match="include_subfolders"):
        ImageFolder(tmp_path, include_subfolders=["nope"])
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(ValueError, match="no usable image.*corrupt"):
        ImageFolder(bad)
    with pytest.raises(ValueError, match="not a folder"):
        ImageFolder(tmp_path / "missing")


def drawn_folder(root: Path) -> Path:
    """Eight drawn charts in two subfolders, plus files that must be skipped."""
    from pipelines.recipes.evolmm.recipe import draw_demo_images

    draw_demo_images(root / "charts_a", count=4, seed=1)
    draw_demo_images(root / "charts_b", count=4, seed=2)
    (root / "charts_a" / "zero.png").write_bytes(b"")
    (root / "charts_b" / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    (root / "readme.txt").write_text("not an image")
    return root


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["evolmm", "ireasoner"])
def test_tiny_run_on_a_folder_with_corrupt_files_resumes_after_sigkill_identically(
        ray_cluster, tmp_path, recipe):
    import json

    from safetensors.numpy import load_file

    from pipelines.runtime.metrics import read_metrics

    images = drawn_folder(tmp_path / "images")
    common = [str(ROOT / f"configs/{recipe}/tiny-cpu.yaml"), f"run.root={tmp_path}",
              f"{recipe}.data_dir={images}", "logging.progress=false"]
    if recipe == "ireasoner":  # the step reward from the first step on
        common.append("ireasoner.warmup=false")

    def cli(name: str):
        return driver_cli(*common, f"run.name={name}")

    whole = cli("whole")
    assert whole.wait(timeout=600) == 0, whole.stderr.read()[-3000:]
    killed = cli("killed")
    sigkill_after_step(killed, tmp_path / f"killed/iter_0001/{recipe}/metrics.jsonl",
                       "solver/reward/mean")
    resumed = cli("killed")
    assert resumed.wait(timeout=600) == 0, resumed.stderr.read()[-3000:]

    def curve(run: str) -> list[dict]:
        return [{k: v for k, v in m.items() if not k.startswith(("timing/", "perf/", "phase/"))}
                for m in read_metrics(tmp_path / run / f"iter_0001/{recipe}/metrics.jsonl")
                if "solver/reward/mean" in m]

    lines = curve("whole")
    assert [m["step"] for m in lines] == [1, 2, 3, 4]
    # after the preset's warm start the Solver answers in tags and its rewards vary. A
    # step of the faithful schedule is one image's 5 answers: when they all agree, or all
    # differ, their rewards are equal (measured: one such step in 4 in each recipe)
    print("answer-tag share, reward std per step:",
          [(m["solver/reward/answer_tag_share"], round(m["solver/reward/std"], 3))
           for m in lines])
    assert all(m["solver/reward/answer_tag_share"] > 0.5 for m in lines)
    assert sum(m["solver/reward/std"] > 0 for m in lines) >= 3
    assert lines[0]["data/images"] == 8 and lines[0]["data/skipped"] == 2
    # the Proposer trains every second step (preset proposer_update_freq 2), the Solver
    # five times per step (one update per sample), each with its own adaptive beta
    assert [m.get("proposer/rollout/version") for m in lines] == [None, 1, None, 2]
    assert all(m["solver/train/updates"] == 5 for m in lines)
    assert lines[1]["solver/train/kl_coef"] != lines[1].get("proposer/train/kl_coef")
    assert curve("killed") == lines
    for folder in ("hf", "hf-proposer"):
        a = load_file(tmp_path / f"whole/iter_0001/{recipe}/{folder}/model.safetensors")
        b = load_file(tmp_path / f"killed/iter_0001/{recipe}/{folder}/model.safetensors")
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    state = json.loads((tmp_path / "killed/state.json").read_text())
    assert state["finished"]


def test_the_warm_start_examples_parse_as_the_recipes_read_them():
    """The built-in warm start (tiny presets): five examples per drawn figure, whose
    targets the recipes' own parsers read back as the figure's question and answers
    (EvoLMM's answer tag, iReasoner's two numbered steps); deterministic in the seed."""
    from pipelines.config import load_config
    from pipelines.recipes.evolmm.recipe import EvoLMMRecipe
    from pipelines.recipes.evolmm.warm_start import sft_examples
    from pipelines.recipes.ireasoner.recipe import IReasonerRecipe
    from pipelines.recipes.ireasoner.steps import extract_steps

    examples = sft_examples(10, seed=0)
    assert len(examples) == 10 and all(len(e.images) == 1 for e in examples)
    assert [e.target for e in sft_examples(10, seed=0)] == [e.target for e in examples]
    assert [e.target for e in sft_examples(10, seed=1)] != [e.target for e in examples]
    for first in (0, 5):  # a figure: Proposer, then (EvoLMM, iReasoner) x (easy, hard)
        proposer, evo_easy, ire_easy, evo_hard, ire_hard = examples[first:first + 5]
        question, fallback = parse_question(proposer.target)
        assert not fallback and question in evo_easy.messages[0]["content"][1]["text"]
        for evo, ire in ((evo_easy, ire_easy), (evo_hard, ire_hard)):
            answer = final_answer(evo.target)
            assert answer and final_answer(ire.target) == answer
            assert len(extract_steps(ire.target)) == 2
    with Image.open(io.BytesIO(examples[0].images[0])) as im:
        assert max(im.size) <= 224
    # both recipes ask for the same examples: one cached warm start serves both
    root = Path(__file__).resolve().parents[1]
    evo = EvoLMMRecipe(load_config(root / "configs/evolmm/tiny-cpu.yaml"))
    ire = IReasonerRecipe(load_config(root / "configs/ireasoner/tiny-cpu.yaml"))
    assert [e.target for e in evo.warm_start_examples(6, 2, None)] == \
        [e.target for e in ire.warm_start_examples(6, 2, None)]
