"""Answer text: extraction (``\\boxed{}``, tags), normalisation, option letters,
numbers with units, and the screen that decides which pairs reach the symbolic check.
Linear time on hostile text; ``pipelines/algorithms/grading.py`` combines them into
``grade`` (the order of the checks is documented there).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from functools import lru_cache

DEFAULT_REL_TOL = 1e-4  # spec
_MAX_SYMBOLIC_CHARS = 500  # longer "answers" are rambles, not expressions: never sent
# An extracted answer longer than this is degenerate output, not an answer: it
# grades False at once (counted as `too_long`), so normalising it costs nothing.
MAX_ANSWER_CHARS = 2000

# ---------------------------------------------------------------- extraction

_BOX_RE = re.compile(r"\\(?:boxed|fbox)\s*\{")


def closing_brace(text: str, start: int) -> int | None:
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
        end = closing_brace(text, m.end())
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
    if len(s) > 1 and s[0] == "{" and closing_brace(s, 1) == len(s) - 1:
        s = s[1:-1].strip()
    return _strip_thousands(s)


# ------------------------------------------------------------ option letters

_LETTER_RE = re.compile(r"(?:(?:option|choice)\s*[:.]?\s*)?\(?([a-z])\)?[.:]?")
_LETTER_TEXT_RE = re.compile(r"(?:\(([a-z])\)|([a-z])[.)])\s+(\S.*)")


def option_of(s: str) -> tuple[str, str | None] | None:
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


def quantity_of(raw: str, norm: str) -> tuple[float, bool, str | None] | None:
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


def numeric_equal(a: tuple, b: tuple, rel_tol: float, percent_equiv: bool) -> bool:
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


def worth_symbolic(p: str, r: str) -> bool:
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


