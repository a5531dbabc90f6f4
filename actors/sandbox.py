"""Sandboxed worker subprocesses, shared by the SVG renderer and the answer grader.

A worker runs code that may take for ever or blow up its memory on hostile
input (cairosvg on a crafted SVG, sympy on ``2^{2^{2^{2^{2}}}}``). It is a
persistent subprocess started with ``python -c`` (not multiprocessing: spawn
would re-import the driver's ``__main__``, torch and all, before the memory
limit is set) that:

1. points its fd 1 at stderr, so stray prints (Python or C) never reach the
   protocol, which uses a private copy of the original stdout;
2. runs the caller's ``setup()`` (imports), then sets its address-space limit
   (RLIMIT_AS) to ``memory_bytes``; an allocation past it fails in the child;
3. exits when its parent dies, even while busy (a watchdog thread);
4. runs ``warm_up()`` (e.g. building a parser's grammar) and reports ready;
5. answers requests in order, until stdin closes.

Parent and child speak length-prefixed frames both ways: a JSON header and a
raw byte payload (a PNG, say); the parent never unpickles anything from a
child. The parent enforces wall-clock limits by killing a worker that runs
over (``SandboxWorker.kill``) and starting a new one; what to schedule where
is the caller's (``RendererPool``, ``Grader``).
"""

from __future__ import annotations

import json
import os
import resource
import select
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

_FRAME = struct.Struct(">II")  # header length, payload length
_BOOTSTRAP = ("import importlib, json, sys\n"
              "sys.path[:0] = json.loads(sys.argv[2])\n"
              "module, name = sys.argv[3].split(':')\n"
              "getattr(importlib.import_module(module), name)(json.loads(sys.argv[1]))\n")

Handler = Callable[[dict, bytes], tuple[dict, bytes]]


def frame(header: dict, payload: bytes = b"") -> bytes:
    head = json.dumps(header).encode()
    return _FRAME.pack(len(head), len(payload)) + head + payload


def pop_frame(buf: bytearray) -> tuple[dict, bytes] | None:
    """The first complete frame of ``buf`` (removed from it), or None."""
    if len(buf) < _FRAME.size:
        return None
    n_head, n_payload = _FRAME.unpack_from(buf)
    end = _FRAME.size + n_head + n_payload
    if len(buf) < end:
        return None
    header = json.loads(bytes(buf[_FRAME.size:_FRAME.size + n_head]))
    payload = bytes(buf[_FRAME.size + n_head:end])
    del buf[:end]
    return header, payload


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


# ------------------------------------------------------------------- child


def serve(setup: Callable[[], Handler], memory_bytes: int,
          warm_up: Callable[[], object] | None = None) -> None:
    """The worker's main loop (call it from the worker's entry point)."""
    out_fd = os.dup(1)
    os.dup2(2, 1)
    handler = setup()  # imports happen before the memory limit, not under it
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = memory_bytes if hard == resource.RLIM_INFINITY else min(hard, memory_bytes)
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    parent = os.getppid()

    def watchdog() -> None:  # a busy worker never reads the EOF of a dead parent
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watchdog, daemon=True).start()
    if warm_up is not None:
        warm_up()
    _write_all(out_fd, frame({"ready": True}))
    stdin = sys.stdin.buffer
    while len(prefix := stdin.read(_FRAME.size)) == _FRAME.size:
        n_head, n_payload = _FRAME.unpack(prefix)
        header = json.loads(stdin.read(n_head))
        reply, payload = handler(header, stdin.read(n_payload))
        _write_all(out_fd, frame(reply, payload))


# ------------------------------------------------------------------ parent


class SandboxWorker:
    """One worker subprocess and the parent's view of it.

    ``target`` is the worker's entry point as ``module:function``; it gets
    ``config`` (JSON) and calls ``serve``. ``job`` and ``since`` are for the
    caller's bookkeeping (what the worker is doing, since when); ``since`` is
    the start time until the worker is ready.
    """

    def __init__(self, target: str, config: dict):
        package_root = str(Path(__file__).resolve().parents[1])
        argv = [sys.executable, "-c", _BOOTSTRAP, json.dumps(config),
                json.dumps([package_root, *sys.path]), target]
        # New session: a Ctrl-C in the terminal reaches the parent only.
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     bufsize=0, start_new_session=True)
        os.set_blocking(self.proc.stdout.fileno(), False)
        self.buffer = bytearray()
        self.ready = False
        self.job: int | None = None
        self.since = time.monotonic()

    def fileno(self) -> int:
        return self.proc.stdout.fileno()

    def send(self, header: dict, payload: bytes = b"") -> None:
        """One request (BrokenPipeError when the worker is gone)."""
        _write_all(self.proc.stdin.fileno(), frame(header, payload))

    def _read_available(self) -> bool:
        """Read what the child wrote so far into the buffer; whether its stdout is open."""
        while True:
            try:
                chunk = os.read(self.fileno(), 1 << 20)
            except BlockingIOError:
                return True
            if not chunk:
                return False
            self.buffer += chunk

    def receive(self) -> tuple[list[tuple[dict, bytes]], bool]:
        """Frames that arrived completely (without waiting), and whether the child's
        stdout is still open."""
        alive = self._read_available()
        frames = []
        while (got := pop_frame(self.buffer)) is not None:
            frames.append(got)
        return frames, alive

    def wait_frame(self, timeout: float) -> tuple[dict, bytes] | str | None:
        """The next frame, "crashed" when the worker is gone, None after ``timeout`` s."""
        deadline = time.monotonic() + timeout
        while (got := pop_frame(self.buffer)) is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([self.fileno()], [], [], remaining)[0]:
                return None
            if not self._read_available():  # the child is gone: what it wrote, or nothing
                got = pop_frame(self.buffer)
                return "crashed" if got is None else got
        return got

    def wait_ready(self, timeout: float, what: str) -> None:
        """Block until the worker reports ready; RuntimeError (worker killed) if not."""
        got = self.wait_frame(timeout)
        if isinstance(got, tuple) and got[0].get("ready"):
            self.ready, self.since = True, time.monotonic()
            return
        code = self.kill()
        raise RuntimeError(f"{what} worker did not start within {timeout:.0f} s (exit code "
                           f"{code}); see its stderr above")

    def call(self, header: dict, payload: bytes, timeout: float) -> tuple[dict, bytes] | str | None:
        """Send one request and wait for its reply (see ``wait_frame``)."""
        try:
            self.send(header, payload)
        except BrokenPipeError:
            return "crashed"
        return self.wait_frame(timeout)

    def kill(self) -> int:
        """SIGKILL the worker; its exit code."""
        self.proc.kill()
        code = self.proc.wait()
        self.proc.stdin.close()
        self.proc.stdout.close()
        return code
