"""Sandboxed SVG -> PNG rendering (spec: "Render sandbox"; MM-Zero CodeGen extraction).

Data flow: `RendererPool.render_many(svgs) -> list[RenderResult]`, in input order.

Each render runs in a persistent sandboxed worker subprocess
(`actors/sandbox.py`, shared with the grader): its own address-space limit
(RLIMIT_AS) after importing cairosvg, length-prefixed JSON frames over
stdin/stdout (the PNG travels as the raw payload; the parent never unpickles
anything from a child). The pool here enforces the wall-clock limit and kills
and replaces a late worker.

Before cairosvg sees a document, the child:
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

import base64
import binascii
import math
import os
import re
import select
import struct
import time
import types
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from typing import Literal, get_args
from urllib.parse import unquote_to_bytes

from actors.sandbox import SandboxWorker

Failure = Literal["empty", "not_svg", "parse_error", "external_reference", "too_large",
                  "timeout", "memory", "render_error", "cancelled"]
FAILURES: tuple[str, ...] = get_args(Failure)


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
class RenderLimits:
    """Per-render limits, applied inside each worker (wall-clock by the parent)."""

    wall_seconds: float = 30.0
    """Wall-clock seconds per render; the parent kills the worker after this (original: 30)."""
    memory_bytes: int = 1 << 30
    """Address-space limit (RLIMIT_AS) of each worker process."""
    max_input_bytes: int = 2_000_000
    """Longer documents are refused before parsing (failure "too_large")."""
    max_side: float = 16384
    """Largest accepted canvas side in px, before downscaling."""
    max_aspect: float = 100
    """Largest accepted ratio long side / short side."""
    max_output_side: int = 1280
    """PNG is rendered at most this wide and high, keeping the aspect ratio (never upscaled)."""
    max_elements: int = 50_000
    """Largest number of XML elements in the document."""
    max_depth: int = 200
    """Deepest element nesting (cairosvg draws recursively)."""
    max_expanded_elements: int = 100_000
    """Largest element count after expanding <use> and url(#id) references."""

    def __post_init__(self) -> None:
        for f in fields(self):
            if getattr(self, f.name) <= 0:
                raise ValueError(f"RenderLimits.{f.name} must be > 0, got {getattr(self, f.name)}")
        if self.memory_bytes < 64 << 20:
            raise ValueError(f"RenderLimits.memory_bytes must be >= 64 MiB (a worker needs that "
                             f"to import cairosvg), got {self.memory_bytes}")
        if self.max_aspect < 1:
            raise ValueError(f"RenderLimits.max_aspect must be >= 1, got {self.max_aspect}")


@dataclass
class PoolConfig:
    """How a RendererPool runs its workers and stops a batch early."""

    num_workers: int = 0
    """Worker processes; 0 means one per CPU available to this process."""
    grace_seconds: float = 3.0
    """Once the early-stop condition holds, unfinished renders get this long, then are cancelled."""
    early_stop_succeeded: float = 0.7
    """Early stop once this fraction of the batch rendered successfully (spec: 70%)."""
    early_stop_finished: float = 0.9
    """... or once this fraction finished, successfully or not (spec: 90%)."""

    def __post_init__(self) -> None:
        if self.num_workers < 0:
            raise ValueError(f"PoolConfig.num_workers must be >= 0 (0 = one per CPU), "
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


# ---------------------------------------------------------------- extraction

# The language after a fence's ```, and the pieces of raw <svg> tags. Both are
# scanned forward once: lazy `(.*?)```` and `<svg[^>]*?>` patterns rescan the
# rest of the text for every unclosed opener instead (minutes on tens of
# kilobytes of repeated openers).
_FENCE_LANG = re.compile(r"[ \t]*(\w*)")
_SVG_PIECE = re.compile(r"<svg(?=[\s>/])|</svg\s*>|>", re.IGNORECASE)


def _fences(text: str) -> list[tuple[str, str]]:
    """(language, body) of each ``` fence, in order: a fence opens at ```, an
    optional language and the rest of that line, and closes at the next ```;
    an unclosed one runs to the end. ``` with no line end after it opens
    nothing. Each character is scanned a bounded number of times."""
    fences, pos = [], 0
    while (i := text.find("```", pos)) >= 0:
        line_end = text.find("\n", i + 3)
        if line_end < 0:
            break
        lang = _FENCE_LANG.match(text, i + 3, line_end).group(1).lower()
        end = text.find("```", line_end + 1)
        if end < 0:
            fences.append((lang, text[line_end + 1:]))
            break
        fences.append((lang, text[line_end + 1:end]))
        pos = end + 3
    return fences


def extract_svg(text: str | None) -> str | None:
    """The SVG in a CodeGen response, or None (spec: MM-Zero CodeGen "Extraction").

    An ```svg fence, else an ```xml fence containing `<svg`, else the first raw
    `<svg ...</svg>`. An unclosed fence runs to the end of the text (truncated
    generations); the raw match balances nested `<svg>` tags instead of stopping
    at the first `</svg>`. An opening tag runs to the next `>` (so `<svg <svg a>`
    is one tag); `<svg .../>` is self-closing. Linear time in the text.
    """
    if not text:
        return None
    fences = _fences(text)
    for lang, body in fences:
        if lang == "svg":
            return body.strip()
    for lang, body in fences:
        if lang == "xml" and "<svg" in body.lower():
            return body.strip()
    depth, start, tag_start = 0, None, None  # tag_start: inside an opening tag
    for m in _SVG_PIECE.finditer(text):
        piece = m.group(0)
        if tag_start is not None:
            if piece.lower() == "<svg":
                continue  # attribute text of the open tag
            # ">" (or the ">" of a "</svg>") ends the opening tag
            self_closing = text[m.end() - 2] == "/" and piece == ">"
            if self_closing and start is None:
                return text[tag_start:m.end()]
            if not self_closing:
                start = tag_start if start is None else start
                depth += 1
            tag_start = None
        elif piece.lower() == "<svg":
            tag_start = m.start()
        elif piece.startswith("</") and start is not None:
            depth -= 1
            if depth == 0:
                return text[start:m.end()]
    return None


def svg_like(code: str | None) -> bool:
    """True if `code` contains an `<svg` start tag (the CodeGen reward's "SVG-like" test)."""
    return bool(code) and re.search(r"<svg[\s>/]", code, re.IGNORECASE) is not None


# ------------------------------------------------- validation (in the worker)

_DOCTYPE_WITHOUT_SUBSET = re.compile(rb"<!DOCTYPE[^\[>]*>", re.IGNORECASE)
_URL_REF = re.compile(r"url\(\s*['\"]?\s*([^'\")\s]*)", re.IGNORECASE)
# CSS Syntax 4.3.7: a backslash and 1-6 hex digits plus one optional whitespace,
# or a backslash and any other character, which stands for itself; a backslash
# before a newline continues the line. One pass, like the CSS tokenizer.
_CSS_ESCAPE = re.compile(r"\\(?:([0-9a-fA-F]{1,6})(?:\r\n|[ \t\n\r\f])?|(\r\n|[\n\r\f])|(.))",
                         re.DOTALL)
_CSS_COMMENT = re.compile(r"/\*.*?(?:\*/|\Z)", re.DOTALL)  # an unclosed comment runs to the end
# Declared media type of a data: URI -> the image format its bytes must be.
_RASTER_TYPES = {"image/png": "PNG", "image/jpeg": "JPEG", "image/jpg": "JPEG",
                 "image/gif": "GIF", "image/webp": "WebP"}


class RefusedFetch(Exception):
    """cairosvg asked for a resource that the sandbox does not serve."""


class _Reject(Exception):
    def __init__(self, failure: Failure, detail: str):
        super().__init__(detail)
        self.failure, self.detail = failure, detail


def _raster_format(data: bytes) -> str | None:
    """The image format that `data`'s magic bytes announce, if it is one the sandbox serves."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if data.startswith((b"GIF87a", b"GIF89a")):
        return "GIF"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WebP"
    return None


def _decode_raster_data_uri(uri: str) -> bytes:
    """The bytes of a `data:` URI of a raster image; ValueError says why it is not one.

    The declared type must be PNG/JPEG/GIF/WebP (image/svg+xml is refused: it is
    a nested document these checks never saw) and the decoded bytes must start
    with that type's magic bytes. cairosvg sniffs content, not the declared type,
    and parses anything but a PNG that contains `<svg` as SVG, so that is refused
    too. Linear in the length of `uri`.
    """
    header, comma, body = uri[5:].partition(",")
    media_type = header.split(";", 1)[0].strip().lower()
    expected = _RASTER_TYPES.get(media_type)
    if not comma or expected is None:
        raise ValueError(f"data: URI of type {media_type or 'text/plain'!r} is not a PNG, "
                         f"JPEG, GIF or WebP image")
    try:
        data = (base64.b64decode(body) if header.lower().endswith(";base64")
                else unquote_to_bytes(body))
    except (binascii.Error, ValueError) as exc:  # bad padding, non-ASCII characters
        raise ValueError(f"data: URI of type {media_type!r} does not decode: {exc}") from exc
    found = _raster_format(data)
    if found != expected:
        raise ValueError(f"data: URI declared {media_type!r} holds "
                         f"{found + ' data' if found else 'bytes without its magic number'}")
    if expected != "PNG" and b"<svg" in data:
        raise ValueError(f"data: URI declared {media_type!r} contains '<svg' "
                         f"(cairosvg would parse it as a nested SVG document)")
    return data


def fetch_data_only(url: str, resource_type: str) -> bytes:
    """cairosvg url_fetcher: decode a `data:` URI of a raster image, refuse anything else.

    Only images are served (cairosvg asks for "image/*"); a `<use>` target
    ("image/svg+xml") or an @import ("text/css") is refused whatever the URI,
    and so is a data: URI holding SVG or bytes that are not the declared image:
    cairosvg would parse those as documents that the validator never saw.
    """
    if not url.startswith("data:") or resource_type != "image/*":
        raise RefusedFetch(f"refused to fetch {url[:80]!r} ({resource_type})")
    try:
        return _decode_raster_data_uri(url)
    except ValueError as exc:
        raise RefusedFetch(str(exc)) from None


def _local(name: str) -> str:
    return name.rsplit("}", 1)[-1]


def _css_unescape(match: re.Match) -> str:
    hex_digits, newline, char = match.groups()
    if hex_digits is not None:
        code = int(hex_digits, 16)
        return chr(code) if 0 < code <= 0x10FFFF and not 0xD800 <= code <= 0xDFFF else "\ufffd"
    return "" if newline is not None else char


def _css_readings(text: str) -> list[str]:
    """`text` with its CSS escapes decoded, that without comments, and as written.

    A keyword is looked for in all three: a real `@import` or `url(` appears
    in the decoded text; the one without comments also catches `@im/**/port`
    (not an import to a CSS parser; refused anyway), and keeping the one with
    comments means `/*` inside a string cannot hide what follows it.
    """
    decoded = _CSS_ESCAPE.sub(_css_unescape, text) if "\\" in text else text
    readings = [decoded]
    if "/*" in decoded:
        readings.append(_CSS_COMMENT.sub("", decoded))
    if decoded is not text:
        readings.append(text)
    return readings


def _css_references(css: str, imports: bool) -> list[tuple[str, str]]:
    """("url", target) for each url(...) (and ("@import", "") if `imports`) in one CSS
    text, found in any of its readings; one found n times in a reading is listed n times."""
    readings = _css_readings(css)
    found: Counter[tuple[str, str]] = Counter()
    if imports and any("@import" in reading.lower() for reading in readings):
        found["@import", ""] = 1
    for reading in readings:  # the most of each, not the sum: readings repeat one another
        found |= Counter(("url", m.group(1)) for m in _URL_REF.finditer(reading) if m.group(1))
    return list(found.elements())


def _references(el, include_external: bool = True) -> list[tuple[str, str]]:
    """(kind, target) of one element's references, kind "href" (href or src; `<a href>` is
    a link, not drawn), "url" or "@import"; without `include_external`, the `#id`s only."""
    refs = []
    for name, value in el.attrib.items():
        if _local(name) in ("href", "src") and _local(el.tag) != "a":
            refs.append(("href", value.strip()))
        refs.extend(_css_references(value, imports=_local(name) == "style"))
    if _local(el.tag) == "style" and el.text:
        refs.extend(_css_references(el.text, imports=True))
    return [r for r in refs if include_external or r[1].startswith("#")]


def _check_reference(kind: str, ref: str) -> None:
    """Refuse an @import, a url() other than url(#id), an href other than #id or a
    data: URI of a raster image."""
    if kind == "@import":
        raise _Reject("external_reference",
                      "CSS @import (found after decoding CSS escapes and comments)")
    if ref.startswith("#") and len(ref) > 1:
        return
    if kind == "url":
        # cairosvg resolves url() only to elements (fill, clip-path, mask, ...): an image
        # in it has no use, and nothing fetched for CSS is ever looked at again.
        raise _Reject("external_reference",
                      f"url({ref[:80]!r}) is not url(#id) (found after decoding CSS escapes)")
    if ref[:5].lower() != "data:":
        raise _Reject("external_reference",
                      f"reference {ref[:80]!r} is neither #id nor a data: raster image")
    try:
        _decode_raster_data_uri(ref)
    except ValueError as exc:
        raise _Reject("external_reference", f"{exc} (href {ref[:40]!r}...)") from None


def _scan(root, limits: RenderLimits) -> dict:
    """Check counts, depth and references; return the id -> element map (first id wins)."""
    stack, count = [(root, 1)], 0
    while stack:
        el, depth = stack.pop()
        count += 1
        if count > limits.max_elements:
            raise _Reject("too_large", f"more than max_elements={limits.max_elements} elements")
        if depth > limits.max_depth:
            raise _Reject("too_large", f"nesting deeper than max_depth={limits.max_depth}")
        for kind, ref in _references(el):
            _check_reference(kind, ref)
        stack.extend((child, depth + 1) for child in el)
    ids: dict = {}
    for el in root.iter():
        if el.get("id"):
            ids.setdefault(el.get("id").strip(), el)
    return ids


def _check_expansion(root, ids: dict, limits: RenderLimits) -> None:
    """Refuse documents whose <use>/url(#id) expansion exceeds max_expanded_elements.

    cost(el) = 1 + sum(cost(children)) + sum(cost(referenced elements)), by an
    iterative post-order walk (a chain of references must not hit Python's
    recursion limit); costs are capped so a bomb never builds huge integers.
    """
    cap = limits.max_expanded_elements + 1
    cost: dict[int, int] = {}
    on_path: set[int] = set()

    def deps(el) -> list:
        targets = [ids.get(r[1:]) for _, r in _references(el, include_external=False)]
        return list(el) + [t for t in targets if t is not None]

    stack = [(root, False)]
    while stack:
        el, children_done = stack.pop()
        if children_done:
            on_path.discard(id(el))
            cost[id(el)] = min(cap, 1 + sum(cost[id(d)] for d in deps(el)))
            continue
        if id(el) in cost:
            continue
        on_path.add(id(el))
        stack.append((el, True))
        for dep in deps(el):
            if id(dep) in on_path:
                raise _Reject("too_large", "reference cycle (unbounded <use> expansion)")
            if id(dep) not in cost:
                stack.append((dep, False))
    if cost[id(root)] >= cap:
        raise _Reject("too_large", f"more than max_expanded_elements="
                                   f"{limits.max_expanded_elements} after expanding references")


def _output_size(root, limits: RenderLimits) -> tuple[int, int]:
    """Canvas size as cairosvg reads it, checked, then clamped to max_output_side."""
    from cairosvg.helpers import node_format

    # node_format only needs these surface fields; percentages resolve to 0 and
    # fall back to the viewBox, as they do for a top-level cairosvg render.
    probe = types.SimpleNamespace(context_width=None, context_height=None, dpi=96, font_size=16.0)
    try:
        width, height, _ = node_format(probe, root)
    except (ValueError, IndexError) as exc:
        raise _Reject("parse_error", f"unreadable width/height/viewBox: {exc}") from exc
    if not (math.isfinite(width) and math.isfinite(height)):
        raise _Reject("too_large", f"canvas {width} x {height}")
    if width <= 0 or height <= 0:
        raise _Reject("render_error", f"canvas size undefined ({width} x {height})")
    if max(width, height) > limits.max_side:
        raise _Reject("too_large",
                      f"canvas {width:g} x {height:g} exceeds max_side={limits.max_side}")
    if max(width, height) / min(width, height) > limits.max_aspect:
        raise _Reject("too_large", f"aspect of {width:g} x {height:g} exceeds "
                                   f"max_aspect={limits.max_aspect}")
    scale = min(1.0, limits.max_output_side / width, limits.max_output_side / height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def _classify(exc: BaseException) -> tuple[Failure, str]:
    from xml.etree.ElementTree import ParseError

    from defusedxml import DefusedXmlException
    from PIL.Image import DecompressionBombError

    if isinstance(exc, _Reject):
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
        data = _DOCTYPE_WITHOUT_SUBSET.sub(b"", data, count=1)
        root = DefusedET.fromstring(data, forbid_dtd=True, forbid_entities=True,
                                    forbid_external=True)
        if _local(root.tag) != "svg":
            raise _Reject("not_svg", f"root element is <{_local(root.tag)[:40]}>")
        ids = _scan(root, limits)
        _check_expansion(root, ids, limits)
        out_w, out_h = _output_size(root, limits)
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
    from actors.sandbox import serve

    limits = RenderLimits(**limits_dict)

    def setup():
        import cairosvg  # noqa: F401  (imported before the memory limit, not under it)
        from PIL import Image

        Image.MAX_IMAGE_PIXELS = 4096 * 4096  # embedded rasters > 2x this raise DecompressionBombError

        def handle(header: dict, payload: bytes) -> tuple[dict, bytes]:
            result, png = _render_bytes(payload, limits)
            return {"job": header["job"], **result}, png

        return handle

    serve(setup, limits.memory_bytes)


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


def _available_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class RendererPool:
    """N persistent sandboxed workers. Not thread-safe: one render_many at a time."""

    def __init__(self, limits: RenderLimits | None = None, config: PoolConfig | None = None):
        self.limits = limits or RenderLimits()
        self.config = config or PoolConfig()
        n_workers = self.config.num_workers or _available_cpus()
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
        readable, _, _ = select.select(self._workers, [], [], timeout)
        for w in readable:
            frames, alive = w.receive()
            for header, payload in frames:
                self._handle(w, header, payload, results)
            if not alive and w in self._workers:  # (a "memory" result already replaced it)
                self._on_exit(w, results)

    def _handle(self, w: SandboxWorker, header: dict, payload: bytes, results: list) -> None:
        now = time.monotonic()
        if header.get("ready"):
            w.ready, w.since = True, now
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
