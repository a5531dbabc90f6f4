"""Run directories on a cluster: relative roots refused, paths recorded relative to the
run directory, and the shared-storage probe on a simulated two-node Ray.

The two-node check runs in a subprocess started from this file (``python
tests/test_storage.py two-nodes TMP``): it starts its own head and a second node
with ``ray start --block`` on 127.0.0.1, the second one in a mount namespace of its
own (``unshare -m``) where the run root is bind-mounted over another folder, which
is what two machines with local disks look like: one path, two folders. It stops
exactly the processes it started (their process groups), never ``ray stop``.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if __name__ == "__main__":
    sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import pytest

from pipelines.config import ConfigError, load_config
from pipelines.runtime.rundir import RoleState
from pipelines.runtime.storage import run_root


def test_relative_root_refused_on_a_cluster_absolute_elsewhere(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match=r"run.root: 'runs' is relative.*every node mounts"):
        run_root("runs", on_cluster=True)
    assert run_root("/data/runs", on_cluster=True) == Path("/data/runs")
    monkeypatch.chdir(tmp_path)
    assert run_root("runs", on_cluster=False) == tmp_path / "runs"
    assert run_root("~/runs", on_cluster=False) == Path.home() / "runs"


def test_driver_refuses_a_relative_root_under_ray_address(monkeypatch):
    from pipelines.runtime.driver import Driver

    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:1")  # never contacted: refused first
    with pytest.raises(ConfigError, match="run.root: 'runs' is relative"):
        Driver(load_config(ROOT / "configs/simple/tiny-cpu.yaml"))


def test_state_paths_are_relative_to_the_run_directory(tmp_path, monkeypatch):
    """A run resumed, or looked at, from another working directory finds its weights."""
    from pipelines.runtime.driver import Driver
    from pipelines.runtime.status import render_status

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.chdir(tmp_path)
    cfg = load_config(ROOT / "configs/simple/tiny-cpu.yaml", ["run.root=runs", "run.name=moved"])
    driver = Driver(cfg)
    assert driver.run_dir == tmp_path / "runs/moved" and driver.run_dir.is_absolute()
    assert driver.weights("policy") == cfg.model.path  # nothing trained yet: the base model
    driver._update_state(roles={"policy": RoleState("iter_0001/policy/hf", 1, 3)})

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.move(tmp_path / "runs", elsewhere / "runs")  # the whole run directory moves
    monkeypatch.chdir(elsewhere)
    again = Driver(cfg)
    assert again.weights("policy") == str(elsewhere / "runs/moved/iter_0001/policy/hf")
    monkeypatch.chdir(tmp_path)
    status = render_status("elsewhere/runs/moved")
    assert f"weights {elsewhere}/runs/moved/iter_0001/policy/hf" in status


def test_pruning_counts_only_complete_checkpoints(tmp_path):
    """keep 1 with step 4 complete and steps 5-6 cut short by kills: step 4 stays (the
    only one a resume can use); step 2 (complete, older) and step 3 (a cut save older
    than step 4) go; cut saves newer than it are left for the next save to supersede."""
    from actors.checkpoint import MARKER
    from pipelines.runtime.rundir import latest_checkpoint, prune_checkpoints

    for step, complete in ((2, True), (3, False), (4, True), (5, False), (6, False)):
        folder = tmp_path / f"step_{step:06d}"
        folder.mkdir()
        if complete:
            (folder / MARKER).write_text("ok\n")
    prune_checkpoints(tmp_path, keep=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "step_000004", "step_000005", "step_000006"]
    assert latest_checkpoint(tmp_path)[0] == 4


def test_a_resume_under_other_settings_is_refused(tmp_path):
    """The same run.name with another seed or lr would continue the old checkpoints under
    new settings; run.iterations, placement, logging and memory levers may change."""
    from pipelines.config import dump_config
    from pipelines.runtime.driver import check_resume_config

    saved = tmp_path / "config.yaml"
    base = ["run.name=r", "trainer.lr=1e-5"]
    saved.write_text(dump_config(load_config(ROOT / "configs/simple/tiny-cpu.yaml", base)))
    for ok in (["run.iterations=3"], ["logging.wandb=disabled", "trainer.offload=true"],
               ["placement.trainer_ranks=2", "generator.max_model_len=1024"]):
        check_resume_config(saved, load_config(ROOT / "configs/simple/tiny-cpu.yaml", base + ok))
    changed = load_config(ROOT / "configs/simple/tiny-cpu.yaml",
                          ["run.name=r", "trainer.lr=2e-5", "run.seed=7"])
    with pytest.raises(ConfigError, match=r"run.seed: 0 -> 7; trainer.lr: 1e-05 -> 2e-05.*"
                                          r"Use a new run.name"):
        check_resume_config(saved, changed)
    before = saved.read_text()
    changed.run.resume_changed = True  # the user's explicit yes: the old config is kept
    check_resume_config(saved, changed)
    assert (tmp_path / "config.1.yaml").read_text() == before and not saved.exists()


def test_coevolve_run_force_config_resumes_under_changed_settings(tmp_path):
    """`coevolve run --force-config` is run.resume_changed=true: the changed lr is
    refused in one line without it, accepted with it (the old config kept)."""
    from pipelines.cli import _parser, run_config
    from pipelines.config import dump_config
    from pipelines.runtime.driver import check_resume_config

    config = str(ROOT / "configs/simple/tiny-cpu.yaml")
    saved = tmp_path / "config.yaml"
    saved.write_text(dump_config(load_config(config, ["run.name=r"])))
    plain = run_config(_parser().parse_args(["run", config, "run.name=r", "trainer.lr=1e-3"]))
    with pytest.raises(ConfigError) as refused:
        check_resume_config(saved, plain)
    assert "\n" not in str(refused.value) and "--force-config" in str(refused.value)
    forced = run_config(_parser().parse_args(
        ["run", config, "run.name=r", "trainer.lr=1e-3", "--force-config"]))
    assert forced.run.resume_changed and forced.trainer.lr == 1e-3
    check_resume_config(saved, forced)
    assert (tmp_path / "config.1.yaml").exists()


def test_a_second_driver_on_the_same_run_directory_stops(tmp_path):
    from pipelines.runtime.driver import run_lock

    other = [sys.executable, "-c", "import sys; from pathlib import Path; "
             "from pipelines.runtime.driver import run_lock\n"
             "with run_lock(Path(sys.argv[1])): pass", str(tmp_path)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with run_lock(tmp_path):
        proc = subprocess.run(other, env=env, capture_output=True, text=True)
        assert proc.returncode != 0
        assert f"another driver (pid {os.getpid()}) is running" in proc.stderr
    assert subprocess.run(other, env=env).returncode == 0  # released when the first stops


def test_state_of_older_runs_still_resolves(tmp_path, monkeypatch):
    """state.json written before paths were relative to the run directory: absolute
    paths stay, working-directory-relative ones (<run.root>/<name>/iter_...) are read
    from their iter_... part."""
    from pipelines.runtime.driver import Driver

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    cfg = load_config(ROOT / "configs/simple/tiny-cpu.yaml", [f"run.root={tmp_path}",
                                                              "run.name=old"])
    # state.json as older drivers wrote it: role paths relative to the working directory
    (tmp_path / "old").mkdir()
    (tmp_path / "old/state.json").write_text(json.dumps({"roles": {
        "policy": {"path": "/models/exported/hf"},
        "solver": {"path": "runs/old/iter_0002/solver/hf"}}}))
    again = Driver(cfg)
    assert again.weights("policy") == "/models/exported/hf"
    assert again.weights("solver") == str(tmp_path / "old/iter_0002/solver/hf")


def _can_unshare() -> str | None:
    if not shutil.which("unshare") or os.geteuid() != 0:
        return "needs root and unshare(1) to give a simulated node a folder of its own"
    probe = subprocess.run(["unshare", "-m", "true"], capture_output=True, text=True, check=False)
    return None if probe.returncode == 0 else f"unshare -m fails here: {probe.stderr.strip()}"


@pytest.mark.slow
def test_probe_on_two_nodes_names_the_node_with_its_own_folder(tmp_path):
    why = _can_unshare()
    if why:
        pytest.skip(why)
    from conftest import scenario_result, start_scenario

    result = scenario_result("two-nodes", start_scenario(__file__, "two-nodes", str(tmp_path)),
                             timeout=180)
    head, other = result["head"], result["other"]

    # Local folders: the node with its own folder is named, with its IP and id.
    error = result["local"]
    assert "is not one folder shared by the 2 nodes" in error, error
    assert f"({other[:8]}) does not see the files of node 127.0.0.1 ({head[:8]})" in error
    assert f"({head[:8]}) does not see the files of node 127.0.0.1 ({other[:8]})" in error
    assert "mount one shared filesystem at the same path on every node" in error
    # Each node's token went into its own folder, and each removed its own.
    assert result["local_leftovers"] == {"head": [], "other": []}
    # One folder that both nodes see: the probe passes and leaves nothing behind.
    assert result["shared"] is None
    assert result["shared_leftovers"] == []
    # A node that cannot write there is named with the reason.
    assert f"({other[:8]}): cannot write there" in result["read_only"]


# --------------------------------------------------------------------------
# The scenario (run in the subprocess)
# --------------------------------------------------------------------------


def _start_node(address: str, log: Path, mounts: str) -> subprocess.Popen:
    """A second Ray node on 127.0.0.1, in a mount namespace of its own where ``mounts``
    (shell commands) ran first; its process group holds everything it starts."""
    script = f"{mounts} && exec {shlex.join([sys.executable, __file__, 'node', address])}"
    return subprocess.Popen(["unshare", "-m", "--propagation", "private", "sh", "-c", script],
                            stdin=subprocess.DEVNULL, stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def _run_node(address: str) -> None:
    """Child: a worker node joined to ``address`` (as cluster_utils adds one), until SIGTERM."""
    from pipelines.runtime.local_ray import _loopback_only

    _loopback_only()
    from ray._private.node import Node
    from ray._private.parameter import RayParams

    params = RayParams(node_ip_address="127.0.0.1", gcs_address=address, num_cpus=1, num_gpus=0,
                       object_store_memory=150 << 20, min_worker_port=0, max_worker_port=0,
                       include_log_monitor=False, node_manager_port=0)
    params.dashboard_agent_listen_port = None
    Node(params, head=False, shutdown_at_exit=True, spawn_reaper=True)  # stops its processes at exit
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print("node started", flush=True)
    while True:
        time.sleep(3600)


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the node process (it stops what it started), then its process group."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _scenario_two_nodes(tmp: Path) -> dict:
    import tempfile

    # Cluster() writes its address file under Ray's temp dir: keep ours private (and short:
    # Ray's socket paths live under it).
    ray_tmp = tempfile.mkdtemp(prefix="cvst-")
    os.environ["RAY_TMPDIR"] = ray_tmp
    from pipelines.runtime.local_ray import _loopback_only

    _loopback_only()
    import ray
    from ray.cluster_utils import Cluster

    from pipelines.runtime.storage import alive_nodes, check_shared

    local, own, shared, locked = (tmp / "local", tmp / "own-disk", tmp / "shared",
                                  tmp / "locked")
    for folder in (local, own, shared, locked):
        folder.mkdir(parents=True, exist_ok=True)
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "node_ip_address": "127.0.0.1", "include_dashboard": False})
    # The second node: the same machine, but `local` is another folder there, and
    # `locked` is read-only, as on a node that mounts the storage read-only.
    other = _start_node(cluster.address, tmp / "other.log",
                        f"mount --bind {own} {local} && mount --bind {locked} {locked} && "
                        f"mount -o remount,bind,ro {locked}")
    out: dict = {}
    try:
        ray.init(address=cluster.address, _node_ip_address="127.0.0.1", log_to_driver=False)
        deadline = time.monotonic() + 120
        while len(alive_nodes()) < 2:
            if time.monotonic() > deadline or other.poll() is not None:
                raise RuntimeError("the second node did not join:\n"
                                   + (tmp / "other.log").read_text()[-3000:])
            time.sleep(0.5)
        head_id = ray.get_runtime_context().get_node_id()
        [other_id] = [n for n in alive_nodes() if n != head_id]
        out.update(head=head_id, other=other_id)
        nodes = {head_id, other_id}

        def attempt(root: Path) -> str | None:
            try:
                check_shared(root, nodes, timeout_s=60)
                return None
            except Exception as err:  # noqa: BLE001 - the message is what the test reads
                return str(err)

        out["local"] = attempt(local)
        out["local_leftovers"] = {"head": sorted(p.name for p in local.iterdir()),
                                  "other": sorted(p.name for p in own.iterdir())}
        out["shared"] = attempt(shared)
        out["shared_leftovers"] = sorted(p.name for p in shared.iterdir())
        out["read_only"] = attempt(locked)
    finally:
        ray.shutdown()
        _stop(other)
        cluster.shutdown()
        shutil.rmtree(ray_tmp, ignore_errors=True)
    return out


if __name__ == "__main__":
    if sys.argv[1] == "two-nodes":
        print(json.dumps(_scenario_two_nodes(Path(sys.argv[2]))))
    elif sys.argv[1] == "node":
        _run_node(sys.argv[2])


def test_a_kill_between_the_roles_new_weights_and_done_does_not_run_the_phase_again(
        tmp_path, monkeypatch):
    """The last two writes of a phase: the role's new weights in state.json, then DONE.
    Killed between them, the resumed run marks the phase done instead of training it
    again (which would count its weight versions twice and start it from its own
    export). The phase and the placement are fakes: driver logic only."""
    from pipelines.runtime.driver import Driver
    from pipelines.runtime.rundir import DONE, PhaseDir

    class Killed(Exception):
        pass

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    cfg = load_config(ROOT / "configs/simple/tiny-cpu.yaml",
                      [f"run.root={tmp_path}", "run.name=crash", "simple.steps=3"])
    trained = []

    def run_phase(self, iteration, index, phase, phase_dir, engines, placement):
        trained.append(phase.name)
        phase_dir.hf().mkdir(parents=True)
        before = self.state.roles.get(phase.role, RoleState()).version
        self._update_state(roles={phase.role: RoleState(
            self.dirs.relative(phase_dir.hf()), iteration, before + phase.steps)})

    monkeypatch.setattr(Driver, "run_phase", run_phase)
    monkeypatch.setattr(Driver, "_enter", lambda self, places, phase, engines: None)
    monkeypatch.setattr(Driver, "_make_data_first", lambda self, *args: None)
    mark = PhaseDir.mark

    def killed_before_done(self, name):
        if name == DONE:
            raise Killed
        mark(self, name)

    monkeypatch.setattr(PhaseDir, "mark", killed_before_done)
    with pytest.raises(Killed):
        Driver(cfg).run()
    monkeypatch.setattr(PhaseDir, "mark", mark)
    state = Driver(cfg).run()
    assert trained == ["policy"] and state.finished
    assert state.roles["policy"] == RoleState("iter_0001/policy/hf", 1, 3)
    assert (tmp_path / "crash/iter_0001/policy/DONE").exists()


def test_the_rayjob_admits_only_its_owner():
    """cluster/rayjob.yaml: every container (head, GPU workers, submitter) sends Ray's
    token from the Secret and runs as a non-root user without capabilities; a
    NetworkPolicy admits only coevolve's pods and labelled submitter namespaces."""
    import yaml

    job, policy = yaml.safe_load_all((ROOT / "cluster/rayjob.yaml").read_text())
    cluster = job["spec"]["rayClusterSpec"]
    templates = [job["spec"]["submitterPodTemplate"], cluster["headGroupSpec"]["template"],
                 *(group["template"] for group in cluster["workerGroupSpecs"])]
    for template in templates:
        assert template["metadata"]["labels"] == {"app.kubernetes.io/name": "coevolve"}
        for container in template["spec"]["containers"]:
            env = {e["name"]: e for e in container["env"]}
            assert env["RAY_AUTH_MODE"]["value"] == "token"
            assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"] == {
                "name": "coevolve-ray-token", "key": "token"}
            security = container["securityContext"]
            assert security["runAsNonRoot"] and security["runAsUser"] != 0
            assert not security["allowPrivilegeEscalation"]
            assert security["capabilities"] == {"drop": ["ALL"]}
    assert policy["kind"] == "NetworkPolicy" and policy["spec"]["policyTypes"] == ["Ingress"]
    assert policy["spec"]["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "coevolve"}
    assert policy["spec"]["ingress"] == [{"from": [
        {"podSelector": {"matchLabels": {"app.kubernetes.io/name": "coevolve"}}},
        {"namespaceSelector": {"matchLabels": {"coevolve.io/submitter": "true"}}}]}]
