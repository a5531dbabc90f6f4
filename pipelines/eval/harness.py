"""``coevolve eval TARGET``: which models, which tasks, which engines.

TARGET is a run directory (``runs/<name>``: the base model and the policy the
recipe evaluates, as trained by every finished iteration) or one model: an
``hf/`` folder, a peft adapter folder (served on its base model), a hub id or
``tiny://...``. Tasks come from ``--tasks`` (names, ``jsonl:PATH``, YAML
files, ``smoke``) or from the recipe's ``benchmarks``. Their data is found before any
engine starts: the tasks whose data is here run, and every other one is listed
with the hub id, config and split it needs and where to put it in
``--data-dir``, or with the reason its copy does not load; with none left the
command fails with that list.

One pool evaluates all the models of a run: after the first, each model's
weights are loaded into the live engines (the weight-sync path, seconds)
instead of starting new engines (minutes for a large model on a GPU).

Results go to ``RUN_DIR/eval/`` (or ``--out``): per (task, model) parquet,
``summary.parquet``, ``comparison.png``; the table is printed.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from pipelines.config import load_config
from pipelines.contract import recipe_spec
from pipelines.eval import official
from pipelines.eval.data import DataError, DataMissing, Item
from pipelines.eval.engines import read_adapter, read_weights, same_architecture, start_pool
from pipelines.eval.judge import Judge
from pipelines.eval.runner import Model, evaluate_model, write_summary
from pipelines.eval.tasks import TaskSpec, resolve_task
from pipelines.registry import build_recipe, eval_role
from pipelines.runtime.rundir import DONE, RunDir, atomic_json, atomic_write

logger = logging.getLogger(__name__)


@dataclass
class Target:
    models: list[Model]
    cfg: object  # the run's config (engine settings), or the defaults
    out: Path
    benchmarks: tuple[str, ...]  # the recipe's tasks ((): none named)
    recipe: str | None = None


def resolve_target(target: str, out: str | None = None) -> Target:
    """The models a target names (see the module docstring)."""

    path = Path(target)
    if RunDir(path).config.is_file() and RunDir(path).state.is_file():
        return _run_target(path.resolve(), out)
    cfg = load_config(None, [])
    if (path / "adapter_config.json").is_file():
        config = json.loads((path / "adapter_config.json").read_text())
        base = config.get("base_model_name_or_path")
        if not base:
            raise ValueError(f"{path}: adapter_config.json names no base_model_name_or_path")
        model = Model(label=_label(path.name), path=base, adapter=str(path.resolve()))
    elif path.is_dir() and not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: neither a run directory (config.yaml + state.json), a "
                                "model folder (config.json) nor a peft adapter folder")
    else:
        ref = str(path.resolve()) if path.is_dir() else target
        model = Model(label=_label(path.name if path.is_dir() else target), path=ref)
    return Target([model], cfg, Path(out or "eval").resolve(), ())


def _label(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_.") or "model"


def _run_target(run_dir: Path, out: str | None) -> Target:
    dirs = RunDir(run_dir)
    cfg = load_config(str(dirs.config), [])
    recipe = build_recipe(cfg)
    role = eval_role(recipe)
    if role is None:
        raise ValueError(f"recipe {cfg.run.recipe} trains {recipe.roles} and names no eval_role")
    models = [Model(label="base", path=cfg.model.path, iteration=0)]
    warm = dirs.warm_start.hf()  # model.warm_start: what every role started from
    if dirs.warm_start.has(DONE) and (warm / "config.json").is_file():
        models.append(Model(label="warm_start", path=str(warm), iteration=0))
    for it_dir in sorted(run_dir.glob("iter_[0-9]*")):
        iteration = int(it_dir.name.split("_")[1])
        trained = [p for p in recipe.phases(iteration) if p.role == role]
        if not trained:
            continue
        phase_dir = dirs.phase(iteration, trained[-1].name)
        if phase_dir.has(DONE) and (phase_dir.hf() / "config.json").is_file():
            models.append(Model(label=it_dir.name, path=str(phase_dir.hf()),
                                iteration=iteration))
    if len(models) == 1:
        logger.warning("%s: no finished iteration yet; evaluating the base model only", run_dir)
    return Target(models, cfg, Path(out).resolve() if out else run_dir / "eval",
                  recipe_spec(recipe).benchmarks, cfg.run.recipe)


def resolve_tasks(names: Sequence[str] | None, target: Target, data_dir: str | None,
                  limit: int | None = None
                  ) -> tuple[list[TaskSpec], dict[str, list[Item]], list[str]]:
    """coevolve's own tasks whose data is here, their items, and one line per task left
    out: what it needs and where to put it (absent), or why its copy does not load.
    ``DataError`` when no task is left (and no lmms-eval task was named). ``lmms:<task>``
    names are left out (see ``lmms_tasks``)."""

    names = list(names or target.benchmarks)
    if not names:
        raise ValueError(f"recipe {target.recipe or '(none)'} names no benchmarks: pass --tasks "
                         "(smoke, jsonl:PATH, a task YAML file, a built-in task or lmms:<task>)")
    tasks = [resolve_task(n) for n in names if not n.startswith(LMMS_PREFIX)]
    if limit is not None:
        tasks = [dataclasses.replace(t, limit=limit) for t in tasks]
    items, left_out = {}, []
    for task in tasks:
        try:
            items[task.name] = task.load(data_dir)
        except DataMissing:
            left_out.append(f"{task.name}: not found; needs {task.needs(data_dir)}")
        except DataError as err:
            left_out.append(f"{task.name}: does not load: {err}")
    if tasks and not items and not lmms_tasks(names, target):
        where = f"--data-dir {data_dir}" if data_dir else "no --data-dir"
        raise DataError(f"no task's data is here ({where}):\n  " + "\n  ".join(left_out))
    return [t for t in tasks if t.name in items], items, left_out


LMMS_PREFIX = "lmms:"


def lmms_tasks(names: Sequence[str] | None, target: Target) -> list[str]:
    """The lmms-eval task names among ``names`` (``lmms:chartqa`` -> ``chartqa``)."""
    return [n[len(LMMS_PREFIX):] for n in (names or target.benchmarks)
            if n.startswith(LMMS_PREFIX)]


def run_eval(target: Target, tasks: Sequence[TaskSpec], items: dict[str, list[Item]], *,
             engines: int = 1, judge_model: str | None = None, data_dir: str | None = None,
             max_tokens: int | None = None, chunk_items: int = 32,
             lmms: Sequence[str] = (), lmms_include: str | None = None,
             limit: int | None = None,
             on_chunk: Callable[[str, int], None] | None = None) -> list[dict]:
    """Evaluate every model of ``target`` on ``tasks`` and on the lmms-eval tasks ``lmms``
    (through the plugin, on the same pool); one pool for all models, one judge pool."""
    from pipelines.eval import report

    graded = [t.name for t in tasks if t.metric in official.GRADED]
    if graded and not judge_model:
        raise ValueError(f"task(s) {', '.join(graded)} are scored by a judge's graded answer "
                         "(their official protocol): pass --judge MODEL")
    cap = max_tokens or max(16, target.cfg.generator.max_model_len // 2)
    judge = judge_pool = None
    if judge_model:
        judge_pool = start_pool(target.cfg, "judge", judge_model, engines=1)
        judge = Judge(judge_pool)
    rows, pool, served = [], None, None
    try:
        for model in target.models:
            if pool is not None and model.adapter is None and same_architecture(served, model.path):
                # A run's iterations share the base's architecture: load the next weights
                # into the live engines (the weight-sync path) instead of restarting them.
                pool.update_weights(read_weights(model.path), version=pool.version + 1)
            else:
                if pool is not None:
                    pool.shutdown()
                pool = start_pool(target.cfg, "eval", model.path, engines=engines,
                                  lora=model.adapter is not None)
            served = None if model.adapter else model.path
            adapter = None
            if model.adapter:
                pool.load_adapter("eval", read_adapter(model.adapter), version=0)
                adapter = "eval"
            rows += evaluate_model(pool, model, tasks, target.out, judge=judge,
                                   data_dir=data_dir, run_seed=target.cfg.run.seed,
                                   chunk_items=chunk_items, max_tokens=cap, adapter=adapter,
                                   items=items, on_chunk=on_chunk)
            if lmms:
                rows += run_lmms(pool, model, lmms, target.out, adapter=adapter,
                                 include_path=lmms_include, limit=limit,
                                 seed=target.cfg.run.seed)
    finally:
        for p in (pool, judge_pool):
            if p is not None:
                p.shutdown()
    summary = report.load_summary(target.out)
    paper = report.published(target.recipe, getattr(target.cfg.model, "path", None))
    report.plot(summary, target.out / "comparison.png", paper)
    atomic_write(target.out / "summary.md", report.markdown(summary, paper))
    return rows


def run_lmms(pool, model: Model, names: Sequence[str], out: Path, *, adapter: str | None,
             include_path: str | None, limit: int | None, seed: int) -> list[dict]:
    """lmms-eval's own tasks on the live pool; its results JSON per (task, model) is kept
    as ``lmms-<task>-<model>.json`` (a finished one is not run again)."""
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    from pipelines.eval.lmms_model import CoevolveLMM

    lm = CoevolveLMM.on_pool(pool, adapter=adapter, seed=seed)
    rows = []
    for name in names:
        path = out / f"lmms-{name}-{model.label}.json"
        if not path.is_file():
            found = simple_evaluate(model=lm, tasks=[name], limit=limit, log_samples=True,
                                    task_manager=TaskManager(include_path=include_path))
            if not found or name not in found.get("results", {}):
                raise RuntimeError(f"lmms-eval returned no results for task {name!r} (see "
                                   "its log above)")
            atomic_json(path, found, indent=1, default=str)
        found = json.loads(path.read_text())
        metrics = found["results"][name]
        value = next((v for k, v in metrics.items() if isinstance(v, (int, float))
                      and "stderr" not in k), None)
        rows.append({"task": f"lmms:{name}", "model": model.label, "path": model.path,
                     "adapter": model.adapter, "iteration": model.iteration,
                     "items": found.get("n-samples", {}).get(name, {}).get("effective"),
                     "accuracy": float(value) if value is not None else float("nan"),
                     "metric": next((k for k in metrics if "stderr" not in k and k != "alias"),
                                    None)})
    write_summary(out, rows)
    return rows
