"""``coevolve plan CONFIG --timings RUN_DIR``: a layout's step time, with and without
overlap, predicted from a run's measured timings.

The run's ``metrics.jsonl`` files give each step's ``timing/*`` figures; per phase
the medians over its steps (every iteration) are scaled from the run's layout to
the planned one (``CONFIG``'s, phase by phase):

- generation (``timing/generate``) divides over the role's engines: the pool hands
  requests out longest first to the least loaded engine, so
  ``g' = g * engines_run / engines_plan``;
- the trainer's work (``timing/logprobs`` + ``timing/update``) divides over the
  trainer ranks (FSDP2 data parallel; the gradient reduction is left out), so
  ``u' = u * ranks_run / ranks_plan``;
- scoring (``timing/reward``, judge engines included), the weight sync, saving and
  the driver's own work (``timing/overhead``) stay as measured.

A step then takes ``g' + r + u' + rest`` in turns, and ``max(g' + r, u') + rest``
with ``run.overlap: 1`` (docs/algorithms.md, Overlap), which a colocated phase
cannot use. A phase without generation (SFT) only scales its update. The speed is the
run's hardware: plan a GPU layout from a run on those GPUs (a short one suffices);
a CPU run shows the model, not a GPU's figures.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipelines.config import Config, load_config
from pipelines.layouts import Layout, resolve_layout
from pipelines.registry import build_recipe
from pipelines.runtime.metrics import read_metrics
from pipelines.runtime.rundir import RunDir

REST = ("weight_sync", "save", "sleep", "wake", "overhead")


@dataclass(frozen=True)
class PhaseTimings:
    """Median seconds per step of one phase of a run."""

    phase: str
    steps: int
    generate: float  # the role's engines sampling (or a multi-policy phase's rollout)
    reward: float
    train: float  # behaviour / reference log-probs + the updates
    rest: float  # weight sync, save, sleep / wake, the driver's own work
    step: float  # measured wall time of a step

    @property
    def samples(self) -> bool:
        return self.generate > 0


def read_timings(run_dir: Path) -> dict[str, PhaseTimings]:
    """phase -> its medians, from every ``iter_*/<phase>/metrics.jsonl`` of the run."""
    rows: dict[str, list[dict]] = {}
    for path in sorted(Path(run_dir).glob("iter_*/*/metrics.jsonl")):
        rows.setdefault(path.parent.name, []).extend(
            m for m in read_metrics(path) if "timing/step" in m)
    if not rows:
        raise ValueError(f"{run_dir}: no steps with timings (iter_*/<phase>/metrics.jsonl); "
                         "is it a run directory, and has a step finished?")

    def median(ms: list[dict], *keys: str) -> float:
        return float(np.median([sum(m.get(f"timing/{k}", 0.0) for k in keys) for m in ms]))

    return {phase: PhaseTimings(
        phase, len(ms), generate=median(ms, "generate", "rollout"), reward=median(ms, "reward"),
        train=median(ms, "logprobs", "update"), rest=median(ms, *REST), step=median(ms, "step"))
        for phase, ms in rows.items() if ms}


@dataclass(frozen=True)
class Prediction:
    phase: str
    generate: float
    train: float
    sequential: float
    overlapped: float | None  # None: the phase cannot overlap (colocated, or no sampling)


def predict(t: PhaseTimings, run: Layout, role: str, plan: Layout) -> Prediction:
    """One phase's step time in ``plan``, from its timings ``t`` measured in ``run``."""
    def engines(layout: Layout) -> int:
        r = layout.roles.get(role)
        return r.engines if r is not None and r.engines else 0

    generate = t.generate
    if t.samples:
        if not engines(plan):
            raise ValueError(f"phase {t.phase}: the planned layout has no {role} engines")
        generate = t.generate * max(engines(run), 1) / engines(plan)
    train = t.train * run.trainer_ranks / plan.trainer_ranks
    sequential = generate + t.reward + train + t.rest
    can_overlap = t.samples and role not in plan.colocate
    overlapped = max(generate + t.reward, train) + t.rest if can_overlap else None
    return Prediction(t.phase, generate, train, sequential, overlapped)


def _roles(cfg: Config) -> tuple[tuple[str, ...], dict[str, str]]:
    recipe = build_recipe(cfg)
    return recipe.roles, {p.name: p.role for p in recipe.phases(1)}


def timings_report(cfg: Config, run_dir: str) -> str:
    """The table ``coevolve plan --timings`` prints."""
    run_dir = Path(run_dir)
    saved = RunDir(run_dir).config
    if not saved.is_file():
        raise ValueError(f"{run_dir}: no config.yaml; give a run directory (runs/<name>)")
    run_cfg = load_config(saved)
    timings = read_timings(run_dir)
    run_roles, run_phase_roles = _roles(run_cfg)
    plan_roles, plan_phase_roles = _roles(cfg)
    title = (f"timings   {run_dir}: medians over each phase's steps, seconds; scaled from the "
             f"run's layout to this one (generation by engines, the update by trainer ranks)")
    header = (f"  {'phase':<10}{'steps':>6}{'generate':>10}{'reward':>8}{'train':>8}{'rest':>7}"
              f"{'measured':>10}  |  {'layout':<36}{'generate':>9}{'train':>8}{'in turns':>10}"
              f"{'overlap':>9}{'gain':>7}")
    lines = [title, "", header]
    for phase, t in timings.items():
        role = run_phase_roles.get(phase, plan_phase_roles.get(phase, phase))
        run = resolve_layout(run_cfg.placement, phase, run_roles)
        plan = resolve_layout(cfg.placement, phase, plan_roles)
        left = (f"  {phase:<10}{t.steps:>6}{t.generate:>10.2f}{t.reward:>8.2f}{t.train:>8.2f}"
                f"{t.rest:>7.2f}{t.step:>10.2f}  |  ")
        for name, layout in (("as run", run), ("planned", plan)):
            p = predict(t, run, role, layout)
            shape = f"{name}: {layout.trainer_ranks} ranks, {_engines(layout, role)}"
            gain = f"{p.sequential / p.overlapped:.2f}x" if p.overlapped else "-"
            over = f"{p.overlapped:.2f}" if p.overlapped else "-"
            lines.append(f"{left}{shape:<36}{p.generate:>9.2f}{p.train:>8.2f}{p.sequential:>10.2f}"
                         f"{over:>9}{gain:>7}")
            left = " " * (len(left) - 5) + "  |  "
    legend = ("  in turns: generate + reward + train + rest; overlap (run.overlap: 1): "
              "max(generate + reward, train) + rest; '-': colocated or no sampling")
    lines += ["", legend]
    return "\n".join(lines) + "\n"


def _engines(layout: Layout, role: str) -> str:
    r = layout.roles.get(role)
    n = r.engines if r is not None else 0
    return f"{n} {role} engine{'s' * (n != 1)}" + (" (coloc.)" if role in layout.colocate else "")
