"""Hand-computed tests for pipelines/recipes/mmzero/rewards.py (CPU, no Ray, no model).

Every expected figure has its arithmetic next to it. Texts in the diversity
tests use disjoint vocabularies unless they are meant to be near-duplicates:
BLEU without a unigram match is exactly 0 (distance 1), so only the intended
pairs can cluster.
"""

import math

import numpy as np
import pytest
from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu

from pipelines.recipes.mmzero.rewards import (
    CONTENT_TYPES,
    SEED_TOPICS,
    Proposal,
    SampleJudgement,
    bleu_similarity,
    clamp_batch,
    cluster_shares,
    codegen_keep,
    codegen_reward,
    content_type_penalties,
    diversity_penalties,
    format_ok,
    infer_content_type,
    parse_proposal,
    proposer_reward,
    proposer_rewards,
    solver_keep,
    solver_reward,
)


def exact(a: str, b: str) -> bool:
    """A grader without the symbolic worker: case-insensitive string equality."""
    return a.strip().lower() == b.strip().lower()


def prop(caption: str, easy_q: str, hard_q: str, content_type: str = "other") -> Proposal:
    return Proposal(content_type=content_type, caption=caption, easy_question=easy_q,
                    easy_answer="1", hard_question=hard_q, hard_answer="2", type_inferred=False)


J = SampleJudgement

# ------------------------------------------------------------------ constants


def test_constants_follow_the_spec_order():
    assert CONTENT_TYPES == ("data_chart", "diagram", "geometry", "timeline", "map", "table",
                             "other")
    assert len(SEED_TOPICS) == 8
    assert SEED_TOPICS[0] == "chart and graph understanding"
    assert SEED_TOPICS[6] == "visual text recognition and OCR"
    assert SEED_TOPICS[7] == "basic shape and object perception"


# -------------------------------------------------------------------- parsing

FULL = """<content_type>table</content_type>
<caption>A table of three cities and their populations.</caption>
<easy_question>How many cities are listed?</easy_question>
<easy_answer>3</easy_answer>
<hard_question>What is the total population?</hard_question>
<hard_answer>4.5 million</hard_answer>"""


def test_parse_full_proposal():
    p = parse_proposal(FULL)
    assert p == Proposal(content_type="table",
                         caption="A table of three cities and their populations.",
                         easy_question="How many cities are listed?", easy_answer="3",
                         hard_question="What is the total population?",
                         hard_answer="4.5 million", type_inferred=False)


def test_parse_tolerates_whitespace_and_tag_case():
    text = ("noise <  CAPTION >\n  A pie chart \n</ caption >\n<Easy_Question> Q1 "
            "</EASY_QUESTION><easy_answer>\n5\n</easy_answer>< hard_question>Q2</hard_question >"
            "<hard_answer> 7 </ hard_answer> trailing")
    p = parse_proposal(text)
    assert (p.caption, p.easy_question, p.easy_answer, p.hard_question, p.hard_answer) == (
        "A pie chart", "Q1", "5", "Q2", "7")
    assert (p.content_type, p.type_inferred) == ("data_chart", True)  # "pie", "chart": 2 hits


def test_parse_uses_the_first_of_repeated_tags():
    text = FULL.replace("<easy_answer>3</easy_answer>",
                        "<easy_answer>3</easy_answer><easy_answer>4</easy_answer>")
    assert parse_proposal(text).easy_answer == "3"


@pytest.mark.parametrize("drop", ["caption", "easy_question", "easy_answer", "hard_question",
                                  "hard_answer"])
def test_parse_requires_every_field(drop):
    text = "\n".join(line for line in FULL.splitlines() if not line.startswith(f"<{drop}>"))
    assert parse_proposal(text) is None


def test_parse_rejects_blank_or_unclosed_fields_and_no_text():
    assert parse_proposal(FULL.replace("<easy_answer>3<", "<easy_answer>  \n <")) is None
    assert parse_proposal(FULL.replace("</hard_answer>", "")) is None
    assert parse_proposal("") is None
    assert parse_proposal(None) is None


def test_content_type_is_normalised_inferred_or_kept():
    # "Data Chart" -> "data_chart" is a valid declared type.
    p = parse_proposal(FULL.replace("<content_type>table", "<content_type> Data Chart "))
    assert (p.content_type, p.type_inferred) == ("data_chart", False)
    # Not a known type -> inferred from the caption ("table": 1 hit).
    p = parse_proposal(FULL.replace("<content_type>table", "<content_type>spreadsheet"))
    assert (p.content_type, p.type_inferred) == ("table", True)
    # Missing -> inferred.
    p = parse_proposal(FULL.replace("<content_type>table</content_type>", ""))
    assert (p.content_type, p.type_inferred) == ("table", True)
    # An explicit "other" stays, although the caption says "table".
    p = parse_proposal(FULL.replace("<content_type>table", "<content_type>other"))
    assert (p.content_type, p.type_inferred) == ("other", False)


@pytest.mark.parametrize("caption, expected", [
    ("A line chart of monthly sales", "data_chart"),  # line, chart
    ("A table with 3 rows and 4 columns", "table"),  # table, rows, columns
    ("A chronological timeline of five events", "timeline"),  # chronological, timeline
    ("A map of the countries in one region", "map"),  # map, countries, region
    ("Triangle ABC with the line AB and angle C of 30 degrees", "geometry"),  # 2 vs line: 1
    ("A flowchart whose nodes form a tree", "diagram"),  # flowchart, nodes, tree
    ("A pie next to a table", "data_chart"),  # 1 vs 1: the earlier type wins
    ("A puzzle of pieces and arrows", "other"),  # whole words: not "pie", not "rows"
    ("A cat on a mat", "other"),
])
def test_infer_content_type(caption, expected):
    assert infer_content_type(caption) == expected


# ------------------------------------------------------------ proposer: judge


def test_proposer_reward_averages_over_k_and_caps_solvability():
    judgements = [J(True, 0.8, 0.5), J(True, 0.3, 0.9), J(False), J(True, None, None)]
    out = proposer_reward(judgements, k=4)
    # (1/4) * [(min(0.8, .5) + min(.5, .5)) + (0.3 + min(.9, .1))] = (1.0 + 0.4) / 4
    assert out["judge"] == pytest.approx(0.35)
    # mean diff over judged samples = (0.5 + 0.1) / 2 = 0.3 >= 0.15
    assert out["low_difficulty_penalty"] == 0.0
    assert (out["n_rendered"], out["n_judged"], out["n_solver_failed"]) == (3.0, 2.0, 1.0)


def test_low_difficulty_penalty_applies_below_0_15():
    out = proposer_reward([J(True, 1.0, 1.0), J(True, 0.2, 0.9)], k=4)
    # judge = (0.5 + 0 + 0.2 + 0.1) / 4 = 0.2; mean diff = (0 + 0.1) / 2 = 0.05 < 0.15
    assert out["judge"] == pytest.approx(0.2)
    assert out["low_difficulty_penalty"] == -0.3


def test_low_difficulty_threshold_is_strict():
    out = proposer_reward([J(True, 0.0, 0.15)], k=4)
    # diff = min(0.15, 0.85) = 0.15, not < 0.15; judge = 0.15 / 4
    assert out["low_difficulty_penalty"] == 0.0
    assert out["judge"] == pytest.approx(0.0375)


def test_nothing_judged_gives_no_penalty():
    # No sample rendered, or every Solver call failed: judge 0, never negative.
    for judgements in ([], [J(False)] * 4, [J(True)] * 4):
        out = proposer_reward(judgements, k=4)
        assert (out["judge"], out["low_difficulty_penalty"]) == (0.0, 0.0)


def test_a_failed_hard_call_keeps_the_easy_term():
    out = proposer_reward([J(True, 0.6, None)], k=4)
    # only min(0.6, 0.5) = 0.5 counts: 0.5 / 4; no hard judgement -> no difficulty penalty
    assert out["judge"] == pytest.approx(0.125)
    assert out["low_difficulty_penalty"] == 0.0
    assert (out["n_solv"], out["n_judged"], out["n_solver_failed"]) == (1.0, 0.0, 1.0)


def test_judgement_validation():
    with pytest.raises(ValueError, match="k=2"):
        proposer_reward([J(False)] * 3, k=2)
    with pytest.raises(ValueError, match="did not render"):
        J(False, 0.5, 0.5)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        J(True, 1.5, 0.5)


# ------------------------------------------------------------ content types


def test_content_type_penalty_for_an_over_represented_type():
    out = content_type_penalties(["data_chart"] * 3 + ["table", None])
    # 4 valid, data_chart share 3/4: -0.15 * (0.75 - 0.5) / 0.5 = -0.075
    assert out == pytest.approx([-0.075] * 3 + [0.0, 0.0])
    out = content_type_penalties(["map"] * 4 + ["table"])
    # share 4/5 = 0.8: -0.15 * 0.3 / 0.5 = -0.09
    assert out == pytest.approx([-0.09] * 4 + [0.0])


def test_content_type_penalty_needs_two_types_and_share_above_half():
    assert content_type_penalties(["map"] * 5) == [0.0] * 5  # one type: no signal
    assert content_type_penalties(["map", "map", "table", "table"]) == [0.0] * 4  # f = 0.5
    with pytest.raises(ValueError, match="unknown content types"):
        content_type_penalties(["map", "bar_chart"])


# ------------------------------------------------------------------ diversity


def test_bleu_similarity_is_symmetrised_by_hand():
    # hyp "a b c d e" vs ref "a b c d": p = 4/5, 3/4, 2/3, 1/2, BP 1 -> (1/5)^(1/4) = 0.668740
    # hyp "a b c d" vs ref "a b c d e": p all 1, BP = exp(1 - 5/4) = e^-0.25 = 0.778801
    expected = (0.2 ** 0.25 + math.exp(-0.25)) / 2  # = 0.723770
    assert bleu_similarity("a b c d", "a b c d e") == pytest.approx(expected)
    assert bleu_similarity("a b c d e", "a b c d") == pytest.approx(expected)
    assert expected == pytest.approx(0.723770, abs=1e-6)


def test_bleu_similarity_lowercases_and_scores_exact_duplicates_1():
    assert bleu_similarity("A B C D", "a  b\nc d") == 1.0
    assert bleu_similarity("one two", "three four") == 0.0  # no unigram match
    # Raw nltk on an identical 3-token text: p4 = (0 + 0.1) / 1 -> 0.1^(1/4) = 0.562341
    smooth = SmoothingFunction().method1
    tokens = ["how", "many", "bars"]
    raw = sentence_bleu([tokens], tokens, smoothing_function=smooth)
    assert raw == pytest.approx(0.562341, abs=1e-6)
    assert bleu_similarity("how many bars", "How many bars") == 1.0  # ours: a duplicate


def test_bleu_needs_no_nltk_data_and_downloads_nothing(monkeypatch):
    import nltk

    monkeypatch.setattr(nltk.data, "path", [])  # no corpus can be found
    monkeypatch.setattr(nltk, "download", lambda *a, **k: pytest.fail("nltk.download called"))
    # hyp "a b c d e" vs ref "a b c d": see the hand computation above
    assert bleu_similarity("a b c d", "a b c d e") == pytest.approx(0.723770, abs=1e-6)


def test_cluster_shares_average_linkage_and_strict_threshold():
    # d(A,B)=0.1 merges first; then d({A,B},C) = (0.4 + 0.2) / 2 = 0.3 >= 0.25: C stays alone
    # (single linkage would merge at 0.2). D is far from all.
    d = np.array([[0.0, 0.1, 0.4, 1.0],
                  [0.1, 0.0, 0.2, 1.0],
                  [0.4, 0.2, 0.0, 1.0],
                  [1.0, 1.0, 1.0, 0.0]])
    assert cluster_shares(d, 0.25) == [0.5, 0.5, 0.25, 0.25]
    # with threshold 0.35 the average 0.3 merges: {A,B,C} = 3/4
    assert cluster_shares(d, 0.35) == [0.75, 0.75, 0.75, 0.25]
    # exactly at the threshold: not merged (sklearn's rule); just below: merged
    at = np.array([[0.0, 0.25], [0.25, 0.0]])
    assert cluster_shares(at, 0.25) == [0.5, 0.5]
    assert cluster_shares(at * 0.999, 0.25) == [1.0, 1.0]
    assert cluster_shares(np.zeros((1, 1)), 0.25) == [1.0]


def test_diversity_penalty_hand_computed_with_clip():
    hard = "alpha bravo charlie delta echo"
    props = [
        prop("red green blue cyan", "q1 one", hard),
        None,
        prop("red green blue cyan", "q2 two", hard),
        prop("north south east west", "q3 three", hard),
        prop("pear plum fig lime", "q4 four", "zulu yankee xray whiskey"),
    ]
    out = diversity_penalties(props)
    # n_valid = 4, 1/n = 0.25. P0, P2: caption share 2/4, easy 1/4, hard 3/4:
    #   sum = 0.45*0.25 + 0.20*0 + 0.35*0.5 = 0.2875; pen = 0.5*4*0.2875 = 0.575 -> clip 0.5
    # P3: caption 1/4, easy 1/4, hard 3/4: sum = 0.35*0.5 = 0.175; pen = 2*0.175 = 0.35
    # P4: all unique: pen = 0
    assert out == pytest.approx([-0.5, 0.0, -0.5, -0.35, 0.0])


def test_diversity_penalty_caption_only_without_clip():
    props = [prop("one two three four five six seven eight", "a", "k"),
             prop("one two three four five six seven eight nine", "b", "l"),
             prop("red green", "c", "m"), prop("blue cyan", "d", "n")]
    # captions 0/1: hyp 9 vs ref 8: (8/9 * 7/8 * 6/7 * 5/6)^(1/4) = (5/9)^(1/4) = 0.863340;
    # hyp 8 vs ref 9: e^(1 - 9/8) = 0.882497; distance = 1 - 0.872918 = 0.127 < 0.25
    # P0, P1: 0.5 * 4 * 0.45 * (2/4 - 1/4) = 0.225
    assert diversity_penalties(props) == pytest.approx([-0.225, -0.225, 0.0, 0.0])


def test_diversity_threshold_decides_a_pair_at_distance_0_276():
    # distance("a b c d", "a b c d e") = 1 - 0.723770 = 0.276230
    props = [prop("a b c d", "x", "y"), prop("a b c d e", "u", "v")]
    assert diversity_penalties(props) == [0.0, 0.0]  # 0.276 >= 0.25: two clusters
    # threshold 0.3: merged; n = 2: pen = 0.5 * 2 * 0.45 * (1 - 1/2) = 0.225
    assert diversity_penalties(props, threshold=0.3) == pytest.approx([-0.225, -0.225])


def test_diversity_identical_pair_and_degenerate_batches():
    twin = prop("same caption words here", "same easy", "same hard")
    # n = 2, every share 1: pen = 0.5 * 2 * (0.45 + 0.20 + 0.35) * (1 - 1/2) = 0.5
    assert diversity_penalties([twin, twin]) == pytest.approx([-0.5, -0.5])
    assert diversity_penalties([None, twin, None]) == [0.0, 0.0, 0.0]  # n_valid = 1
    assert diversity_penalties([None, None]) == [0.0, 0.0]
    assert diversity_penalties([]) == []


# ------------------------------------------------------------ proposer: total


def test_proposer_rewards_sum_components_and_log_them():
    twin = prop("alpha bravo charlie delta", "echo foxtrot", "golf hotel", "data_chart")
    props = [twin, twin,
             prop("india juliet kilo lima", "mike november", "oscar papa", "data_chart"),
             prop("quebec romeo sierra tango", "uniform victor", "whiskey xray", "table"),
             None]
    judgements = [[J(True, 1.0, 0.5)], [], [J(True, 0.4, 1.0)], [J(True, 0.5, 0.25)] * 4,
                  [J(True, 1.0, 0.5)]]  # ignored: unparsable
    rewards, metrics = proposer_rewards(props, judgements, k=4)
    # content type: data_chart share 3/4 -> -0.075 for P0..P2
    # diversity: P0, P1 identical in all fields: 0.5 * 4 * 1.0 * (2/4 - 1/4) = 0.5 -> -0.5
    # P0: judge (0.5 + 0.5) / 4 = 0.25 -> 0.25 - 0.075 - 0.5 = -0.325
    # P1: judge 0, no judged sample -> 0 - 0.075 - 0.5 = -0.575
    # P2: judge (0.4 + 0) / 4 = 0.1, mean diff 0 < 0.15 -> 0.1 - 0.3 - 0.075 = -0.275
    # P3: judge 4 * (0.5 + 0.25) / 4 = 0.75
    assert rewards == pytest.approx([-0.325, -0.575, -0.275, 0.75, -1.0])
    assert metrics == pytest.approx({
        "judge_mean": (0.25 + 0 + 0.1 + 0.75) / 4,  # 0.275
        "low_difficulty_penalty_mean": -0.3 / 4,  # -0.075
        "content_type_penalty_mean": -0.225 / 4,  # 3 * -0.075 / 4
        "diversity_penalty_mean": -1.0 / 4,
        "parse_rate": 4 / 5,
        "type_inferred_frac": 0.0,
        "low_difficulty_frac": 1 / 4,
        "render_rate": 6 / 16,  # (1 + 0 + 1 + 4) rendered / (k=4 * 4 parsed)
        "solvability_mean": (1.0 + 0.4 + 4 * 0.5) / 6,  # 3.4 / 6 over samples with solv
        "difficulty_mean": (0.5 + 0.0 + 4 * 0.25) / 6,  # 1.5 / 6
        "solver_failures": 0.0,
    })


def test_proposer_rewards_all_unparsable_and_length_check():
    rewards, metrics = proposer_rewards([None, None], [[], []], k=4)
    assert rewards == [-1.0, -1.0]
    assert (metrics["parse_rate"], metrics["judge_mean"], metrics["render_rate"]) == (0, 0, 0)
    with pytest.raises(ValueError, match="judgement lists"):
        proposer_rewards([None], [], k=4)


# -------------------------------------------------------------------- codegen

SVG = '<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 10 10"><rect/></svg>'


def test_codegen_reward_not_rendered():
    assert codegen_reward(SVG, False, None, None) == pytest.approx(-0.1)  # -(0.1)
    assert codegen_reward("print('hi')", False, None, None) == -0.5  # -(0.1 + 0.5) -> floor
    assert codegen_reward("", False, None, None) == -0.5  # -(0.1 + 0.05 + 0.5) = -0.65 -> floor
    assert codegen_reward(None, False, None, None) == -0.5
    assert codegen_reward("  \n", False, None, None) == -0.5


def test_codegen_reward_rendered_is_uncapped():
    assert codegen_reward(SVG, True, 0.75, 0.5) == pytest.approx(2.25)  # 1 + 0.75 + 0.5
    assert codegen_reward(SVG, True, 1.0, 0.8) == pytest.approx(2.2)  # 1 + 1 + min(.8, .2)
    assert codegen_reward(SVG, True, None, None) == 1.0  # failed Solver calls count 0
    assert codegen_reward(SVG, True, 0.25, None) == pytest.approx(1.25)
    with pytest.raises(ValueError, match="solv"):
        codegen_reward(SVG, True, 1.2, 0.5)


# --------------------------------------------------------------------- solver


@pytest.mark.parametrize("response, ok", [
    ("<think>x = 2 + 2</think>\\boxed{4}", True),
    ("  \n<think>\nsteps\n</think>\n\n\\boxed{4}\n ", True),
    ("<think></think>\\boxed{\\frac{1}{2}}", True),  # nested braces
    ("<think>a</think>\\boxed{4} done", False),  # text after the box
    ("Sure. <think>a</think>\\boxed{4}", False),  # text before think
    ("<think>a</think>so \\boxed{4}", False),  # text between
    ("<think>a</think>\\boxed{\\frac{1}{2}", False),  # unbalanced
    ("<think>a</think>\\boxed{1}\\boxed{2}", False),  # two boxes
    ("<think>a</think>\\boxed{ }", False),  # empty box
    ("<think>a</think><think>b</think>\\boxed{4}", False),  # two think blocks
    ("<think>a</think> x </think>\\boxed{4}", False),
    ("<think>a</think>\\boxed{4</think>}", False),  # one think block, closed once
    ("<think>a <think> b</think>\\boxed{4}", False),
    ("\\boxed{4}", False),  # no think
    ("<think>a</think><answer>4</answer>", False),
    ("", False),
])
def test_format_ok(response, ok):
    assert format_ok(response) is ok


def test_solver_reward_combines_answer_and_format():
    good = "<think>count the bars</think>\\boxed{4}"
    assert solver_reward(good, "4", grader=exact) == pytest.approx(1.0)  # 0.9 * 1 + 0.1 * 1
    assert solver_reward(good, "5", grader=exact) == pytest.approx(0.1)  # 0.9 * 0 + 0.1 * 1
    # correct but not in format: answer from <answer>: 0.9 * 1 + 0.1 * 0
    assert solver_reward("It is <answer>4</answer>", "4", grader=exact) == pytest.approx(0.9)
    assert solver_reward("no answer at all", "4", grader=exact) == 0.0
    assert solver_reward(None, "4", grader=exact) == 0.0
    # the last box is the answer; the box inside think does not count
    inner = "<think>maybe \\boxed{3}</think>\\boxed{4}"
    assert solver_reward(inner, "3", grader=exact) == pytest.approx(0.1)
    assert solver_reward(inner, "4", grader=exact) == pytest.approx(1.0)


def test_solver_reward_uses_the_project_grader_by_default():
    # numeric equality of the default `grade`: "0.50" == "1/2", no symbolic worker needed
    assert solver_reward("<think>t</think>\\boxed{0.50}", "1/2") == pytest.approx(1.0)
    assert solver_reward("<think>t</think>\\boxed{0.6}", "1/2") == pytest.approx(0.1)
    with pytest.raises(ValueError, match="pseudo_label"):
        solver_reward("<think>t</think>\\boxed{4}", "n/a")


# -------------------------------------------------------------------- filters


@pytest.mark.parametrize("rate, keep", [(0.0, False), (0.2499, False), (0.25, True), (0.5, True),
                                        (0.75, True), (0.7501, False), (1.0, False)])
def test_codegen_keep_bounds_are_inclusive(rate, keep):
    assert codegen_keep(rate) is keep


def test_codegen_keep_rejects_a_rate_outside_0_1():
    with pytest.raises(ValueError, match="render_rate"):
        codegen_keep(1.5)


@pytest.mark.parametrize("easy, hard, image_ok, label, keep", [
    (0.5, 0.25, True, "4", True),  # every bound inclusive
    (1.0, 0.75, True, "red", True),
    (0.4, 0.5, True, "4", False),  # easy < 0.5
    (0.9, 0.2, True, "4", False),  # hard < 0.25 (the Solver is lost)
    (0.9, 0.8, True, "4", False),  # hard > 0.75 (too easy)
    (0.9, 0.5, False, "4", False),  # no valid image
    (0.9, 0.5, True, None, False),  # no pseudo-label
    (0.9, 0.5, True, " N/A ", False),  # invalid pseudo-label
])
def test_solver_keep(easy, hard, image_ok, label, keep):
    assert solver_keep(easy, hard, image_ok, label) is keep


# ------------------------------------------------------------------ batch size


@pytest.mark.parametrize("batch, available, expected", [
    (64, 100, 64),  # enough data: unchanged
    (64, 64, 64),
    (64, 40, 32),  # largest power of two <= 40
    (64, 63, 32),
    (64, 16, 16),
    (64, 10, 16),  # 8 < floor 16 -> 16, items cycle
    (18, 17, 16),  # Proposer batch 18: 16
    (4, 3, 4),  # power 2 < min(16, 4) = 4 -> 4 = batch, items cycle
    (20, 1, 16),  # power 1 -> 16
])
def test_clamp_batch(batch, available, expected):
    size, message = clamp_batch(batch, available)
    assert size == expected
    assert (message is None) == (available >= batch)
    if message is not None:
        assert f"clamped to {expected}" in message
        assert ("repeat" in message) == (expected > available)


def test_clamp_batch_rejects_an_empty_data_set():
    with pytest.raises(ValueError, match="empty"):
        clamp_batch(64, 0)
    with pytest.raises(ValueError, match="batch"):
        clamp_batch(0, 10)
