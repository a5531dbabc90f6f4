"""Worst-case seconds per call of every parser of model output, and of ``grade``,
on adversarial text: repeated unclosed openers, endless letters and digits,
thousands of nested ``\\text{`` wrappers, long whitespace runs.

    python -m benchmarks.hostile [--sizes 4096 16384 65536] [--repeat 3]

The renderer's own pre-checks (CSS escapes, comments, ``url(``) get
documents with that much degenerate CSS. Each parser gets every input at every size (the largest of ``--repeat`` runs
is kept); the table shows, per parser and size, the slowest input and its
time. ``grade`` is measured twice: on the inputs as they come (anything over
``answers.MAX_ANSWER_CHARS`` is refused unread) and on the same inputs cut to
that cap, which is the most work a single call can be made to do before the
symbolic step; the symbolic step itself runs in the worker under the grader's
time limit (``grading.DEFAULT_TIMEOUT_S``), whose figure is in the last row.
Goal (issue: hostile model output): every parser under 50 ms per call at 64k
characters, ``grade`` within its documented limit.

Prints a table and writes ``benchmarks/results/hostile-<time>.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

from actors.svg_checks import extract_svg
from pipelines.algorithms.answers import (
    MAX_ANSWER_CHARS,
    extract_answer,
    extract_boxed,
    extract_tag,
    normalize,
)
from pipelines.algorithms.grading import DEFAULT_TIMEOUT_S, Grader, majority
from pipelines.eval import official
from pipelines.eval.data import Item
from pipelines.recipes.evolmm.rewards import evolmm_normalize
from pipelines.recipes.mmzero.rewards import format_ok, infer_content_type, parse_proposal

ROOT = Path(__file__).resolve().parents[1]


def _fill(unit: str, n: int, tail: str = "") -> str:
    return (unit * (n // len(unit) + 1))[: max(0, n - len(tail))] + tail


def adversarial(n: int) -> dict[str, str]:
    """Inputs of about ``n`` characters that break backtracking or quadratic parsers."""
    half = n // 2
    return {
        "letters": _fill("a", n),
        "letters+bang": _fill("a", n, "!"),
        "digits+x": _fill("1", n, "x"),
        "digits.digits+x": _fill("1", half) + "." + _fill("1", half, "x"),
        "thousands": _fill("1,000", n, ",0"),
        "spaces+x": _fill(" ", n, "x"),
        "open <answer>": _fill("<answer>", n),
        "open < answer >": _fill("< answer  ", n),
        "open <caption>": _fill("<caption>", n),
        "open <svg": _fill("<svg ", n),
        "open </svg": _fill("</svg ", n),
        "fences": _fill("```", n),
        "fence+letters": "```svg" + _fill("a", n),
        "open \\boxed{": _fill("\\boxed{", n),
        "open braces": "\\boxed{" + _fill("{", n),
        "nested \\text{": _fill("\\text{", half) + "5" + _fill("}", half),
        "open \\text{": _fill("\\text{", n),
        "think tags": _fill("<think>", half) + _fill("</think>", half),
        "option spam": _fill("(a) 1 ", n),
        "fraction spam": _fill("\\frac{1}{2}", n),
        "units": _fill("5 cm ", n),
        "digits+comma": _fill("1", n, ","),
        "open {": _fill("{", n),
        "backticks": _fill("`a", n),
        "indicator spam": _fill("the answer is ", n),
        "Answer: spam": _fill("Answer: A ", n),
    }


# Items the official scorers (pipelines/eval/official.py) read the inputs against.
_CHOICE = Item(id="c", question="q", answer="B", choices=["alpha", "beta", "gamma", "delta"],
               meta={"question_type": "multi_choice", "answer_type": "text"})
_FLOAT = Item(id="f", question="q", answer="1.5",
              meta={"question_type": "free_form", "answer_type": "float", "precision": 1})
_YES = Item(id="y", question="q", answer="Yes")


PARSERS: dict[str, Callable[[str], object]] = {
    "extract_boxed": extract_boxed,
    "extract_tag": lambda t: extract_tag(t, "answer"),
    "extract_answer": extract_answer,
    "parse_proposal": parse_proposal,
    "format_ok": format_ok,
    "extract_svg": extract_svg,
    "infer_content_type": infer_content_type,
    "normalize": normalize,
    "evolmm_normalize": evolmm_normalize,
    "official chartqa": lambda t: official.chartqa(_FLOAT, t),
    "official mathvista (choice)": lambda t: official.mathvista(_CHOICE, t),
    "official mathvista (float)": lambda t: official.mathvista(_FLOAT, t),
    "official mmmu (choice)": lambda t: official.mmmu(_CHOICE, t),
    "official mmmu (open)": lambda t: official.mmmu(_FLOAT, t),
    "official mmmu_pro": lambda t: official.mmmu_pro(_CHOICE, t),
    "official hallusionbench": lambda t: official.hallusionbench(_YES, t),
    "official visnumbench": lambda t: official.visnumbench(_CHOICE, t),
    "official mmsi": lambda t: official.mmsi(_CHOICE, t),
}


def hostile_css(n: int) -> dict[str, str]:
    """SVG documents whose <style> and style attribute hold ~``n`` characters of degenerate CSS."""
    ns = 'xmlns="http://www.w3.org/2000/svg"'
    css = {"open comments": _fill("/*", n), "backslashes": _fill("\\", n),
           "hex escapes": _fill("\\aaaaaa", n), "one long comment": "a/*" + _fill("*", n),
           "split keywords": _fill("@im/**/", n), "url(": _fill("url(", n)}
    return {k: f'<svg {ns} width="9" height="9"><style>{v}</style><rect style="{v}"/></svg>'
            for k, v in css.items()}


def renderer_checks(svg: str) -> None:
    """The renderer's pre-checks (run in its worker before cairosvg), in this process."""
    from defusedxml import ElementTree

    from actors import renderer, svg_checks

    root = ElementTree.fromstring(svg.encode())
    try:
        svg_checks.scan_tree(root, renderer.RenderLimits())
        svg_checks.check_expansion(root, {}, renderer.RenderLimits())
    except svg_checks.Refusal:
        pass


def worst(fn: Callable[[str], object], inputs: dict[str, str], repeat: int) -> tuple[float, str]:
    slowest, name = 0.0, ""
    for key, text in inputs.items():
        for _ in range(repeat):
            start = time.perf_counter()
            fn(text)
            elapsed = time.perf_counter() - start
            if elapsed > slowest:
                slowest, name = elapsed, key
    return slowest, name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[4096, 16384, 65536])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    grader = Grader()
    grader.grade("x+x", "2x")  # start the symbolic worker outside the timed calls
    rows = []
    for n in args.sizes:
        inputs = adversarial(n)
        for name, fn in PARSERS.items():
            seconds, which = worst(fn, inputs, args.repeat)
            rows.append({"function": name, "chars": n, "worst_s": seconds, "input": which})
        seconds, which = worst(renderer_checks, hostile_css(n), args.repeat)
        rows.append({"function": "renderer checks (CSS)", "chars": n, "worst_s": seconds,
                     "input": which})
        seconds, which = worst(lambda t: grader.grade(t, "5"), inputs, args.repeat)
        rows.append({"function": "grade", "chars": n, "worst_s": seconds, "input": which})
        capped = {k: v[:MAX_ANSWER_CHARS] for k, v in inputs.items()}
        seconds, which = worst(lambda t: grader.grade(t, "5"), capped, args.repeat)
        rows.append({"function": f"grade (cut to {MAX_ANSWER_CHARS})", "chars": n,
                     "worst_s": seconds, "input": which})
        seconds, which = worst(lambda t: majority([t[:MAX_ANSWER_CHARS]] * 5 + ["5"] * 5,
                                                  grader=grader.grade), inputs, 1)
        rows.append({"function": "majority of 10 (5 hostile)", "chars": n, "worst_s": seconds,
                     "input": which})
    start = time.perf_counter()
    grader.grade(r"2^{2^{2^{2^{2^{2^{2}}}}}}", "1")  # sympy would run for ever
    rows.append({"function": "grade, symbolic hang", "chars": 22,
                 "worst_s": time.perf_counter() - start, "input": f"limit {DEFAULT_TIMEOUT_S} s"})
    grader.close()

    print(f"{'function':<30} {'chars':>7} {'worst ms':>10}  slowest input")
    for r in rows:
        print(f"{r['function']:<30} {r['chars']:>7} {r['worst_s'] * 1e3:>10.2f}  {r['input']}")
    print(f"grader counters: {grader.stats()}")
    out = ROOT / "benchmarks" / "results" / f"hostile-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "rows": rows, "grader": grader.stats()},
                              indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
