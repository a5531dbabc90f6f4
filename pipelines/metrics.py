"""One metrics sink: ``metrics.jsonl`` in the phase folder, wandb, Ray metrics.

Keys are namespaced (``train/``, ``rollout/``, ``reward/``, ``timing/``,
``perf/``, ``coevo/``); actors return dicts and only the driver logs. wandb
runs offline by default (``wandb sync`` later), online when configured, and a
failure to start it is reported once and never stops the run.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

logger = logging.getLogger(__name__)


class MetricsSink:
    def __init__(self, path: Path, cfg, phase: str, truncate_after: int | None = None,
                 total_steps: int | None = None):
        self.path = Path(path)
        self.phase = phase
        if truncate_after is not None:
            self._truncate(truncate_after)
        self._file = open(self.path, "a")
        self._wandb = _start_wandb(cfg, phase, self.path.parent)
        self._gauges = _ray_gauges()
        self._progress = _progress(cfg, phase, total_steps, truncate_after or 0)

    def log(self, step: int, metrics: dict) -> None:
        record = {"step": step, "phase": self.phase, **metrics}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())
        if self._wandb is not None:
            self._wandb.log({f"{self.phase}/{k}": v for k, v in metrics.items()}, step=step)
        for key, gauge in self._gauges.items():
            if key in metrics:
                gauge.set(float(metrics[key]), tags={"phase": self.phase})
        if self._progress is not None and "reward/mean" in metrics:
            self._progress.n = step
            self._progress.set_postfix(reward=f"{metrics['reward/mean']:.3f}",
                                       step_s=f"{metrics.get('timing/step', 0.0):.1f}")
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
                if line.strip() and json.loads(line)["step"] <= step]
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        tmp.replace(self.path)

    def close(self) -> None:
        self._file.close()
        if self._progress is not None:
            self._progress.close()
        if self._wandb is not None:
            self._wandb.finish()


def read_metrics(path: Path) -> list[dict]:
    if not Path(path).exists():
        return []
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def _start_wandb(cfg, phase: str, folder: Path):
    if cfg.logging.wandb == "disabled":
        return None
    try:
        import wandb

        return wandb.init(project=cfg.logging.project, name=f"{cfg.run.name}-{phase}",
                          dir=str(folder), mode=cfg.logging.wandb, reinit="create_new",
                          config={"run": cfg.run.name, "phase": phase})
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
    return {key: Gauge(name, description=key, tag_keys=("phase",)) for key, name in names.items()}


def _progress(cfg, phase: str, total: int | None, initial: int):
    if not cfg.logging.progress:
        return None
    from tqdm import tqdm

    return tqdm(desc=phase, unit="step", total=total, initial=initial, dynamic_ncols=True)
