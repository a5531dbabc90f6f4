"""Sandboxed worker subprocesses, shared by the SVG renderer and the answer grader.

A worker runs code that may take for ever or blow up its memory on hostile
input (cairosvg on a crafted SVG, sympy on ``2^{2^{2^{2^{2}}}}``). It is a
persistent subprocess started with ``python -c`` (not multiprocessing: spawn
would re-import the driver's ``__main__``, torch and all, before the memory
limit is set) that:

1. starts with a clean environment (``worker_env``: no tokens, keys or
   settings of the parent) and, on Linux, leaves the host's network: a network
   namespace of its own (as root), or a user and network namespace (where the
   kernel lets unprivileged users make one), so code a crafted input might run
   in a decoder reaches no listener, local or remote. Where neither is allowed
   the worker runs without, and the parent logs that once;
2. points its fd 1 at stderr, so stray prints (Python or C) never reach the
   protocol, which uses a private copy of the original stdout;
3. runs the caller's ``setup()`` (imports), then sets its limits: address space
   (RLIMIT_AS) ``memory_bytes``, no core dumps, 256 open files, and per request
   ``cpu_seconds`` of CPU time (SIGXCPU ends it; the parent counts a crash);
4. exits when its parent dies, even while busy (a watchdog thread, within 1 s);
5. runs ``warm_up()`` (e.g. building a parser's grammar) and reports ready;
6. answers requests in order, until stdin closes.

Not done (docs/architecture.md): a read-only view of the file system (a mount
namespace), file-size and process-count limits (the worker's stderr may be a
large log file; RLIMIT_NPROC counts all of a user's processes).

Parent and child speak length-prefixed frames both ways: a JSON header and a
raw byte payload (a PNG, say); the parent never unpickles anything from a
child. The parent enforces wall-clock limits by killing a worker that runs
over (``SandboxWorker.kill``) and starting a new one; what to schedule where
is the caller's (``RendererPool``, ``Grader``).
"""

from __future__ import annotations

import ctypes
import json
import logging
import math
import os
import resource
import selectors
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
logger = logging.getLogger(__name__)

# What a worker keeps of its parent's environment: where programs, libraries, fonts and
# temporary files are, and the locale. Nothing else: no HF, wandb or cloud tokens.
_ENV_KEPT = ("PATH", "HOME", "LANG", "LC_ALL", "LC_CTYPE", "TMPDIR", "LD_LIBRARY_PATH",
             "FONTCONFIG_FILE", "FONTCONFIG_PATH")
_OPEN_FILES = 256
_CLONE_NEWUSER, _CLONE_NEWNET = 0x10000000, 0x40000000


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


def worker_env() -> dict[str, str]:
    return {k: os.environ[k] for k in _ENV_KEPT if k in os.environ}


def leave_network() -> str | None:
    """Move this (single-threaded) process into a network namespace of its own, with
    no interface but a loopback that is down; which kind, or None where not allowed."""
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(_CLONE_NEWNET) == 0:
        return "network namespace"
    uid, gid = os.getuid(), os.getgid()
    if libc.unshare(_CLONE_NEWUSER | _CLONE_NEWNET) != 0:
        return None
    # the same user inside, so files read as before (and write as before: see "Not done")
    Path("/proc/self/setgroups").write_text("deny")
    Path("/proc/self/uid_map").write_text(f"{uid} {uid} 1")
    Path("/proc/self/gid_map").write_text(f"{gid} {gid} 1")
    return "user and network namespace"


def _limit(resource_id: int, value: int) -> None:
    """Lower a limit (soft and hard) to ``value``, never raising it."""
    _, hard = resource.getrlimit(resource_id)
    cap = value if hard == resource.RLIM_INFINITY else min(hard, value)
    resource.setrlimit(resource_id, (cap, cap))


def serve(setup: Callable[[], Handler], memory_bytes: int,
          warm_up: Callable[[], object] | None = None, cpu_seconds: float = 60.0) -> None:
    """The worker's main loop (call it from the worker's entry point)."""
    isolation = leave_network()  # first: unshare needs a process of one thread
    out_fd = os.dup(1)
    os.dup2(2, 1)
    handler = setup()  # imports happen before the limits, not under them
    _limit(resource.RLIMIT_AS, memory_bytes)
    _limit(resource.RLIMIT_CORE, 0)
    _limit(resource.RLIMIT_NOFILE, _OPEN_FILES)
    parent = os.getppid()

    def watchdog() -> None:  # a busy worker never reads the EOF of a dead parent
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watchdog, daemon=True).start()
    if warm_up is not None:
        warm_up()
    _write_all(out_fd, frame({"ready": True, "isolation": isolation}))
    stdin = sys.stdin.buffer
    while len(prefix := stdin.read(_FRAME.size)) == _FRAME.size:
        n_head, n_payload = _FRAME.unpack(prefix)
        header = json.loads(stdin.read(n_head))
        payload = stdin.read(n_payload)
        used = resource.getrusage(resource.RUSAGE_SELF)
        cpu = math.ceil(used.ru_utime + used.ru_stime + cpu_seconds)
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, resource.RLIM_INFINITY))
        reply, payload = handler(header, payload)
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
                                     bufsize=0, start_new_session=True, env=worker_env())
        os.set_blocking(self.proc.stdout.fileno(), False)
        self.buffer = bytearray()
        self.ready = False
        self.isolation: str | None = None
        self.job: int | None = None
        self.since = time.monotonic()

    def fileno(self) -> int:
        return self.proc.stdout.fileno()

    def started(self, header: dict) -> None:
        """The worker's ready frame arrived; without network isolation: logged once."""
        global _warned_isolation
        self.ready, self.since = True, time.monotonic()
        self.isolation = header.get("isolation")
        if self.isolation is None and not _warned_isolation:
            _warned_isolation = True
            logger.warning("sandbox workers run without a network namespace of their own "
                           "(this host allows none): only their limits and clean environment "
                           "hold (docs/architecture.md)")

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
            if remaining <= 0 or not wait_readable([self], remaining):
                return None
            if not self._read_available():  # the child is gone: what it wrote, or nothing
                got = pop_frame(self.buffer)
                return "crashed" if got is None else got
        return got

    def wait_ready(self, timeout: float, what: str) -> None:
        """Block until the worker reports ready; RuntimeError (worker killed) if not."""
        got = self.wait_frame(timeout)
        if isinstance(got, tuple) and got[0].get("ready"):
            self.started(got[0])
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


_warned_isolation = False


def wait_readable(workers: list, timeout: float) -> list:
    """The workers whose stdout has something to read (or was closed) within ``timeout``
    seconds; ``selectors``, so descriptors past 1,024 work (``select`` breaks there)."""
    with selectors.DefaultSelector() as selector:
        for w in workers:
            selector.register(w.fileno(), selectors.EVENT_READ, w)
        return [key.data for key, _ in selector.select(timeout)]
