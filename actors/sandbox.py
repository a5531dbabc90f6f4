"""Sandboxed worker subprocesses, shared by the SVG renderer and the answer grader.

A worker runs code that may take for ever or blow up its memory on hostile
input (cairosvg on a crafted SVG, sympy on ``2^{2^{2^{2^{2}}}}``). It is a
persistent subprocess started with ``python -c`` (not multiprocessing: spawn
would re-import the driver's ``__main__``, torch and all, before the memory
limit is set) that:

1. starts with a clean environment (``worker_env``: no tokens, keys or
   settings of the parent) and, on Linux, leaves the host (``isolate``): user,
   mount and network namespaces of its own, so code a crafted input might run
   in a decoder reaches no listener, local or remote, and sees the file system
   read-only (checkpoints, exports, the code) with a private 64 MiB tmpfs at
   /dev/shm as its TMPDIR (not over /tmp: a checkout or virtual environment may
   live there). Where the kernel allows less (no user namespaces: mount and network
   namespaces as root; or nothing), it keeps what it can, and the parent logs
   what is missing once;
2. points its fd 1 at stderr, so stray prints (Python or C) never reach the
   protocol, which uses a private copy of the original stdout; its stderr is a
   pipe the parent copies to its own, so no file of the host is open for
   writing in the worker;
3. runs the caller's ``setup()`` (imports), then sets its limits: address space
   (RLIMIT_AS) ``memory_bytes``, no core dumps, 256 open files, 16 MiB per
   file written, no new process or program: a seccomp filter (libseccomp,
   through ``pyseccomp``) fails fork, vfork, clone without CLONE_THREAD and
   exec with EPERM, and RLIMIT_NPROC at the worker's own thread count holds
   where libseccomp is missing (except for root, whom the kernel exempts); and
   per request ``cpu_seconds`` of CPU time (SIGXCPU ends it; the parent counts a
   crash);
4. exits when its parent dies, even while busy (a watchdog thread, within a quarter
   second on an idle host);
5. runs ``warm_up()`` (e.g. building a parser's grammar) and reports ready;
6. answers requests in order, until stdin closes.

``default_workers`` sizes a pool by the CPUs the process may use (affinity and a
container's CPU quota) and by the memory it may use (a container's limit).

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

WATCHDOG_S = 0.25  # how often a worker checks that its parent is alive

# What a worker keeps of its parent's environment: where programs, libraries, fonts and
# temporary files are, and the locale. Nothing else: no HF, wandb or cloud tokens.
_ENV_KEPT = ("PATH", "HOME", "LANG", "LC_ALL", "LC_CTYPE", "TMPDIR", "LD_LIBRARY_PATH",
             "FONTCONFIG_FILE", "FONTCONFIG_PATH")
_OPEN_FILES = 256
_FILE_BYTES = 16 << 20
_TMPFS = b"size=64m,mode=1777"
_SCRATCH = "/dev/shm"  # a worker's private tmpfs
_CLONE_NEWNS, _CLONE_NEWUSER, _CLONE_NEWNET = 0x00020000, 0x10000000, 0x40000000
_MS_NOSUID, _MS_NODEV, _MS_REC, _MS_PRIVATE = 0x2, 0x4, 0x4000, 0x40000
_AT_FDCWD, _AT_RECURSIVE, _MOUNT_ATTR_RDONLY = -100, 0x8000, 0x1
_SYS_MOUNT_SETATTR = {"x86_64": 442, "aarch64": 442}  # Linux 5.12+
READ_ONLY = "read-only file system"
NO_PROCESSES = "no new processes"
_CLONE_THREAD = 0x00010000


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


def isolate() -> list[str]:
    """Move this (single-threaded) process out of the host: user, mount and network
    namespaces of its own (the network: a loopback that is down), the file system
    read-only but for a private tmpfs at /dev/shm, its TMPDIR. What it got, e.g.
    ``["user namespace", "network namespace", "read-only file system"]``; less where
    the kernel refuses."""
    if not sys.platform.startswith("linux"):
        return []
    import platform

    libc = ctypes.CDLL(None, use_errno=True)
    uid, gid = os.getuid(), os.getgid()
    got: list[str] = []
    if libc.unshare(_CLONE_NEWUSER | _CLONE_NEWNS | _CLONE_NEWNET) == 0:
        # the same user inside, so the files it may read are the ones it could read before
        Path("/proc/self/setgroups").write_text("deny")
        Path("/proc/self/uid_map").write_text(f"{uid} {uid} 1")
        Path("/proc/self/gid_map").write_text(f"{gid} {gid} 1")
        got = ["user namespace", "mount namespace", "network namespace"]
    elif libc.unshare(_CLONE_NEWNS | _CLONE_NEWNET) == 0:  # root without user namespaces
        got = ["mount namespace", "network namespace"]
    elif libc.unshare(_CLONE_NEWNET) == 0:
        got = ["network namespace"]
    number = _SYS_MOUNT_SETATTR.get(platform.machine())
    if "mount namespace" in got and number is not None:
        attr = struct.pack("QQQQ", _MOUNT_ATTR_RDONLY, 0, 0, 0)  # struct mount_attr
        if (libc.mount(b"none", b"/", None, _MS_REC | _MS_PRIVATE, None) == 0  # no echo out
                and libc.syscall(number, _AT_FDCWD, b"/", _AT_RECURSIVE, attr, len(attr)) == 0):
            got.append(READ_ONLY)
            if libc.mount(b"tmpfs", _SCRATCH.encode(), b"tmpfs", _MS_NOSUID | _MS_NODEV,
                          _TMPFS) == 0:
                os.environ["TMPDIR"] = _SCRATCH
    return got


def forbid_new_processes() -> bool:
    """A seccomp filter: fork, vfork, clone of a process (not a thread) and exec fail
    with EPERM from now on (clone3 with ENOSYS: libc then makes threads with clone).
    False where libseccomp is missing."""
    import errno

    try:
        import pyseccomp as seccomp

        rules = seccomp.SyscallFilter(defaction=seccomp.ALLOW)
        for call in ("fork", "vfork", "execve", "execveat"):
            rules.add_rule(seccomp.ERRNO(errno.EPERM), call)
        rules.add_rule(seccomp.ERRNO(errno.EPERM), "clone",
                       seccomp.Arg(0, seccomp.MASKED_EQ, _CLONE_THREAD, 0))
        rules.add_rule(seccomp.ERRNO(errno.ENOSYS), "clone3")
        rules.load()
    except (ImportError, OSError, RuntimeError, ValueError):
        return False
    return True


def _limit(resource_id: int, value: int) -> None:
    """Lower a limit (soft and hard) to ``value``, never raising it."""
    _, hard = resource.getrlimit(resource_id)
    cap = value if hard == resource.RLIM_INFINITY else min(hard, value)
    resource.setrlimit(resource_id, (cap, cap))


def serve(setup: Callable[[], Handler], memory_bytes: int,
          warm_up: Callable[[], object] | None = None, cpu_seconds: float = 60.0) -> None:
    """The worker's main loop (call it from the worker's entry point)."""
    isolation = isolate()  # first: unshare needs a process of one thread
    out_fd = os.dup(1)
    os.dup2(2, 1)
    handler = setup()  # imports happen before the limits, not under them
    parent = os.getppid()

    def watchdog() -> None:  # a busy worker never reads the EOF of a dead parent
        while os.getppid() == parent:
            time.sleep(WATCHDOG_S)
        os._exit(1)

    threading.Thread(target=watchdog, daemon=True).start()
    _limit(resource.RLIMIT_AS, memory_bytes)
    _limit(resource.RLIMIT_CORE, 0)
    _limit(resource.RLIMIT_NOFILE, _OPEN_FILES)
    _limit(resource.RLIMIT_FSIZE, _FILE_BYTES)
    _limit(resource.RLIMIT_NPROC, len(os.listdir("/proc/self/task")))  # this one, as it is
    if forbid_new_processes():
        isolation.append(NO_PROCESSES)
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
                                     stderr=subprocess.PIPE, bufsize=0, start_new_session=True,
                                     env=worker_env())
        threading.Thread(target=_copy_to_stderr, args=(self.proc.stderr,), daemon=True).start()
        os.set_blocking(self.proc.stdout.fileno(), False)
        self.buffer = bytearray()
        self.ready = False
        self.isolation: list[str] = []
        self.job: int | None = None
        self.since = time.monotonic()

    def fileno(self) -> int:
        return self.proc.stdout.fileno()

    def started(self, header: dict) -> None:
        """The worker's ready frame arrived; what isolation it lacks: logged once."""
        global _warned_isolation
        self.ready, self.since = True, time.monotonic()
        self.isolation = header.get("isolation") or []
        missing = [what for what in ("network namespace", READ_ONLY, NO_PROCESSES)
                   if what not in self.isolation]
        if missing and not _warned_isolation:
            _warned_isolation = True
            logger.warning("sandbox workers run without %s (this host allows no more than %s): "
                           "their limits and clean environment hold (docs/architecture.md)",
                           " and ".join(missing), ", ".join(self.isolation) or "rlimits")

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


def _copy_to_stderr(pipe) -> None:
    """Copy a worker's stderr to this process's until the worker is gone."""
    with pipe:
        while chunk := os.read(pipe.fileno(), 1 << 16):
            try:
                os.write(2, chunk)
            except OSError:
                pass  # our own stderr is gone or full: the worker must not block on it


def default_workers(memory_bytes: int, cgroup: Path = Path("/sys/fs/cgroup")) -> int:
    """Workers a pool starts by default: one per CPU this process may use (affinity and a
    container's CPU quota), no more than fit the memory it may use (a container's limit,
    else the host's) at ``memory_bytes`` each."""
    import psutil

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cpus = min(cpus or 1, cgroup_cpus(cgroup) or 1 << 30)
    memory = min(psutil.virtual_memory().total, cgroup_memory(cgroup) or 1 << 62)
    return max(1, min(cpus, memory // max(1, memory_bytes)))


def cgroup_cpus(root: Path) -> int | None:
    """CPUs of the cgroup quota under ``root`` (v2 ``cpu.max``, v1 CFS), rounded up; None
    without a quota. (A container sees its own cgroup at /sys/fs/cgroup.)"""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
    except (OSError, ValueError):
        try:
            quota = (root / "cpu/cpu.cfs_quota_us").read_text().strip()
            period = (root / "cpu/cpu.cfs_period_us").read_text().strip()
        except OSError:
            return None
    if quota in ("max", "-1"):
        return None
    return max(1, math.ceil(int(quota) / int(period)))


def cgroup_memory(root: Path) -> int | None:
    """Bytes of the cgroup memory limit under ``root`` (v2 ``memory.max``, v1); None
    without one (v1 writes "no limit" as a number near 2**63)."""
    for file in ("memory.max", "memory/memory.limit_in_bytes"):
        try:
            text = (root / file).read_text().strip()
        except OSError:
            continue
        return None if text == "max" or int(text) >= 1 << 60 else int(text)
    return None


def wait_readable(workers: list, timeout: float) -> list:
    """The workers whose stdout has something to read (or was closed) within ``timeout``
    seconds; ``selectors``, so descriptors past 1,024 work (``select`` breaks there)."""
    with selectors.DefaultSelector() as selector:
        for w in workers:
            selector.register(w.fileno(), selectors.EVENT_READ, w)
        return [key.data for key, _ in selector.select(timeout)]
