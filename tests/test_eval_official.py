"""Each benchmark's official scoring (pipelines/eval/official.py) on its schema fixture's
items (tests/eval_fixtures.py), read through the code path of real data, with
hand-written responses and the values the official code gives them; the summary
figures (HallusionBench's aAcc/fAcc/qAcc) by hand; the parsers never raise on
arbitrary text."""

from __future__ import annotations

import json
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from actors.generator import Completion
from pipelines.algorithms.grading import Grader
from pipelines.eval import official
from pipelines.eval.data import Item
from pipelines.eval.runner import Model, evaluate_model
from pipelines.eval.tasks import BUILTIN


@pytest.fixture(scope="module")
def grader():
    g = Grader()
    yield g
    g.close()


@pytest.fixture(scope="module")
def items(tmp_path_factory):
    """Official task name -> {item id: item}, loaded from the fixtures."""
    pytest.importorskip("datasets")
    from eval_fixtures import write_repos

    root = write_repos(tmp_path_factory.mktemp("official-data"))
    return {name: {i.id: i for i in BUILTIN[name].load(root)}
            for name in ("chartqa", "mathvista", "mathvision", "mathverse", "mmmu", "mmmu_pro",
                         "hallusionbench", "visnumbench", "mmsi")}


def scored(name, item, response, grader):
    return BUILTIN[name].correct(item, response, grader)


def test_chartqa_relaxed_accuracy_is_relative_to_the_target():
    # |14.7 - 14| / 14 = 0.05 exactly: in; 14.71: out
    assert official.relaxed_correctness("14", "14.7")
    assert not official.relaxed_correctness("14", "14.71")
    # relative to the target, not the larger value: 95 vs 100 is 5.26% off 95
    assert official.relaxed_correctness("100", "95")
    assert not official.relaxed_correctness("95", "100")
    # a trailing % divides by 100 on its side only
    assert not official.relaxed_correctness("50", "50%")
    assert official.relaxed_correctness("50%", "0.5")
    # no number (or a target of 0): case-insensitive exact match
    assert official.relaxed_correctness("Yes", "yes")
    assert not official.relaxed_correctness("0", "0.0")
    assert not official.relaxed_correctness("14", "14 items")


def test_chartqa_official_task(items, grader):
    chart = items["chartqa"]
    assert scored("chartqa", chart["0"], "14", grader) == ("14", True)
    assert scored("chartqa", chart["0"], "14 items", grader)[1] is False
    assert scored("chartqa", chart["1"], "0.59", grader)[1] is True  # 3.5% off 0.57
    assert scored("chartqa", chart["2"], "50%", grader)[1] is True
    assert scored("chartqa", chart["2"], "50", grader)[1] is False  # 50 vs 0.5
    # the seed-protocol relaxed task (evolmm_chartqa) reads the boxed answer the same way
    assert BUILTIN["evolmm_chartqa"].correct(chart["1"], "\\boxed{0.55}", grader)[1] is True
    assert BUILTIN["evolmm_chartqa"].correct(chart["1"], "\\boxed{0.54}", grader)[1] is False


def test_mathvista_normalises_by_answer_type_as_the_official_code(items, grader):
    vista = items["mathvista"]
    # float, precision 1: rounded before the exact compare ("1.53" -> "1.5" ... vs "1.2")
    assert scored("mathvista", vista["1"], "\\boxed{1.24}", grader) == ("1.2", True)
    assert scored("mathvista", vista["1"], "\\boxed{1.26}", grader) == ("1.3", False)
    assert scored("mathvista", vista["1"], "1.2", grader) == ("1.2", True)  # the whole reply
    # integer: truncated, not rounded
    assert scored("mathvista", vista["2"], "\\boxed{1000.9}", grader) == ("1000", True)
    assert scored("mathvista", vista["2"], "\\boxed{999.9}", grader) == ("999", False)
    # multiple choice: a letter or "(A)" is the option's text; free text the nearest option
    assert scored("mathvista", vista["5"], "\\boxed{A}", grader) == ("97", True)
    assert scored("mathvista", vista["5"], "so the answer is (B)", grader) == ("102", False)
    assert scored("mathvista", vista["5"], "\\boxed{97 degrees}", grader) == ("97", True)
    assert scored("mathvista", vista["5"], "\\boxed{107}", grader) == ("107", False)
    assert official.levenshtein("kitten", "sitting") == 3
    assert official.levenshtein("97 degrees", "97") == 8


def test_mmmu_parses_choices_and_open_answers_as_the_official_code(items, grader):
    mmmu = items["mmmu"]
    first, open_, art = (mmmu["validation_Accounting_1"], mmmu["validation_Accounting_2"],
                         mmmu["validation_Art_1"])
    assert scored("mmmu", first, "The answer is (B).", grader) == ("B", True)
    assert scored("mmmu", first, "I would pick B here", grader) == ("B", True)
    assert scored("mmmu", first, "(A) is wrong, so (C) then", grader) == ("C", False)  # last
    # more than 5 words and no letter: the option's text
    assert scored("mmmu", first, "the missing amount must be $77,490 in total",
                  grader) == ("D", False)
    # nothing to read: a random letter, the same every time for the item
    picks = {scored("mmmu", art, "no idea", grader)[0] for _ in range(3)}
    assert len(picks) == 1 and picks <= {"A", "B"}
    # open: the tail after an indicator and every number, numbers rounded to 2 places
    assert official.mmmu_open("So the ratio is 1.06.") == [1.06]  # "1.06" and its number
    assert scored("mmmu", open_, "So the ratio is 1.060.", grader)[1] is True
    assert scored("mmmu", open_, "Therefore it is about 1.1", grader)[1] is False
    assert official.mmmu_open_correct("['1.06', '1.1']", [1.1])


def test_mmmu_pro_reads_the_letter_after_answer_first(items, grader):
    [item] = items["mmmu_pro"].values()
    assert scored("mmmu_pro", item, "Thinking... (A) looks tempting.\nAnswer: B", grader) == \
        ("B", True)
    # two letters after "Answer:": the MMMU parser decides ((A) in brackets)
    assert scored("mmmu_pro", item, "Answer: (A) or B", grader) == ("A", False)


def test_hallusionbench_yes_no_and_its_three_accuracies(items, tmp_path):
    """Two figures of one set asking the same question (same: Yes; edited: No). Both
    right: aAcc = fAcc = qAcc = 1. The edited figure's answer wrong: aAcc 1/2, fAcc 1/2
    (one of two figures all right), qAcc 0 (the question pair is broken)."""
    hb = items["hallusionbench"]
    same, edited = hb["VD_illusion_0_0_0"], hb["VD_illusion_0_1_0"]
    assert BUILTIN["hallusionbench"].correct(same, "Yes, they are.", None) == ("Yes", True)
    assert BUILTIN["hallusionbench"].correct(edited, "\\boxed{No}", None) == ("No", True)

    class Pool:
        def __init__(self, replies):
            self.replies = replies

        def generate(self, requests):
            return [[Completion(self.replies.pop(0), [1], [2], [-0.1], "stop", 0)]
                    for _ in requests]

    task = BUILTIN["hallusionbench"]
    for replies, figures in ((["Yes", "No"], (1.0, 1.0, 1.0)), (["Yes", "Yes"], (0.5, 0.5, 0.0))):
        out = tmp_path / "-".join(replies)
        [row] = evaluate_model(Pool(list(replies)), Model(label="m", path="x"), [task], out,
                               items={task.name: [same, edited]})
        assert (row["aAcc"], row["fAcc"], row["qAcc"]) == figures


def test_visnumbench_mmsi_and_mathvision(items, grader):
    visnum = items["visnumbench"]
    assert scored("visnumbench", visnum["Synthetic/25_Scale"], "\\boxed{(c) 0.76}", grader) == \
        ("C", True)
    assert scored("visnumbench", visnum["Synthetic/25_Scale"], "\\boxed{C}", grader) == ("C", True)
    assert scored("visnumbench", visnum["Synthetic/17_Scale"], "I'd say (c)", grader) == \
        ("C", False)
    [mmsi] = items["mmsi"].values()
    assert scored("mmsi", mmsi, "It is on the right: `B`", grader) == ("B", True)
    assert scored("mmsi", mmsi, "``A``", grader) == ("A", False)
    assert scored("mmsi", mmsi, "B is right", grader) == (None, False)  # official: a word follows
    vision = items["mathvision"]
    assert scored("mathvision", vision["4"], "so \\boxed{6}", grader)[1] is True
    assert scored("mathvision", vision["39"], "\\boxed{A}", grader)[1] is True
    assert scored("mathvision", vision["39"], "\\boxed{red}", grader)[1] is True  # option text
    assert scored("mathvision", vision["39"], "\\boxed{blue}", grader)[1] is False
    verse = items["mathverse"]
    assert scored("mathverse", verse["1"], "\\boxed{D}", grader)[1] is True


def test_seed_and_official_protocols_are_named_apart():
    """MM-Zero's own protocol (T 0.6, the last boxed answer, the rule grader) keeps the
    mmzero_ name; the official protocol is the benchmark's name."""
    for bench in ("chartqa", "mathvista", "mmmu", "hallusionbench"):
        seed, own = BUILTIN[f"mmzero_{bench}"], BUILTIN[bench]
        assert (seed.temperature, seed.metric, seed.answer) == (0.6, "exact", "boxed")
        assert (own.temperature, own.metric) == (0.0, bench)
        assert seed.layout == own.layout == bench


def test_every_builtin_prompt_renders_for_its_fixture_items(items):
    for name, by_id in items.items():
        for item in by_id.values():
            text = BUILTIN[name].prompt_text(item)
            assert "{" not in text.replace("\\boxed{}", "").replace("{}", ""), (name, text)
    vista = items["mathvista"]
    assert BUILTIN["mathvista"].prompt_text(vista["1"]).endswith(
        "Answer the question using a single floating-point number with one decimal place.")
    assert BUILTIN["mathvista"].prompt_text(vista["5"]) == (
        "Find $m\\angle H$\nA. 97\nB. 102\nC. 107\nD. 122\n"
        "Answer with the option's letter from the given choices directly.")


OFFICIAL_ITEMS = [
    Item(id="x", question="q", answer="B", choices=["a", "b", "c"],
         meta={"question_type": "multi_choice", "answer_type": "text", "precision": None}),
    Item(id="y", question="q", answer="1.5",
         meta={"question_type": "free_form", "answer_type": "float", "precision": 1}),
    Item(id="z", question="q", answer="2", meta={"question_type": "free_form",
                                                   "answer_type": "integer", "precision": None}),
]


@settings(max_examples=300, deadline=None, derandomize=True)
@given(st.text(max_size=400))
def test_fuzz_official_parsers_never_raise(text):
    for item in OFFICIAL_ITEMS:
        for rule in (official.mathvista, official.mmmu, official.mmmu_pro,
                     official.hallusionbench, official.mmsi, official.chartqa):
            rule(item, text)
        official.visnumbench(item, text)
    official.mmmu_open(text)
    official.mmmu_choice(text, {"A": "x", "B": text[:5]}, random.Random(0))


def test_mmvet_is_the_judges_graded_answer_and_needs_a_judge(tmp_path):
    """MM-Vet's official score: the judge completes the few-shot table with a 0-1 grade
    (<AND>: every element, <OR>: any); the task's accuracy is the mean grade. Without a
    judge the task is refused before anything runs."""
    from pipelines.eval.judge import MMVET_PROMPT, Judge, parse_score

    item = Item(id="v1_0", question="What is x in the equation?", answer="-1<AND>-5")
    sent = []

    class JudgePool:
        def generate(self, requests):
            sent.extend(r.messages[0]["content"][0]["text"] for r in requests)
            return [[Completion(reply, [1], [2], [-0.1], "stop", 0)]
                    for reply in ("0.5", "1.0 since both", "maybe")]

    class ModelPool:
        def generate(self, requests):
            return [[Completion(text, [1], [2], [-0.1], "stop", 0)]
                    for text in ("x = -1", "x = -1 or x = -5", "x = 2")]

    task = BUILTIN["mmvet"]
    items = [item, Item(id="v1_1", question=item.question, answer=item.answer),
             Item(id="v1_2", question=item.question, answer=item.answer)]
    with pytest.raises(ValueError, match="pass --judge"):
        evaluate_model(ModelPool(), Model(label="m", path="x"), [task], tmp_path,
                       items={"mmvet": items})
    [row] = evaluate_model(ModelPool(), Model(label="m", path="x"), [task], tmp_path,
                           items={"mmvet": items}, judge=Judge(JudgePool()))
    assert row["accuracy"] == pytest.approx((0.5 + 1.0 + 0.0) / 3)
    assert sent[0] == MMVET_PROMPT + "What is x in the equation? | -1 <AND> -5 | x = -1 | "
    assert (parse_score("0.7"), parse_score("1.5"), parse_score("correct")) == (0.7, None, None)


def _lmms_kwargs(task_dir: str, yaml_name: str) -> dict:
    """The default ``lmms_eval_specific_kwargs`` of one of lmms-eval's task files."""
    from pathlib import Path

    import lmms_eval.tasks
    import yaml

    path = Path(lmms_eval.tasks.__file__).parent / task_dir / yaml_name
    text = "\n".join(line for line in path.read_text().splitlines() if "!function" not in line)
    return yaml.safe_load(text)["lmms_eval_specific_kwargs"]["default"]


def test_lmms_evals_task_definitions_agree_on_the_fixture_rows(items):
    """lmms-eval 0.7.3's own task code over the same fixture rows: the same prompts
    (ChartQA, MMMU, MathVision, MMSI, HallusionBench) and, where lmms-eval scores by rule,
    the same scores. Where lmms-eval departs from the official code, the official wins
    and the test shows the case: its MMMU parser also takes a letter followed by a space
    inside a word ("RGB is ..." reads as B), its MMSI extractor ignores case."""
    pytest.importorskip("lmms_eval")
    from eval_fixtures import datasets_rows
    from lmms_eval.tasks.chartqa import utils as chartqa
    from lmms_eval.tasks.hallusion_bench import evaluate_hb
    from lmms_eval.tasks.hallusion_bench import utils as hallusion
    from lmms_eval.tasks.mathvision import utils as mathvision
    from lmms_eval.tasks.mmmu import utils as mmmu
    from lmms_eval.tasks.mmsi_bench import utils as mmsi

    rows = datasets_rows()
    kwargs = _lmms_kwargs("chartqa", "chartqa.yaml")
    for index, row in enumerate(rows["HuggingFaceM4/ChartQA"][None]["test"][1]):
        doc = {"question": row["query"], "answer": row["label"][0], "type": "human_test"}
        item = items["chartqa"][str(index)]
        assert BUILTIN["chartqa"].prompt_text(item) == chartqa.chartqa_doc_to_text(doc, kwargs)
        for reply in ("14", "0.59", "50%", "50", "fourteen", "14.7"):
            theirs = chartqa.chartqa_process_results(doc, [reply])["relaxed_overall"] == 1.0
            assert BUILTIN["chartqa"].correct(item, reply, None)[1] is theirs, (doc, reply)

    kwargs = _lmms_kwargs("mmmu", "mmmu_val.yaml")
    replies = {  # none leaves either parser to a random letter
        "validation_Accounting_1": ("The answer is (B).", "I pick C here",
                                    "(A) is wrong, so (D) then",
                                    "the missing amount must be $77,490 in total"),
        "validation_Accounting_2": ("So the ratio is 1.060.", "Therefore it is about 1.1",
                                    "1.06", "no idea"),
        "validation_Art_1": ("(A)", "B is older", "The answer is (B)."),
    }
    for config in ("Accounting", "Art"):
        for doc in rows["MMMU/MMMU"][config]["validation"][1]:
            item = items["mmmu"][doc["id"]]
            assert BUILTIN["mmmu"].prompt_text(item) == mmmu.mmmu_doc_to_text(doc, kwargs)
            for reply in replies[doc["id"]]:
                parsed = mmmu.mmmu_process_results(doc, [reply])["mmmu_acc"]
                _, metrics = mmmu.evaluate_mmmu([parsed])
                theirs = metrics["acc"] == 1.0
                assert BUILTIN["mmmu"].correct(item, reply, None)[1] is theirs, (doc["id"], reply)
    accounting = items["mmmu"]["validation_Accounting_1"]
    doc = rows["MMMU/MMMU"]["Accounting"]["validation"][1][0]
    assert mmmu.mmmu_process_results(doc, ["RGB is fine"])["mmmu_acc"]["parsed_pred"] == ["B"]
    # the official parser finds no letter there (" B " is not in it): a random one
    assert {official.mmmu_choice("RGB is fine", accounting.options, random.Random(seed))
            for seed in range(20)} == {"A", "B", "C", "D"}

    kwargs = _lmms_kwargs("mathvision", "mathvision_test.yaml")
    for doc in rows["MathLLMs/MathVision"][None]["test"][1]:
        item = items["mathvision"][doc["id"]]
        assert BUILTIN["mathvision"].prompt_text(item) == \
            mathvision.mathvision_doc_to_text(doc, kwargs)

    kwargs = _lmms_kwargs("mmsi_bench", "msr_bench.yaml")
    [doc] = rows["RunsenXu/MMSI-Bench"][None]["test"][1]
    [item] = items["mmsi"].values()
    assert BUILTIN["mmsi"].prompt_text(item) == mmsi.msr_doc_to_text(doc, kwargs)
    for reply in ("It is on the right: `B`", "``A``", "{B}", "B is right", "\\boxed{B}"):
        theirs = mmsi.msr_process_results(doc, [reply])["average"]["score"]
        assert BUILTIN["mmsi"].correct(item, reply, None)[1] is (theirs == 1.0), reply
    assert mmsi.msr_process_results(doc, ["`b`"])["average"]["score"] == 1.0  # case ignored
    assert BUILTIN["mmsi"].correct(item, "`b`", None)[1] is False  # the official regex: A-D

    docs = rows["lmms-lab/HallusionBench"][None]["image"][1]
    for doc in docs:
        item = items["hallusionbench"]["_".join(doc[k] for k in official_keys())]
        assert BUILTIN["hallusionbench"].prompt_text(item) == evaluate_hb.hb_doc_to_text(doc)
    # the three accuracies against lmms-eval's (the official code's) on the same verdicts
    for verdicts in (["1", "1"], ["1", "0"], ["0", "0"]):
        data = hallusion.assign_correctness(
            [{**doc, "verdict": v} for doc, v in zip(docs, verdicts)], "verdict")
        rows_ = [{"item_id": "_".join(d[k] for k in official_keys()), "sample": 0,
                  "correct": bool(d["correct"]),
                  "meta": json.dumps({k: d[k] for k in official_keys()})} for d in data]
        ours = official.hallusion_figures(rows_)
        fig, every, pair = (hallusion.get_eval_fig(data), hallusion.get_eval_all(data, "verdict"),
                            hallusion.get_eval_pair_all(data, "verdict"))
        assert ours == {"aAcc": every["correct"] / every["total"],
                        "fAcc": fig["correct"] / fig["total"],
                        "qAcc": pair["correct"] / pair["total"]}, verdicts


def official_keys():
    from pipelines.eval.benchmarks import HALLUSION_KEYS

    return HALLUSION_KEYS
