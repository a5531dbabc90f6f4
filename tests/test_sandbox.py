"""The sandbox every render and grade worker runs in (actors/sandbox.py), probed from
inside a worker: no network, no tokens, its limits, gone when its parent is killed.

The probe worker runs ``serve`` (the entry both the renderer's and the grader's
workers call) with a handler that reports what it can see instead of rendering.
"""

from __future__ import annotations

import json
import os
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
                      for name in ("RLIMIT_AS", "RLIMIT_CORE", "RLIMIT_NOFILE", "RLIMIT_CPU")}
            return {"reached": reached, "env": sorted(os.environ), "limits": limits,
                    "pid": os.getpid()}, b""

        return handle

    serve(setup, config["memory_bytes"], cpu_seconds=7.0)


@pytest.fixture
def listener():
    server = socket.create_server(("127.0.0.1", 0))
    yield server.getsockname()[1]
    server.close()


def test_a_worker_reaches_no_listener_sees_no_token_and_runs_under_its_limits(
        listener, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    monkeypatch.setenv("WANDB_API_KEY", "secret")
    worker = SandboxWorker("test_sandbox:probe_main",
                           {"port": listener, "memory_bytes": 2 << 30})
    try:
        worker.wait_ready(60, "probe")
        # root: a network namespace; elsewhere a user and network namespace (leave_network)
        assert worker.isolation in ("network namespace", "user and network namespace")
        got = worker.call({}, b"", timeout=30)
    finally:
        worker.kill()
    reply = got[0]
    # the parent reaches its own listener; the worker does not
    socket.create_connection(("127.0.0.1", listener), timeout=2).close()
    assert reply["reached"].startswith("OSError"), reply["reached"]  # network unreachable
    assert not {"HF_TOKEN", "WANDB_API_KEY", "PYTHONPATH", "RAY_ADDRESS"} & set(reply["env"])
    assert set(reply["env"]) <= {"PATH", "HOME", "LANG", "LC_ALL", "LC_CTYPE", "TMPDIR",
                                 "LD_LIBRARY_PATH", "FONTCONFIG_FILE", "FONTCONFIG_PATH"}
    limits = reply["limits"]
    assert limits["RLIMIT_AS"] == [2 << 30, 2 << 30]
    assert limits["RLIMIT_CORE"] == [0, 0] and limits["RLIMIT_NOFILE"] == [256, 256]
    # per request: the worker's CPU seconds so far (a few: its imports) plus 7, rounded up
    soft, hard = limits["RLIMIT_CPU"]
    assert 8 <= soft <= 7 + 30 and hard == resource.RLIM_INFINITY


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
