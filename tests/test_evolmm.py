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
    # after the preset's warm start the Solver answers in tags and its rewards vary in
    # every step (four images' questions per step, the preset's batched schedule)
    print("answer-tag share, reward std per step:",
          [(m["solver/reward/answer_tag_share"], round(m["solver/reward/std"], 3))
           for m in lines])
    assert all(m["solver/reward/answer_tag_share"] > 0.5 for m in lines)
    assert all(m["solver/reward/std"] > 0 for m in lines)
    assert lines[0]["data/images"] == 8 and lines[0]["data/skipped"] == 2
    # the Proposer trains every second step (preset proposer_update_freq 2), the Solver
    # once per step on its 20 answers, each with its own adaptive beta
    assert [m.get("proposer/rollout/version") for m in lines] == [None, 1, None, 2]
    assert all(m["solver/train/updates"] == 1 for m in lines)
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


# -- hidden answers: pseudo-label accuracy, the control, the held-out set ------------------


def test_pseudo_label_accuracy_by_hand():
    from pipelines.recipes.evolmm.known import hidden_answer, pseudo_label_metrics
    from pipelines.recipes.evolmm.rewards import majority_answer as majority

    groups = [["3", "3", "4"], ["red", "Blue", "blue"], ["A", "B"], ["7", "", ""]]
    # majorities 3, blue, a (tie: the first met), "" (an unparsable majority is never right)
    assert [majority(g) for g in groups] == ["3", "blue", "a", ""]
    m = pseudo_label_metrics(groups, ["3", "red", None, "7"])
    # known: groups 0, 1, 3; majority right in group 0 only: 1/3
    # samples right: 2 of 3 ("3"), 1 of 3 ("red"), 1 of 3 ("7"): 4/9
    assert m == pytest.approx({"pseudo_label_accuracy": 1 / 3, "sample_accuracy": 4 / 9,
                               "known_questions": 3})
    assert pseudo_label_metrics(groups, [None] * 4) == {}
    known = [("What colour are the circles?", "red"), ("How many circles are there?", "3")]
    assert hidden_answer("  what colour are the  CIRCLES? ", known) == "red"
    assert hidden_answer("What colour are the squares?", known) is None


def test_the_shuffled_control_moves_rewards_between_answers_not_their_sum():
    from pipelines.recipes.evolmm.recipe import shuffled

    rewards = [[0.1, 0.2, 0.3], [0.4, 0.5], [0.6]]
    out = shuffled(rewards, np.random.default_rng(0))
    assert [len(g) for g in out] == [3, 2, 1]
    assert sorted(r for g in out for r in g) == [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]
    assert out != rewards  # this seed moves them (a fixed draw)
    assert out == shuffled(rewards, np.random.default_rng(0))


def test_hidden_answers_are_read_and_bad_lines_skipped_and_counted(tmp_path):
    import json

    for name in ("a.png", "b.png"):
        Image.new("RGB", (8, 8), "red").save(tmp_path / name)
    lines = [{"image": "a.png", "question": "Q1?", "answer": "1"},
             {"image": "a.png", "question": " Q2? ", "answer": " two "},
             {"image": "c.png", "question": "Q?", "answer": "x"},  # no such image
             {"image": "../a.png", "question": "Q?", "answer": "x"},  # not under the folder
             {"image": "b.png", "question": "Q?", "answer": 3},  # not a string
             {"image": "b.png", "question": "Q?"},  # no answer
             ["b.png", "Q?", "x"]]  # not an object
    text = "\n".join(json.dumps(x) for x in lines) + "\nnot json\n\n"
    (tmp_path / "answers.jsonl").write_text(text)
    folder = ImageFolder(tmp_path)
    by_name = {p.name: folder.known(i) for i, p in enumerate(folder.paths)}
    assert by_name == {"a.png": [("Q1?", "1"), ("Q2?", "two")], "b.png": []}
    assert folder.stats()["answers_skipped"] == 6 and folder.stats()["answered_images"] == 1


def test_demo_figures_carry_their_answers_and_the_heldout_set_is_unseen(tmp_path):
    from pipelines.recipes.evolmm import warm_start as ws
    from pipelines.recipes.evolmm.known import heldout_figures, heldout_items
    from pipelines.recipes.evolmm.recipe import draw_demo_images

    draw_demo_images(tmp_path, count=3, seed=7)
    folder = ImageFolder(tmp_path)
    drawn = ws.demo_figures(3, 7)
    for i, path in enumerate(folder.paths):
        p = drawn[int(path.stem.split("_")[1])].proposal
        assert folder.known(i) == [(p.easy_question, p.easy_answer),
                                   (p.hard_question, p.hard_answer)]
    figures = heldout_figures(40, seed=0, warm_examples=1600, demo_images=64)
    seen = {f.svg for f in ws.drawn_figures(320, [0, 3]) + ws.demo_figures(64, 0)}
    assert not {f.svg for f in figures} & seen and len({f.svg for f in figures}) == 40
    assert [f.proposal.content_type for f in figures[:4]] == ["data_chart", "table"] * 2
    items = heldout_items(2, seed=0, warm_examples=1600, demo_images=64)
    p = figures[0].proposal
    assert [(q, a) for _, q, a in items[:2]] == [(p.easy_question, p.easy_answer),
                                                 (p.hard_question, p.hard_answer)]
    assert items[0][0] == items[1][0] != items[2][0]  # both questions of one image


def test_status_and_curves_show_pseudo_labels_and_heldout_accuracy(tmp_path, capsys):
    """A multi-policy phase's rows (``solver/reward/...``) are counted and shown; the
    held-out line reads before -> newest; the curves figure and `coevolve plot` draw it."""
    import json

    from pipelines.cli import main
    from pipelines.recipes.evolmm.figure import series
    from pipelines.runtime.status import render_status

    run = tmp_path / "run"
    phase = run / "iter_0001" / "evolmm"
    phase.mkdir(parents=True)
    (run / "state.json").write_text(json.dumps({"finished": True, "updated": 0, "roles": {}}))
    rows = [{"step": 1, "solver/reward/mean": 0.5, "solver/reward/pseudo_label_accuracy": 0.25,
             "solver/reward/sample_accuracy": 0.2, "heldout/greedy_before": 0.5,
             "heldout/sampled_before": 0.4, "heldout/majority_before": 0.6,
             "timing/step": 2.0},
            {"step": 2, "solver/reward/mean": 0.75, "solver/reward/pseudo_label_accuracy": 0.5,
             "solver/reward/sample_accuracy": 0.375, "heldout/greedy": 0.625,
             "heldout/sampled": 0.55, "heldout/majority": 0.7, "timing/step": 2.0},
            {"step": 2, "timing/export": 0.1}]
    (phase / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    text = render_status(run)
    assert "iter_0001/evolmm: in progress, 2 steps logged" in text
    assert ("step 2: solver/reward/mean 0.75, solver/reward/pseudo_label_accuracy 0.5, "
            "solver/reward/sample_accuracy 0.375") in text
    assert ("held-out accuracy greedy 0.500 -> 0.625, sampled 0.400 -> 0.550, "
            "majority 0.600 -> 0.700 (step 2)") in text
    assert series(rows, "heldout/sampled") == ([0, 2], [0.4, 0.55])
    assert series(rows, "solver/reward/mean") == ([1, 2], [0.5, 0.75])
    assert main(["plot", str(run)]) == 0
    assert capsys.readouterr().out.split() == [str(phase / "curves.png")]
    with Image.open(phase / "curves.png") as image:
        assert image.size == (1200, 800)


def test_known_questions_mode_asks_the_images_questions_and_scores_the_votes(tmp_path):
    """questions: known: no Proposer request or update; each image's question from its
    answers.jsonl; the majority checked against the hidden answer by hand; reward:
    shuffled moves the same rewards between answers."""
    import json
    from types import SimpleNamespace

    from actors.sampling import Completion
    from pipelines.config import load_config
    from pipelines.recipes.evolmm.recipe import EvoLMMPhase

    for name in ("a.png", "b.png"):
        Image.new("RGB", (8, 8), "red").save(tmp_path / name)
    (tmp_path / "answers.jsonl").write_text(
        json.dumps({"image": "a.png", "question": "Colour of a?", "answer": "red"}) + "\n"
        + json.dumps({"image": "b.png", "question": "Colour of b?", "answer": "blue"}) + "\n")
    replies = {"Colour of a?": ["red", "red", "green", "red"],  # majority red: right
               "Colour of b?": ["red", "red", "blue", "green"]}  # majority red: wrong

    class Pool:
        def __init__(self):
            self.asked = []

        def generate(self, requests):
            self.asked += requests
            return [[Completion(f"<think>x</think><answer>{a}</answer>", [], [], [], "stop", 0)
                     for a in replies[r.messages[0]["content"][1]["text"].split(": ")[-1]]]
                    for r in requests]

    def rollout(reward: str):
        cfg = load_config(ROOT / "configs/evolmm/tiny-cpu.yaml", [
            f"evolmm.data_dir={tmp_path}", "evolmm.questions=known", "evolmm.images_per_step=2",
            "evolmm.solver_samples=4", "evolmm.proposer_update_freq=1", f"evolmm.reward={reward}"])
        phase = EvoLMMPhase(cfg, cfg.evolmm)
        phase.prepare(SimpleNamespace(run_dir=tmp_path))
        pool = Pool()
        out = phase.rollout(0, np.random.default_rng(0), SimpleNamespace(pool=pool, dir=tmp_path))
        return out, pool.asked

    [solver], asked = rollout("soft")
    assert {r.adapter for r in asked} == {"solver"} and len(asked) == 2  # no Proposer
    m = solver.scores.metrics
    # majorities: red (= red), red (!= blue): 1/2; single answers right: 3/4 and 1/4: 4/8
    assert (m["pseudo_label_accuracy"], m["sample_accuracy"], m["known_questions"]) == \
        (0.5, 0.5, 2.0)
    assert m["question_fallbacks"] == 0.0
    [shuffled], _ = rollout("shuffled")
    soft_rewards_ = sorted(r for group in solver.scores.rewards for r in group)
    assert sorted(r for group in shuffled.scores.rewards for r in group) == soft_rewards_
    assert shuffled.scores.rewards != solver.scores.rewards
