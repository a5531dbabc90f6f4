"""Run directories that survive a cluster: absolute, and on storage every node shares.

Trainer ranks write their checkpoint shards under the run directory and engines
read the phases' ``hf/`` exports from it, each on its own node; the driver reads
both back on a resume. So on a cluster ``run.root`` must be one folder that
every node sees at the same path (NFS, a cloud filestore, a ReadWriteMany
volume), and it must not be relative: under ``ray job submit`` the working
directory is a per-job temporary folder, gone with the job.

``run_root`` turns ``run.root`` into an absolute path (refusing a relative one
on a cluster); ``check_shared`` proves the folder is shared by the nodes that
host the run's actors, before any work lands there: every node writes a token
under the root and every node reads back every other node's token.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
import uuid
from collections.abc import Iterable
from pathlib import Path

from pipelines.config import ConfigError
from pipelines.runtime.rundir import atomic_write

PROBE_PREFIX = ".coevolve-probe-"


def attached_to_cluster() -> bool:
    """True under ``ray job submit``/``RAY_ADDRESS``, or when Ray spans more than one node."""
    if os.environ.get("RAY_ADDRESS"):
        return True
    import ray

    return ray.is_initialized() and len(alive_nodes()) > 1


def run_root(root: str, on_cluster: bool) -> Path:
    """``run.root`` as an absolute path; a relative one is refused on a cluster."""
    path = Path(root).expanduser()
    if path.is_absolute():
        return path
    if on_cluster:
        raise ConfigError(
            f"run.root: '{root}' is relative, and this run is on a Ray cluster, where the "
            "working directory is a temporary per-job folder on one node: checkpoints would be "
            "scattered over the nodes and lost with the job. Set run.root to an absolute folder "
            "that every node mounts at the same path (an NFS share, a ReadWriteMany volume)")
    return Path.cwd() / path


def alive_nodes() -> dict[str, str]:
    """Node id -> IP address of the cluster's live nodes."""
    import ray

    return {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes() if n.get("Alive")}


def placement_nodes(placement) -> set[str]:
    """The node ids that hold a bundle of any of the placement's groups."""
    from ray.util import placement_group_table

    nodes: set[str] = set()
    for pg in placement.groups.values():
        nodes.update(n for n in placement_group_table(pg)["bundles_to_node_id"].values() if n)
    return nodes


def _write_token(folder: str, node_id: str, token: str) -> str | None:
    """On one node: write ``folder/<node_id>``; None, or why it could not."""
    try:
        os.makedirs(folder, exist_ok=True)
        atomic_write(Path(folder) / node_id, token, sync=True)
        return None
    except OSError as err:
        return f"cannot write there ({err.strerror or err})"


def _unseen_tokens(folder: str, tokens: dict[str, str]) -> list[str]:
    """On one node: the node ids whose token it cannot read back under ``folder``."""
    unseen = []
    for node_id, token in tokens.items():
        try:
            with open(os.path.join(folder, node_id)) as f:
                ok = f.read() == token
        except OSError:
            ok = False
        if not ok:
            unseen.append(node_id)
    return unseen


def _remove_token(folder: str, node_id: str) -> None:
    """On one node: remove its token, and the probe folder once it is empty."""
    for path in (Path(folder) / node_id, *Path(folder).glob(f".{node_id}.*.tmp")):
        with contextlib.suppress(OSError):
            os.remove(path)
    with contextlib.suppress(OSError):
        os.rmdir(folder)


def _gather(refs: dict, timeout_s: float) -> dict:
    """node -> its probe task's result, or the error it failed with (within timeout_s)."""
    import ray

    deadline = time.monotonic() + timeout_s
    out = {}
    for node_id, ref in refs.items():
        try:
            out[node_id] = ray.get(ref, timeout=max(1.0, deadline - time.monotonic()))
        except Exception as err:  # noqa: BLE001 - any failure of the probe names the node
            out[node_id] = err
    return out


def check_shared(root: Path, node_ids: Iterable[str], timeout_s: float = 60.0) -> None:
    """Fail, naming the nodes, unless every node in ``node_ids`` sees the same ``root``.

    Each node writes a random token to ``root/.coevolve-probe-<id>/<node id>``;
    then each node reads every token back. A node that cannot write, cannot see
    another node's token, or does not answer within ``timeout_s`` makes the
    check fail before the run writes anything.
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    names = alive_nodes()
    nodes = sorted(set(node_ids))
    if not nodes:
        return
    missing = [n for n in nodes if n not in names]
    if missing:
        raise RuntimeError(f"nodes {', '.join(missing)} are not alive in the Ray cluster")
    folder = str(Path(root) / f"{PROBE_PREFIX}{uuid.uuid4().hex[:12]}")
    tokens = {n: uuid.uuid4().hex for n in nodes}

    def on(node_id: str, fn):
        return ray.remote(fn).options(
            num_cpus=0, max_retries=0,
            scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False))

    def who(node_id: str) -> str:
        return f"{names[node_id]} ({node_id[:8]})"

    try:
        written = _gather({n: on(n, _write_token).remote(folder, n, tokens[n]) for n in nodes},
                          timeout_s)
        problems = [f"node {who(n)}: {r if isinstance(r, str) else f'probe failed: {r}'}"
                    for n, r in written.items() if r is not None]
        if not problems:
            read = _gather({n: on(n, _unseen_tokens).remote(folder, tokens) for n in nodes},
                           timeout_s)
            for n, unseen in read.items():
                if isinstance(unseen, Exception):
                    problems.append(f"node {who(n)}: probe failed: {unseen}")
                elif unseen:
                    problems.append(f"node {who(n)} does not see the files of node"
                                    f"{'s' if len(unseen) > 1 else ''} "
                                    + ", ".join(who(u) for u in unseen))
    finally:  # every node removes its own token (the folders may be several)
        _gather({n: on(n, _remove_token).remote(folder, n) for n in nodes}, timeout_s)
        shutil.rmtree(folder, ignore_errors=True)
    if problems:
        raise ConfigError(
            f"run.root: {root} is not one folder shared by the {len(nodes)} nodes of this run: "
            + "; ".join(problems) + ". Trainer ranks write checkpoints and engines read weights "
            "there from their own nodes: mount one shared filesystem at the same path on every "
            "node and set run.root to it")
