"""The run directory on disk: atomic writes, step-checkpoint folders, state.json paths.

Layout (docs/architecture.md, "Run directories")::

    <run.root>/<name>/config.yaml  state.json
    <run.root>/<name>/iter_0001/<phase>/rollouts-000001.parquet  metrics.jsonl  ckpt/step_000002/  hf/  DONE
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

STATE = "state.json"


def run_relative(path: str | None) -> str | None:
    """A role path as state.json keeps it: absolute, or relative to the run directory.
    Runs written before that kept ``<run.root>/<name>/iter_.../hf`` relative to the
    working directory: their ``iter_...`` tail is the path inside the run."""
    if not path or Path(path).is_absolute():
        return path
    parts = Path(path).parts
    start = next((i for i, p in enumerate(parts) if p.startswith("iter_")), 0)
    return str(Path(*parts[start:]))


def atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def latest_checkpoint(ckpt_dir: Path) -> tuple[int, Path] | None:
    """The newest complete ``step_NNNNNN`` folder, or None."""
    from actors.checkpoint import is_complete

    found = [(int(p.name.split("_")[1]), p) for p in ckpt_dir.glob("step_*")
             if p.name.split("_")[1].isdigit() and is_complete(p)]
    return max(found) if found else None


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
