"""`ray job submit` of a tiny run to a local head on loopback, watched through the
dashboard's job API; the test stops only the head it started."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ray_job_submit_runs_a_tiny_config_and_the_same_submission_resumes_it(tmp_path):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(COEVOLVE_HEAD_DIR=str(tmp_path / "head"), DASHBOARD_PORT=str(port),
               PYTHON=sys.executable)
    started = subprocess.run(["bash", str(ROOT / "cluster/start_head.sh"), "--num-cpus", "4"],
                             env=env, capture_output=True, text=True, timeout=240)
    assert started.returncode == 0, started.stderr[-3000:]
    pids = (tmp_path / "head/head.pids").read_text().split()  # the processes of our head
    assert pids
    try:
        address = f"http://127.0.0.1:{port}"
        # token auth is always on: a request without the token is refused
        assert "RAY_AUTH_MODE=token" in started.stdout
        assert not (tmp_path / "head/auth_header").exists()  # the probe's header file is gone
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"{address}/api/version", timeout=30)
        assert refused.value.code in (401, 403)
        env["RAY_AUTH_MODE"] = "token"
        # This process may have read RAY_AUTH_MODE already (an earlier test's Ray):
        # the client sends the token itself rather than rely on the environment.
        token = os.environ.get("RAY_AUTH_TOKEN") or Path(os.environ.get(
            "RAY_AUTH_TOKEN_PATH", Path.home() / ".ray/auth_token")).read_text().strip()
        headers = {"Authorization": f"Bearer {token}"}
        request = urllib.request.Request(f"{address}/api/version", headers=headers)
        assert urllib.request.urlopen(request, timeout=30).status == 200
        ray_bin = str(Path(sys.executable).parent / "ray")

        from ray.job_submission import JobStatus, JobSubmissionClient

        client = JobSubmissionClient(address, headers=headers)

        def submit() -> tuple[JobStatus, str]:
            done = subprocess.run(
                [ray_bin, "job", "submit", "--address", address, "--no-wait",
                 "--working-dir", str(ROOT), "--runtime-env", str(ROOT / "cluster/runtime_env.yaml"),
                 "--", "python", "-m", "pipelines.cli", "run", "configs/simple/tiny-cpu.yaml",
                 f"run.root={tmp_path / 'runs'}", "simple.steps=2", "logging.progress=false"],
                env=env, capture_output=True, text=True, timeout=180, cwd=ROOT, check=False)
            assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
            job_id = re.search(r"raysubmit_\w+", done.stdout + done.stderr).group(0)
            deadline = time.monotonic() + 600
            while (status := client.get_job_status(job_id)) not in JobStatus.__members__.values() \
                    or not status.is_terminal():
                assert time.monotonic() < deadline, f"job {job_id} still {status}"
                time.sleep(2)
            return status, client.get_job_logs(job_id)

        status, logs = submit()
        assert status == JobStatus.SUCCEEDED, logs[-3000:]
        assert "run simple-tiny finished" in logs
        phase = tmp_path / "runs/simple-tiny/iter_0001/policy"
        assert (phase / "DONE").exists()
        assert (phase / "hf/model.safetensors").exists()
        metrics = (phase / "metrics.jsonl").read_text()
        # The same submission again (another job, another working-directory copy) finds
        # the run under the absolute run.root: finished, nothing redone.
        status, logs = submit()
        assert status == JobStatus.SUCCEEDED, logs[-3000:]
        assert "run simple-tiny finished" in logs
        assert (phase / "metrics.jsonl").read_text() == metrics
    finally:
        stopped = subprocess.run(["bash", str(ROOT / "cluster/stop_head.sh")], env=env,
                                 capture_output=True, text=True, timeout=120)
        assert stopped.returncode == 0, stopped.stderr[-2000:]
    assert not any(Path(f"/proc/{pid}").exists() for pid in pids)
