"""Answer extraction, normalisation, equivalence and majority voting.

The answer-equivalence rule shared by all recipes (documented here),
MM-Zero's solvability share (arXiv:2603.09206) and EvoLMM's voting
normalisation.

`grade(pred, ref)` tries, in order, and stops at the first decisive step:
  1. string: `normalize(pred) == normalize(ref)`;
  2. option letters: "B", "(B)", "B.", "Option B" name the same option; with an
     `options` mapping a letter also matches its option text;
  3. numeric: both sides are a plain number (int, decimal, scientific, a
     fraction of two numbers) with an optional unit from a fixed list; equal
     within `rel_tol`. This verdict is final (no symbolic second opinion), so
     0.333 != 1/3 at the default 1e-4 even though math-verify would round;
  4. symbolic: math-verify `parse`/`verify` in a worker subprocess under a hard
     wall-clock limit, only for pairs that look like mathematics (see
     `_worth_symbolic`): plain words such as "dog"/"god" would otherwise parse
     as products of symbols and compare equal.

Hedges never grade as correct. math-verify picks an expression out of any text,
so an answer reaches it only when it reads as one value (`_single_expression`):
junk symbols around a value ("@#$ 5"), several candidate values ("3 or 5",
"3 \\lor 5", "3, 5" against "5", "a) 3 b) 5") and unbalanced brackets are
False. An answer over `MAX_ANSWER_CHARS` is False without being read.

Hostile text costs linear time: every pattern over answer text is
unambiguous or anchored, `\\text{}` unwrapping and tag extraction are single
passes, and the one step that can still take long, the symbolic check, runs
in the worker under its limit; `Grader.budget(seconds)` caps what one batch
of checks may spend in all (the phase wraps each step's scoring in one and
logs what it cut as `reward/timeouts`).

Units are stripped only in this safe way: "<number> <unit>" with the unit
from `_UNIT_ALIASES` (plural/spelling variants map to one canonical name).
"5 cm" == "5" == "5 centimeters", but "5 cm" != "5 m" (both carry units and
they differ; no conversion), and "5 apples" is not a number at all.

Percentages: normalisation drops `%` and `\\%`, so "50%" == "50". With
`percent_equiv=True` a side that carries a percent sign (or "percent") is also
compared after dividing by 100, so "50%" == "0.5". Off by default (spec).

Why a subprocess: sympy can run for ever (`2^{2^{2^{2^{2^{2}}}}}`), and
math-verify's own timeout is SIGALRM, which raises in any non-main thread
(Ray actor threads, thread pools). The worker (a sandboxed subprocess,
`actors/sandbox.py`, the same as the SVG renderer's) runs math-verify with its
timeouts disabled (None), in its own main thread, under a memory limit; the
parent waits and SIGKILLs a worker that runs over (replaced on next use). No
alarms or signal handlers anywhere.
"""

from __future__ import annotations

import atexit
import importlib
import logging
import math
import re
import string
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 5.0  # per symbolic check; math-verify's own default is 5 s
DEFAULT_REL_TOL = 1e-4  # spec
_MAX_SYMBOLIC_CHARS = 500  # longer "answers" are rambles, not expressions: never sent
# An extracted answer longer than this is degenerate output, not an answer: it
# grades False at once (counted as `too_long`), so normalising it costs nothing.
MAX_ANSWER_CHARS = 2000

# ---------------------------------------------------------------- extraction

_BOX_RE = re.compile(r"\\(?:boxed|fbox)\s*\{")


def _balanced(text: str, start: int) -> int | None:
    """Index of the `}` closing the group opened just before `start`, or None.
    Escaped characters (`\\{`, `\\}`, `\\\\`) do not count as braces."""
    depth, i = 1, start
    while i < len(text):
        ch = text[i]
        if ch == "\\":
            i += 2
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    return None


def extract_boxed(text: str | None) -> str | None:
    """Content of the last top-level `\\boxed{...}` / `\\fbox{...}`, stripped.

    None when there is none, when it is empty, or when the last one is not
    closed (a truncated answer is no answer; an earlier box is not used).
    """
    if not text:
        return None
    found, pos = None, 0
    while (m := _BOX_RE.search(text, pos)) is not None:
        end = _balanced(text, m.end())
        if end is None:
            return None
        found, pos = text[m.end():end], end + 1
    return (found.strip() or None) if found is not None else None


@lru_cache(maxsize=32)
def _tag_token_re(tag: str) -> re.Pattern:
    """`<tag>` or `</tag>` (case and inner whitespace ignored); group 1 is the slash."""
    return re.compile(rf"<\s*(/?)\s*{re.escape(tag)}\s*>", re.IGNORECASE)


def tag_blocks(text: str, tag: str) -> list[tuple[int, int]]:
    """(start, end) of each closed `<tag>...</tag>` block's content, in order.

    One left-to-right pass over the tags: a block opens at the first opener
    while none is open and closes at the next closer; openers inside an open
    block and closers outside one are text. The same blocks as a lazy
    `<tag>(.*?)</tag>` scan, in linear time: the lazy pattern rescans the rest
    of the text for every unclosed opener (quadratic in degenerate output).
    """
    blocks, start = [], None
    for m in _tag_token_re(tag).finditer(text):
        if not m.group(1):
            if start is None:
                start = m.end()
        elif start is not None:
            blocks.append((start, m.start()))
            start = None
    return blocks


def extract_tag(text: str | None, tag: str) -> str | None:
    """Stripped content of the last closed `<tag>...</tag>` block (tag case and
    whitespace inside the angle brackets ignored); None when absent or empty."""
    if not text:
        return None
    blocks = tag_blocks(text, tag)
    return (text[slice(*blocks[-1])].strip() or None) if blocks else None


def extract_answer(text: str | None,
                   fallback: Callable[[str], str | None] | None = None) -> str | None:
    """The final answer of a response: last `\\boxed{}`, else last `<answer>`
    block, else `fallback(text)`. "No answer" is None (never the string "None")."""
    if text is None:
        return None
    for found in (extract_boxed(text), extract_tag(text, "answer")):
        if found is not None:
            return found
    if fallback is None:
        return None
    out = fallback(text)
    return (out.strip() or None) if out is not None else None


# ------------------------------------------------------------- normalisation

_WRAPPERS_RE = re.compile(
    r"\\(?:text|textbf|textit|textrm|texttt|mathrm|mathbf|mathit|mbox|operatorname|boxed|fbox)"
    r"\s*\{")
_REPLACEMENTS = (
    ("\\dfrac", "\\frac"), ("\\tfrac", "\\frac"), ("\\cfrac", "\\frac"),
    ("\\displaystyle", ""), ("\\!", ""), ("\\,", " "), ("\\;", " "), ("\\:", " "),
    ("\\quad", " "), ("\\qquad", " "), ("\\ ", " "), ("~", " "),
    ("\\%", ""), ("%", ""), ("\\$", ""), ("$", ""), ("\u2212", "-"),
    ("^{\\circ}", "°"), ("^\\circ", "°"), ("\\circ", "°"), ("\\degree", "°"),
)
_BRACKET_SPACE_RE = re.compile(r"([(\[{])\s+|\s+([)\]}])")
_LEFT_RIGHT_RE = re.compile(r"\\(?:left|right)(?![a-zA-Z])\.?")
_PREFIX_RE = re.compile(
    r"^(?:(?:the )?(?:final )?answer(?: is)?(?:\s*[:=]\s*|\s+)|[a-z]\s*=\s*(?!.*=))")
# A digit run with thousands separators only: 1,000 and 12,345,678 but not
# 1,2 / 1,0000 / 1,000,2 (list items) -- see `_strip_thousands`.
_THOUSANDS_RE = re.compile(r"(?<![\d.,])\d{1,3}(?:,\d{3})+(?![\d,])")


_UNWRAP_TOKEN_RE = re.compile(_WRAPPERS_RE.pattern + r"|\\.|[{}]", re.DOTALL)


def _unwrap(s: str) -> str:
    """`\\text{5 cm}` -> `5 cm` for each wrapper command, nested ones included.

    One pass with a stack of open groups: a wrapper's braces are dropped and
    its content kept, other groups are copied as they are, escaped characters
    are never braces. A wrapper left open at the end loses its command (the
    rest is kept). Linear in the length of `s`, also for thousands of nested
    wrappers.
    """
    out, stack, pos = [], [], 0
    for m in _UNWRAP_TOKEN_RE.finditer(s):
        token = m.group(0)
        if token == "{":
            stack.append(False)
        elif token == "}":
            if stack and stack.pop():  # the end of a wrapper: drop the brace
                out.append(s[pos:m.start()])
                pos = m.end()
        elif token.endswith("{") and token[1:2].isalpha():  # a wrapper: drop the command
            out.append(s[pos:m.start()])
            stack.append(True)
            pos = m.end()
    out.append(s[pos:])
    return "".join(out)


def _strip_thousands(s: str) -> str:
    """Drop thousands commas, but never inside brackets, where a comma separates
    tuple, interval or set items ("(1,000, 2)" stays as it is). A bare "100,200"
    reads as 100200: three-digit groups after the first are taken as thousands."""
    if any(ch in s for ch in "()[]{}"):
        return s
    return _THOUSANDS_RE.sub(lambda m: m.group(0).replace(",", ""), s)


def normalize(s: str | None) -> str:
    """Canonical string form for equality: LaTeX spacing and wrappers removed
    (`\\text{}` content kept), `\\dfrac` -> `\\frac`, `\\left`/`\\right`, `$`, `%`
    dropped, `^\\circ` -> `°`, lowercase, whitespace collapsed, one answer
    prefix ("answer:", "x =") and trailing periods dropped, thousands commas
    removed. None -> ""."""
    if s is None:
        return ""
    s = _unwrap(str(s).strip())
    for old, new in _REPLACEMENTS:
        s = s.replace(old, new)
    s = _LEFT_RIGHT_RE.sub("", s)
    s = " ".join(s.lower().split())
    s = _BRACKET_SPACE_RE.sub(r"\1\2", s)  # "( 1, 2 )" -> "(1, 2)"; words keep their spaces
    if s.startswith("\\(") and s.endswith("\\)") or s.startswith("\\[") and s.endswith("\\]"):
        s = s[2:-2].strip()
    s = _PREFIX_RE.sub("", s, count=1)
    s = s.rstrip(". ")
    if len(s) > 1 and s[0] == "{" and _balanced(s, 1) == len(s) - 1:
        s = s[1:-1].strip()
    return _strip_thousands(s)


def evolmm_normalize(s: str | None) -> str:
    """EvoLMM's answer normalisation for voting: lowercase, drop commas, collapse
    whitespace, strip punctuation. "Strip" is read as at both ends: removing all
    punctuation would merge "3.5" and "35", and the separate comma rule would
    be redundant. None -> ""."""
    if s is None:
        return ""
    s = " ".join(s.lower().replace(",", "").split())
    return s.strip(string.punctuation + " ")


# ------------------------------------------------------------ option letters

_LETTER_RE = re.compile(r"(?:(?:option|choice)\s*[:.]?\s*)?\(?([a-z])\)?[.:]?")
_LETTER_TEXT_RE = re.compile(r"(?:\(([a-z])\)|([a-z])[.)])\s+(\S.*)")


def _option(s: str) -> tuple[str, str | None] | None:
    """(letter, option text or None) of a normalised answer that names an
    option: "b", "(b)", "b)", "option b", "(b) 42", "b. 42". "b 42" does not
    (too easily a word)."""
    if m := _LETTER_RE.fullmatch(s):
        return m.group(1), None
    if m := _LETTER_TEXT_RE.fullmatch(s):
        return m.group(1) or m.group(2), m.group(3)
    return None


# ------------------------------------------------------------------- numbers

# Unambiguous (no two ways to split a digit run), so a fullmatch that fails on
# a long run of digits fails in linear time.
_NUM = r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:e[+-]?\d+)?"
_NUMBER_FORMS = (
    (re.compile(rf"({_NUM})"), lambda g: float(g[0])),
    (re.compile(rf"({_NUM})\s*(?:\\times|\\cdot|\*|×|·)\s*10\s*\^\s*\{{?\s*([+-]?\d+)\s*\}}?"),
     lambda g: float(g[0]) * 10.0 ** int(g[1])),
    (re.compile(rf"([+-]?)\s*\\frac\s*\{{\s*({_NUM})\s*\}}\s*\{{\s*({_NUM})\s*\}}"),
     lambda g: (-1 if g[0] == "-" else 1) * float(g[1]) / float(g[2])),
    (re.compile(r"([+-]?)\s*\\frac\s*(\d)\s*(\d)"),
     lambda g: (-1 if g[0] == "-" else 1) * float(g[1]) / float(g[2])),
    (re.compile(rf"({_NUM})\s*/\s*({_NUM})"), lambda g: float(g[0]) / float(g[1])),
)
_UNIT_ALIASES = {
    "mm": "millimeter millimeters millimetre millimetres", "cm": "centimeter centimeters "
    "centimetre centimetres", "m": "meter meters metre metres", "km": "kilometer kilometers "
    "kilometre kilometres", "in": "inch inches", "ft": "foot feet", "yd": "yard yards",
    "mi": "mile miles", "mg": "milligram milligrams", "g": "gram grams",
    "kg": "kilogram kilograms kilo kilos", "lb": "lbs pound pounds", "oz": "ounce ounces",
    "ml": "milliliter milliliters millilitre millilitres", "l": "liter liters litre litres",
    "s": "sec secs second seconds", "min": "mins minute minutes", "h": "hr hrs hour hours",
    "day": "days", "week": "weeks", "month": "months", "year": "years yr yrs",
    "°": "deg degree degrees", "$": "dollar dollars usd", "cent": "cents",
    "%": "percent pct", "unit": "units", "km/h": "kmh kph", "m/s": "", "mph": "",
}
_UNITS = {alias: canon for canon, aliases in _UNIT_ALIASES.items()
          for alias in (canon, *aliases.split())}
_UNIT_RE = re.compile(r"(.*?\S)\s*((?:square |sq |cubic )?[a-z°$/]+(?:\^\{?[23]\}?|²|³)?)")


_MAX_QUANTITY_CHARS = 100  # "<number> <unit>" is short; the unit pattern backtracks on long text


def _number(s: str) -> float | None:
    for pattern, value in _NUMBER_FORMS:
        if m := pattern.fullmatch(s):
            try:
                v = value(m.groups())
            except (ZeroDivisionError, OverflowError):
                return None
            return v if math.isfinite(v) else None
    return None


def _quantity(raw: str, norm: str) -> tuple[float, bool, str | None] | None:
    """(value, has percent sign, canonical unit or None) when `norm` is a number
    with at most one known unit; None otherwise. `raw` is consulted for `%`,
    which normalisation has already dropped."""
    if len(norm) > _MAX_QUANTITY_CHARS:
        return None
    percent = "%" in raw
    value, unit = _number(norm), None
    if value is None and (m := _UNIT_RE.fullmatch(norm)):
        word = m.group(2)
        power = "^3" if word.startswith("cubic ") or word[-1] in "3³" else (
            "^2" if word.startswith(("square ", "sq ")) or word[-1] in "2²" else "")
        base = re.sub(r"^(?:square |sq |cubic )|(?:\^\{?[23]\}?|²|³)$", "", word)
        if base in _UNITS and (value := _number(m.group(1))) is not None:
            unit = _UNITS[base] + power
    if value is None:
        return None
    if unit == "%":
        percent, unit = True, None
    return value, percent, unit


def _numeric_equal(a: tuple, b: tuple, rel_tol: float, percent_equiv: bool) -> bool:
    (va, pa, ua), (vb, pb, ub) = a, b
    if ua is not None and ub is not None and ua != ub:
        return False
    if math.isclose(va, vb, rel_tol=rel_tol, abs_tol=0.0):
        return True
    if percent_equiv and pa != pb:
        return math.isclose(va / 100 if pa else va, vb / 100 if pb else vb,
                            rel_tol=rel_tol, abs_tol=0.0)
    return False


# ---------------------------------------------------------------- symbolic

_MATH_SIGNAL_RE = re.compile(r"[\d\\^_+\-*/=<>()\[\]{}|√π∞]")
_MATH_WORDS = frozenset({"sin", "cos", "tan", "cot", "sec", "csc", "arcsin", "arccos", "arctan",
                        "sinh", "cosh", "tanh", "log", "exp", "sqrt", "inf", "infty", "max",
                        "min", "lim", "mod", "gcd", "lcm"})  # 3+ letters; shorter never count
# What a single mathematical answer is written with (after `normalize`). Anything
# else is junk the normaliser cannot account for, and math-verify would quietly
# pick an expression out of it ("@#$ 5" -> 5): such answers never reach it.
_EXPRESSION_RE = re.compile(r"[0-9a-z\s\\^_+\-*/=<>()\[\]{}|.,!'°√π∞×·≤≥≠²³]*")
_COMMAND_RE = re.compile(r"\\([a-z]+|.)")
# LaTeX commands of one value: no connectives such as \lor, \vee or line breaks.
_EXPRESSION_COMMANDS = frozenset({
    "frac", "sqrt", "pi", "cdot", "times", "div", "pm", "mp", "infty", "circ", "degree",
    "le", "leq", "ge", "geq", "lt", "gt", "ne", "neq", "approx", "sim", "in", "cup", "cap",
    "emptyset", "varnothing", "mathbb", "overline", "vec", "hat", "bar", "binom", "dbinom",
    "angle", "triangle", "perp", "parallel", "prime", "log", "ln", "exp", "sin", "cos", "tan",
    "cot", "sec", "csc", "arcsin", "arccos", "arctan", "sinh", "cosh", "tanh", "max", "min",
    "lim", "gcd", "lcm", "mod", "bmod", "pmod", "to", "infin", "dots", "ldots", "cdots",
    "lfloor", "rfloor", "lceil", "rceil", "lvert", "rvert", "mid", "nmid", "subset", "subseteq",
    "setminus", "forall", "exists", "partial", "nabla", "int", "sum", "prod", "neg",
    "alpha", "beta", "gamma", "delta", "epsilon", "varepsilon", "zeta", "eta", "theta",
    "vartheta", "iota", "kappa", "lambda", "mu", "nu", "xi", "rho", "varrho", "sigma", "tau",
    "upsilon", "phi", "varphi", "chi", "psi", "omega", "Gamma", "Delta", "Theta", "Lambda",
    "Xi", "Pi", "Sigma", "Phi", "Psi", "Omega", "{", "}", "|",
})
_CONNECTIVES = frozenset({"or", "vs", "nor"})  # 2-letter hedges; longer words are refused anyway
_BRACKETS = {")": "(", "]": "[", "}": "{"}


def _single_expression(s: str) -> bool:
    """Whether a normalised answer reads as one mathematical value: only
    characters of mathematics, known LaTeX commands, no connective words, and
    balanced brackets (a half-open interval "[0,1)" may pair "[" with ")").
    "@#$ 5", "3 \\lor 5", "3 or 5" and "a) 3 b) 5" are not."""
    if not _EXPRESSION_RE.fullmatch(s):
        return False
    if any(c not in _EXPRESSION_COMMANDS for c in _COMMAND_RE.findall(s)):
        return False
    if any(w in _CONNECTIVES for w in re.findall(r"[a-z]+", _COMMAND_RE.sub(" ", s))):
        return False
    depth = 0
    for ch in _COMMAND_RE.sub(" ", s):  # escaped braces \{ \} are set notation, not groups
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
            if depth < 0:
                return False
    return depth == 0


def _worth_symbolic(p: str, r: str) -> bool:
    """Whether a normalised pair may be sent to math-verify: neither side a bare
    letter (option letters and lone variables were settled by steps 1-2), each
    side a single expression (`_single_expression`), at least one side with a
    digit, command or operator, and no word of three or more letters outside
    LaTeX commands and `_MATH_WORDS` on either side; when the reference has
    no top-level comma or "=", the prediction has at most one "=" and no
    comma either (several candidate values are a hedge, not an answer)."""
    if max(len(p), len(r)) > _MAX_SYMBOLIC_CHARS:
        return False
    if any(re.fullmatch(r"\(?[a-z]\)?", s) for s in (p, r)):
        return False
    if not (_single_expression(p) and _single_expression(r)):
        return False
    if not (_MATH_SIGNAL_RE.search(p) or _MATH_SIGNAL_RE.search(r)):
        return False
    if "," not in _top_level(r) and "," in _top_level(p):
        return False
    if p.count("=") > max(1, r.count("=")):
        return False
    words = re.findall(r"[a-z]{3,}", re.sub(r"\\[a-z]+", " ", p + " " + r))
    return all(w in _MATH_WORDS for w in words)


def _top_level(s: str) -> str:
    """The characters of `s` outside any bracket (escaped braces count as brackets)."""
    out, depth = [], 0
    for ch in s:
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth = max(0, depth - 1)
        elif depth == 0:
            out.append(ch)
    return "".join(out)


def math_verify_equal(pred: str, ref: str) -> bool:
    """math-verify's verdict with its signal-based timeouts disabled; runs in
    the grading worker only (the worker's wall-clock limit replaces them)."""
    from math_verify import parse, verify

    gold = parse(f"${ref}$", parsing_timeout=None)
    target = parse(f"${pred}$", parsing_timeout=None)
    return bool(gold and target and verify(gold, target, timeout_seconds=None))


# ------------------------------------------------------------ worker process

_STARTUP_SECONDS = 60.0


def _worker_main(config: dict) -> None:
    """Entry point of a grading worker (actors/sandbox.py): one verdict per request
    {"fn": "module:name", "args": [...]}."""
    from actors.sandbox import serve

    def setup():
        import math_verify  # noqa: F401  (imported before the memory limit)

        logging.getLogger("math_verify").setLevel(logging.ERROR)  # "timeout disabled" notice

        def handle(request: dict, _payload: bytes) -> tuple[dict, bytes]:
            module, name = request["fn"].split(":")
            try:
                value = bool(getattr(importlib.import_module(module), name)(*request["args"]))
                return {"ok": True, "value": value}, b""
            except Exception as exc:  # noqa: BLE001  (reported to the parent, which counts it)
                return {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:300]}, b""

        return handle

    # Warm up before reporting ready: the first parse builds math-verify's LaTeX
    # grammar (about a second on a loaded host), which must not count against
    # the time limit of a real check.
    serve(setup, config["memory_bytes"], warm_up=lambda: math_verify_equal("x+x", "2x"))


class _Worker:
    """One grading worker, started and waited for until it reports ready."""

    def __init__(self, memory_bytes: int):
        from actors.sandbox import SandboxWorker

        self.sandbox = SandboxWorker("pipelines.algorithms.grading:_worker_main",
                                     {"memory_bytes": memory_bytes})
        self.proc = self.sandbox.proc
        self.sandbox.wait_ready(_STARTUP_SECONDS, "grading")

    def call(self, fn: str, args: list, timeout: float) -> dict | str | None:
        """The reply, "crashed" when the worker died, None when ``timeout`` s passed."""
        got = self.sandbox.call({"fn": fn, "args": args}, b"", timeout)
        return got[0] if isinstance(got, tuple) else got

    def kill(self) -> None:
        self.sandbox.kill()


# ------------------------------------------------------------------- grader


def _fn_path(fn: Callable[[str, str], bool]) -> str:
    path = f"{fn.__module__}:{fn.__qualname__}"
    if "<" in path or fn.__module__ == "__main__":
        raise ValueError(f"symbolic_fn must be a module-level function the worker can import, "
                         f"got {path}")
    return path


class Grader:
    """`grade` with its own symbolic worker pool, result cache and counters.

    Thread-safe. Workers start lazily on the first symbolic check (a start-up
    of ~1 s that does not count against the limit); a check that runs past its
    limit returns False, is counted in `symbolic_timeouts`, and its worker is
    killed (replaced lazily). The limit covers the check itself: a thread
    waiting for a busy worker (at most `max_workers` checks run at once)
    waits on top of it. Verdicts of symbolic checks, timeouts included, are
    cached per normalised pair, so majority voting over repeated answers pays
    for a pathological one once.
    """

    def __init__(self, timeout_s: float = DEFAULT_TIMEOUT_S, max_workers: int = 1,
                 memory_bytes: int = 2 << 30, cache_size: int = 4096,
                 symbolic_fn: Callable[[str, str], bool] = math_verify_equal):
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0 seconds, got {timeout_s}")
        if max_workers < 1:
            raise ValueError(f"max_workers must be >= 1, got {max_workers}")
        self.timeout_s = timeout_s
        self._memory_bytes = memory_bytes
        self._fn = _fn_path(symbolic_fn)
        self._slots = threading.BoundedSemaphore(max_workers)
        self._lock = threading.Lock()
        self._idle: list[_Worker] = []
        self._closed = False
        self._cache: OrderedDict[tuple[str, str], bool] = OrderedDict()
        self._cache_size = cache_size
        self._counts = dict.fromkeys(
            ("calls", "equal", "string", "option", "numeric", "symbolic", "symbolic_cached",
             "symbolic_timeouts", "symbolic_over_budget", "symbolic_errors", "too_long",
             "worker_starts"), 0)
        self._local = threading.local()  # the calling thread's budget deadline

    def grade(self, pred: str | None, ref: str | None, *, percent_equiv: bool = False,
              rel_tol: float = DEFAULT_REL_TOL, timeout: float | None = None,
              options: Mapping[str, str] | None = None) -> bool:
        """Whether `pred` answers `ref` (see the module docstring for the order of
        checks). None or blank on either side -> False. `timeout` overrides the
        grader's per-check limit in seconds."""
        self._count("calls")
        verdict = self._grade(pred, ref, percent_equiv, rel_tol, timeout, options)
        if verdict:
            self._count("equal")
        return verdict

    def _grade(self, pred, ref, percent_equiv, rel_tol, timeout, options) -> bool:
        if not isinstance(pred, str) or not isinstance(ref, str):
            if pred is None or ref is None:
                return False
            raise TypeError(f"grade takes str answers, got {type(pred).__name__} and "
                            f"{type(ref).__name__}")
        if max(len(pred), len(ref)) > MAX_ANSWER_CHARS:
            self._count("too_long")
            return False
        p, r = normalize(pred), normalize(ref)
        if not p or not r:
            return False
        if p == r:
            self._count("string")
            return True
        by_option = self._grade_option(p, r, options, percent_equiv, rel_tol, timeout)
        if by_option is not None:
            return by_option
        qp, qr = _quantity(pred, p), _quantity(ref, r)
        if qp is not None and qr is not None:
            self._count("numeric")
            return _numeric_equal(qp, qr, rel_tol, percent_equiv)
        if not _worth_symbolic(p, r):
            return False
        return self._symbolic(p, r, self.timeout_s if timeout is None else timeout)

    def _grade_option(self, p, r, options, percent_equiv, rel_tol, timeout) -> bool | None:
        """True/False when option letters decide the pair, None when they do not."""
        op, orf = _option(p), _option(r)
        if op is None and orf is None:
            return None
        if op is not None and orf is not None:
            self._count("option")
            return op[0] == orf[0]
        # One side names an option: compare the other side with that option's
        # text from `options`, or with the text written after the letter.
        (letter, written), other = (op, r) if op else (orf, p)
        texts = {k.strip().lower(): v for k, v in (options or {}).items()}
        for text in (texts.get(letter), written):
            if text is None:
                continue
            pair = (text, other) if op else (other, text)
            if self._grade(*pair, percent_equiv, rel_tol, timeout, None):
                self._count("option")
                return True
        return None

    @contextmanager
    def budget(self, seconds: float):
        """Symbolic checks made by this thread inside the block share ``seconds``
        of their own time (worker starts included; whatever else the block does,
        such as sampling judges, is not charged): each gets at most what is left,
        and once it is spent the rest count False without running
        (``symbolic_over_budget``). A step's scoring wraps itself in one, so a
        batch of pathological answers costs at most about ``seconds``, never a
        stalled step. A nested budget cannot give more than its outer one has left."""
        if not seconds > 0:
            raise ValueError(f"budget must be > 0 seconds, got {seconds}")
        outer = getattr(self._local, "left", None)
        self._local.left = seconds if outer is None else min(outer, seconds)
        start_left = self._local.left
        try:
            yield
        finally:
            spent = start_left - self._local.left
            self._local.left = None if outer is None else outer - spent

    def _symbolic(self, p: str, r: str, timeout: float) -> bool:
        with self._lock:
            if (p, r) in self._cache:
                self._cache.move_to_end((p, r))
                self._counts["symbolic_cached"] += 1
                return self._cache[(p, r)]
        left = getattr(self._local, "left", None)
        cut = False
        if left is not None:
            if left <= 0:
                self._count("symbolic_over_budget")
                return False
            cut, timeout = left < timeout, min(timeout, left)
        self._count("symbolic")
        start = time.monotonic()
        try:
            verdict, timed_out = self._run(self._fn, [p, r], timeout)
        finally:
            if left is not None:
                self._local.left = left - (time.monotonic() - start)
        if timed_out and cut:  # stopped by the budget, not by the limit: not a verdict
            return False
        with self._lock:
            self._cache[(p, r)] = verdict
            if len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return verdict

    def _run(self, fn: str, args: list, timeout: float) -> tuple[bool, bool]:
        """(verdict, whether the check ran out of time) of one worker call."""
        with self._slots:
            worker, reply = self._take(), None
            try:
                reply = worker.call(fn, args, timeout)
            finally:  # a worker that timed out, died or was interrupted mid-call is not reused
                healthy = isinstance(reply, dict)
                if healthy and not self._closed:
                    with self._lock:
                        self._idle.append(worker)
                else:
                    worker.kill()
        if reply is None:
            self._count("symbolic_timeouts")
            logger.warning("symbolic check over %.1f s, counted False: %.80r vs %.80r",
                           timeout, *args)
            return False, True
        if not healthy or not reply["ok"]:
            self._count("symbolic_errors")
            logger.warning("symbolic check failed (%s): %.80r vs %.80r",
                           reply if not healthy else reply["error"], *args)
            return False, False
        return reply["value"], False

    def _take(self) -> _Worker:
        with self._lock:
            if self._closed:
                raise RuntimeError("Grader is closed")
            while self._idle:
                worker = self._idle.pop()
                if worker.proc.poll() is None:
                    return worker
                worker.kill()
            first = self._counts["worker_starts"] == 0
            self._counts["worker_starts"] += 1
        if first:
            atexit.register(self.close)
        return _Worker(self._memory_bytes)

    def _count(self, key: str) -> None:
        with self._lock:
            self._counts[key] += 1

    def stats(self) -> dict[str, int]:
        """Cumulative counters (for metrics; the caller adds a prefix such as
        `reward/grade_`): calls, equal, how each True/False was decided, symbolic
        timeouts, checks skipped past a budget, errors, answers over
        `MAX_ANSWER_CHARS`, worker starts."""
        with self._lock:
            return dict(self._counts)

    def close(self) -> None:
        """Kill idle workers; busy ones are killed when their check returns."""
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for worker in idle:
            worker.kill()


_default = Grader()


def grade(pred: str | None, ref: str | None, *, percent_equiv: bool = False,
          rel_tol: float = DEFAULT_REL_TOL, timeout: float | None = None,
          options: Mapping[str, str] | None = None) -> bool:
    """`Grader.grade` on the module's shared grader (see `grading_stats`)."""
    return _default.grade(pred, ref, percent_equiv=percent_equiv, rel_tol=rel_tol,
                          timeout=timeout, options=options)


def budget(seconds: float):
    """`Grader.budget` of the module's shared grader (the one `grade` uses)."""
    return _default.budget(seconds)


def grading_stats() -> dict[str, int]:
    """Counters of the shared grader used by `grade`."""
    return _default.stats()


# ------------------------------------------------------------------ majority

INVALID_ANSWERS = frozenset({"", "n/a", "unknown", "-"})


def is_valid_answer(answer: str | None) -> bool:
    """False for None and for "", "n/a", "unknown", "-" (stripped, any case)."""
    return answer is not None and answer.strip().lower() not in INVALID_ANSWERS


@dataclass(frozen=True)
class Cluster:
    representative: str  # the first member, stripped
    members: tuple[int, ...]  # indices into the voted answers, ascending


@dataclass(frozen=True)
class Majority:
    """Result of `majority`. `consistency` is the spec's self-consistency c."""

    label: str | None  # representative of the largest cluster; None if no valid answer
    consistency: float  # |largest cluster| / n_valid; 0.0 if no valid answer
    n_valid: int
    n_total: int
    clusters: tuple[Cluster, ...]  # in order of formation

    @property
    def members(self) -> tuple[int, ...]:
        """Indices of the answers in the majority cluster (empty if none)."""
        top = _largest(self.clusters)
        return top.members if top is not None else ()


def _largest(clusters: Sequence[Cluster]) -> Cluster | None:
    # max() keeps the first of equal sizes: ties go to the earliest-formed cluster.
    return max(clusters, key=lambda c: len(c.members), default=None)


def majority(answers: Sequence[str | None], *,
             grader: Callable[[str, str], bool] = grade) -> Majority:
    """Greedy answer clustering (spec "Answer equivalence"): each valid answer
    joins the first cluster whose representative it grades equal to in either
    direction (`grader(a, rep) or grader(rep, a)`), else starts a new one.
    Ties between largest clusters go to the one formed first."""
    reps: list[str] = []
    members: list[list[int]] = []
    for i, answer in enumerate(answers):
        if not is_valid_answer(answer):
            continue
        a = answer.strip()
        for rep, group in zip(reps, members):
            if grader(a, rep) or grader(rep, a):
                group.append(i)
                break
        else:
            reps.append(a)
            members.append([i])
    clusters = tuple(Cluster(rep, tuple(m)) for rep, m in zip(reps, members))
    n_valid = sum(len(m) for m in members)
    top = _largest(clusters)
    return Majority(label=top.representative if top else None,
                    consistency=len(top.members) / n_valid if top else 0.0,
                    n_valid=n_valid, n_total=len(answers), clusters=clusters)


def agreement(answers: Sequence[str | None], ref: str | None, *,
              grader: Callable[[str, str], bool] = grade) -> float:
    """Share of `answers` that grade equal to `ref` (`grader(answer, ref)`);
    invalid answers count in the denominator (MM-Zero's solvability). 0.0 for
    no answers or no reference."""
    if not answers or not is_valid_answer(ref):
        return 0.0
    hits = sum(1 for a in answers if is_valid_answer(a) and grader(a.strip(), ref))
    return hits / len(answers)
