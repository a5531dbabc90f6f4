"""The sandbox every render and grade worker runs in (actors/sandbox.py), probed from
inside a worker: no network, no tokens, a read-only file system, no new processes,
its limits, gone when its parent is killed; pools sized by a container's limits.

The probe worker runs ``serve`` (the entry both the renderer's and the grader's
workers call) with a handler that reports what it can see instead of rendering.
"""

from __future__ import annotations

import json
import os
import re
import resource
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from actors.sandbox import SandboxWorker, serve

ROOT = Path(__file__).resolve().parents[1]


def probe_main(config: dict) -> None:
    """Entry point of the probe worker (its config names the listener to try)."""

    def setup():
        def handle(header: dict, payload: bytes) -> tuple[dict, bytes]:
            try:
                socket.create_connection(("127.0.0.1", config["port"]), timeout=2).close()
                reached = "connected"
            except OSError as err:
                reached = type(err).__name__ + ": " + str(err)
            limits = {name: resource.getrlimit(getattr(resource, name))
                      for name in ("RLIMIT_AS", "RLIMIT_CORE", "RLIMIT_NOFILE", "RLIMIT_CPU",
                                   "RLIMIT_FSIZE", "RLIMIT_NPROC")}
            return {"reached": reached, "env": sorted(os.environ), "limits": limits,
                    "pid": os.getpid(), "write": attempt(write_run_dir),
                    "tmp": attempt(write_tmp), "big": attempt(write_big),
                    "fork": attempt(fork), "exec": attempt(execute)}, b""

        def write_run_dir():  # a folder the parent can write (a run directory, say)
            (Path(config["run_dir"]) / "planted").write_text("x")

        def write_tmp():  # a private tmpfs: writable, and nothing reaches the host
            import tempfile

            assert tempfile.gettempdir() == "/dev/shm"
            Path("/dev/shm", config["tmp_name"]).write_text("x")

        def write_big():
            with open("/dev/shm/big", "wb") as f:
                f.write(b"\0" * (17 << 20))

        def fork():
            pid = os.fork()
            if pid == 0:
                os._exit(0)
            os.waitpid(pid, 0)

        def execute():
            subprocess.run(["true"], check=True)

        def attempt(action) -> str:
            try:
                action()
                return "done"
            except Exception as err:  # noqa: BLE001 - reported to the test
                return f"{type(err).__name__}: {err}"

        return handle

    serve(setup, config["memory_bytes"], cpu_seconds=7.0)


@pytest.fixture
def listener():
    server = socket.create_server(("127.0.0.1", 0))
    yield server.getsockname()[1]
    server.close()


@pytest.fixture
def run_dir():
    """A folder the test process may write (a run directory, say)."""
    import shutil
    import tempfile

    path = Path(tempfile.mkdtemp(prefix="coevolve-probe-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_a_worker_reaches_no_listener_sees_no_token_and_runs_under_its_limits(
        listener, monkeypatch, run_dir):
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    monkeypatch.setenv("WANDB_API_KEY", "secret")
    tmp_name = f"coevolve-probe-{os.getpid()}"
    worker = SandboxWorker("test_sandbox:probe_main",
                           {"port": listener, "memory_bytes": 2 << 30,
                            "run_dir": str(run_dir), "tmp_name": tmp_name})
    try:
        worker.wait_ready(60, "probe")
        assert worker.isolation == ["user namespace", "mount namespace", "network namespace",
                                    "read-only file system", "no new processes"]
        got = worker.call({}, b"", timeout=30)
    finally:
        worker.kill()
    reply = got[0]
    # the parent reaches its own listener; the worker does not
    socket.create_connection(("127.0.0.1", listener), timeout=2).close()
    assert reply["reached"].startswith("OSError"), reply["reached"]  # network unreachable
    # the run directory (under /tmp, as a checkout may be) is there, read-only; its
    # scratch space is its own
    assert "Read-only file system" in reply["write"] and not (run_dir / "planted").exists()
    assert reply["tmp"] == "done" and not Path("/dev/shm", tmp_name).exists()
    assert "File too large" in reply["big"]  # 17 MiB past the 16 MiB RLIMIT_FSIZE
    assert "Operation not permitted" in reply["fork"] and "not permitted" in reply["exec"]
    assert not {"HF_TOKEN", "WANDB_API_KEY", "PYTHONPATH", "RAY_ADDRESS"} & set(reply["env"])
    assert set(reply["env"]) <= {"PATH", "HOME", "LANG", "LC_ALL", "LC_CTYPE", "TMPDIR",
                                 "LD_LIBRARY_PATH", "FONTCONFIG_FILE", "FONTCONFIG_PATH"}
    limits = reply["limits"]
    assert limits["RLIMIT_AS"] == [2 << 30, 2 << 30]
    assert limits["RLIMIT_CORE"] == [0, 0] and limits["RLIMIT_NOFILE"] == [256, 256]
    # per request: the worker's CPU seconds so far (a few: its imports) plus 7, rounded up
    soft, hard = limits["RLIMIT_CPU"]
    assert 8 <= soft <= 7 + 30 and hard == resource.RLIM_INFINITY
    assert limits["RLIMIT_FSIZE"] == [16 << 20, 16 << 20]
    assert limits["RLIMIT_NPROC"] == [2, 2]  # its main thread and its parent watchdog


PARENT = """
import json, sys, time
sys.path[:0] = json.loads(sys.argv[1])
from actors.sandbox import SandboxWorker
w = SandboxWorker("test_sandbox:probe_main", {"port": 1, "memory_bytes": 1 << 30})
w.wait_ready(60, "probe")
print(w.proc.pid, flush=True)
time.sleep(600)
"""


def test_a_worker_exits_within_2_s_of_its_parents_sigkill():
    paths = json.dumps([str(ROOT), str(ROOT / "tests")])
    parent = subprocess.Popen([sys.executable, "-c", PARENT, paths], stdout=subprocess.PIPE,
                              text=True, start_new_session=True)
    try:
        child = psutil.Process(int(parent.stdout.readline()))
        assert child.is_running()
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait()
        killed = time.monotonic()
        gone, _ = psutil.wait_procs([child], timeout=5)
        assert gone, "the worker outlived its parent"
        assert time.monotonic() - killed < 2.0
    finally:
        if parent.poll() is None:
            os.killpg(parent.pid, signal.SIGKILL)  # this test's own process group


def test_a_pool_of_default_size_fits_the_containers_cpu_quota_and_memory_limit(tmp_path):
    """default_workers: a container's cgroup (v2 or v1) caps the workers below the CPUs the
    scheduler lets the process use and the memory at each worker's RLIMIT_AS."""
    from actors.sandbox import cgroup_cpus, cgroup_memory, default_workers

    v2, v1 = tmp_path / "v2", tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "memory").mkdir()
    v2.mkdir()
    (v2 / "cpu.max").write_text("150000 100000\n")  # 1.5 CPUs
    (v2 / "memory.max").write_text(f"{5 << 30}\n")
    (v1 / "cpu/cpu.cfs_quota_us").write_text("-1\n")
    (v1 / "cpu/cpu.cfs_period_us").write_text("100000\n")
    (v1 / "memory/memory.limit_in_bytes").write_text("9223372036854771712\n")
    assert (cgroup_cpus(v2), cgroup_memory(v2)) == (2, 5 << 30)
    assert (cgroup_cpus(v1), cgroup_memory(v1)) == (None, None)  # no quota, no limit
    assert cgroup_cpus(tmp_path / "none") is None
    cpus = len(os.sched_getaffinity(0))
    assert default_workers(1 << 30, v2) == min(cpus, 2)
    assert default_workers(2 << 30, v2) == min(cpus, 2)  # 5 GiB hold two of 2 GiB
    assert default_workers(3 << 30, v2) == 1
    assert default_workers(1 << 20, v1) == cpus


def test_a_real_render_worker_is_isolated_and_limited_as_the_probe(monkeypatch):
    """The renderer's own worker, seen from outside through /proc while it renders: no
    token in its environment, other network and mount namespaces than its parent's,
    every mount read-only but its scratch tmpfs, and its limits."""
    from actors.renderer import PoolConfig, RendererPool, RenderLimits
    from actors.sandbox import NO_PROCESSES, READ_ONLY

    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    pool = RendererPool(RenderLimits(), PoolConfig(num_workers=1))
    try:
        svg = ('<svg xmlns="http://www.w3.org/2000/svg" width="8" height="8">'
               '<rect width="8" height="8"/></svg>')
        assert pool.render(svg).ok
        [worker] = pool._workers
        assert READ_ONLY in worker.isolation and NO_PROCESSES in worker.isolation
        proc = Path(f"/proc/{worker.proc.pid}")
        environ = (proc / "environ").read_bytes().split(b"\0")
        assert not any(e.startswith((b"HF_TOKEN=", b"PYTHONPATH=")) for e in environ)
        for ns in ("net", "mnt", "user"):
            assert os.readlink(proc / "ns" / ns) != os.readlink(f"/proc/self/ns/{ns}"), ns
        mounts = [line.split() for line in (proc / "mountinfo").read_text().splitlines()]
        options = {fields[4]: fields[5].split(",") for fields in mounts}  # mount point: options
        assert "ro" in options["/"] and "rw" in options["/dev/shm"]
        assert all("ro" in opts for point, opts in options.items() if point != "/dev/shm")
        limits = (proc / "limits").read_text()
        assert re.search(r"Max core file size\s+0\s+0", limits)
        assert re.search(r"Max open files\s+256\s+256", limits)
        assert re.search(rf"Max file size\s+{16 << 20}\s+{16 << 20}", limits)
        assert re.search(rf"Max address space\s+{RenderLimits().memory_bytes}\s", limits)
    finally:
        pool.close()
