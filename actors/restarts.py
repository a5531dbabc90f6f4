"""The restarts a run may spend on failures, and the history of those failures.

Engine pools (a dead, broken or hung engine) and phases (a trainer group that lost
a rank) draw on one ``RestartBudget`` per driver (``run.max_restarts``). The one
restart too many raises ``RestartsExhausted``, whose message lists every failure
of the run in order, so a run that stops says why in one place.
"""

from __future__ import annotations

import logging
import time

logger = logging.getLogger(__name__)


class RestartsExhausted(RuntimeError):
    """More failures than the run's restart budget; the message holds their history."""


class RestartBudget:
    def __init__(self, limit: int, setting: str = "run.max_restarts"):
        if limit < 0:
            raise ValueError(f"{setting} must be >= 0, got {limit}")
        self.limit, self.setting = limit, setting
        self.history: list[str] = []

    @property
    def used(self) -> int:
        return len(self.history)

    def spend(self, what: str, cause: BaseException | str) -> None:
        """Record a failure of ``what`` (e.g. an engine's name) that is about to be
        restarted; ``RestartsExhausted`` when the budget has none left."""
        reason = cause if isinstance(cause, str) else f"{type(cause).__name__}: {cause}"
        reason = " ".join(reason.split())  # one line each, whatever the error printed
        self.history.append(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {what}: {reason[:500]}")
        if self.used > self.limit:
            raise RestartsExhausted(
                f"{self.used} failures, more than {self.setting}={self.limit} restarts allow; "
                "the run stops. Failures in order:\n" +
                "\n".join(f"  {i}. {entry}" for i, entry in enumerate(self.history, 1)))
        logger.warning("restarting %s (restart %d of %d of this run): %s", what, self.used,
                       self.limit, reason[:500])
