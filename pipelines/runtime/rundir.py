"""The run directory on disk: atomic writes, step-checkpoint folders, state.json paths.

Layout (docs/architecture.md, "Run directories")::

    <run.root>/<name>/config.yaml  state.json
    <run.root>/<name>/iter_0001/<phase>/rollouts-000001.parquet  metrics.jsonl  ckpt/step_000002/  hf/  DONE
"""

from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

STATE = "state.json"
CONFIG = "config.yaml"
DONE = "DONE"  # a finished phase (or warm start): the driver skips it on resume
DATA = "DATA"  # a phase's data made under the top-level layout before its own


@dataclass(frozen=True)
class PhaseDir:
    """One phase's folder (``iter_NNNN/<phase>/``, or ``warm_start/``) and what is in it:
    the one place those names are spelled."""

    path: Path

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    @property
    def ckpt(self) -> Path:
        return self.path / "ckpt"

    def checkpoint(self, steps: int) -> Path:
        """The step checkpoint after ``steps`` steps."""
        return self.ckpt / f"step_{steps:06d}"

    def upcoming(self, steps: int) -> Path:
        """The batch sampled for step ``steps + 1`` (run.overlap), beside its checkpoint."""
        return self.ckpt / f"step_{steps:06d}.upcoming.pkl"

    def hf(self, policy: str | None = None) -> Path:
        """The phase's HF export (``hf/``); a second LoRA policy's: ``hf-<policy>/``."""
        return self.path / ("hf" if policy is None else f"hf-{policy}")

    def exports(self) -> list[Path]:
        return [self.hf(), *sorted(self.path.glob("hf-*"))]

    def rollouts(self, step: int) -> Path:
        return self.path / f"rollouts-{step:06d}.parquet"

    def has(self, marker: str) -> bool:
        return (self.path / marker).exists()

    def mark(self, marker: str, text: str = "ok\n") -> None:
        atomic_write(self.path / marker, text)


@dataclass(frozen=True)
class RunDir:
    """A run's folder: ``config.yaml``, ``state.json``, ``warm_start/``, ``iter_NNNN/``."""

    path: Path

    @property
    def state(self) -> Path:
        return self.path / STATE

    @property
    def config(self) -> Path:
        return self.path / CONFIG

    def iteration(self, k: int) -> Path:
        return self.path / f"iter_{k:04d}"

    def phase(self, k: int, name: str) -> PhaseDir:
        return PhaseDir(self.iteration(k) / name)

    @property
    def warm_start(self) -> PhaseDir:
        return PhaseDir(self.path / "warm_start")

    def relative(self, path: Path) -> str:
        """``path`` as state.json keeps it: relative to the run directory."""
        return str(Path(path).relative_to(self.path))


@dataclass
class RoleState:
    """A role's newest weights: its last phase's hf/ export (relative to the run
    directory), the iteration that made them, their weight version."""

    path: str | None = None
    iteration: int | None = None
    version: int = 0


@dataclass
class RunState:
    """``state.json``: where a run stands, written by the driver after every change."""

    roles: dict[str, RoleState] = field(default_factory=dict)
    order: list[str] = field(default_factory=list)  # phases in the order they ran
    base: str | None = None  # the warm start's export, when model.warm_start made one
    iteration: int | None = None
    phase: str | None = None
    step: int | None = None
    finished: bool = False
    launched: float | None = None  # this launch's start (time.time())
    first_step_s: float | None = None  # seconds from launch to the first step
    updated: float | None = None

    @classmethod
    def read(cls, path: Path) -> RunState:
        """The state in ``path`` (a fresh one if there is none); older files, which kept
        role paths relative to the working directory, read the same."""
        if not Path(path).exists():
            return cls()
        data = json.loads(Path(path).read_text())
        known = {f.name for f in fields(cls)}
        roles = {role: RoleState(path=run_relative(info.get("path")),
                                 iteration=info.get("iteration"),
                                 version=info.get("version", 0))
                 for role, info in data.get("roles", {}).items()}
        return cls(**{k: v for k, v in data.items() if k in known and k != "roles"},
                   roles=roles)

    def write(self, path: Path) -> None:
        atomic_write(path, json.dumps(asdict(self), indent=1))


def run_relative(path: str | None) -> str | None:
    """A role path as state.json keeps it: absolute, or relative to the run directory.
    Runs written before that kept ``<run.root>/<name>/iter_.../hf`` relative to the
    working directory: their ``iter_...`` tail is the path inside the run."""
    if not path or Path(path).is_absolute():
        return path
    parts = Path(path).parts
    start = next((i for i, p in enumerate(parts) if p.startswith("iter_")), 0)
    return str(Path(*parts[start:]))


@contextmanager
def atomic_path(path: Path):
    """A temporary path beside ``path`` for a writer that wants a file name (parquet,
    matplotlib); renamed over ``path`` when the block ends without an error, so a reader
    sees the old file or the new one, never half of one. Every write of the run
    directory, the eval folders and the recipes' data goes through here. The temporary
    name carries the process id: processes writing the same file do not collide."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


def atomic_write(path: Path, data: str | bytes, sync: bool = False) -> None:
    """``path`` holds ``data`` whole or keeps what it held; ``sync``: on disk (fsync)
    before the rename, for readers on other nodes."""
    with atomic_path(path) as tmp, open(tmp, "wb" if isinstance(data, bytes) else "w") as f:
        f.write(data)
        if sync:
            f.flush()
            os.fsync(f.fileno())


def atomic_json(path: Path, value, **dump) -> None:
    """``atomic_write`` of ``value`` as JSON (``dump``: json.dumps options)."""
    atomic_write(path, json.dumps(value, **dump))


def atomic_parquet(path: Path, table) -> None:
    """``atomic_write`` of a pyarrow table as parquet."""
    import pyarrow.parquet as pq

    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def write_rollouts(path: Path, step: int, rollouts: list, trained: list,
                   with_policy: bool) -> None:
    """``rollouts-<step>.parquet``: a row per sample of every policy of the step, with
    what it was trained on (pipelines/runtime/rl_step.py's ``TrainedRollout``)."""
    import numpy as np
    import pyarrow as pa

    tables = []
    for r, t in zip(rollouts, trained):
        rows = [(p, s, c) for p, group in enumerate(r.completions) for s, c in enumerate(group)]
        columns = {
            "step": [step] * len(rows),
            **({"policy": [r.policy] * len(rows)} if with_policy else {}),
            "prompt_index": [p for p, _, _ in rows],
            "sample_index": [s for _, s, _ in rows],
            "prompt": [prompt_text(r.requests[p]) for p, _, _ in rows],
            "response": [c.text for _, _, c in rows],
            "response_tokens": [len(c.token_ids) for _, _, c in rows],
            "finish_reason": [c.finish_reason for _, _, c in rows],
            "version": [c.version for _, _, c in rows],
            "staleness": t.staleness.tolist(),
            "reward": t.rewards.tolist(),
            # per sample, or per completion token (reinforce_pp)
            "advantage": [a.tolist() if isinstance(a, np.ndarray) else float(a)
                          for a in t.advantages],
            **{name: [values[p][s] for p, s, _ in rows]
               for name, values in r.scores.columns.items()},
        }
        tables.append(pa.table(columns))
    table = pa.concat_tables(tables, promote_options="permissive") if len(tables) > 1 \
        else tables[0]
    atomic_parquet(path, table)


def prompt_text(request) -> str:
    """The last user turn's text (images as ``<image>``)."""
    parts = request.messages[-1]["content"]
    if isinstance(parts, str):
        return parts
    return " ".join(p.get("text", "<image>") for p in parts)


def complete_checkpoints(ckpt_dir: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every ``step_NNNNNN`` checkpoint with its completion marker, by step."""
    from actors.checkpoint import is_complete

    return sorted((int(p.name.split("_")[1]), p) for p in Path(ckpt_dir).glob("step_*")
                  if p.name.split("_")[1].isdigit() and is_complete(p))


def latest_checkpoint(ckpt_dir: Path) -> tuple[int, Path] | None:
    """The newest complete ``step_NNNNNN`` folder, or None."""
    found = complete_checkpoints(ckpt_dir)
    return found[-1] if found else None


def prune_checkpoints(ckpt_dir: Path, keep: int) -> None:
    """Keep the newest ``keep`` complete checkpoints. Folders without the completion
    marker (a save a kill cut short) never count toward ``keep``: counting them could
    delete the only checkpoint a resume can use. Those older than the newest complete
    one are leftovers and go too."""
    from actors.checkpoint import is_complete

    steps = sorted((int(p.name.split("_")[1]), p) for p in ckpt_dir.glob("step_*")
                   if p.name.split("_")[1].isdigit())
    complete = [(step, p) for step, p in steps if is_complete(p)]
    newest = complete[-1][0] if complete else -1
    cut = [p for step, p in steps if step < newest and not is_complete(p)]
    for path in cut + [p for _, p in complete[:-keep]]:
        shutil.rmtree(path, ignore_errors=True)
    kept = {p.name for _, p in complete[-keep:]}
    for batch in ckpt_dir.glob("step_*.upcoming.pkl"):  # a pruned checkpoint's next batch
        folder = batch.name.removesuffix(".upcoming.pkl")
        if folder not in kept and int(folder.split("_")[1]) <= newest:
            batch.unlink(missing_ok=True)


def link_tree(source: Path, target: Path) -> None:
    """``target`` becomes a copy of the folder ``source`` (hard links where the filesystem
    allows), replaced whole: a reader sees the old folder or the new one."""
    def link(src, dst):
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    tmp = target.with_name(f".{target.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(source, tmp, copy_function=link)
    shutil.rmtree(target, ignore_errors=True)
    tmp.replace(target)
