"""Evaluation: the data format, every own task on fixtures with known answers, pass@k and
judge agreement by hand, the runner's resume (fake pool), and on real engines: greedy
results equal on one and two engines, `coevolve eval` on a run directory, the lmms-eval
plugin."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from actors.generator import Completion
from pipelines.algorithms.grading import Grader
from pipelines.eval import report
from pipelines.eval.data import DataError, Item, read_jsonl, write_jsonl
from pipelines.eval.judge import parse_verdict
from pipelines.eval.runner import Model, agreement, evaluate_model, pass_at_k
from pipelines.eval.tasks import BUILTIN, TaskSpec, resolve_task, smoke_fixture

ROOT = Path(__file__).resolve().parents[1]


def png(colour="white") -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (32, 24), colour).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def grader():
    g = Grader(timeout_s=10)
    yield g
    g.close()


# ------------------------------------------------------------------ data format

def test_jsonl_rows_resolve_images_next_to_the_file(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.png").write_bytes(png())
    write_jsonl(tmp_path / "d.jsonl", [
        {"question": "How many?", "answer": 3, "image": "img/a.png", "id": "q1"},
        {"question": "Pick", "answer": "B", "choices": ["x", "y"], "image": ["img/a.png"]},
        {"question": "Text only", "answer": "yes", "solution": "because"}])
    items = read_jsonl(tmp_path / "d.jsonl")
    assert [i.id for i in items] == ["q1", "2", "3"]  # id defaults to the line number
    assert items[0].answer == "3" and items[0].images == [str(tmp_path / "img" / "a.png")]
    assert items[1].options == {"A": "x", "B": "y"}
    assert items[2].images == [] and items[2].solution == "because"
    assert items[0].image_bytes() == [png()]


def test_bad_rows_fail_the_file_with_every_line_number(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join([
        json.dumps({"question": "ok", "answer": "1"}),
        "not json",
        json.dumps({"question": "", "answer": "1"}),
        json.dumps({"question": "q", "answer": "1", "image": "missing.png"}),
        json.dumps({"question": "q", "answer": True}),
        json.dumps({"question": "q", "answer": "1", "colour": "red"}),
        json.dumps(["a", "list"]),
        json.dumps({"question": "q", "answer": "1", "id": "1"}),  # duplicate of line 1's id
    ]) + "\n")
    with pytest.raises(DataError) as err:
        read_jsonl(path)
    message = str(err.value)
    assert "7 bad row(s)" in message
    for number in (2, 3, 4, 5, 6, 7, 8):
        assert f"line {number}:" in message
    assert "line 1:" not in message
    assert "'colour'" in message and "duplicate id '1'" in message


def test_an_image_that_does_not_decode_is_a_data_error(tmp_path):
    (tmp_path / "x.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    item = Item(id="1", question="q", answer="1", images=[str(tmp_path / "x.png")])
    with pytest.raises(DataError, match="does not decode"):
        item.image_bytes()


# ------------------------------------------------------------ tasks with known answers

# (item id, response, counts?) on the smoke fixture; tricky reference formats included.
SMOKE_CASES = [
    ("count-0", "<think>one</think> \\boxed{1}", True),
    ("count-1", "\\boxed{4}", True),
    ("count-1", "\\boxed{3}", False),
    ("count-2", "I count 2\n2", True),  # no box: the last line counts in this task
    ("tricky-0", "\\boxed{1000}", True),  # reference 1,000
    ("tricky-0", "\\boxed{100}", False),
    ("tricky-1", "\\boxed{50\\%}", True),  # reference 50%
    ("tricky-1", "\\boxed{0.5}", False),  # a share, not the same number as 50 without percent
    ("tricky-2", "\\boxed{0.5}", True),  # reference \frac{1}{2}
    ("tricky-2", "\\boxed{\\dfrac{1}{2}}", True),
    ("tricky-3", "\\boxed{B}", True),  # reference B of (square, circle, triangle)
    ("tricky-3", "\\boxed{circle}", True),
    ("tricky-3", "\\boxed{(C)}", False),
]


def test_smoke_task_scores_known_answers(tmp_path, grader):
    task = BUILTIN["smoke"]
    items = {i.id: i for i in read_jsonl(smoke_fixture(tmp_path))}
    assert len(items) == 12 and items["count-1"].answer == "4"
    for item_id, response, expected in SMOKE_CASES:
        _, ok = task.correct(items[item_id], response, grader)
        assert ok is expected, (item_id, response)
    messages = task.messages(items["tricky-3"])
    text = messages[0]["content"][-1]["text"]
    assert "A. square\nB. circle\nC. triangle" in text and messages[0]["content"][0] == {
        "type": "image"}


def test_mmzero_protocol_counts_only_the_last_box(grader):
    task = BUILTIN["mmzero_chartqa"]
    assert (task.temperature, task.answer) == (0.6, "boxed")
    item = Item(id="1", question="What is the peak?", answer="12")
    cases = [("<think>7 or 12</think>\\boxed{7} no wait \\boxed{12}", True),
             ("<think>12</think>\\boxed{12} then \\boxed{7}", False),
             ("The answer is 12", False),  # no box: no answer under MM-Zero's protocol
             ("\\boxed{12.0}", True)]
    for response, expected in cases:
        assert task.correct(item, response, grader)[1] is expected, response
    assert "\\boxed{}" in task.messages(item)[0]["content"][-1]["text"]


def test_relaxed_accuracy_allows_five_percent_on_numbers(grader):
    task = BUILTIN["evolmm_chartqa"]
    number = Item(id="1", question="q", answer="100")
    word = Item(id="2", question="q", answer="Yes")
    cases = [(number, "104", True), (number, "95.5", True), (number, "106", False),
             (number, "The value is\n105", True), (word, "yes", True), (word, "No", False)]
    for item, response, expected in cases:
        assert task.correct(item, response, grader)[1] is expected, (item.answer, response)
    exact = TaskSpec(name="x", data="smoke")
    assert exact.correct(number, "104", grader)[1] is False


@pytest.fixture(scope="module")
def benchmark_data(tmp_path_factory):
    """Every published benchmark's fixture rows as a dataset repository in a --data-dir."""
    pytest.importorskip("datasets")
    from eval_fixtures import write_repos

    return write_repos(tmp_path_factory.mktemp("benchmark-data"))


# What each built-in task reads from its fixture (tests/eval_fixtures.py): ids, answers,
# images per item, options.
EXPECTED_ITEMS = {
    "chartqa": [("0", "14", 1, []), ("1", "0.57", 1, []), ("2", "50%", 1, [])],
    "mathvista": [("1", "1.2", 1, []), ("2", "1000", 1, []),
                  ("5", "97", 1, ["97", "102", "107", "122"])],
    "mathverse": [("1", "D", 1, []), ("5", "D", 1, [])],
    "mathvision": [("4", "6", 1, []), ("39", "A", 1, ["red", "blue", "green", "Yellow",
                                                      "This cannot be worked out for certain."])],
    "mmmu": [("validation_Accounting_1", "B", 1, ["$63,020", "$58,410", "$71,320", "$77,490"]),
             ("validation_Accounting_2", "1.06", 2, []),
             ("validation_Art_1", "A", 2, ["<image 1>", "<image 2>"])],
    "mmmu_pro": [("test_History_1", "B", 1, None)],
    "mmmu_pro_4": [("test_History_1", "B", 1, ["a", "b", "c", "d"])],
    "mmmu_pro_vision": [("test_History_1", "B", 1, ["a", "b"])],
    "mmvet": [("v1_0", "-1<AND>-5", 1, []), ("v1_1", "Iceland<OR>Greenland", 1, [])],
    "hallusionbench": [("VD_illusion_0_0_0", "Yes", 1, []), ("VD_illusion_0_1_0", "No", 1, [])],
    "visnumbench": [("Synthetic/25_Scale", "C", 1, ["0.15", "0.27", "0.76", "0.64"]),
                    ("Synthetic/17_Scale", "B", 1, ["(0.50, 0.60)", "(0.0, 0.10)",
                                                    "(0.80, 0.90)", "(0.20, 0.30)"]),
                    ("Real/25_Scale", "C", 1, ["1 hours and 26 minutes", "10 hours and 43 minutes",
                                               "3 hours and 55 minutes", "6 hours and 28 minutes"])],
    "mmsi": [("0", "B", 2, [])],
}


@pytest.mark.parametrize("name", sorted(n for n, t in BUILTIN.items() if t.layout))
def test_every_builtin_benchmark_reads_its_published_layout(name, benchmark_data, grader):
    """Each benchmark task reads its fixture (the real dataset's configs, splits, column
    names and types) through the code path of real data: ``DATA_DIR/<hub id>/`` loaded
    with the task's config and split; every image of an item, in order; the options
    parsed from the benchmark's own format."""
    task = BUILTIN[name]
    items = task.load(benchmark_data)
    want = EXPECTED_ITEMS[task.layout]
    assert [(i.id, i.answer, len(i.images)) for i in items] == [w[:3] for w in want]
    for item, (*_, options) in zip(items, want):
        assert all(image_bytes.startswith(b"\x89PNG") for image_bytes in item.image_bytes())
        if options is not None:
            assert item.choices == options, item.id
    if task.layout == "mmmu_pro":
        assert len(items[0].choices) == 10
    if task.layout == "mmmu":  # <image 2> before <image 1> in the question: number order
        colors = [Image.open(io.BytesIO(b)).getpixel((0, 0)) for b in items[1].image_bytes()]
        assert colors == [(255, 255, 255), (128, 128, 128)]
    if task.layout == "mathvista":
        assert items[1].question.endswith("(Unit: g)") and items[0].meta["precision"] == 1
    # MM-Zero's protocol: the last boxed answer by the rule grader (MM-Vet's references
    # with <AND>/<OR> need its judge)
    if name.startswith("mmzero_") and task.layout != "mmvet" or name == "evolmm_chartqa":
        for item in items:
            assert task.correct(item, f"so \\boxed{{{item.answer}}}", grader)[1], item.id
            assert not task.correct(item, "\\boxed{zzz}", grader)[1], item.id
            assert not task.correct(item, item.answer, grader)[1] or name == "evolmm_chartqa"


def test_task_files_and_jsonl_tasks(tmp_path):
    write_jsonl(tmp_path / "mine.jsonl", [{"question": "q", "answer": "1"}])
    (tmp_path / "t.yaml").write_text("data: jsonl:mine.jsonl\ntemperature: 0.6\nsamples: 4\n"
                                     "pass_at: [1, 4]\nanswer: boxed\n")
    task = resolve_task(str(tmp_path / "t.yaml"))
    assert (task.name, task.samples, task.pass_at) == ("t", 4, (1, 4))
    assert task.load()[0].answer == "1"
    assert resolve_task(f"jsonl:{tmp_path / 'mine.jsonl'}").name == "mine"
    (tmp_path / "bad.yaml").write_text("data: smoke\ntemprature: 1\n")
    with pytest.raises(ValueError, match="temprature"):
        resolve_task(str(tmp_path / "bad.yaml"))
    with pytest.raises(ValueError, match="pass_at"):
        TaskSpec(name="x", data="smoke", samples=2, pass_at=(4,))
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        resolve_task("nope")


def test_tasks_whose_data_is_absent_are_listed_and_the_rest_run(tmp_path, monkeypatch):
    """A recipe's benchmarks with some data absent: the present ones are returned, each
    absent one is named with the hub id, config and split it needs and the --data-dir
    layout; a copy that is there but does not load gives its real cause; with nothing
    left the error lists them all."""
    from pipelines.eval.harness import Target, resolve_tasks

    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)  # no hub lookups here
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-cache"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    broken = tmp_path / "data" / "MMMU" / "MMMU_Pro"
    broken.mkdir(parents=True)
    (broken / "README.md").write_text("not a dataset card\n")
    target = Target(models=[], cfg=None, out=tmp_path, benchmarks=(
        "smoke", "mmzero_mathverse", "mmzero_mmmu", "mmzero_mmmu_pro"))
    tasks, items, left_out = resolve_tasks(None, target, str(tmp_path / "data"))
    assert [t.name for t in tasks] == ["smoke"] and list(items) == ["smoke"]
    mathverse, mmmu, pro = left_out
    assert mathverse.startswith("mmzero_mathverse: not found; needs AI4Math/MathVerse, config "
                                "'testmini', split 'testmini': `hf download AI4Math/MathVerse "
                                f"--repo-type dataset --local-dir {tmp_path}/data/AI4Math/MathVerse`")
    assert mmmu.startswith("mmzero_mmmu: not found; needs MMMU/MMMU, every config, split "
                           "'validation'")
    assert pro.startswith("mmzero_mmmu_pro: does not load: MMMU/MMMU_Pro") or \
        pro.startswith(f"mmzero_mmmu_pro: does not load: {broken}"), pro
    with pytest.raises(DataError, match="no task's data is here") as err:
        resolve_tasks(["mmzero_mathverse", "mmzero_mmmu"], target, str(tmp_path / "data"))
    assert "AI4Math/MathVerse" in str(err.value) and "MMMU/MMMU" in str(err.value)
    with pytest.raises(ValueError, match="names no benchmarks"):
        resolve_tasks(None, Target([], None, tmp_path, ()), None)


# ------------------------------------------------------------------ figures by hand

def test_pass_at_k_by_hand():
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)
    assert pass_at_k(4, 1, 2) == pytest.approx(1 - 3 / 6)  # 1 - C(3,2)/C(4,2)
    assert pass_at_k(8, 2, 4) == pytest.approx(1 - 15 / 70)  # 1 - C(6,4)/C(8,4)
    assert pass_at_k(4, 0, 4) == 0.0
    assert pass_at_k(4, 3, 2) == 1.0  # fewer wrong samples than k


def test_judge_agreement_and_kappa_by_hand():
    rows = ([{"rule_correct": True, "judge_correct": True}] * 4
            + [{"rule_correct": True, "judge_correct": False}] * 1
            + [{"rule_correct": False, "judge_correct": True}] * 2
            + [{"rule_correct": False, "judge_correct": False}] * 3)
    out = agreement(rows)
    # agree 7/10; p_rule .5, p_judge .6 -> chance .5*.6 + .5*.4 = .5; kappa (.7-.5)/.5
    assert out["agree"] == pytest.approx(0.7) and out["kappa"] == pytest.approx(0.4)
    assert (out["rule_only"], out["judge_only"], out["judge_accuracy"]) == (1, 2, 0.6)
    assert agreement([])["kappa"] is None


def test_judge_verdicts_parse_strictly():
    assert parse_verdict("Yes.") is True and parse_verdict("  no") is False
    assert parse_verdict("**Yes**, it matches") is True and parse_verdict("NO") is False
    assert parse_verdict("Yesterday") is None and parse_verdict("Maybe") is None
    assert parse_verdict("") is None


# ------------------------------------------------------------ the runner (fake pool)

class ScriptedPool:
    """Answers every request with its item's known answer boxed, or a wrong one."""

    def __init__(self, right: set[str]):
        self.right, self.asked = right, []

    def generate(self, requests):
        out = []
        for r in requests:
            question = r.messages[0]["content"][-1]["text"]
            self.asked.append((question, r.sampling.seed))
            text = "\\boxed{7}" if question in self.right else "\\boxed{0}"
            out.append([Completion(text, [1], [2, 3], [-0.1, -0.2], "stop", 0)] * r.sampling.n)
        return out


def _items(n):
    return [Item(id=f"i{k}", question=f"q{k}", answer="7") for k in range(n)]


class RefusingPool(ScriptedPool):
    """Refuses the requests whose question starts with "long"."""

    def generate(self, requests):
        out = super().generate(requests)
        return [[Completion("prompt longer than max_model_len", [], [], [], "refused", 0)]
                if r.messages[0]["content"][-1]["text"].startswith("long") else samples
                for r, samples in zip(requests, out)]


class RecordingJudge:
    def __init__(self):
        self.seen = []

    def judge(self, triples):
        self.seen += triples
        return [(reference == "B" and "Bravo" in question, "Yes")
                for question, reference, _ in triples]


def test_refused_items_are_counted_and_skipped_and_the_judge_sees_the_options(tmp_path):
    """An item the engine refuses (a prompt past max_model_len, too many images) is
    counted and left out; the task goes on. The judge is shown the question as asked,
    with its lettered options, so it can judge a letter reference."""
    task = TaskSpec(name="t", data="smoke", prompt="{question}{choices}")
    items = [Item(id="a", question="Pick one.", answer="B", choices=["Alpha", "Bravo"]),
             Item(id="b", question="long " * 10, answer="7"),
             Item(id="c", question="q", answer="7")]
    judge = RecordingJudge()
    [row] = evaluate_model(RefusingPool(right={"q"}), Model(label="m", path="x"), [task],
                           tmp_path, items={"t": items}, judge=judge)
    assert (row["items"], row["refused"], row["computed"]) == (2, 1, 3)
    assert [q for q, *_ in judge.seen] == ["Pick one.\nA. Alpha\nB. Bravo", "q"]
    table = pq.read_table(tmp_path / "t-m.parquet").to_pylist()
    assert [(r["item_id"], r["correct"]) for r in table] == [("a", True), ("c", True)]


def test_an_interrupted_evaluation_resumes_without_recomputing(tmp_path):
    task = TaskSpec(name="t", data="smoke", prompt="{question}", samples=2, pass_at=(1, 2),
                    temperature=1.0)
    model = Model(label="m", path="x")
    pool = ScriptedPool(right={"q0", "q1", "q2"})

    def stop_after_first(name, index):
        if index == 0:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        evaluate_model(pool, model, [task], tmp_path, items={"t": _items(10)}, chunk_items=4,
                       on_chunk=stop_after_first)
    assert len(pool.asked) == 4 and (tmp_path / ".parts" / "t-m" / "part-00000.parquet").is_file()
    [row] = evaluate_model(pool, model, [task], tmp_path, items={"t": _items(10)},
                           chunk_items=4)
    assert len(pool.asked) == 10  # the first chunk was not asked again
    assert (row["computed"], row["reused"], row["items"], row["samples"]) == (6, 4, 10, 20)
    assert row["accuracy"] == pytest.approx(0.3) and row["pass@2"] == pytest.approx(0.3)
    assert not (tmp_path / ".parts" / "t-m").exists()
    table = pq.read_table(tmp_path / "t-m.parquet")
    assert sorted(set(table.column("item_id").to_pylist())) == sorted(f"i{k}" for k in range(10))
    # a finished file is reused whole
    [again] = evaluate_model(pool, model, [task], tmp_path, items={"t": _items(10)})
    assert len(pool.asked) == 10 and again["reused"] == 10 and again["computed"] == 0
    # more items later (a larger --limit): only the new ones are asked; fewer: the file
    # keeps every row, the summary counts the requested items
    [more] = evaluate_model(pool, model, [task], tmp_path, items={"t": _items(12)})
    assert len(pool.asked) == 12 and (more["computed"], more["reused"]) == (2, 10)
    [fewer] = evaluate_model(pool, model, [task], tmp_path, items={"t": _items(3)})
    assert len(pool.asked) == 12 and (fewer["items"], fewer["accuracy"]) == (3, 1.0)
    assert pq.read_table(tmp_path / "t-m.parquet").num_rows == 24
    # seeds are per item: the same item gets the same seed whatever the chunking
    seeds = dict(pool.asked)
    assert seeds["q5"] == task.seed(_items(10)[5]) and len(set(seeds.values())) == 12


def test_undecodable_images_are_skipped_and_counted(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"not an image")
    items = _items(3)
    items[1].images = [str(tmp_path / "bad.png")]
    task = TaskSpec(name="t", data="smoke", prompt="{question}")
    pool = ScriptedPool(right={"q0"})
    [row] = evaluate_model(pool, Model("m", "x"), [task], tmp_path / "out", items={"t": items})
    assert (row["items"], row["skipped"], row["accuracy"]) == (2, 1, 0.5)


def test_report_orders_models_by_iteration_and_draws(tmp_path):
    rows = [{"task": "smoke", "model": m, "iteration": it, "accuracy": acc, "items": 12}
            for m, it, acc in [("iter_0002", 2, 0.5), ("base", 0, 0.25), ("iter_0001", 1, 0.4)]]
    text = report.table(rows)
    header, line = text.splitlines()[:2]
    assert header.split()[1:] == ["base", "iter_0001", "iter_0002"]
    assert line.split()[1:4] == ["0.250", "0.400", "0.500"]
    assert report.plot(rows, tmp_path / "c.png").stat().st_size > 1000


# ------------------------------------------------------------------ real engines

def _cfg(*extra: str):
    from pipelines.config import load_config

    return load_config(None, ["model.path=tiny://qwen2.5-vl", "model.dtype=float32",
                              "generator.max_model_len=1024",
                              "generator.max_num_batched_tokens=2048", "run.name=evaltest",
                              *extra])


@pytest.mark.slow
def test_per_item_seeds_give_the_same_results_on_one_and_two_engines(ray_cluster, tmp_path):
    """Greedy and seeded sampling over the smoke task: one engine vs two (the chunk is
    split over both, so items meet other batch neighbours)."""
    import dataclasses

    from pipelines.eval.engines import start_pool

    cfg = _cfg()
    greedy = dataclasses.replace(BUILTIN["smoke"], max_tokens=12)
    sampled = dataclasses.replace(greedy, name="smoke_sampled", temperature=1.0, samples=2,
                                  pass_at=(1, 2))
    items = {t.name: t.load() for t in (greedy, sampled)}
    tables = {}
    for n in (1, 2):
        pool = start_pool(cfg, f"eval{n}", cfg.model.path, engines=n)
        try:
            evaluate_model(pool, Model(f"e{n}", cfg.model.path), [greedy, sampled],
                           tmp_path / f"e{n}", items=items)
        finally:
            pool.shutdown()
        for t in (greedy, sampled):
            tables[(t.name, n)] = pq.read_table(tmp_path / f"e{n}" / f"{t.name}-e{n}.parquet")
    for t in (greedy, sampled):
        one = {(r["item_id"], r["sample"]): r["response"]
               for r in tables[(t.name, 1)].to_pylist()}
        two = {(r["item_id"], r["sample"]): r["response"]
               for r in tables[(t.name, 2)].to_pylist()}
        assert one.keys() == two.keys() and len(one) == 12 * t.samples
        mismatch = sum(one[k] != two[k] for k in one) / len(one)
        print(f"{t.name}: {mismatch:.1%} of {len(one)} responses differ between 1 and 2 engines")
        assert mismatch == 0.0


@pytest.mark.slow
def test_a_peft_adapter_folder_is_served_on_the_base_it_names(engines, tmp_path):
    """`coevolve eval ADAPTER_FOLDER`: the base model from adapter_config.json with the
    adapter loaded into a LoRA engine; its answers differ from the base model's (the
    session's plain engine asked the same greedy requests)."""
    import dataclasses

    import ray
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText

    from actors.generator import Request, Sampling
    from actors.lora import language_targets
    from actors.models import resolve_model
    from pipelines.cli import main

    base = resolve_model("tiny://qwen2.5-vl")
    model = AutoModelForImageTextToText.from_pretrained(base, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(
        r=8, lora_alpha=16, target_modules=language_targets(model, ["q_proj", "v_proj"])))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.5)
    peft_model.save_pretrained(tmp_path / "adapter")
    out = tmp_path / "out"
    assert main(["eval", str(tmp_path / "adapter"), "--tasks", "smoke", "--limit", "4",
                 "--max-tokens", "8", "--out", str(out)]) == 0
    [row] = report.load_summary(out)
    assert (row["model"], row["adapter"], row["path"], row["items"]) == (
        "adapter", str(tmp_path / "adapter"), base, 4)
    with_adapter = pq.read_table(out / "smoke-adapter.parquet").to_pylist()
    task = dataclasses.replace(BUILTIN["smoke"], limit=4)
    items = task.load()
    requests = [Request(task.messages(i), images=i.image_bytes(), sampling=Sampling(
        n=1, temperature=0.0, max_tokens=8, seed=task.seed(i))) for i in items]
    plain = ray.get(engines("qwen2.5-vl").generate.remote(requests))
    assert [r["item_id"] for r in with_adapter] == [i.id for i in items]
    assert all(abs(r["logprob"] - sum(p[0].logprobs)) > 1e-3 or r["response"] != p[0].text
               for r, p in zip(with_adapter, plain))


@pytest.fixture(scope="module")
def tiny_run(ray_cluster, tmp_path_factory):
    """A finished two-iteration run of the simple recipe (one step per iteration)."""
    from pipelines.config import load_config
    from pipelines.runtime.driver import Driver

    root = tmp_path_factory.mktemp("evalrun")
    cfg = load_config(ROOT / "configs/simple/tiny-cpu.yaml", [
        f"run.root={root}", "run.name=run", "run.iterations=2", "simple.steps=1",
        "simple.prompts_per_step=2", "simple.n=2", "simple.max_tokens=8", "trainer.lr=5e-3",
        "placement.trainer_ranks=1", "logging.progress=false"])
    Driver(cfg).run()
    return root / "run"


@pytest.mark.slow
def test_coevolve_eval_on_a_run_directory_resumes_and_plots(tiny_run, capsys, monkeypatch,
                                                             tmp_path):
    """Base model and both iterations' policies on the smoke task, with a judge pool; an
    evaluation stopped after two chunks resumes without asking the finished items again.
    A named benchmark whose data is absent is listed with what it needs; the command
    evaluates the rest and exits 0."""
    from pipelines.cli import main
    from pipelines.eval.harness import resolve_target, resolve_tasks, run_eval

    target = resolve_target(str(tiny_run))
    assert [m.label for m in target.models] == ["base", "iter_0001", "iter_0002"]
    assert target.models[2].path == str(tiny_run / "iter_0002/policy/hf")
    tasks, items, _ = resolve_tasks(["smoke"], target, None)

    def stop(task, index):
        if index == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_eval(target, tasks, items, max_tokens=8, chunk_items=5, on_chunk=stop)
    parts = tiny_run / "eval/.parts/smoke-base"
    assert sorted(p.name for p in parts.iterdir()) == ["part-00000.parquet", "part-00001.parquet"]

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "no-cache"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "no-cache"))
    assert main(["eval", str(tiny_run), "--tasks", "smoke", "mmzero_mathverse",
                 "--max-tokens", "8", "--judge", "tiny://qwen2.5-vl"]) == 0
    printed = capsys.readouterr().out
    assert "left out 1 task(s) whose data is not here:\n  mmzero_mathverse: not found; needs " \
           "AI4Math/MathVerse, config 'testmini', split 'testmini'" in printed
    assert (tiny_run / "eval/summary.md").read_text().startswith("| task | base |")
    summary = {r["model"]: r for r in report.load_summary(tiny_run / "eval")}
    assert sorted(summary) == ["base", "iter_0001", "iter_0002"]
    assert (summary["base"]["reused"], summary["base"]["computed"]) == (10, 2)
    assert (summary["iter_0002"]["reused"], summary["iter_0002"]["computed"]) == (0, 12)
    assert all(r["items"] == 12 for r in summary.values())
    # the judge (a random tiny model here) saw every new response; replies that are
    # neither Yes nor No are no verdict, and an answer counts if rule or judge accepts it
    table = pq.read_table(tiny_run / "eval/smoke-iter_0002.parquet").to_pylist()
    assert all(isinstance(r["judge_reply"], str) for r in table)  # asked about every one
    assert summary["iter_0002"]["judged"] == sum(r["judge_correct"] is not None for r in table)
    assert all(r["correct"] == (r["rule_correct"] or bool(r["judge_correct"])) for r in table)
    assert "smoke" in printed and "iter_0002" in printed
    assert (tiny_run / "eval/comparison.png").stat().st_size > 1000
    # each iteration's weights are served: the same responses get other log-probs
    logprobs = {m: pq.read_table(tiny_run / f"eval/smoke-{m}.parquet").column("logprob")
                .to_pylist() for m in summary}
    assert len({tuple(v) for v in logprobs.values()}) == 3


LMMS_TASK = """task: coevolve_count
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: answer
process_results: !function utils.process_results
generation_kwargs:
  max_new_tokens: 8
  temperature: 0
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
metadata:
  version: 0.0
"""

LMMS_UTILS = '''
from PIL import Image, ImageDraw

def doc_to_visual(doc):
    image = Image.new("RGB", (64, 48), "white")
    for k in range(int(doc["answer"])):
        ImageDraw.Draw(image).ellipse([4 + 12 * k, 20, 14 + 12 * k, 30], fill="red")
    return [image]

def doc_to_text(doc):
    return doc["question"]

def process_results(doc, results):
    return {"exact_match": float(results[0].strip() == doc["answer"])}
'''


@pytest.mark.slow
def test_lmms_eval_runs_a_coevolve_checkpoint_offline(ray_cluster, tiny_run, tmp_path):
    """`python -m lmms_eval --model coevolve` on a local task writes lmms-eval's own results
    files; `coevolve eval --tasks lmms:<task>` runs the same task on its own pool and gets
    the same greedy responses."""
    pytest.importorskip("lmms_eval")
    import ray

    tasks = tmp_path / "tasks"
    tasks.mkdir()
    write_jsonl(tmp_path / "items.jsonl",
                [{"question": f"How many circles are red? {k}", "answer": str(k % 4)}
                 for k in range(6)])
    (tasks / "coevolve_count.yaml").write_text(LMMS_TASK.format(data=tmp_path / "items.jsonl"))
    (tasks / "utils.py").write_text(LMMS_UTILS)
    model = tiny_run / "iter_0002/policy/hf"
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
           "RAY_ADDRESS": ray.get_runtime_context().gcs_address,
           "HF_HOME": str(tmp_path / "hf")}
    proc = subprocess.run(
        [sys.executable, "-m", "lmms_eval", "--model", "coevolve",
         "--model_args", f"pretrained={model},max_model_len=1024", "--batch_size", "4",
         "--tasks", "coevolve_count", "--include_path", str(tasks),
         "--output_path", str(tmp_path / "out"), "--log_samples"],
        check=False, cwd=tmp_path, env=env, capture_output=True, text=True,
        timeout=600)
    log = proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.returncode == 0, log
    results = list((tmp_path / "out").rglob("*_results.json"))
    assert len(results) == 1, log  # lmms-eval logs some errors and still exits 0
    [results] = results
    scores = json.loads(results.read_text())["results"]["coevolve_count"]
    assert 0.0 <= scores["exact_match,none"] <= 1.0
    [samples] = list((tmp_path / "out").rglob("*_samples_coevolve_count.jsonl"))
    logged = [json.loads(line) for line in samples.read_text().splitlines()]
    assert len(logged) == 6

    from pipelines.cli import main

    assert main(["eval", str(model), "--tasks", "lmms:coevolve_count", "--lmms-include",
                 str(tasks), "--out", str(tmp_path / "ours")]) == 0
    ours = json.loads((tmp_path / "ours" / "lmms-coevolve_count-hf.json").read_text())
    def response(sample):
        text = sample["filtered_resps"]
        return text[0] if isinstance(text, list) else text

    by_doc = {s["doc_id"]: response(s) for s in ours["samples"]["coevolve_count"]}
    assert {s["doc_id"]: response(s) for s in logged} == by_doc
    [row] = report.load_summary(tmp_path / "ours")
    assert row["task"] == "lmms:coevolve_count" and row["items"] == 6
    assert row["accuracy"] == scores["exact_match,none"]


def test_a_warm_started_run_evaluates_the_warm_model_after_the_base(tmp_path):
    """model.warm_start: the run directory's target lists base, warm_start, then each
    finished iteration of the recipe's eval role."""
    from pipelines.config import dump_config, load_config
    from pipelines.eval.harness import resolve_target

    run = tmp_path / "run"
    cfg = load_config(None, ["model.warm_start.data=tests.user_recipe:warm_examples"])
    for folder in ("warm_start/hf", "iter_0001/policy/hf"):
        (run / folder).mkdir(parents=True)
        (run / folder / "config.json").write_text("{}")
    (run / "warm_start/DONE").write_text("key\n")
    (run / "iter_0001/policy/DONE").write_text("ok\n")
    (run / "config.yaml").write_text(dump_config(cfg))
    (run / "state.json").write_text('{"roles": {}, "base": "warm_start/hf"}')
    target = resolve_target(str(run))
    assert [(m.label, m.path, m.iteration) for m in target.models] == [
        ("base", "tiny://qwen2.5-vl", 0), ("warm_start", str(run / "warm_start/hf"), 0),
        ("iter_0001", str(run / "iter_0001/policy/hf"), 1)]


def test_the_lmms_plugin_keeps_blank_lines_and_accepts_lmms_evals_own_model_args():
    """A task without ``until`` gets lmms-eval's default stop ``["\\n\\n"]``, which would end
    a chain-of-thought answer at its first blank line: the plugin drops that one stop
    string (as lmms-eval's Qwen-VL models do) and keeps the task's others; ``device`` and
    ``max_batch_size``, which lmms-eval's command line passes to every model, are
    accepted."""
    pytest.importorskip("lmms_eval")
    import types

    from pipelines.eval.lmms_model import CoevolveLMM

    model = CoevolveLMM.on_pool(pool=None)
    model.task_dict = {"t": {"test": {0: {"question": "q"}}}}

    def stops(gen_kwargs):
        instance = types.SimpleNamespace(args=("Think, then answer.", gen_kwargs, None, 0,
                                               "t", "test"))
        return model._request(instance).sampling.stop

    assert stops({"until": ["\n\n"], "max_new_tokens": 64}) == []
    assert stops({"until": "\n\n"}) == []
    assert stops({"until": ["\n\n", "</answer>"]}) == ["</answer>"]
    assert stops({}) == []
    with pytest.raises(ValueError, match=r"unknown model_args \['flavour'\]"):
        CoevolveLMM(pretrained="tiny://qwen2.5-vl", device="cpu", max_batch_size=8,
                    flavour="x")


def test_the_markdown_table_puts_the_papers_numbers_beside_a_runs_own(tmp_path):
    """An EvoLMM run on the paper's base model: the table shows base and every iteration
    in percent, and the paper's base and trained numbers beside them; another base
    model, or a recipe without published numbers, gets no paper columns."""
    rows = [{"task": "mathvista", "model": "base", "iteration": 0, "accuracy": 0.5},
            {"task": "mathvista", "model": "iter_0001", "iteration": 1, "accuracy": 0.625},
            {"task": "smoke", "model": "base", "iteration": 0, "accuracy": 0.25}]
    paper = report.published("evolmm", "Qwen/Qwen2.5-VL-7B-Instruct")
    assert report.markdown(rows, paper).splitlines()[:4] == [
        "| task | base | iter_0001 | paper: base | paper: trained |",
        "| --- | --- | --- | --- | --- |",
        "| mathvista | 50.0 | 62.5 | 68.46 | 70.52 |",
        "| smoke | 25.0 | - | - | - |"]
    assert report.published("evolmm", "tiny://qwen2.5-vl") is None
    assert report.published("mmzero", "Qwen/Qwen2.5-VL-7B-Instruct") is None
    assert report.markdown(rows).splitlines()[0] == "| task | base | iter_0001 |"
    assert report.plot(rows, tmp_path / "c.png", paper).is_file()
