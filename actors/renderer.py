"""Sandboxed SVG -> PNG rendering (spec: "Render sandbox"; MM-Zero CodeGen extraction).

Data flow: `RendererPool.render_many(svgs) -> list[RenderResult]`, in input order.

Each render runs in a persistent sandboxed worker subprocess
(`actors/sandbox.py`, shared with the grader): its own address-space limit
(RLIMIT_AS) after importing cairosvg, length-prefixed JSON frames over
stdin/stdout (the PNG travels as the raw payload; the parent never unpickles
anything from a child). The pool here enforces the wall-clock limit and kills
and replaces a late worker.

Before cairosvg sees a document, the child (checks in `actors/svg_checks.py`):
  1. drops a DOCTYPE without internal subset (the SVG 1.1 boilerplate); any
     other DTD or entity declaration is refused by defusedxml;
  2. refuses external references: every href (and src) must be `#id` or a
     `data:` URI declared as PNG/JPEG/GIF/WebP whose decoded bytes start with
     that type's magic bytes (no SVG inside: a nested document would escape
     these checks); every `url(...)` must be `url(#id)`; no CSS `@import`. CSS
     (style elements and attributes) is searched after decoding its escapes,
     with and without its comments, so `@\69mport` or `@im/**/port` count;
  3. bounds the element count, the nesting depth and the element count after
     expanding `<use>` and `url(#id)` references (the `<use>` bomb);
  4. reads the canvas size, refuses a side > max_side or an aspect ratio >
     max_aspect, and renders straight at the downscaled output size.
cairosvg then gets `fetch_data_only` as its url_fetcher, the single point
through which it reads images, `<use>` targets and stylesheets: it serves only
images, from `data:` URIs that pass the same check as in 2., so nothing is read
from disk or network even if the validation above missed a reference.
"""

from __future__ import annotations

import re
import struct
import time
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from xml.etree.ElementTree import ParseError

from actors.sandbox import SandboxWorker, default_workers, serve, wait_readable
from actors.svg_checks import (
    DOCTYPE_WITHOUT_SUBSET,
    FAILURES,
    Failure,
    Refusal,
    RefusedFetch,
    RenderLimits,
    check_expansion,
    fetch_data_only,
    local_name,
    output_size,
    scan_tree,
)


@dataclass
class RenderResult:
    """Outcome of one render. `png` is set iff `ok`; `failure` is set iff not `ok`."""

    ok: bool
    png: bytes | None
    width: int  # of the PNG (after downscaling); 0 on failure
    height: int
    failure: Failure | None
    seconds: float  # dispatch to result in the parent; 0.0 if refused before reaching a worker
    detail: str = ""  # human-readable reason for logs; never contains fetched content


@dataclass
class PoolConfig:
    """How a RendererPool runs its workers and stops a batch early."""

    num_workers: int = 0
    """Worker processes; 0: one per CPU this process may use (a container's CPU quota
    included), no more than its memory limit holds (``sandbox.default_workers``)."""
    grace_seconds: float = 3.0
    """Once the early-stop condition holds, unfinished renders get this long, then are cancelled."""
    early_stop_succeeded: float = 0.7
    """Early stop once this fraction of the batch rendered successfully (spec: 70%)."""
    early_stop_finished: float = 0.9
    """... or once this fraction finished, successfully or not (spec: 90%)."""

    def __post_init__(self) -> None:
        if self.num_workers < 0:
            raise ValueError(f"PoolConfig.num_workers must be >= 0 (0 = one per CPU, "
                             "sandbox.default_workers), "
                             f"got {self.num_workers}")
        if self.grace_seconds < 0:
            raise ValueError(f"PoolConfig.grace_seconds must be >= 0, got {self.grace_seconds}")
        for name in ("early_stop_succeeded", "early_stop_finished"):
            if not 0 < getattr(self, name) <= 1:
                raise ValueError(f"PoolConfig.{name} must be in (0, 1], got {getattr(self, name)}")


def early_stop_reached(n_ok: int, n_done: int, n_total: int, config: PoolConfig) -> bool:
    """Spec batch early stop: >= 70% succeeded or >= 90% finished (fractions from `config`)."""
    if n_total == 0:
        return False
    return (n_ok / n_total >= config.early_stop_succeeded
            or n_done / n_total >= config.early_stop_finished)


def _classify(exc: BaseException) -> tuple[Failure, str]:
    from defusedxml import DefusedXmlException
    from PIL.Image import DecompressionBombError

    if isinstance(exc, Refusal):
        return exc.failure, exc.detail
    if isinstance(exc, (RefusedFetch, DefusedXmlException)):
        return "external_reference", f"{type(exc).__name__}: {exc}"
    if isinstance(exc, ParseError):
        return "parse_error", str(exc)
    if isinstance(exc, MemoryError):  # includes cairo's STATUS_NO_MEMORY
        return "memory", f"{type(exc).__name__}: {exc}"
    if isinstance(exc, DecompressionBombError):
        return "too_large", str(exc)
    return "render_error", f"{type(exc).__name__}: {exc}"


def _render_bytes(data: bytes, limits: RenderLimits) -> tuple[dict, bytes]:
    """Validate and render in this process (a worker). Returns (result header, png)."""
    import cairosvg.surface
    from defusedxml import ElementTree as DefusedET

    try:
        data = DOCTYPE_WITHOUT_SUBSET.sub(b"", data, count=1)
        root = DefusedET.fromstring(data, forbid_dtd=True, forbid_entities=True,
                                    forbid_external=True)
        if local_name(root.tag) != "svg":
            raise Refusal("not_svg", f"root element is <{local_name(root.tag)[:40]}>")
        ids = scan_tree(root, limits)
        check_expansion(root, ids, limits)
        out_w, out_h = output_size(root, limits)
        # cairosvg re-parses the same bytes with the same defusedxml parser; svg2png
        # does not forward url_fetcher, PNGSurface.convert hands it to the Tree.
        png = cairosvg.surface.PNGSurface.convert(
            bytestring=data, url_fetcher=fetch_data_only, unsafe=False,
            output_width=out_w, output_height=out_h)
        width, height = struct.unpack(">II", png[16:24])
        return {"ok": True, "width": width, "height": height, "failure": None, "detail": ""}, png
    except Exception as exc:  # noqa: BLE001 -- the sandbox's job: every failure is typed
        failure, detail = _classify(exc)
        return {"ok": False, "width": 0, "height": 0, "failure": failure,
                "detail": detail[:300]}, b""


# ---------------------------------------------------------- worker process

_STARTUP_SECONDS = 60.0


def _worker_main(limits_dict: dict) -> None:
    """Entry point of a render worker (actors/sandbox.py): PNG for each SVG payload."""

    limits = RenderLimits(**limits_dict)

    def setup():
        import cairosvg  # noqa: F401  (imported before the memory limit, not under it)
        from PIL import Image

        Image.MAX_IMAGE_PIXELS = 4096 * 4096  # embedded rasters > 2x this raise DecompressionBombError

        def handle(header: dict, payload: bytes) -> tuple[dict, bytes]:
            result, png = _render_bytes(payload, limits)
            return {"job": header["job"], **result}, png

        return handle

    serve(setup, limits.memory_bytes, cpu_seconds=2 * limits.wall_seconds + 1)


def _start_worker(limits: RenderLimits) -> SandboxWorker:
    return SandboxWorker("actors.renderer:_worker_main", asdict(limits))


def _failed(failure: Failure, seconds: float, detail: str) -> RenderResult:
    return RenderResult(False, None, 0, 0, failure, seconds, detail)


def _precheck(svg: str | None, limits: RenderLimits) -> bytes | RenderResult:
    """Cheap checks in the parent; returns the UTF-8 payload or a failed result."""
    if svg is None:
        return _failed("empty", 0.0, "no SVG code")
    if len(svg) > limits.max_input_bytes:  # before any parsing or copying
        return _failed("too_large", 0.0, f"{len(svg)} characters > max_input_bytes")
    if not svg.strip():
        return _failed("empty", 0.0, "no SVG code")
    try:
        data = svg.encode("utf-8")
    except UnicodeEncodeError as exc:
        return _failed("parse_error", 0.0, f"not encodable as UTF-8: {exc}")
    if len(data) > limits.max_input_bytes:
        return _failed("too_large", 0.0, f"{len(data)} bytes > max_input_bytes")
    if re.search(rb"<svg", data, re.IGNORECASE) is None:
        return _failed("not_svg", 0.0, "no <svg tag")
    return data


class RendererPool:
    """N persistent sandboxed workers. Not thread-safe: one render_many at a time."""

    def __init__(self, limits: RenderLimits | None = None, config: PoolConfig | None = None):
        self.limits = limits or RenderLimits()
        self.config = config or PoolConfig()
        n_workers = self.config.num_workers or default_workers(self.limits.memory_bytes)
        self._workers = [_start_worker(self.limits) for _ in range(n_workers)]
        self._counts: Counter[str] = Counter()
        self._restarts = 0

    def render(self, svg: str | None) -> RenderResult:
        return self.render_many([svg], early_stop=False)[0]

    def render_many(self, svgs: Sequence[str | None],
                    early_stop: bool = True) -> list[RenderResult]:
        """Render all `svgs`; results in input order. With `early_stop`, the spec's batch
        early stop applies: after the condition holds, the rest get `grace_seconds`, then
        are cancelled (failure "cancelled")."""
        results: list[RenderResult | None] = []
        payloads: dict[int, bytes] = {}
        for i, svg in enumerate(svgs):
            checked = _precheck(svg, self.limits)
            results.append(checked if isinstance(checked, RenderResult) else None)
            if not isinstance(checked, RenderResult):
                payloads[i] = checked
        pending = deque(payloads)
        grace_end = None
        while pending or any(w.job is not None for w in self._workers):
            now = time.monotonic()
            if early_stop and grace_end is None:
                done = [r for r in results if r is not None]
                if early_stop_reached(sum(r.ok for r in done), len(done), len(results),
                                      self.config):
                    grace_end = now + self.config.grace_seconds
            if grace_end is not None and now >= grace_end:
                self._cancel(results, pending, now)
                break
            self._dispatch(pending, payloads)
            self._expire(results, now)
            self._collect(results, grace_end)
        assert all(r is not None for r in results)
        self._counts.update("ok" if r.ok else r.failure for r in results)
        return results

    def stats(self) -> dict[str, int]:
        """Cumulative counters since construction (for metrics; the caller adds a prefix)."""
        out = {"renders": sum(self._counts.values()), "ok": self._counts["ok"],
               "worker_restarts": self._restarts}
        out.update({f"failed/{reason}": self._counts[reason] for reason in FAILURES})
        return out

    def close(self) -> None:
        for w in self._workers:
            w.kill()
        self._workers = []

    def __enter__(self) -> RendererPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _replace(self, worker: SandboxWorker) -> int:
        code = worker.kill()
        self._workers[self._workers.index(worker)] = _start_worker(self.limits)
        self._restarts += 1
        return code

    def _dispatch(self, pending: deque, payloads: dict[int, bytes]) -> None:
        for w in list(self._workers):
            if pending and w.ready and w.job is None:
                job = pending.popleft()
                try:
                    w.job, w.since = job, time.monotonic()
                    w.send({"job": job}, payloads[job])
                except BrokenPipeError:  # died while idle: not this job's fault
                    pending.appendleft(job)
                    self._replace(w)

    def _expire(self, results: list, now: float) -> None:
        for w in list(self._workers):
            if w.job is not None and now - w.since >= self.limits.wall_seconds:
                results[w.job] = _failed("timeout", now - w.since,
                                         f"killed after wall_seconds={self.limits.wall_seconds}")
                self._replace(w)
            elif not w.ready and now - w.since > _STARTUP_SECONDS:
                raise RuntimeError(f"renderer worker not ready after {_STARTUP_SECONDS} s")

    def _cancel(self, results: list, pending: deque, now: float) -> None:
        detail = f"batch early stop: grace_seconds={self.config.grace_seconds} over"
        for w in list(self._workers):
            if w.job is not None:
                results[w.job] = _failed("cancelled", now - w.since, detail)
                self._replace(w)
        for job in pending:
            results[job] = _failed("cancelled", 0.0, detail)
        pending.clear()

    def _collect(self, results: list, grace_end: float | None) -> None:
        """Wait until a worker speaks or the next deadline, then handle what arrived."""
        deadlines = [grace_end] if grace_end is not None else []
        for w in self._workers:
            if w.job is not None:
                deadlines.append(w.since + self.limits.wall_seconds)
            elif not w.ready:
                deadlines.append(w.since + _STARTUP_SECONDS)
        timeout = max(0.0, min(deadlines) - time.monotonic()) if deadlines else 1.0
        readable = wait_readable(self._workers, timeout)
        for w in readable:
            frames, alive = w.receive()
            for header, payload in frames:
                self._handle(w, header, payload, results)
            if not alive and w in self._workers:  # (a "memory" result already replaced it)
                self._on_exit(w, results)

    def _handle(self, w: SandboxWorker, header: dict, payload: bytes, results: list) -> None:
        now = time.monotonic()
        if header.get("ready"):
            w.started(header)
            return
        assert header["job"] == w.job, (header["job"], w.job)
        results[w.job] = RenderResult(header["ok"], payload or None, header["width"],
                                      header["height"], header["failure"], now - w.since,
                                      header["detail"])
        w.job = None
        if header["failure"] == "memory":  # the heap may be left fragmented: start afresh
            self._replace(w)

    def _on_exit(self, w: SandboxWorker, results: list) -> None:
        was_ready, job, since = w.ready, w.job, w.since
        code = self._replace(w)
        if not was_ready:
            raise RuntimeError(f"renderer worker exited with code {code} before it was ready "
                               f"(can it import cairosvg within memory_bytes="
                               f"{self.limits.memory_bytes}?)")
        if job is not None:
            results[job] = _failed("render_error", time.monotonic() - since,
                                   f"worker exited with code {code}")


class RenderWorker:
    """A RendererPool behind a Ray-actor-shaped API.

    The caller applies Ray: `ray.remote(num_cpus=...)(RenderWorker).remote(limits, config)`.
    Nothing happens at import; the workers start when the instance is built.
    """

    def __init__(self, limits: RenderLimits | None = None, config: PoolConfig | None = None):
        self._pool = RendererPool(limits, config)

    def render_many(self, svgs: Sequence[str | None],
                    early_stop: bool = True) -> list[RenderResult]:
        return self._pool.render_many(svgs, early_stop)

    def stats(self) -> dict[str, int]:
        return self._pool.stats()

    def close(self) -> None:
        self._pool.close()
