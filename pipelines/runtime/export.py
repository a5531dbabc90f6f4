"""``coevolve export RUN_DIR``: the trained policies of a run, ready to load elsewhere.

For every role of the run (state.json) the newest phase that trained it left
``hf/``: full weights that transformers and vLLM load (with LoRA: the base
merged with the adapter, and the adapters in peft's format under
``adapter/``). A phase that trains several policies also left ``hf-<policy>/``
for each policy after the first. The export copies them (hard links where the
filesystem allows) to ``<out>/<role>/`` and ``<out>/<role>-<policy>/`` and
writes ``<out>/export.json``: what each folder is, the run's resolved config,
and the code version (the package version and, in a git checkout, the commit).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import yaml

from pipelines.runtime.rundir import STATE, RunDir, RunState, atomic_write, link_tree


def code_version() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    root = Path(__file__).resolve().parents[2]
    try:
        package = version("coevolve")
    except PackageNotFoundError:
        package = None
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                                text=True, timeout=10, check=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "-C", str(root), "status", "--porcelain"],
                                    capture_output=True, text=True, timeout=10).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        commit, dirty = None, None
    return {"package": package, "git_commit": commit, "git_dirty": dirty}


def export_run(run_dir: str | Path, out: str | Path | None = None) -> dict:
    """Export every trained policy of ``run_dir`` to ``out`` (default: RUN_DIR/export)."""
    run_dir = Path(run_dir).resolve()
    dirs = RunDir(run_dir)
    if not dirs.state.is_file():
        raise FileNotFoundError(f"{run_dir}: no {STATE}; is this a run directory?")
    state = RunState.read(dirs.state)
    out = Path(out) if out is not None else run_dir / "export"
    out.mkdir(parents=True, exist_ok=True)
    policies = {}
    for role, info in sorted(state.roles.items()):
        if not info.path:
            continue
        hf = run_dir / info.path
        if not (hf / "config.json").is_file():
            raise FileNotFoundError(f"{role}: {hf} holds no model (config.json missing)")
        folders = {role: hf}
        for extra in sorted(hf.parent.glob("hf-*")):
            folders[f"{role}-{extra.name[3:]}"] = extra
        for name, source in folders.items():
            link_tree(source, out / name)
            adapters = out / name / "adapter"
            policies[name] = {
                "folder": name, "source": str(source.relative_to(run_dir)),
                "iteration": info.iteration, "version": info.version,
                "adapters": sorted(str(p.parent.relative_to(adapters))
                                   for p in adapters.rglob("adapter_config.json"))
                if adapters.is_dir() else []}
    if not policies:
        raise ValueError(f"{run_dir}: no trained policy yet (state.json lists no role export)")
    config = dirs.config
    manifest = {"run": str(run_dir), "policies": policies, "code": code_version(),
                "config": yaml.safe_load(config.read_text()) if config.is_file() else None}
    atomic_write(out / "export.json", json.dumps(manifest, indent=1))
    return manifest
