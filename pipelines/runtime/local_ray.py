"""Attach to a Ray cluster, or start a private one bound to loopback.

``RAY_ADDRESS`` set (e.g. inside ``ray job submit``): attach to it and never
shut it down. Unset: start a private local Ray on 127.0.0.1 only and shut
down exactly that one on exit. Never ``ray stop``: it would kill every Ray
on the machine, other people's included.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator


@contextlib.contextmanager
def ray_session(num_cpus: int | None = None, num_gpus: int | None = None,
                dashboard: bool = False, runtime_env: dict | None = None) -> Iterator[dict]:
    """Context manager around ``ray.init``; yields the cluster's total resources.

    ``num_gpus`` may name logical GPUs on a CPU host (placement tests).
    """
    import ray

    if ray.is_initialized():
        yield ray.cluster_resources()
        return
    if os.environ.get("RAY_ADDRESS"):
        # Attach; ray.shutdown() below only disconnects this driver.
        ray.init(address=os.environ["RAY_ADDRESS"], runtime_env=runtime_env, log_to_driver=True)
    else:
        # A private cluster of our own; ray.shutdown() below stops exactly it.
        _loopback_only()
        ray.init(
            address="local",
            _node_ip_address="127.0.0.1",
            num_cpus=num_cpus,
            num_gpus=num_gpus,
            include_dashboard=dashboard,
            dashboard_host="127.0.0.1",
            runtime_env=runtime_env,
            log_to_driver=True,
        )
        node_ip = ray.util.get_node_ip_address()
        if node_ip != "127.0.0.1":
            ray.shutdown()
            raise RuntimeError(f"private Ray came up on {node_ip}, not 127.0.0.1; refusing to run")
    try:
        yield ray.cluster_resources()
    finally:
        ray.shutdown()


def _loopback_only() -> None:
    """Make a private Ray advertise and bind 127.0.0.1 only.

    Ray resolves ``_node_ip_address="127.0.0.1"`` to the host's routable
    address unless its "local cluster" switch is off; that switch is read
    from RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER when ray is imported, so set the
    variable (for the processes Ray starts) and the already-imported constant.
    """
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False
