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
     `worth_symbolic`): plain words such as "dog"/"god" would otherwise parse
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
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from actors.sandbox import SandboxWorker, serve
from pipelines.algorithms.answers import (
    DEFAULT_REL_TOL,
    MAX_ANSWER_CHARS,
    math_verify_equal,
    normalize,
    numeric_equal,
    option_of,
    quantity_of,
    worth_symbolic,
)

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 5.0  # per symbolic check; math-verify's own default is 5 s

# ------------------------------------------------------------ worker process

_STARTUP_SECONDS = 60.0


def _worker_main(config: dict) -> None:
    """Entry point of a grading worker (actors/sandbox.py): one verdict per request
    {"fn": "module:name", "args": [...]}."""

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
        qp, qr = quantity_of(pred, p), quantity_of(ref, r)
        if qp is not None and qr is not None:
            self._count("numeric")
            return numeric_equal(qp, qr, rel_tol, percent_equiv)
        if not worth_symbolic(p, r):
            return False
        return self._symbolic(p, r, self.timeout_s if timeout is None else timeout)

    def _grade_option(self, p, r, options, percent_equiv, rel_tol, timeout) -> bool | None:
        """True/False when option letters decide the pair, None when they do not."""
        op, orf = option_of(p), option_of(r)
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
        stalled step. A nested budget cannot give more than its outer one has left.

        Yields the block's own counts (``stats()``'s keys, for this thread's checks
        inside the block): what a step reports as its timeouts, without diffing the
        grader's totals, which other threads move too."""
        if not seconds > 0:
            raise ValueError(f"budget must be > 0 seconds, got {seconds}")
        outer = getattr(self._local, "left", None)
        self._local.left = seconds if outer is None else min(outer, seconds)
        start_left = self._local.left
        blocks = getattr(self._local, "blocks", [])
        counts: Counter = Counter()
        self._local.blocks = [*blocks, counts]
        try:
            yield counts
        finally:
            spent = start_left - self._local.left
            self._local.left = None if outer is None else outer - spent
            self._local.blocks = blocks

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
        for block in getattr(self._local, "blocks", ()):  # the budget blocks around the call
            block[key] += 1

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
