"""The run's generator pools, one per role, kept alive across phases.

A pool is expensive to start (a vLLM engine per device) and MM-Zero's phases
keep needing the same weights: Proposer_i trains on its own pool, then serves
the CodeGen and Solver phases' data from that same pool; CodeGen_{i-1} judges
proposals and then starts the CodeGen phase. So the driver asks for "role R
serving weights W" and gets the live pool when it already serves W; otherwise
the pool is restarted on W. What a pool serves is a label: the folder it was
started from, or what the phase that trains it set (``served``).

Pools live in the placement groups of the current phase; when the next phase
moves devices, ``shutdown`` runs before the groups are released.
"""

from __future__ import annotations

import logging

from pipelines.runtime.specs import role_engine_spec

logger = logging.getLogger(__name__)


class Engines:
    def __init__(self, cfg, restarts=None):
        """``restarts``: the run's ``RestartBudget`` (actors/restarts.py), shared with its
        phases' trainer groups; default: a new one of ``run.max_restarts``."""
        from actors.restarts import RestartBudget

        self.cfg = cfg
        self.restarts = restarts if restarts is not None else RestartBudget(cfg.run.max_restarts)
        self.pools: dict = {}  # role -> GeneratorPool
        self.serving: dict[str, str] = {}  # role -> label of the weights it serves

    def pool(self, role: str, weights: str, placement):
        """The pool of ``role`` serving ``weights``, started in ``placement`` if needed."""
        return self.pools_for({role: weights}, placement)[role]

    def pools_for(self, wanted: dict[str, str], placement) -> dict:
        """role -> its pool serving ``wanted[role]``; the pools that must start are started
        side by side (a phase's own engines and its judges load at the same time)."""
        from actors.pool import GeneratorPool

        starting = {}
        for role, weights in wanted.items():
            if self.serving.get(role) == weights:
                continue
            self.stop(role)
            layout = placement.layout.roles.get(role)
            if layout is None or layout.engines == 0:
                raise ValueError(f"phase {placement.layout.name} needs engines of role "
                                 f"{role!r}; add placement.roles.{role}.engines=1 (or to this "
                                 "phase's layout)")
            logger.info("starting %d %s engine(s) on %s", layout.engines, role, weights)
            spec = role_engine_spec(self.cfg, placement.layout, role, weights)
            # registered at once, so that shutdown() stops it if another one fails to load
            g = self.cfg.generator
            self.pools[role] = starting[role] = GeneratorPool(
                role, spec, layout.engines, run=self.cfg.run.name, wait=False,
                restarts=self.restarts, stall_timeout_s=g.stall_timeout_s,
                call_timeout_s=g.call_timeout_s, start_timeout_s=g.start_timeout_s,
                sync_timeout_s=g.sync_timeout_s,
                **placement.pool_kwargs(role))
        for role, pool in starting.items():
            pool.wait_ready()
            self.serving[role] = wanted[role]
        return {role: self.pools[role] for role in wanted}

    def served(self, role: str, weights: str, saved: bool = False) -> None:
        """Record that the pool of ``role`` now serves ``weights`` (after a weight sync).

        ``saved``: ``weights`` is a folder holding exactly those weights; engines
        restarted later load it (the pushed buckets die with the trainer group).
        """
        self.serving[role] = weights
        if saved:
            self.pools[role].rebase(weights)

    def stop(self, role: str) -> None:
        pool = self.pools.pop(role, None)
        self.serving.pop(role, None)
        if pool is not None:
            pool.shutdown()

    def shutdown(self) -> None:
        for role in list(self.pools):
            self.stop(role)
