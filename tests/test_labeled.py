"""Labeled data sources (pipelines/recipes/labeled.py): jsonl, datasets folders with a
column mapping, the drawn counting set; clear errors for bad sources."""

from __future__ import annotations

import io

import pytest

from pipelines.eval.data import DataError
from pipelines.recipes.labeled import item_messages, load_items


def png(colour: str) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buf, format="PNG")
    return buf.getvalue()


def test_a_datasets_folder_with_its_own_column_names(tmp_path):
    """A geometry3k-style set (problem / answer / images columns, PIL images) read with a
    mapping in the source string; the split comes from the recipe unless given."""
    import datasets
    from PIL import Image

    def split(n, offset):
        return datasets.Dataset.from_dict({
            "problem": [f"Find x {k}." for k in range(offset, offset + n)],
            "answer": [str(k) for k in range(offset, offset + n)],
            "images": [[Image.open(io.BytesIO(png("red")))] for _ in range(n)],
            "worked": [f"x = {k}" for k in range(offset, offset + n)]})

    folder = tmp_path / "geo"
    datasets.DatasetDict({"train": split(3, 0), "test": split(2, 10)}).save_to_disk(folder)
    source = f"hf:{folder}?question=problem&image=images&solution=worked"
    train = load_items(source, "train")
    assert [(i.question, i.answer, i.solution) for i in train] == [
        ("Find x 0.", "0", "x = 0"), ("Find x 1.", "1", "x = 1"), ("Find x 2.", "2", "x = 2")]
    assert len(train[0].image_bytes()) == 1
    assert [i.answer for i in load_items(source, "test")] == ["10", "11"]
    assert [i.answer for i in load_items(source + "&split=test", "train", limit=1)] == ["10"]
    with pytest.raises(DataError, match="unknown field"):
        load_items(f"hf:{folder}?questoin=problem")
    with pytest.raises(DataError, match="no column 'question'"):
        load_items(f"hf:{folder}")


def test_jsonl_and_bad_sources(tmp_path):
    (tmp_path / "a.png").write_bytes(png("blue"))
    path = tmp_path / "set.jsonl"
    path.write_text('{"question": "Colour?", "answer": "blue", "image": "a.png"}\n'
                    '{"question": "", "answer": 3}\n{"answer": 2}\n')
    with pytest.raises(DataError, match=r"line 2.*line 3"):
        load_items(f"jsonl:{path}")
    path.write_text('{"question": "Colour?", "answer": "blue", "image": "a.png", '
                    '"choices": ["red", "blue"]}\n')
    [item] = load_items(str(path))  # a bare .jsonl path
    assert item.options == {"A": "red", "B": "blue"}
    text = item_messages(item, "Say it.")[0]["content"]
    assert text[0] == {"type": "image"} and text[1]["text"] == "Colour?\nA. red\nB. blue\nSay it."
    for bad, message in [("csv:x", "expected jsonl"), ("shapes:many", "whole number"),
                         ("shapes:0", "1..100000"), (f"jsonl:{tmp_path}/none.jsonl", "no such")]:
        with pytest.raises(DataError, match=message):
            load_items(bad)


def test_the_drawn_counting_set(tiny_cache):
    train, test = load_items("shapes:12", "train"), load_items("shapes:12", "test")
    assert [i.id for i in train] == [f"train-{k}" for k in range(12)]
    assert all(i.question in ("How many circles are in the image?",
                              "How many squares are in the image?") for i in train)
    assert all(i.answer in "12345" and i.answer in i.solution for i in train)
    assert {i.answer for i in train} != {train[0].answer}
    # the same count and split is the same set; another split other images
    assert [i.image_bytes() for i in load_items("shapes:12", "train")] == \
        [i.image_bytes() for i in train]
    assert not {b for i in train for b in i.image_bytes()} & \
        {b for i in test for b in i.image_bytes()}
    with pytest.raises(DataError, match="splits"):
        load_items("shapes:4", "dev")


def test_the_simple_recipe_on_labeled_data(tiny_cache):
    """simple.data: the items in order, their images, and the reward sees the answer."""
    import numpy as np

    from pipelines.config import load_config
    from pipelines.recipes.simple.recipe import SimplePhase, correct_answer

    cfg = load_config(None, ["simple.data=shapes:8", "simple.prompts_per_step=3"])
    phase = SimplePhase(cfg)
    asked = phase.requests(2, np.random.default_rng(0))
    assert [r.meta.id for r in asked] == ["train-6", "train-7", "train-0"]  # cycled
    assert asked[0].images == asked[0].meta.image_bytes()
    assert correct_answer({"response": "so \\boxed{3}", "answer": "3"}) == 1.0
    assert correct_answer({"response": "I count\n 4 \n", "answer": "4"}) == 1.0  # last line
    assert correct_answer({"response": "\\boxed{5}\n4", "answer": "4"}) == 0.0  # the box wins
    assert correct_answer({"response": "", "answer": "4"}) == 0.0
    with pytest.raises(ValueError, match="simple.data"):
        correct_answer({"response": "4", "answer": None})


def test_coevolve_eval_names_the_runs_test_set(tmp_path, tiny_cache):
    from pipelines.config import load_config
    from pipelines.recipes.maye.recipe import MayeRecipe
    from pipelines.recipes.r3v.recipe import R3VRecipe

    cfg = load_config(None, ["run.recipe=maye", "maye.test=shapes:4"])
    [task] = MayeRecipe(cfg).benchmarks
    assert task.startswith("jsonl:") and task.endswith("shapes-v2-test-4/shapes-v2-test-4.jsonl")
    cfg = load_config(None, ["run.recipe=r3v", f"r3v.test=jsonl:{tmp_path}/t.jsonl"])
    assert R3VRecipe(cfg).benchmarks == (f"jsonl:{tmp_path}/t.jsonl",)
    cfg = load_config(None, ["run.recipe=r3v", "r3v.test=hf:someone/set"])
    assert R3VRecipe(cfg).benchmarks == ()


def test_items_with_broken_images_are_skipped_and_counted(tmp_path):
    from pipelines.recipes.labeled import usable

    (tmp_path / "good.png").write_bytes(png("green"))
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    path = tmp_path / "set.jsonl"
    path.write_text('{"question": "a?", "answer": 1, "image": "good.png"}\n'
                    '{"question": "b?", "answer": 2, "image": "bad.png"}\n'
                    '{"question": "c?", "answer": 3}\n')
    kept, skipped = usable(load_items(f"jsonl:{path}"), "test set")
    assert [i.question for i in kept] == ["a?", "c?"] and skipped == 1
    path.write_text('{"question": "b?", "answer": 2, "image": "bad.png"}\n')
    with pytest.raises(DataError, match="no item has images that decode"):
        usable(load_items(f"jsonl:{path}"), "test set")
