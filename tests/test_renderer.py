"""Render sandbox (spec: "Render sandbox"): real worker processes on CPU, no Ray.

Every hostile document must come back as its typed failure within its limit,
and the pool must still render a good SVG afterwards.
"""

from __future__ import annotations

import base64
import http.server
import io
import threading
import time
import urllib.request

import pytest
from PIL import Image

from actors import renderer, svg_checks
from actors.renderer import (
    FAILURES,
    PoolConfig,
    RendererPool,
    RenderLimits,
    RenderWorker,
    early_stop_reached,
)
from actors.svg_checks import RefusedFetch, extract_svg, fetch_data_only, svg_like

NS = 'xmlns="http://www.w3.org/2000/svg" xmlns:xlink="http://www.w3.org/1999/xlink"'
GOOD = (f'<svg {NS} width="200" height="100">'
        '<rect width="100" height="100" fill="#ff0000"/>'
        '<rect x="100" width="100" height="100" fill="#0000ff"/></svg>')
WALL = 3.0
GRACE = 0.5


HOSTILE_CSS = ["/*" * 300_000, "\\" * 600_000, "\\aaaaaa" * 80_000, "a/*" + "*" * 600_000,
               "@im/**/" * 80_000, "url(" * 150_000]


def slow_svg(segments: int = 120_000) -> str:
    """A legitimate SVG that takes cairo tens of seconds: a thick self-crossing polyline.

    Its cost grows about quadratically with the segments: 30k took 1.6 s on an AMD
    EPYC here (under the 3 s WALL: the timeout test then failed), 60k 4.9 s, 120k 22 s.
    """
    d = "M0 0 " + " ".join(f"L{(i * 37) % 400} {(i * 91) % 400}" for i in range(segments))
    return (f'<svg {NS} width="400" height="400">'
            f'<path d="{d}" stroke="black" stroke-width="20" fill="none"/></svg>')


def png_bytes(color: tuple[int, int, int], size: tuple[int, int] = (8, 8)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def pool():
    with RendererPool(RenderLimits(wall_seconds=WALL),
                      PoolConfig(num_workers=2, grace_seconds=GRACE)) as p:
        yield p


def assert_still_serves(pool: RendererPool) -> None:
    result = pool.render(GOOD)
    assert result.ok, result.detail
    assert (result.width, result.height) == (200, 100)


def assert_fails(pool: RendererPool, svg: str | None, failure: str, *, within: float = WALL):
    result = pool.render(svg)
    assert (result.ok, result.failure) == (False, failure), result.detail
    assert result.png is None and result.seconds < within
    return result


# ------------------------------------------------------------------ success


def test_valid_svg_renders_with_its_size_and_colors(pool):
    result = pool.render(GOOD)
    assert result.ok and result.failure is None
    image = Image.open(io.BytesIO(result.png)).convert("RGBA")
    assert image.size == (200, 100) == (result.width, result.height)
    assert image.getpixel((50, 50)) == (255, 0, 0, 255)
    assert image.getpixel((150, 50)) == (0, 0, 255, 255)


def test_large_canvas_is_downscaled_keeping_aspect(pool):
    svg = (f'<svg {NS} width="4000" height="2000"><rect width="4000" height="2000" fill="#00ff00"/>'
           '<rect x="3000" width="1000" height="2000" fill="#ff0000"/></svg>')
    result = pool.render(svg)
    assert result.ok, result.detail
    image = Image.open(io.BytesIO(result.png)).convert("RGB")
    assert image.size == (1280, 640)
    assert image.getpixel((100, 320)) == (0, 255, 0)
    assert image.getpixel((1200, 320)) == (255, 0, 0)  # right quarter: x >= 960


# ---------------------------------------------------------- hostile inputs


def test_xml_entities_never_read_a_local_file(pool, tmp_path):
    secret = "TOPSECRET-7f3a9c"
    path = tmp_path / "secret.txt"
    path.write_text(secret)
    xxe = (f'<?xml version="1.0"?><!DOCTYPE svg [<!ENTITY xxe SYSTEM "file://{path}">]>'
           f'<svg {NS} width="400" height="50"><text x="0" y="30">&xxe;</text></svg>')
    laughs = ('<!DOCTYPE svg [<!ENTITY a "lol"><!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;">]>'
              f'<svg {NS} width="10" height="10"><text>&b;</text></svg>')
    for svg in (xxe, laughs):
        result = assert_fails(pool, svg, "external_reference")
        assert secret not in repr(result)
    assert_still_serves(pool)


def test_file_and_relative_references_are_refused(pool, tmp_path):
    (tmp_path / "secret.png").write_bytes(png_bytes((255, 0, 0)))
    url = f"file://{tmp_path}/secret.png"
    cases = [
        f'<image href="{url}" width="8" height="8"/>',
        f'<image xlink:href="{url}" width="8" height="8"/>',
        '<image href="secret.png" width="8" height="8"/>',  # relative -> worker's cwd
        f'<use href="file://{tmp_path}/other.svg#x"/>',
        f'<style>@import url("{url}");</style><rect width="5" height="5"/>',
        f'<rect width="5" height="5" style="fill: url({url}#g)"/>',
        '<image href="data:image/svg+xml;base64,PHN2Zy8+" width="8" height="8"/>',
    ]
    for body in cases:
        assert_fails(pool, f'<svg {NS} width="10" height="10">{body}</svg>', "external_reference")
    assert_still_serves(pool)


@pytest.fixture
def http_server():
    """A local HTTP server that records every request it receives."""
    requests: list[str] = []

    class Recorder(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            requests.append(self.path)
            body = png_bytes((0, 255, 0))
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Recorder)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    urllib.request.urlopen(f"{base}/sanity").read()  # the recorder works ...
    assert requests == ["/sanity"]
    requests.clear()  # ... so an empty list below means no request was made
    yield base, requests
    server.shutdown()
    server.server_close()


def test_http_references_are_never_fetched(pool, http_server):
    base, requests = http_server
    refused = [
        f'<svg {NS} width="10" height="10"><image href="{base}/a.png" width="8" height="8"/></svg>',
        f'<svg {NS} width="10" height="10"><use xlink:href="{base}/b.svg#x"/></svg>',
        f'<svg {NS} width="10" height="10"><style>@import "{base}/c.css";</style></svg>',
        (f'<!DOCTYPE svg [<!ENTITY e SYSTEM "{base}/d.txt">]>'
         f'<svg {NS} width="9" height="9">&e;</svg>'),
    ]
    for svg in refused:
        assert_fails(pool, svg, "external_reference")
    # Harmless boilerplate renders, and its URLs are not fetched either.
    harmless = (f'<?xml-stylesheet type="text/css" href="{base}/e.css"?>'
                f'<!DOCTYPE svg PUBLIC "-//W3C//DTD SVG 1.1//EN" "{base}/f.dtd">{GOOD}')
    assert pool.render(harmless).ok
    assert requests == []
    assert_still_serves(pool)


def test_url_fetcher_is_the_backstop_when_validation_is_bypassed(monkeypatch, tmp_path):
    (tmp_path / "secret.png").write_bytes(png_bytes((255, 0, 0)))
    for url in (f"file://{tmp_path}/secret.png", "http://127.0.0.1:9/x.png",
                "data:image/svg+xml;base64,PHN2Zy8+", "data:image/png;base64,AAAA"):
        with pytest.raises(RefusedFetch):
            fetch_data_only(url, "image/*")
    raster = png_bytes((0, 0, 255))
    assert fetch_data_only("data:image/png;base64," + base64.b64encode(raster).decode(),
                           "image/*") == raster
    # In this process, with the validator switched off, cairosvg itself must go
    # through fetch_data_only and refuse the file.
    monkeypatch.setattr(renderer, "scan_tree", lambda root, limits: {})
    svg = f'<svg {NS} width="10" height="10"><image href="file://{tmp_path}/secret.png" ' \
          'width="8" height="8"/></svg>'
    header, png = renderer._render_bytes(svg.encode(), RenderLimits())
    assert (header["failure"], png) == ("external_reference", b""), header


def test_oversized_canvas_and_extreme_aspect_are_refused(pool):
    huge = f'<svg {NS} width="100000" height="100000"><rect width="9" height="9"/></svg>'
    assert_fails(pool, huge, "too_large", within=1.0)
    assert_fails(pool, f'<svg {NS} viewBox="0 0 10000 50"><rect width="9" height="9"/></svg>',
                 "too_large", within=1.0)
    assert_still_serves(pool)


def test_use_bomb_is_refused_before_rendering(pool):
    levels = ['<rect id="l0" width="1" height="1"/>']
    for level in range(1, 11):  # 10 levels x 10 uses: 10^10 rects once expanded
        uses = "".join(f'<use href="#l{level - 1}" x="{i}"/>' for i in range(10))
        levels.append(f'<g id="l{level}">{uses}</g>')
    bomb = f'<svg {NS} width="100" height="100"><defs>{"".join(levels)}</defs>' \
           '<use href="#l10"/></svg>'
    result = assert_fails(pool, bomb, "too_large", within=1.0)
    assert "max_expanded_elements" in result.detail
    cycle = f'<svg {NS} width="10" height="10"><g id="a"><use href="#b"/></g>' \
            '<g id="b"><use href="#a"/></g></svg>'
    assert_fails(pool, cycle, "too_large", within=1.0)
    assert_still_serves(pool)


def test_50mb_document_is_refused_before_parsing(pool):
    huge = f'<svg {NS} width="10" height="10"><!--{"a" * 50_000_000}--></svg>'
    start = time.monotonic()
    result = pool.render(huge)
    assert (result.failure, result.seconds) == ("too_large", 0.0)  # never sent to a worker
    assert time.monotonic() - start < 1.0
    assert_still_serves(pool)


def test_empty_html_and_malformed_inputs(pool):
    for empty in ("", "  \n\t", None):
        assert_fails(pool, empty, "empty", within=0.1)
    assert_fails(pool, "<html><body><h1>A chart</h1></body></html>", "not_svg", within=0.1)
    xhtml = f'<html xmlns="http://www.w3.org/1999/xhtml"><body>{GOOD}</body></html>'
    assert_fails(pool, xhtml, "not_svg")
    assert_fails(pool, f'<svg {NS} width="10" height="10"><rect></svg>', "parse_error")
    assert_still_serves(pool)


def test_timeout_kills_the_worker_and_the_pool_recovers(pool):
    restarts = pool.stats()["worker_restarts"]
    slow, good, good2 = pool.render_many([slow_svg(), GOOD, GOOD], early_stop=False)
    assert slow.failure == "timeout"
    assert WALL <= slow.seconds < WALL + 1.5
    assert good.ok and good2.ok  # the other worker kept serving meanwhile
    assert pool.stats()["worker_restarts"] == restarts + 1
    assert_still_serves(pool)


def test_memory_limit_gives_a_typed_failure_and_a_fresh_worker():
    limits = RenderLimits(memory_bytes=256 << 20, max_output_side=16384, wall_seconds=10)
    with RendererPool(limits, PoolConfig(num_workers=1)) as small:
        # 12000 x 12000 ARGB needs 576 MB > 256 MiB.
        result = small.render(f'<svg {NS} width="12000" height="12000"></svg>')
        assert result.failure == "memory", result.detail
        assert small.stats()["worker_restarts"] == 1
        assert_still_serves(small)


# ------------------------------------------- CSS escapes and data: URIs

CSS_URL = "http://127.0.0.1:9/x.css"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def data_uri(media_type: str, data: bytes) -> str:
    return f"data:{media_type};base64,{base64.b64encode(data).decode()}"


def refused_by_validation(monkeypatch, body: str) -> str:
    """The worker's checks refuse `<svg>body</svg>` before cairosvg runs; returns the detail."""
    import cairosvg.surface

    calls = []
    monkeypatch.setattr(cairosvg.surface.PNGSurface, "convert", lambda **kw: calls.append(kw))
    svg = f'<svg {NS} width="10" height="10">{body}</svg>'
    header, png = renderer._render_bytes(svg.encode(), RenderLimits())
    assert (header["failure"], png, calls) == ("external_reference", b"", []), header
    return header["detail"]


IMPORT = "CSS @import (found after decoding CSS escapes and comments)"


@pytest.mark.parametrize("body, message", [
    # A hex escape: 1-6 hex digits, then one optional whitespace that belongs to it.
    (rf'<style>@\69mport "{CSS_URL}";</style>', IMPORT),
    (rf'<style>@im\70 ort "{CSS_URL}";</style>', IMPORT),
    (rf'<style>@\000069 mport "{CSS_URL}";</style>', IMPORT),
    # A backslash before any other character stands for that character.
    (rf'<style>@\i\m\p\o\r\t "{CSS_URL}";</style>', IMPORT),
    (rf'<style>@\IMPORT "{CSS_URL}";</style>', IMPORT),  # at-keywords ignore ASCII case
    (rf'<style><![CDATA[@imp\
ort "{CSS_URL}";]]></style>', IMPORT),  # backslash-newline
    # A comment splitting the keyword (not an import to CSS; refused anyway).
    (f'<style>@im/**/port "{CSS_URL}";</style>', IMPORT),
    (f'<style>@im/* a */po/**/rt url({CSS_URL});</style>', IMPORT),
    # "/*" inside a string must not hide what follows it.
    (f'<style>a {{ fill: url("#x/*") }} @import "{CSS_URL}"; /* */</style>', IMPORT),
    # Escapes inside url(...), in style elements, style attributes and presentation attributes.
    (rf'<style>rect {{ fill: u\72l({CSS_URL}#g) }}</style><rect width="5" height="5"/>',
     f"url({CSS_URL + '#g'!r}) is not url(#id)"),
    (rf'<rect width="5" height="5" style="fill: \75 rl({CSS_URL}#g)"/>',
     f"url({CSS_URL + '#g'!r}) is not url(#id)"),
    (rf'<rect width="5" height="5" fill="\55\52\4c({CSS_URL}#g)"/>',
     f"url({CSS_URL + '#g'!r}) is not url(#id)"),
    (r'<rect width="5" height="5" style="fill: url(\68ttp://127.0.0.1:9/x#g)"/>',
     "url('http://127.0.0.1:9/x#g') is not url(#id)"),
])
def test_css_escapes_and_comments_do_not_hide_imports_or_urls(monkeypatch, body, message):
    assert refused_by_validation(monkeypatch, body).startswith(message)


def test_stylesheet_in_a_data_uri_is_refused(monkeypatch):
    css = f"@import url({CSS_URL});".encode()
    png_with_css = data_uri("image/png", PNG_MAGIC + css)  # passes a magic-bytes check
    cases = [
        (f'<style>@import url("{png_with_css}");</style>', IMPORT),
        (f"<style>@import '{png_with_css}';</style>", IMPORT),
        (f'<rect width="5" height="5" style="fill: url({png_with_css})"/>', "is not url(#id)"),
        (f'<style>rect {{ fill: url("{png_with_css}") }}</style>', "is not url(#id)"),
        (f'<image href="data:text/css,@import%20url({CSS_URL})" width="8" height="8"/>',
         "data: URI of type 'text/css' is not a PNG, JPEG, GIF or WebP image"),
        (f'<image xlink:href="{data_uri("text/css", css)}" width="8" height="8"/>',
         "data: URI of type 'text/css' is not a PNG, JPEG, GIF or WebP image"),
        (f'<image href="data:,{css.decode()}" width="8" height="8"/>',
         "data: URI of type 'text/plain' is not a PNG, JPEG, GIF or WebP image"),
        (f'<image href="{data_uri("image/png", css)}" width="8" height="8"/>',
         "data: URI declared 'image/png' holds bytes without its magic number"),
        (f'<image href="{data_uri("image/png", b"GIF89a" + css)}"/>',
         "data: URI declared 'image/png' holds GIF data"),
        (f'<image href="data:IMAGE/PNG,%89PNH%0D%0A%1A%0A{css.decode()}"/>',  # percent-encoded
         "data: URI declared 'image/png' holds bytes without its magic number"),
        ('<image href="data:image/png;base64,iVBORw0KGgo" width="8" height="8"/>',
         "data: URI of type 'image/png' does not decode"),  # bad base64 padding
        (f'<image src="{data_uri("text/css", css)}" width="8" height="8"/>',
         "data: URI of type 'text/css' is not a PNG, JPEG, GIF or WebP image"),
    ]
    for body, message in cases:
        assert message in refused_by_validation(monkeypatch, body), body


def test_svg_in_a_data_uri_is_refused_declared_or_behind_magic_bytes(monkeypatch):
    nested = (f'<svg {NS} width="8" height="8"><image href="http://127.0.0.1:9/a.png" '
              'width="8" height="8"/></svg>').encode()
    jpeg_with_svg = data_uri("image/jpeg", b"\xff\xd8\xff" + nested)
    cases = [
        # Refused by decision, not checked recursively: cairosvg renders it as a
        # nested document whose <use>s, styles and references would need the
        # whole validation again.
        (f'<image href="{data_uri("image/svg+xml", nested)}" width="8" height="8"/>',
         "data: URI of type 'image/svg+xml' is not a PNG, JPEG, GIF or WebP image"),
        # cairosvg sniffs: anything but a PNG that contains "<svg" is parsed as SVG.
        (f'<image href="{jpeg_with_svg}"/>',
         "data: URI declared 'image/jpeg' contains '<svg'"),
        (f'<image href="{data_uri("image/gif", b"GIF89a" + nested)}"/>',
         "data: URI declared 'image/gif' contains '<svg'"),
    ]
    for body, message in cases:
        assert message in refused_by_validation(monkeypatch, body), body


def test_fetcher_serves_only_images_of_their_declared_type():
    raster = png_bytes((0, 0, 255))
    assert fetch_data_only(data_uri("image/png", raster), "image/*") == raster
    for url, resource_type in [
        (data_uri("image/png", raster), "text/css"),  # an @import of a real PNG
        (data_uri("image/png", raster), "image/svg+xml"),  # a <use> target
        (data_uri("image/png", PNG_MAGIC + b"@import url(http://127.0.0.1:9/x.css);"),
         "text/css"),
        (data_uri("image/png", b"GIF89a" + raster), "image/*"),
        (data_uri("image/jpeg", b"\xff\xd8\xff<svg/>"), "image/*"),
        ("data:text/css,a{}", "image/*"),
        ("data:image/png;base64,iVBORw0KGgo", "image/*"),
    ]:
        with pytest.raises(RefusedFetch):
            fetch_data_only(url, resource_type)


def test_smuggled_stylesheets_are_refused_by_the_pool_and_never_fetched(pool, http_server):
    base, requests = http_server
    css = f"@import url({base}/inner.css);".encode()
    hostile = [
        f'<style>@\\69mport url({base}/a.css);</style>',
        f'<style>@im\\70 ort "{base}/b.css";</style>',
        f'<style>@im/**/port "{base}/c.css";</style>',
        f'<style>@import url("{data_uri("image/png", PNG_MAGIC + css)}");</style>',
        f'<image href="data:text/css,{css.decode()}" width="8" height="8"/>',
        f'<image href="{data_uri("image/png", css)}" width="8" height="8"/>',
    ]
    before = pool.stats()
    results = pool.render_many([f'<svg {NS} width="10" height="10">{body}</svg>'
                                for body in hostile], early_stop=False)
    assert [r.failure for r in results] == ["external_reference"] * len(hostile)
    assert not any(r.detail.startswith("RefusedFetch") for r in results)  # not the backstop
    assert pool.stats()["failed/external_reference"] == \
        before["failed/external_reference"] + len(hostile)
    assert requests == []
    assert_still_serves(pool)


def test_raster_data_uris_still_render(pool):
    green = png_bytes((0, 255, 0))
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (0, 0, 255)).save(buf, format="GIF")
    blue_gif = "".join(f"%{b:02X}" for b in buf.getvalue())  # percent-encoded
    svg = (f'<svg {NS} width="20" height="10">'
           f'<image href="{data_uri("image/png", green)}" width="10" height="10"/>'
           f'<image x="10" xlink:href="data:image/gif,{blue_gif}" width="10" height="10"/>'
           '</svg>')
    result = pool.render(svg)
    assert result.ok, result.detail
    image = Image.open(io.BytesIO(result.png)).convert("RGB")
    assert image.getpixel((5, 5)) == (0, 255, 0)
    assert image.getpixel((15, 5)) == (0, 0, 255)


def test_degenerate_css_gets_a_verdict():
    """Megabytes of unclosed comments, lone backslashes and half keywords: each document
    is checked (passed or refused), nothing else escapes. Their cost per call is in
    benchmarks/hostile.py (linear: about a second for all six here)."""
    from defusedxml import ElementTree as DefusedET

    refused = []
    for css in HOSTILE_CSS:
        svg = f'<svg {NS} width="9" height="9"><style>{css}</style><rect style="{css}"/></svg>'
        root = DefusedET.fromstring(svg.encode())
        try:
            svg_checks.scan_tree(root, RenderLimits())
            svg_checks.check_expansion(root, {}, RenderLimits())
        except svg_checks.Refusal as err:
            refused.append(str(err)[:40])
    assert len(refused) == 1 and "url(" in refused[0]  # only "url(" spam names a target


# -------------------------------------------------------------- early stop


def test_early_stop_reached_hand_counts():
    config = PoolConfig()  # 70% succeeded or 90% finished
    assert early_stop_reached(7, 7, 10, config)       # 7/10 ok
    assert not early_stop_reached(6, 8, 10, config)   # 6/10 ok, 8/10 done
    assert early_stop_reached(0, 9, 10, config)       # 9/10 done
    assert not early_stop_reached(2, 2, 3, config)    # 0.67 ok, 0.67 done
    assert not early_stop_reached(0, 0, 0, config)


def test_early_stop_after_70_percent_succeeded(pool):
    # Both workers take the 7 good SVGs first; the 7th success (7/10) starts
    # the grace period; the slow ones cannot finish within it.
    start = time.monotonic()
    results = pool.render_many([GOOD] * 7 + [slow_svg()] * 3)
    elapsed = time.monotonic() - start
    assert [r.ok for r in results] == [True] * 7 + [False] * 3
    assert [r.failure for r in results[7:]] == ["cancelled"] * 3
    assert GRACE <= elapsed < WALL  # cancelled, not timed out
    assert_still_serves(pool)


def test_early_stop_after_90_percent_finished(pool):
    start = time.monotonic()
    results = pool.render_many([""] * 9 + [slow_svg()])  # 9/10 finished before any render
    elapsed = time.monotonic() - start
    assert [r.failure for r in results] == ["empty"] * 9 + ["cancelled"]
    assert GRACE <= elapsed < WALL
    assert_still_serves(pool)


# ------------------------------------------------------------- bookkeeping


def test_stats_count_failures_by_reason(pool):
    before = pool.stats()
    pool.render_many(["", GOOD, "<p>no</p>", GOOD], early_stop=False)
    after = pool.stats()
    diff = {k: after[k] - before[k] for k in after if after[k] != before[k]}
    assert diff == {"renders": 4, "ok": 2, "failed/empty": 1, "failed/not_svg": 1}
    assert {f"failed/{r}" for r in FAILURES} <= set(after)


def test_render_worker_is_a_plain_class_for_ray():
    worker = RenderWorker(config=PoolConfig(num_workers=1))
    try:
        results = worker.render_many([GOOD, ""])
        assert [r.ok for r in results] == [True, False]
        assert worker.stats()["ok"] == 1
    finally:
        worker.close()


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="wall_seconds"):
        RenderLimits(wall_seconds=0)
    with pytest.raises(ValueError, match="memory_bytes"):
        RenderLimits(memory_bytes=1 << 20)
    with pytest.raises(ValueError, match="max_aspect"):
        RenderLimits(max_aspect=0.5)
    with pytest.raises(ValueError, match="early_stop_succeeded"):
        PoolConfig(early_stop_succeeded=1.5)
    with pytest.raises(ValueError, match="num_workers"):
        PoolConfig(num_workers=-1)


# -------------------------------------------------------------- extraction


def test_extract_svg_prefers_svg_fence_then_xml_fence_then_raw():
    svg_a, svg_b = '<svg width="1" height="1"></svg>', '<svg width="2" height="2"></svg>'
    assert extract_svg(f"```xml\n{svg_b}\n```\n```svg\n{svg_a}\n```") == svg_a
    assert extract_svg(f"```xml\n<note/>\n```\n```xml\n{svg_b}\n```") == svg_b
    nested = '<svg id="outer"><svg id="inner"></svg><rect/></svg>'
    assert extract_svg(f"Here it is: {nested} and {svg_a}") == nested
    assert extract_svg(f"```svg\n{svg_a[:-6]}") == svg_a[:-6]  # truncated, unclosed fence
    assert extract_svg("```python\nprint(1)\n```") is None
    assert extract_svg("") is None and extract_svg(None) is None


def test_svg_like():
    assert svg_like('<svg width="1">') and svg_like("text <SVG>")
    assert not svg_like("") and not svg_like(None)
    assert not svg_like("<svgfoo/>") and not svg_like("<html></html>")
