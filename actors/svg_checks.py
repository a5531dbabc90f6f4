"""What the render sandbox checks before cairosvg sees an SVG (``actors/renderer.py``
runs these in its worker): SVG extraction from model output, references, CSS, element
counts and expansion, canvas size; and the one url_fetcher cairosvg gets.
"""

from __future__ import annotations

import base64
import binascii
import math
import re
import types
from collections import Counter
from dataclasses import dataclass, fields
from typing import Literal, get_args
from urllib.parse import unquote_to_bytes

# Why a render failed (RenderResult.failure).
Failure = Literal["empty", "not_svg", "parse_error", "external_reference", "too_large",
                  "timeout", "memory", "render_error", "cancelled"]
FAILURES: tuple[str, ...] = get_args(Failure)


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

DOCTYPE_WITHOUT_SUBSET = re.compile(rb"<!DOCTYPE[^\[>]*>", re.IGNORECASE)
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


class Refusal(Exception):
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


def local_name(name: str) -> str:
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
        if local_name(name) in ("href", "src") and local_name(el.tag) != "a":
            refs.append(("href", value.strip()))
        refs.extend(_css_references(value, imports=local_name(name) == "style"))
    if local_name(el.tag) == "style" and el.text:
        refs.extend(_css_references(el.text, imports=True))
    return [r for r in refs if include_external or r[1].startswith("#")]


def _check_reference(kind: str, ref: str) -> None:
    """Refuse an @import, a url() other than url(#id), an href other than #id or a
    data: URI of a raster image."""
    if kind == "@import":
        raise Refusal("external_reference",
                      "CSS @import (found after decoding CSS escapes and comments)")
    if ref.startswith("#") and len(ref) > 1:
        return
    if kind == "url":
        # cairosvg resolves url() only to elements (fill, clip-path, mask, ...): an image
        # in it has no use, and nothing fetched for CSS is ever looked at again.
        raise Refusal("external_reference",
                      f"url({ref[:80]!r}) is not url(#id) (found after decoding CSS escapes)")
    if ref[:5].lower() != "data:":
        raise Refusal("external_reference",
                      f"reference {ref[:80]!r} is neither #id nor a data: raster image")
    try:
        _decode_raster_data_uri(ref)
    except ValueError as exc:
        raise Refusal("external_reference", f"{exc} (href {ref[:40]!r}...)") from None


def scan_tree(root, limits: RenderLimits) -> dict:
    """Check counts, depth and references; return the id -> element map (first id wins)."""
    stack, count = [(root, 1)], 0
    while stack:
        el, depth = stack.pop()
        count += 1
        if count > limits.max_elements:
            raise Refusal("too_large", f"more than max_elements={limits.max_elements} elements")
        if depth > limits.max_depth:
            raise Refusal("too_large", f"nesting deeper than max_depth={limits.max_depth}")
        for kind, ref in _references(el):
            _check_reference(kind, ref)
        stack.extend((child, depth + 1) for child in el)
    ids: dict = {}
    for el in root.iter():
        if el.get("id"):
            ids.setdefault(el.get("id").strip(), el)
    return ids


def check_expansion(root, ids: dict, limits: RenderLimits) -> None:
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
                raise Refusal("too_large", "reference cycle (unbounded <use> expansion)")
            if id(dep) not in cost:
                stack.append((dep, False))
    if cost[id(root)] >= cap:
        raise Refusal("too_large", f"more than max_expanded_elements="
                                   f"{limits.max_expanded_elements} after expanding references")


def output_size(root, limits: RenderLimits) -> tuple[int, int]:
    """Canvas size as cairosvg reads it, checked, then clamped to max_output_side."""
    from cairosvg.helpers import node_format

    # node_format only needs these surface fields; percentages resolve to 0 and
    # fall back to the viewBox, as they do for a top-level cairosvg render.
    probe = types.SimpleNamespace(context_width=None, context_height=None, dpi=96, font_size=16.0)
    try:
        width, height, _ = node_format(probe, root)
    except (ValueError, IndexError) as exc:
        raise Refusal("parse_error", f"unreadable width/height/viewBox: {exc}") from exc
    if not (math.isfinite(width) and math.isfinite(height)):
        raise Refusal("too_large", f"canvas {width} x {height}")
    if width <= 0 or height <= 0:
        raise Refusal("render_error", f"canvas size undefined ({width} x {height})")
    if max(width, height) > limits.max_side:
        raise Refusal("too_large",
                      f"canvas {width:g} x {height:g} exceeds max_side={limits.max_side}")
    if max(width, height) / min(width, height) > limits.max_aspect:
        raise Refusal("too_large", f"aspect of {width:g} x {height:g} exceeds "
                                   f"max_aspect={limits.max_aspect}")
    scale = min(1.0, limits.max_output_side / width, limits.max_output_side / height)
    return max(1, round(width * scale)), max(1, round(height * scale))


