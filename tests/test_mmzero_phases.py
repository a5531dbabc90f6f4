"""Data flow of the three MM-Zero phases (pipelines/recipes/mmzero/recipe.py) with fake pools.

The vLLM engines are replaced by small scripted pools (driver-logic unit tests);
the SVG renderer is the real sandboxed RendererPool (one worker process). Each
fake pool checks the sampling of every request against the spec (n, T, top_p)
and answers by looking at the prompt. Every expected figure is worked out by
hand next to it. Render batches are laid out so the renderer's batch early stop
(>= 70% ok or >= 90% finished) can only trigger once everything has finished.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from actors.generator import Completion
from pipelines.config import load_config
from pipelines.recipes.mmzero.examples import EXAMPLES
from pipelines.recipes.mmzero.recipe import (
    CodeGenPhase,
    MMZeroRecipe,
    ProposerPhase,
    SolverPhase,
)
from pipelines.recipes.mmzero.rewards import parse_proposal

ROOT = Path(__file__).resolve().parents[1]
OVERRIDES = [
    "run.recipe=mmzero", "mmzero.train_steps=3", "mmzero.max_tokens=64",
    "mmzero.judge_samples=2", "mmzero.eval_samples=4", "mmzero.judge_solver_n=4",
    "mmzero.proposer_batch=2", "mmzero.proposer_n=2",
    "mmzero.codegen_batch=4", "mmzero.codegen_n=4", "mmzero.codegen_proposals=4",
    "mmzero.codegen_filter_samples=2",
    "mmzero.solver_batch=2", "mmzero.solver_proposals=7",  # solver_n stays 8 (spec)
    "mmzero.batch_floor=1", "mmzero.image_side=64", "mmzero.render_workers=1",
    "mmzero.samples_saved=4", "mmzero.heldout=0",  # the held-out set: its own test
]
# (T, top_p, top_k) per role; "judge": the Solver scoring a Proposer's or CodeGen's image,
# sampled as the original's Solver service (T 1.0, top_p 1.0, top_k 40)
SPEC_SAMPLING = {"proposer": (1.0, 0.99, 0), "codegen": (0.7, 0.95, 0),
                 "solver": (1.0, 0.99, 0), "judge": (1.0, 1.0, 40)}
PNG = b"\x89PNG\r\n\x1a\n"
SVG = ('<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 64 48" width="64" height="48">'
       '<rect width="64" height="48" fill="white"/><rect x="8" y="8" width="20" height="30" '
       'fill="red"/></svg>')
VALID = f"Here it is:\n```svg\n{SVG}\n```"
NO_CODE = "I cannot draw this."  # extract_svg -> None: render failure "empty", reward -0.5
NOT_SVG = "```svg\nnot a picture\n```"  # extracted, no <svg: failure "not_svg"
BROKEN = '```svg\n<svg xmlns="http://www.w3.org/2000/svg"><rect width="10"\n```'  # SVG-like
EMPTY = "```svg\n\n```"  # extracted code "": failure "empty"


# ------------------------------------------------------------------ fakes


def prompt_text(request) -> str:
    return "".join(part.get("text", "") for msg in request.messages for part in msg["content"])


def boxed(*answers) -> list[str]:
    return [f"<think>x</think>\\boxed{{{a}}}" if a is not None else "no answer" for a in answers]


def lookup(table: dict[str, list[str]]):
    """A script answering the one entry of ``table`` whose key occurs in the prompt."""
    def script(prompt: str) -> list[str]:
        hits = [key for key in table if key in prompt]
        if len(hits) != 1:
            raise AssertionError(f"prompt matches {hits} of the script keys: {prompt[:200]!r}")
        return table[hits[0]]
    return script


def in_order(texts: list[str], n: int):
    """A script handing out ``texts`` n at a time, in request order."""
    it = iter(texts)
    return lambda prompt: [next(it) for _ in range(n)]


class FakePool:
    """``generate(requests) -> list[list[Completion]]`` with scripted texts; raises on a
    request whose (n, temperature, top_p) is not the spec's for ``role``."""

    def __init__(self, role: str, n: int, script):
        self.role, self.n, self.script, self.calls = role, n, script, 0

    def generate(self, requests):
        self.calls += 1
        out = []
        for req in requests:
            s = req.sampling
            if (s.n, s.temperature, s.top_p, s.top_k) != (self.n, *SPEC_SAMPLING[self.role]):
                raise AssertionError(f"{self.role}: sampling {s} is not n={self.n}, "
                                     f"(T, top_p, top_k)={SPEC_SAMPLING[self.role]}")
            if self.role in ("solver", "judge"):
                assert len(req.images) == 1 and req.images[0].startswith(PNG)
            else:
                assert req.images == [], f"{self.role} prompts are text-only"
            texts = self.script(prompt_text(req))
            assert len(texts) == s.n
            out.append([Completion(t, prompt_ids=[1], token_ids=[2], logprobs=[0.0],
                                   finish_reason="stop", version=0) for t in texts])
        return out


class Forbidden:
    def __init__(self, why: str):
        self.why = why

    def generate(self, requests):
        raise AssertionError(f"pool called: {self.why}")


class Broken:
    def generate(self, requests):
        raise RuntimeError("engine gave up after its restarts")


@dataclass
class Ctx:
    dir: Path
    role: str
    pool: object
    pools: dict = field(default_factory=dict)
    seed_path: tuple = (0, 1, 0)
    iteration: int = 1
    run_dir: Path | None = None

    def pool_for(self, role: str):  # as RunnerContext: the own role is ctx.pool
        return self.pool if role == self.role else self.pools[role]


def make_ctx(tmp_path: Path, phase, pool, **pools) -> Ctx:
    index = ("proposer", "codegen", "solver").index(phase.name)
    folder = tmp_path / "iter_0001" / phase.name
    folder.mkdir(parents=True, exist_ok=True)
    return Ctx(folder, phase.role, pool, pools, seed_path=(0, 1, index), run_dir=tmp_path)


def proposal_text(tag: str, content_type: str | None = "other", caption: str | None = None,
                  easy_q: str | None = None, easy_a: str = "3", hard_q: str | None = None,
                  hard_a: str = "5") -> str:
    head = f"<content_type>{content_type}</content_type>\n" if content_type else ""
    return (f"{head}<caption>{caption or tag + ' caption'}</caption>\n"
            f"<easy_question>{easy_q or tag + ' easy question?'}</easy_question>\n"
            f"<easy_answer>{easy_a}</easy_answer>\n"
            f"<hard_question>{hard_q or tag + ' hard question?'}</hard_question>\n"
            f"<hard_answer>{hard_a}</hard_answer>")


def item_of(text: str, **extra) -> dict:
    return {**dataclasses.asdict(parse_proposal(text)), **extra}


@pytest.fixture(scope="module")
def recipe():
    r = MMZeroRecipe(load_config(None, OVERRIDES))
    yield r
    r.close()


# ------------------------------------------------------------------ proposer

CAPTION_AD = "A bar chart of fruit sold: apples 12, pears 7."  # A and D: identical captions
PROP_A = proposal_text("A", "data_chart", CAPTION_AD, "How many apples were sold?", "12",
                       "How many more apples than pears?", "5")
PROP_B = "<caption>half a proposal</caption>"  # unparsable -> -1
PROP_C = proposal_text("C", "geometry", "Right triangle with legs 3 and 4.",
                       "Shortest leg length?", "3", "Hypotenuse length?", "5")
PROP_D = proposal_text("D", None, CAPTION_AD, "Which fruit did best?", "apples",
                       "Sum of both counts?", "19")  # type inferred: "bar", "chart" -> data_chart
PROPOSER_SVGS = {  # previous CodeGen, k = 2 SVGs per proposal, keyed by hard question
    "How many more apples than pears?": [VALID, NO_CODE],
    "Hypotenuse length?": [VALID, VALID],
    "Sum of both counts?": [NO_CODE, NOT_SVG],
}
PROPOSER_ANSWERS = {  # previous Solver, 4 answers per question
    "How many apples were sold?": boxed(12, 12, 12, 7),  # solv 3/4 = 0.75 (capped to 0.5)
    "How many more apples than pears?": boxed(5, 5, 5, 4),  # c 3/4, diff min(.75,.25) = .25
    "Shortest leg length?": boxed(3, 4, None, 4),  # solv 1/4 (no answer in the denominator)
    "Hypotenuse length?": boxed(5, 5, 5, 5),  # c 1, diff 0
}


def score_proposals(recipe, tmp_path, solver):
    phase = ProposerPhase(recipe)
    requests = phase.requests(0, np.random.default_rng(0))  # 2 topics x n 2
    completions = FakePool("proposer", 2, in_order([PROP_A, PROP_B, PROP_C, PROP_D], 2)
                           ).generate(requests)
    ctx = make_ctx(tmp_path, phase, Forbidden("the proposer does not judge itself"),
                   codegen=FakePool("codegen", 2, lookup(PROPOSER_SVGS)), solver=solver)
    return phase.score(requests, completions, ctx), ctx


def test_proposer_score_components(recipe, tmp_path):
    scores, ctx = score_proposals(recipe, tmp_path, FakePool("judge", 4, lookup(PROPOSER_ANSWERS)))
    # content type over the 3 valid: data_chart 2/3 > 0.5 -> -0.15 * (2/3 - 0.5) / 0.5 = -0.05
    #   for A and D; geometry 1/3 -> 0 for C.
    # diversity: only the captions of A and D cluster (identical, distance 0); all other
    #   texts are far apart. A, D: share 2/3, excess 0.45 * (2/3 - 1/3) = 0.15,
    #   pen = 0.5 * 3 * 0.15 = 0.225; C: share 1/3 everywhere -> 0.
    # A: judge (min(.75, .5) + .25) / 2 = 0.375; mean diff .25 >= .15: no penalty
    #    0.375 - 0.05 - 0.225 = 0.1
    # C: judge 2 * (0.25 + 0) / 2 = 0.25; mean diff 0 < 0.15: -0.3 -> 0.25 - 0.3 = -0.05
    # D: nothing rendered -> judge 0, no difficulty known -> no penalty; -0.05 - 0.225 = -0.275
    assert scores.rewards == [[pytest.approx(0.1), -1.0], [pytest.approx(-0.05),
                                                           pytest.approx(-0.275)]]
    assert scores.metrics == pytest.approx({
        "judge_mean": (0.375 + 0.25 + 0) / 3,
        "low_difficulty_penalty_mean": -0.3 / 3,
        "content_type_penalty_mean": -0.1 / 3,
        "diversity_penalty_mean": -0.45 / 3,
        "parse_rate": 3 / 4,
        "type_inferred_frac": 1 / 3,  # D
        "low_difficulty_frac": 1 / 3,  # C
        "render_rate": (1 + 2 + 0) / (2 * 3),
        "solvability_mean": (0.75 + 0.25 + 0.25) / 3,  # uncapped, over judged samples
        "difficulty_mean": (0.25 + 0 + 0) / 3,
        "solver_failures": 0.0,
        "render_fail/empty": 2.0,  # A's second SVG, D's first
        "render_fail/not_svg": 1.0,  # D's second
    })
    assert scores.columns == {
        "parsed": [[True, False], [True, True]],
        "content_type": [["data_chart", None], ["geometry", "data_chart"]],
        "rendered": [[1, 0], [2, 0]],
    }
    assert len(list((ctx.dir / "samples").glob("sample_*.png"))) == 3  # A s0, C s0, C s1


def test_proposer_score_with_a_failed_solver(recipe, tmp_path):
    scores, _ = score_proposals(recipe, tmp_path, Broken())
    # Rendered samples add nothing and no difficulty is known -> no -0.3 either:
    # A: 0 - 0.05 - 0.225; C: 0 + 0 + 0; D as before; B still -1.
    assert scores.rewards == [[pytest.approx(-0.275), -1.0], [0.0, pytest.approx(-0.275)]]
    assert scores.metrics["solver_failures"] == 3.0  # A s0, C s0, C s1
    assert scores.metrics["judge_mean"] == 0.0
    assert scores.metrics["low_difficulty_penalty_mean"] == 0.0
    assert scores.metrics["render_rate"] == pytest.approx(0.5)  # renders still counted
    assert scores.columns["rendered"] == [[1, 0], [2, 0]]


# ------------------------------------------------------------------ codegen

P1, P2, P3 = (proposal_text(t, "table") for t in ("P1", "P2", "P3"))
FILTER_SVGS = {"P1 hard": [NO_CODE, NO_CODE], "P2 hard": [VALID, NO_CODE],
               "P3 hard": [VALID, VALID]}  # render rates 0/2, 1/2, 2/2


def codegen_prepare(recipe, tmp_path, svgs=FILTER_SVGS):
    phase = CodeGenPhase(recipe)
    proposer = FakePool("proposer", 2, in_order([P1, P2, P3, "garbage"], 2))  # 4 = 2 x n 2
    ctx = make_ctx(tmp_path, phase, FakePool("codegen", 2, lookup(svgs)), proposer=proposer,
                   solver=Forbidden("the CodeGen filter asks no Solver"))
    return phase, ctx, phase.prepare(ctx)


def test_codegen_prepare_keeps_half_rendering_proposals(recipe, tmp_path, caplog):
    phase, ctx, metrics = codegen_prepare(recipe, tmp_path)
    expected_items = [item_of(P2, render_rate=0.5, bootstrap=False)]  # 0 and 1 outside [.25, .75]
    expected_metrics = {"proposals": 4.0, "parsed": 3.0,
                        "filter_render_rate": 0.5,  # (0 + 0.5 + 1) / 3
                        "kept": 1.0, "bootstrap": 0.0}
    assert json.loads((ctx.dir / "data.json").read_text()) == {
        "items": expected_items, "metrics": expected_metrics}
    # 1 item < batch 4: largest power of two <= 1 is 1 (floor 1)
    assert metrics == {**expected_metrics, "batch": 1.0}
    assert (phase.items, phase.batch, phase.steps) == (expected_items, 1, 3)
    assert "codegen: filtered data set has 1 items, fewer than the batch of 4: batch clamped " \
           "to 1" in caplog.text

    again = CodeGenPhase(recipe)  # a resumed phase: reads data.json, samples nothing
    ctx2 = make_ctx(tmp_path, again, Forbidden("data.json exists"),
                    proposer=Forbidden("data.json exists"), solver=Forbidden("data.json exists"))
    assert again.prepare(ctx2) == metrics
    assert again.items == expected_items


def test_codegen_prepare_bootstrap_tops_up(recipe, tmp_path, monkeypatch):
    monkeypatch.setattr(recipe.m, "bootstrap", 3)
    phase, _, metrics = codegen_prepare(recipe, tmp_path)
    examples = [{k: v for k, v in e.items() if k != "svg"} | {"type_inferred": False,
                "render_rate": None, "bootstrap": True} for e in EXAMPLES[:2]]
    by_caption = {it["caption"]: it for it in phase.items}  # order: a seeded permutation
    assert by_caption == {it["caption"]: it for it in
                          [item_of(P2, render_rate=0.5, bootstrap=False), *examples]}
    assert len(phase.items) == 3
    # 3 items < batch 4 -> largest power of two <= 3 = 2
    assert metrics == {"proposals": 4.0, "parsed": 3.0, "filter_render_rate": 0.5,
                       "kept": 1.0, "bootstrap": 2.0, "batch": 2.0}
    assert phase.steps == 3


def test_codegen_prepare_empty_trains_no_step(recipe, tmp_path, caplog):
    svgs = {**FILTER_SVGS, "P2 hard": [NO_CODE, NO_CODE]}  # rates 0, 0, 1: nothing kept
    phase, _, metrics = codegen_prepare(recipe, tmp_path, svgs)
    assert phase.items == [] and phase.steps == 0
    assert metrics == {"proposals": 4.0, "parsed": 3.0, "filter_render_rate": pytest.approx(1 / 3),
                       "kept": 0.0, "bootstrap": 0.0, "batch": 4.0}
    assert "codegen: the filtered data set is empty" in caplog.text


X = proposal_text("X", "data_chart", easy_a="12")
Y = proposal_text("Y", "diagram", easy_a="blue")
CODEGEN_ANSWERS = {  # the latest Solver judges the rendered SVGs
    "X easy": boxed(12, 12, 12, 7),  # solv 3/4 (uncapped for CodeGen)
    "X hard": boxed(5, 5, 5, 4),  # c 3/4 -> min(c, 1 - c) = 0.25
    "Y easy": boxed("blue", "blue", "Blue", "blue"),  # solv 4/4 (grading ignores case)
    "Y hard": boxed(7, 7, 9, 9),  # c 2/4 -> 0.5
}


def test_codegen_score_rewards_and_judge_is_the_solver(recipe, tmp_path):
    phase = CodeGenPhase(recipe)
    phase.items, phase.batch = [item_of(X), item_of(Y)], 2  # as prepare would clamp 2 items
    requests = phase.requests(0, np.random.default_rng(0))
    completions = FakePool("codegen", 4, lookup({
        "X hard": [VALID, BROKEN, EMPTY, NO_CODE], "Y hard": [VALID, VALID, NO_CODE, NOT_SVG],
    })).generate(requests)
    solver = FakePool("judge", 4, lookup(CODEGEN_ANSWERS))
    never = Forbidden("the CodeGen must not judge its own SVGs")
    ctx = make_ctx(tmp_path, phase, never, codegen=never, proposer=never, solver=solver)
    scores = phase.score(requests, completions, ctx)
    # X: 1 + 0.75 + 0.25 = 2.0 | SVG-like, no render: -0.1 | empty: -(0.1+0.05+0.5) -> floor -0.5
    #    | no code: -(0.1 + 0.05 + 0.5) -> -0.5
    # Y: 1 + 1.0 + 0.5 = 2.5 twice | no code -0.5 | "not a picture": -(0.1 + 0.5) = -0.6 -> -0.5
    assert scores.rewards == [[pytest.approx(2.0), pytest.approx(-0.1), -0.5, -0.5],
                              [pytest.approx(2.5), pytest.approx(2.5), -0.5, -0.5]]
    assert solver.calls == 1
    assert scores.metrics == pytest.approx({
        "render_rate": 3 / 8,
        "empty_frac": 3 / 8,  # "", None, None ("not a picture" is code)
        "svg_like_frac": 4 / 8,  # X valid, X broken, Y valid x2
        "judge_solvability_mean": (0.75 + 1.0 + 1.0) / 3,
        "render_fail/empty": 3.0, "render_fail/not_svg": 1.0, "render_fail/parse_error": 1.0,
    })
    assert scores.columns["rendered"] == [[True, False, False, False], [True, True, False, False]]
    assert scores.columns["render_failure"] == [[None, "parse_error", "empty", "empty"],
                                                [None, None, "empty", "not_svg"]]


# ------------------------------------------------------------------ solver

S_TYPES = {"S1": "data_chart", "S2": "table", "S3": "geometry", "S4": "data_chart",
           "S5": "map", "S7": "timeline"}
S_TEXTS = [proposal_text(t, S_TYPES[t]) if t in S_TYPES else "unparsable"
           for t in ("S1", "S2", "S3", "S4", "S5", "S6", "S7")] + ["8th: cut by [:count]"]
S_SVGS = {f"{t} hard": [NO_CODE if t == "S5" else VALID] for t in S_TYPES}  # 1 SVG each
S_ANSWERS = {  # easy self-consistency e, hard self-consistency h (valid answers only)
    "S1 easy": boxed(3, 3, 3, 3), "S1 hard": boxed(5, 5, 6, 7),  # e 1, h .5 -> kept, label 5
    "S2 easy": boxed(2, 2, 3, 9), "S2 hard": boxed(8, 8, 8, 1),  # e .5, h .75 -> kept, 8
    "S3 easy": boxed(1, 2, 3, 4), "S3 hard": boxed(1, 1, 1, 3),  # e .25 < .5 -> dropped
    "S4 easy": boxed(3, 3, 3, 3), "S4 hard": boxed(6, 6, 6, 6),  # h 1 > .75 -> dropped
    "S7 easy": boxed(7, 7, 7, None), "S7 hard": boxed(1, 2, 3, 4),  # e 3/3, h .25 -> kept, 1
}
S_LABELS = {"S1 hard question?": "5", "S2 hard question?": "8", "S7 hard question?": "1"}


def solver_prepare(recipe, tmp_path):
    phase = SolverPhase(recipe)
    ctx = make_ctx(tmp_path, phase, FakePool("solver", 4, lookup(S_ANSWERS)),
                   proposer=FakePool("proposer", 2, in_order(S_TEXTS, 2)),  # 4 requests x 2
                   codegen=FakePool("codegen", 1, lookup(S_SVGS)))
    return phase, ctx, phase.prepare(ctx)


def training_answers(prompt: str) -> list[str]:
    """solver_n = 8 responses to a training item: four cases, twice."""
    v = int(lookup({q: [label] for q, label in S_LABELS.items()})(prompt)[0])
    return [f"<think>x</think>\\boxed{{{v}}}",  # 0.9 * 1 + 0.1 * 1 = 1.0
            f"\\boxed{{{v}}}",  # right, no <think>: 0.9
            f"<think>x</think>\\boxed{{{v + 10}}}",  # wrong, well formatted: 0.1
            "garbage"] * 2  # 0


def test_solver_phase_prepare_score_finish(recipe, tmp_path):
    phase, ctx, metrics = solver_prepare(recipe, tmp_path)
    assert metrics == {"proposals": 7.0, "parsed": 6.0, "rendered": 5.0, "evaluated": 5.0,
                       "kept": 3.0, "bootstrap": 0.0, "render_fail/empty": 1.0,  # S5
                       "batch": 2.0}  # 3 items >= batch 2: unchanged
    rows = pq.read_table(ctx.dir / "data.parquet").to_pylist()
    assert {r["question"]: r["label"] for r in rows} == S_LABELS
    assert all(r["png"].startswith(PNG) and r["bootstrap"] is False for r in rows)
    funnel = json.loads((ctx.dir / "funnel.json").read_text())["items"]
    assert [(f["parsed"], f["rendered"], f["evaluated"], f["kept"]) for f in funnel] == [
        (True, True, True, True), (True, True, True, True), (True, True, True, False),
        (True, True, True, False), (True, False, False, False), (False, False, False, False),
        (True, True, True, True)]
    assert [f["hard_consistency"] for f in funnel] == [0.5, 0.75, 0.75, 1.0, None, None, 0.25]
    assert (phase.steps, phase.batch) == (3, 2)

    again = SolverPhase(recipe)  # resumed: reads data.parquet and funnel.json only
    never = Forbidden("data.parquet exists")
    assert again.prepare(make_ctx(tmp_path, again, never, proposer=never, codegen=never)) == metrics

    requests = phase.requests(0, np.random.default_rng(0))
    completions = FakePool("solver", 8, training_answers).generate(requests)
    scores = phase.score(requests, completions, make_ctx(tmp_path, phase, Forbidden("scoring")))
    assert [[round(r, 9) for r in g] for g in scores.rewards] == [[1.0, 0.9, 0.1, 0.0] * 2] * 2
    assert scores.metrics == {"format_rate": 0.5, "accuracy": 0.5}

    (tmp_path / "iter_0001" / "codegen").mkdir(exist_ok=True)
    (tmp_path / "iter_0001" / "codegen" / "data.json").write_text(
        json.dumps({"items": [], "metrics": {"kept": 1.0}}))
    phase.finish(ctx)
    record = json.loads((tmp_path / "iter_0001" / "coevo.json").read_text())
    # evaluated h: .5, .75, .75, 1, .25 -> 2 min(h, 1 - h): 1, .5, .5, 0, .5 -> mean 2.5 / 5
    # easy e: 1, .5, .25, 1, 1 -> 3.75 / 5; hard mean 3.25 / 5 = .65; gap .75 - .65
    # types over the 6 parsed: data_chart 2, table/geometry/map/timeline 1 each
    entropy = -(1 / 3 * math.log(1 / 3) + 4 / 6 * math.log(1 / 6)) / math.log(7)  # 0.80205
    assert record.pop("funnel") == {"proposals": 7, "parsed": 6, "rendered": 5,
                                    "evaluated": 5, "kept": 3}
    assert record.pop("content_types") == pytest.approx({
        "data_chart": 2 / 6, "diagram": 0.0, "geometry": 1 / 6, "timeline": 1 / 6,
        "map": 1 / 6, "table": 1 / 6, "other": 0.0})
    assert record == pytest.approx({
        "iteration": 1, "difficulty": 0.5, "solvability": 0.75, "hard_consistency": 0.65,
        "easy_hard_gap": 0.1, "render_rate": 5 / 7, "content_type_entropy": entropy,
        "mean_svg_chars": float(len(SVG)),  # S5 had no code: not counted
        "codegen_kept": 1, "solver_kept": 3,
        # every proposal's hard answer is 5; the majorities 5, 8, 1, 6, 1 (S1, S2, S3, S4, S7):
        # right on 1 of 5 evaluated items, 1 of 3 kept (S1, S2, S7)
        "pseudo_label_accuracy": 1 / 5, "kept_pseudo_label_accuracy": 1 / 3,
        # no phase logged a step here (metrics.jsonl absent): no reward figures
        **{f"{p}_reward_{k}": None for p in ("proposer", "codegen", "solver")
           for k in ("mean", "std")}})
    assert entropy == pytest.approx(0.80205, abs=1e-5)
    assert (tmp_path / "iter_0001" / "coevo.png").read_bytes().startswith(PNG)
    assert (tmp_path / "coevo.png").read_bytes().startswith(PNG)  # the run's curves


def test_heldout_accuracy_scores_fixed_draws_at_validation_sampling(tmp_path):
    """mmzero.heldout figures, both questions, one answer each at the original's validation
    sampling (T 0.6, top_p 0.95) with seeds run.seed + k: the same draws for the Solver
    before and after its phase. A scripted Solver right on every other question: 0.5."""
    from pipelines.recipes.mmzero.warm_start import heldout_figures, warm_figures

    r = MMZeroRecipe(load_config(None, [*OVERRIDES, "mmzero.heldout=3", "run.seed=7",
                                        "model.warm_start.data=recipe",
                                        "model.warm_start.examples=64"]))
    seen = frozenset(fig.svg for _, fig in warm_figures(64, 7))
    figures = heldout_figures(3, 7, seen)
    questions = [q for f in figures for q in (f.proposal.easy_question, f.proposal.hard_question)]
    answers = {f.proposal.easy_question: f.proposal.easy_answer for f in figures} | {
        f.proposal.hard_question: f.proposal.hard_answer for f in figures}
    asked = []

    class Scripted:
        def generate(self, requests):
            out = []
            for k, req in enumerate(requests):
                s = req.sampling
                assert (s.n, s.temperature, s.top_p, s.seed) == (1, 0.6, 0.95, 7 + k)
                assert len(req.images) == 1 and req.images[0].startswith(PNG)
                question = prompt_text(req).split("\n")[0]
                asked.append(question)
                text = boxed(answers[question] if k % 2 == 0 else "no")[0]
                out.append([Completion(text, prompt_ids=[1], token_ids=[2], logprobs=[0.0],
                                       finish_reason="stop", version=0)])
            return out
    try:
        assert r.heldout_accuracy(Scripted()) == 0.5
        assert r.heldout_accuracy(Scripted()) == 0.5  # rendered once, asked again
    finally:
        r.close()
    assert asked == questions * 2


def test_render_grace_is_the_originals_and_reaches_the_renderer(recipe):
    """180 s for stragglers after a batch may stop early (the original's scripts); the tiny
    preset shortens it; the recipe's renderer pool gets the configured value."""
    assert load_config(None, ["run.recipe=mmzero"]).mmzero.render_grace_s == 180.0
    assert load_config(ROOT / "configs/mmzero/tiny-cpu.yaml", []).mmzero.render_grace_s == 3.0
    assert recipe.renderer.config.grace_seconds == recipe.m.render_grace_s == 180.0


def test_gpu_presets_run_the_published_six_iterations():
    presets = sorted((ROOT / "configs/mmzero").glob("qwen*.yaml"))
    assert len(presets) == 3
    assert {p.name: load_config(p, []).run.iterations for p in presets} == {
        p.name: 6 for p in presets}


def test_update_batches_per_phase():
    """mmzero.<role>_mini_batches reach the phases (updates per generation step, as the
    original's rollout / global batches); the GPU presets take the original's."""
    cfg = load_config(None, [*OVERRIDES, "mmzero.proposer_mini_batches=1",
                             "mmzero.codegen_mini_batches=4", "mmzero.solver_mini_batches=8"])
    r = MMZeroRecipe(cfg)
    proposer, codegen, solver = r.phases(1)
    assert (proposer.mini_batches, codegen.mini_batches, solver.mini_batches) == (1, 4, 8)
    gpu = load_config(ROOT / "configs/mmzero/qwen3-vl-8b-8gpu.yaml").mmzero
    assert (gpu.proposer_batch, gpu.proposer_mini_batches) == (18, 1)
    assert (gpu.codegen_batch, gpu.codegen_mini_batches) == (256, 4)
    assert (gpu.solver_batch, gpu.solver_mini_batches) == (512, 4)


def test_proposer_prompt_states_the_originals_requirements():
    """The original's proposer template's requirements, in our words: complexity, no
    clichés or repeats, a hard question that does not state its values, short answers,
    exactly the six tagged fields."""
    from pipelines.recipes.mmzero.prompts import proposer_messages

    text = " ".join(proposer_messages("chart and graph understanding")[0]["content"][0][
        "text"].split())  # one space between words
    for required in ("at least three data elements", "No clichés (monthly sales",
                     "no repeats", "must not state the values it needs",
                     "a single number, a single word or a very short phrase",
                     "exactly these six tagged fields"):
        assert required in text, required
    tags = ("content_type", "caption", "easy_question", "easy_answer", "hard_question",
            "hard_answer")
    assert [text.count(f"<{t}>") for t in tags] == [1] * 6
