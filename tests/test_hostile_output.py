"""Model output is hostile input: hedged answers never grade as correct, the parsers
give the documented results on degenerate text (their times are measured in
benchmarks/hostile.py, not asserted here), a batch's symbolic checks stay within
their budget, and a property-based fuzz tier (hypothesis, derandomized) finds no
exception escaping a parser or the grader.
"""

from __future__ import annotations

import re
import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from actors.svg_checks import extract_svg
from pipelines.algorithms.answers import (
    MAX_ANSWER_CHARS,
    extract_answer,
    extract_boxed,
    extract_tag,
    normalize,
    tag_blocks,
)
from pipelines.algorithms.grading import (
    Grader,
    agreement,
    grade,
    majority,
)
from pipelines.recipes.evolmm.rewards import evolmm_normalize
from pipelines.recipes.mmzero.rewards import format_ok, parse_proposal, solver_reward

# ------------------------------------------------------------------ hedges

HEDGES = [  # (class, prediction, reference): none of them may grade as correct
    ("junk before the value", "@#$ 5", "5"),
    ("junk before the value", "?? 5", "5"),
    ("junk before the value", "&5", "5"),
    ("junk after the value", "5 @@", "5"),
    ("junk around a fraction", r"#\frac{1}{2}#", "0.5"),
    ("two values, last right", "3 5", "5"),
    ("two values, last right", "3, 5", "5"),
    ("two values, last right", "3; 5", "5"),
    ("two values, last right", r"3 \quad 5", "5"),
    ("two values, last right", r"3 \\ 5", "5"),
    ("connective", "3 or 5", "5"),
    ("connective", "5 or 3", "5"),
    ("connective", r"3 \text{ or } 5", "5"),
    ("connective", r"3 \lor 5", "5"),
    ("connective", r"3 \vee 5", "5"),
    ("connective", "3 and 5", "5"),
    ("connective", "x = 3 or x = 5", "5"),
    ("several equations", "x = 3, x = 5", "5"),
    ("several equations", "x = 3 = 5", "5"),
    ("option list", "a) 3 b) 5", "5"),
    ("option list", "(a) 3 (b) 5", "5"),
    ("unbalanced", "(5", "5"),
    ("unbalanced", "5]", "5"),
    ("set of candidates", r"\{3, 5\}", "5"),
    ("two boxes, last right", r"\boxed{3} \boxed{5}", "5"),
]

# Legitimate answers of the same shapes that must stay correct.
STILL_RIGHT = [
    ("5.", "5"), (r"\$5", "5"), ("x = 5", "5"), ("=5", "5"), ("((5))", "5"), ("|5|", "5"),
    ("[5]", "5"), (r"\frac{10}{2}", "5"), ("2+3", "5"), ("5, 5", "5, 5"), ("(3, 5)", "(3,5)"),
    ("[0,1)", r"\left[0, 1\right)"), (r"\{1,2\}", r"\{2,1\}"), ("x^2+2x+1", "(x+1)^2"),
    (r"\sqrt{2}", "2^{1/2}"), ("5 cm", "5"), ("The answer is 5.", "5"), (r"\text{5}", "5"),
]


@pytest.mark.parametrize("kind, pred, ref", HEDGES, ids=[f"{k}: {p[:20]}" for k, p, _ in HEDGES])
def test_hedged_answers_do_not_grade_as_correct(kind, pred, ref):
    assert grade(pred, ref) is False
    assert agreement([pred] * 4, ref) == 0.0  # and earn no MM-Zero solvability either


@pytest.mark.parametrize("pred, ref", STILL_RIGHT)
def test_the_same_shapes_written_plainly_still_grade(pred, ref):
    assert grade(pred, ref) is True


def test_hedges_earn_no_solver_reward():
    # 0.1 for the format only: the boxed hedge is not the pseudo-label.
    assert solver_reward(r"<think>t</think>\boxed{@#$ 5}", "5") == pytest.approx(0.1)
    assert solver_reward(r"<think>t</think>\boxed{3 \lor 5}", "5") == pytest.approx(0.1)
    assert solver_reward(r"<think>t</think>\boxed{5}", "5") == pytest.approx(1.0)


def test_too_long_answers_are_counted():
    g = Grader()
    assert g.grade("5" * (MAX_ANSWER_CHARS + 1), "5") is False
    assert g.stats()["too_long"] == 1 and g.stats()["worker_starts"] == 0
    g.close()


# ------------------------------------------------- parsers on degenerate text

N = 20_000  # large enough that a quadratic parser would be obvious in the suite's time


def test_tag_blocks_match_the_lazy_pattern_on_degenerate_text():
    assert extract_tag("<answer>" * N, "answer") is None
    assert extract_tag("<answer>" * N + "x</answer>", "answer") == ("<answer>" * (N - 1) + "x")
    text = "<answer>a</answer>" + "</answer>" * 3 + "<ANSWER > b < /answer>" + "<answer>" * N
    assert [text[a:b] for a, b in tag_blocks(text, "answer")] == ["a", " b "]
    assert extract_tag(text, "answer") == "b"


def test_parsers_on_repeated_openers():
    assert extract_boxed("\\boxed{" * N) is None
    assert extract_boxed("\\boxed{" + "{" * N) is None
    assert extract_answer("<answer>" * N) is None
    assert parse_proposal("<caption>" * N) is None
    assert extract_svg("<svg " * N) is None
    assert extract_svg("```" * N) is None
    # "<svg <svg ... >" is one opening tag whose attribute text holds the other openers
    # (as the documented pattern `<svg[^>]*>` reads it), so the whole text is the SVG.
    spam = "<svg " * N + '<svg width="1"></svg>'
    assert extract_svg(spam) == spam
    assert extract_svg("x" + "</svg>" * N + '<svg width="1"/>') == '<svg width="1"/>'
    assert not format_ok("<think>" * N)


def test_normalize_unwraps_thousands_of_nested_wrappers():
    assert normalize("\\text{" * N + "5" + "}" * N) == "5"
    assert normalize("\\text{" * N) == ""
    assert normalize(r"\textbf{\text{5} cm}") == "5 cm"
    assert normalize(r"\text{a \{ b}") == r"a \{b"  # escaped braces are not groups


def test_numbers_with_long_digit_runs():
    assert grade("1" * 1500, "1" * 1500) is True  # string step
    assert grade("1" * 1500 + "x", "5") is False
    assert grade("1" * 700 + "." + "1" * 700 + "x", "5") is False


# --------------------------------------------------------------- the budget


def _slow(pred: str, ref: str) -> bool:
    """Runs in the worker (imported by name): every check hangs."""
    time.sleep(60)
    return True


def test_a_batch_spends_at_most_its_budget():
    g = Grader(timeout_s=30.0, symbolic_fn=_slow)
    try:
        start = time.monotonic()
        with g.budget(2.0) as block:
            verdicts = [g.grade(f"x+{i}", f"{i}+x") for i in range(3)]
            # another thread's check counts in the grader's totals, not in this block's
            other = threading.Thread(target=g.grade, args=("x+9", "9+x"), kwargs={"timeout": 0.5})
            other.start()
            other.join()
        elapsed = time.monotonic() - start
        stats = g.stats()
        # The first check ran out of the budget (killed at 2 s, not at its 30 s limit);
        # the other two were never started.
        assert verdicts == [False] * 3
        assert (stats["symbolic_timeouts"], stats["symbolic_over_budget"]) == (2, 2)
        assert (block["symbolic_timeouts"], block["symbolic_over_budget"]) == (1, 2)
        assert block["calls"] == 3 and stats["calls"] == 4
        assert elapsed < 30.0, elapsed
        # A check cut by the budget is not a verdict: it is not cached.
        with g.budget(1.0):
            g.grade("x+0", "0+x")
        assert g.stats()["symbolic_cached"] == 0
    finally:
        g.close()
    with pytest.raises(ValueError, match="budget"), g.budget(0):
        pass


# ------------------------------------------------------------------- fuzz

FUZZ = settings(deadline=None, derandomize=True, max_examples=150,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
PIECES = ["<answer>", "</answer>", "<think>", "</think>", "\\boxed{", "\\text{", "{", "}", "\\",
          "<svg ", "</svg>", ">", "```", "```svg\n", "<caption>", "</caption>", "\\frac", "^",
          "5", "1,000", ".", " or ", "$", "%", "(", ")", "[", "]", "\n", "a", "B", " "]
hostile_text = st.one_of(
    st.text(max_size=2000),
    st.lists(st.sampled_from(PIECES), max_size=400).map("".join),
    st.tuples(st.sampled_from(PIECES), st.integers(1, 4000)).map(lambda t: t[0] * t[1]),
)


@FUZZ
@given(hostile_text)
def test_fuzz_parsers_never_raise(text):
    for fn in (extract_boxed, extract_answer, normalize, evolmm_normalize, extract_svg,
               parse_proposal, format_ok):
        fn(text)
    assert extract_tag(text, "answer") in (None, *[text[a:b].strip() or None
                                                  for a, b in tag_blocks(text, "answer")])


@FUZZ
@given(hostile_text, st.sampled_from(["5", "0.5", "B", r"\frac{1}{2}", "paris", "(1, 2)"]))
def test_fuzz_grade_never_raises_and_is_reflexive(text, ref):
    assert grade(text, ref) in (True, False)
    if normalize(text) and len(text) <= MAX_ANSWER_CHARS:
        assert grade(text, text) is True  # the string step: an answer always matches itself


@FUZZ
@given(st.lists(hostile_text, max_size=6))
def test_fuzz_majority_counts_every_valid_answer(answers):
    with_label = majority(answers + ["5"])
    assert sum(len(c.members) for c in with_label.clusters) == with_label.n_valid
    assert 0 < with_label.consistency <= 1


@FUZZ
@given(st.text(alphabet=st.characters(blacklist_characters="{}\\"), max_size=300))
def test_fuzz_boxed_returns_what_was_boxed(inner):
    assert extract_boxed(f"so \\boxed{{{inner}}}") == (inner.strip() or None)



# The lazy patterns the linear parsers replaced: fine as oracles on short text.
LAZY_FENCE = re.compile(r"```[ \t]*(\w*)[^\n]*\n(.*?)(?:```|\Z)", re.DOTALL)
LAZY_SVG_TAG = re.compile(r"<svg(?=[\s>/])[^>]*?(/?)>|</svg\s*>", re.IGNORECASE)
LAZY_ANSWER = re.compile(r"<\s*answer\s*>(.*?)<\s*/\s*answer\s*>", re.IGNORECASE | re.DOTALL)


def lazy_extract_svg(text: str) -> str | None:
    fences = [(m.group(1).lower(), m.group(2)) for m in LAZY_FENCE.finditer(text)]
    for want in ("svg", "xml"):
        for lang, body in fences:
            if lang == want and (want == "svg" or "<svg" in body.lower()):
                return body.strip()
    depth, start = 0, None
    for m in LAZY_SVG_TAG.finditer(text):
        if m.group(0).startswith("</"):
            if start is not None:
                depth -= 1
                if depth == 0:
                    return text[start:m.end()]
        elif m.group(1):
            if start is None:
                return m.group(0)
        else:
            start = m.start() if start is None else start
            depth += 1
    return None


SVG_PIECES = ["```", "```svg", "```xml", "```SVG ", "\n", "<svg", "<SVG", " ", "/", ">",
              "</svg>", "</svg >", "<svg/>", "a", "<rect/>", "`"]
TAG_PIECES = ["<answer>", "</answer>", "< ANSWER >", "</ answer>", "<", ">", "/", "x", " "]


@settings(deadline=None, derandomize=True, max_examples=3000)
@given(st.lists(st.sampled_from(SVG_PIECES), max_size=16).map("".join))
def test_extract_svg_reads_text_as_the_lazy_patterns_did(text):
    assert extract_svg(text) == (lazy_extract_svg(text) if text else None)


@settings(deadline=None, derandomize=True, max_examples=3000)
@given(st.lists(st.sampled_from(TAG_PIECES), max_size=16).map("".join))
def test_tag_blocks_read_text_as_the_lazy_pattern_did(text):
    assert [text[a:b] for a, b in tag_blocks(text, "answer")] == LAZY_ANSWER.findall(text)
