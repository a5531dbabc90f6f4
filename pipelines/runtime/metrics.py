"""One metrics sink: ``metrics.jsonl`` in the phase folder, wandb, Ray metrics.

Keys are namespaced (``train/``, ``rollout/``, ``reward/``, ``timing/``,
``perf/``, ``coevo/``); actors return dicts and only the driver logs.

wandb: one wandb run per coevolve run. Its id is kept in the run directory
(``wandb_id``); a driver process opens it once for all its phases
(``finish_wandb`` closes it) and a resumed or resubmitted driver resumes it
online. Offline (the default) wandb ignores resuming: each driver process
writes its own ``offline-run-*-<id>`` folder. A phase's metrics are
``<phase>/<key>`` against the x-axis ``<phase>/progress`` = iteration - 1 +
step / steps, so the curves of all iterations line up. A failure to start
wandb is reported once and never stops the run.

Ray metrics (Prometheus, via Ray's metrics export; the Grafana dashboard is
``cluster/grafana-coevolve.json``): gauges tagged with the run, role, phase
and iteration, so two runs on one cluster never share a series.
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

from pipelines.runtime.rundir import atomic_write

logger = logging.getLogger(__name__)


class Timer:
    """Named wall-clock timers for one step: ``with timer("generate"): ...``."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


class MetricsSink:
    def __init__(self, path: Path, cfg, phase: str, truncate_after: int | None = None,
                 total_steps: int | None = None, *, run_dir: Path | None = None,
                 role: str = "", iteration: int = 1):
        self.path = Path(path)
        self.phase = phase
        self.iteration, self.total_steps = iteration, total_steps
        self.tags = {"run": cfg.run.name, "role": role or phase, "phase": phase,
                     "iteration": str(iteration)}
        drop_cut_line(self.path)  # a kill or a full disk mid-log(): the next row starts clean
        if truncate_after is not None:
            self._truncate(truncate_after)
        self._file = open(self.path, "a")
        self._wandb = _start_wandb(cfg, phase, Path(run_dir) if run_dir else self.path.parent)
        self._gauges = _ray_gauges()
        self._progress = _progress(cfg, phase, total_steps, truncate_after or 0)

    def log(self, step: int, metrics: dict) -> None:
        record = {"step": step, "phase": self.phase, **metrics}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())
        if self._wandb is not None:
            progress = self.iteration - 1 + step / max(self.total_steps or step, 1)
            self._wandb.log({f"{self.phase}/progress": progress,
                             **{f"{self.phase}/{k}": v for k, v in metrics.items()
                                if isinstance(v, (int, float))}})
        for key, gauge in self._gauges.items():
            if key in metrics:
                gauge.set(float(metrics[key]), tags=self.tags)
        shown = next((k for k in ("reward/mean", "sft/nll") if k in metrics), None)
        if self._progress is not None and shown:  # an RL step's reward, an SFT step's loss
            self._progress.n = step
            self._progress.set_postfix({"reward" if shown == "reward/mean" else "nll":
                                        f"{metrics[shown]:.3f}",
                                        "step_s": f"{metrics.get('timing/step', 0.0):.1f}"})
            self._progress.refresh()

    def rewind(self, step: int) -> None:
        """Forget the lines after ``step`` (the phase went back to that checkpoint)."""
        self._file.close()
        self._truncate(step)
        self._file = open(self.path, "a")

    def _truncate(self, step: int) -> None:
        # A resumed phase repeats the steps after its checkpoint: drop their old lines.
        if not self.path.exists():
            return
        kept = [line for line in self.path.read_text().splitlines()
                if (row := _parse(line)) is not None and row["step"] <= step]
        atomic_write(self.path, "".join(line + "\n" for line in kept))

    def last_step(self) -> int:
        """The highest step with a row in the file (0: none)."""
        rows = [_parse(line) for line in self.path.read_text().splitlines()]
        return max((row["step"] for row in rows if row is not None), default=0)

    def close(self) -> None:
        self._file.close()
        if self._progress is not None:
            self._progress.close()



def read_metrics(path: Path) -> list[dict]:
    """The rows of a metrics.jsonl; a line that is not one JSON object (the last line
    while a driver writes it, or one cut short by a kill) is skipped."""
    if not Path(path).exists():
        return []
    rows = [_parse(line) for line in Path(path).read_text().splitlines()]
    return [row for row in rows if row is not None]


def _parse(line: str) -> dict | None:
    try:
        row = json.loads(line)
    except ValueError:
        return None
    return row if isinstance(row, dict) and "step" in row else None


def drop_cut_line(path: Path) -> None:
    """Cut a file back to its last newline: ``log`` writes whole lines, so anything after
    the last one is a line a kill or a full disk stopped half-way."""
    path = Path(path)
    if not path.exists():
        return
    with open(path, "rb+") as f:
        data = f.read()
        if data and not data.endswith(b"\n"):
            f.truncate(data.rfind(b"\n") + 1)


def wandb_run_id(run_dir: Path) -> str:
    """The id of the run's one wandb run, made on first use and kept in ``run_dir``."""

    path = Path(run_dir) / "wandb_id"
    if not path.exists():
        atomic_write(path, uuid.uuid4().hex[:16] + "\n")
    return path.read_text().strip()


_OPEN_WANDB: dict[str, object] = {}  # run id -> the wandb run this process has open


def finish_wandb() -> None:
    """Close the wandb runs this process opened (the driver calls it when it stops)."""
    while _OPEN_WANDB:
        _, run = _OPEN_WANDB.popitem()
        try:
            run.finish()
        except Exception as err:  # noqa: BLE001 - wandb must never stop a run
            logger.warning("wandb could not finish (%s)", err)


def _start_wandb(cfg, phase: str, run_dir: Path):
    """The run's wandb run (opened once per process); this phase's keys get their x-axis."""
    if cfg.logging.wandb == "disabled":
        return None
    try:
        import wandb

        run_id = wandb_run_id(run_dir)
        run = _OPEN_WANDB.get(run_id)
        if run is None:
            run = wandb.init(project=cfg.logging.project, name=cfg.run.name, id=run_id,
                             resume="allow", dir=str(run_dir), mode=cfg.logging.wandb,
                             reinit="create_new",
                             config={"run": cfg.run.name, "recipe": cfg.run.recipe})
            _OPEN_WANDB[run_id] = run
        run.define_metric(f"{phase}/progress")
        run.define_metric(f"{phase}/*", step_metric=f"{phase}/progress")
        return run
    except Exception as err:  # wandb must never stop a run (no network, no login, ...)
        logger.warning("wandb could not start (%s); metrics stay in metrics.jsonl", err)
        return None


def _ray_gauges() -> dict:
    import ray

    if not ray.is_initialized():
        return {}
    from ray.util.metrics import Gauge

    names = {"perf/tokens_per_s": "coevolve_tokens_per_s", "reward/mean": "coevolve_reward_mean",
             "rollout/version": "coevolve_weight_version", "train/step": "coevolve_train_step"}
    return {key: Gauge(name, description=key, tag_keys=TAG_KEYS) for key, name in names.items()}


TAG_KEYS = ("run", "role", "phase", "iteration")


def _progress(cfg, phase: str, total: int | None, initial: int):
    if not cfg.logging.progress:
        return None
    from tqdm import tqdm

    return tqdm(desc=phase, unit="step", total=total, initial=initial, dynamic_ncols=True)
