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
    try:
        yield ray.cluster_resources()
    finally:
        ray.shutdown()
