"""Run tasks on models through a generator pool; resumable; results as parquet.

For each (task, model): the task's items are asked in chunks, data-parallel
over the pool's engines (``GeneratorPool.generate`` balances a chunk over
them), every item with its own seed (``TaskSpec.seed``: the same answer on one
engine or several). Each finished chunk is written atomically to
``OUT/.parts/<task>-<model>/part-NNNNN.parquet``; when all are there they are
joined into ``OUT/<task>-<model>.parquet`` and the parts removed. An
interrupted evaluation started again skips every finished file, and every item
a saved part holds (whatever the chunk size then and now).

With a judge pool, every response is also shown to the judge (``judge.py``);
an answer counts when the rule grader or the judge accepts it, and the
summary reports how often the two agree.

``OUT/summary.parquet`` holds one row per (task, model); ``report.py``
prints it and draws the comparison across models.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from actors.sampling import Request, Sampling
from pipelines.algorithms.grading import Grader
from pipelines.eval import official
from pipelines.eval.data import DataError, Item
from pipelines.eval.tasks import TaskSpec
from pipelines.runtime.rundir import atomic_parquet

logger = logging.getLogger(__name__)

SUMMARY = "summary.parquet"


@dataclass(frozen=True)
class Model:
    """A model to evaluate: ``path`` (hf folder, tiny://, hub id), optionally with a
    peft ``adapter`` folder served on top of it."""

    label: str  # file-name safe: base, iter_0001, ...
    path: str
    adapter: str | None = None
    iteration: int | None = None  # the training iteration it comes from (None: not a run's)


@dataclass
class Progress:
    computed: int = 0  # items generated now
    reused: int = 0  # items read back from earlier finished chunks or files
    skipped: int = 0  # items whose images do not decode
    refused: int = 0  # items the engine refused (too many images, too long): not scored


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct (Chen et al., arXiv 2107.03374)."""
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def evaluate_model(pool, model: Model, tasks: Sequence[TaskSpec], out: Path, *,
                   grader=None, judge=None, data_dir=None, run_seed: int = 0,
                   chunk_items: int = 32, max_tokens: int | None = None,
                   adapter: str | None = None, items: dict[str, list[Item]] | None = None,
                   on_chunk: Callable[[str, int], None] | None = None) -> list[dict]:
    """Evaluate ``model`` (served by ``pool``) on ``tasks``; returns the summary rows.

    ``items``: task name -> its items, already loaded (else ``task.load(data_dir)``).
    ``judge``: a ``judge.Judge`` or None. ``adapter``: the pool's adapter name that
    serves ``model`` (LoRA folders). ``on_chunk(task, index)`` runs after each chunk is
    saved (progress; tests interrupt there). ``max_tokens`` caps every task's budget.
    """

    graded = [t.name for t in tasks if t.metric in official.GRADED]
    if graded and judge is None:
        raise ValueError(f"task(s) {', '.join(graded)} are scored by a judge's graded answer "
                         "(their official protocol): pass --judge MODEL")
    own = grader is None
    grader = grader or Grader()
    try:
        return _evaluate(pool, model, tasks, out, grader, judge, data_dir, run_seed,
                         chunk_items, max_tokens, adapter, items, on_chunk)
    finally:
        if own:
            grader.close()


def _evaluate(pool, model, tasks, out, grader, judge, data_dir, run_seed, chunk_items,
              max_tokens, adapter, items, on_chunk) -> list[dict]:
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for task in tasks:
        progress = Progress()
        loaded = items[task.name] if items and task.name in items else task.load(data_dir)
        table = _run_task(pool, model, task, loaded, out, grader, judge, run_seed,
                          chunk_items, max_tokens, adapter, progress, on_chunk)
        rows.append(summarize(task, model, table, progress))
        logger.info("%s on %s: accuracy %.3f over %d items (%d computed, %d reused, "
                    "%d skipped)", task.name, model.label, rows[-1]["accuracy"],
                    rows[-1]["items"], progress.computed, progress.reused, progress.skipped)
    write_summary(out, rows)
    return rows


def _run_task(pool, model, task, items, out, grader, judge, run_seed, chunk_items,
              max_tokens, adapter, progress, on_chunk) -> pa.Table:
    """Ask the items that neither the task's results file nor a saved part holds, a chunk
    per part; then the results file holds every row (earlier ones included, e.g. items
    beyond a smaller --limit), and the returned table the rows of ``items``, in order."""
    parts = out / ".parts" / f"{task.name}-{model.label}"
    final = out / f"{task.name}-{model.label}.parquet"
    earlier = [pq.read_table(final)] if final.is_file() else []
    saved = sorted(parts.glob("part-*.parquet")) if parts.is_dir() else []
    tables = earlier + [pq.read_table(p) for p in saved]
    done = {i for t in tables for i in t.column("item_id").to_pylist()}
    todo = [item for item in items if item.id not in done]
    progress.reused = len(items) - len(todo)
    order = {item.id: n for n, item in enumerate(items)}
    if not todo and not saved:
        rows = [r for r in earlier[0].to_pylist() if r["item_id"] in order] if earlier else []
        rows.sort(key=lambda r: (order[r["item_id"]], r["sample"]))
        return pa.Table.from_pylist(rows, schema=_SCHEMA) if rows else _empty()
    parts.mkdir(parents=True, exist_ok=True)
    chunks = [todo[i:i + chunk_items] for i in range(0, len(todo), chunk_items)]
    for k, chunk in enumerate(chunks):
        index = len(tables) - len(earlier)
        start = time.perf_counter()
        table = _run_chunk(pool, model, task, chunk, grader, judge, run_seed, max_tokens,
                           adapter, progress)
        path = parts / f"part-{index:05d}.parquet"
        atomic_parquet(path, table)
        tables.append(table)
        logger.info("%s on %s: chunk %d/%d (%d items) in %.1f s", task.name, model.label,
                    k + 1, len(chunks), len(chunk), time.perf_counter() - start)
        if on_chunk is not None:
            on_chunk(task.name, index)
    # a row of an item can be both in the results file and in a part (a crash between
    # writing the one and removing the other): keep one
    every = list({(r["item_id"], r["sample"]): r
                  for t in reversed(tables) for r in t.to_pylist()}.values())
    rank = {item_id: n for n, item_id in enumerate(dict.fromkeys(r["item_id"] for r in every))}
    every.sort(key=lambda r: (order.get(r["item_id"], len(order) + rank[r["item_id"]]),
                              r["sample"]))
    atomic_parquet(final, pa.Table.from_pylist(every, schema=_SCHEMA) if every else _empty())
    shutil.rmtree(parts, ignore_errors=True)
    rows = [r for r in every if r["item_id"] in order]
    return pa.Table.from_pylist(rows, schema=_SCHEMA) if rows else _empty()


def _run_chunk(pool, model, task, chunk, grader, judge, run_seed, max_tokens, adapter,
               progress) -> pa.Table:
    asked, requests = [], []
    budget = min(task.max_tokens, max_tokens) if max_tokens else task.max_tokens
    for item in chunk:
        try:
            images = item.image_bytes()
        except (DataError, OSError) as err:
            logger.warning("%s: skipping item %s: %s", task.name, item.id, err)
            progress.skipped += 1
            continue
        asked.append(item)
        requests.append(Request(task.messages(item), images=images, adapter=adapter,
                                sampling=Sampling(n=task.samples, temperature=task.temperature,
                                                  top_p=task.top_p, max_tokens=budget,
                                                  seed=task.seed(item, run_seed))))
    seeds = [r.sampling.seed for r in requests]
    completions = pool.generate(requests) if requests else []
    progress.computed += len(asked)  # refused ones included: asked, not to be asked again
    records = []
    for item, seed, samples in zip(asked, seeds, completions):
        if any(c.refused for c in samples):  # counted and left out, the rest go on
            logger.warning("%s: the engine refused item %s: %s", task.name, item.id,
                           next(c.text for c in samples if c.refused)[:300])
            progress.refused += 1
            continue
        for j, c in enumerate(samples):
            pred, rule = task.correct(item, c.text, grader)
            records.append({"task": task.name, "model": model.label, "item_id": item.id,
                            "sample": j, "question": task.prompt_text(item),
                            "reference": item.answer,
                            "response": c.text, "extracted": pred, "rule_correct": rule,
                            "judge_correct": None, "judge_reply": None, "correct": rule,
                            "tokens": len(c.token_ids), "logprob": float(sum(c.logprobs)),
                            "finish_reason": c.finish_reason, "score": float(rule),
                            "seed": seed, "version": c.version,
                            "meta": json.dumps(item.meta, sort_keys=True, default=str)})
    triples = [(r["question"], r["reference"], r["response"]) for r in records]
    if task.metric in official.GRADED and records:  # the judge's 0-1 grade is the score
        for record, (grade, reply) in zip(records, judge.grade(triples)):
            record["score"], record["judge_reply"] = grade or 0.0, reply
            record["judge_correct"] = record["correct"] = grade == 1.0
    elif judge is not None and records:
        for record, (verdict, reply) in zip(records, judge.judge(triples)):
            record["judge_correct"], record["judge_reply"] = verdict, reply
            record["correct"] = record["rule_correct"] or bool(verdict)
            record["score"] = float(record["correct"])
    return pa.Table.from_pylist(records, schema=_SCHEMA) if records else _empty()


_SCHEMA = pa.schema([
    ("task", pa.string()), ("model", pa.string()), ("item_id", pa.string()),
    ("sample", pa.int32()), ("question", pa.string()), ("reference", pa.string()),
    ("response", pa.string()), ("extracted", pa.string()), ("rule_correct", pa.bool_()),
    ("judge_correct", pa.bool_()), ("judge_reply", pa.string()), ("correct", pa.bool_()), ("tokens", pa.int32()),
    ("logprob", pa.float64()), ("finish_reason", pa.string()), ("seed", pa.int64()),
    ("version", pa.int64()), ("meta", pa.string()), ("score", pa.float64())])


def _empty() -> pa.Table:
    return _SCHEMA.empty_table()


def summarize(task: TaskSpec, model: Model, table: pa.Table, progress: Progress) -> dict:
    """One summary row: accuracy (the mean over samples: pass@1), pass@k, judge agreement."""
    rows = table.to_pylist()
    by_item: dict[str, list[dict]] = {}
    for r in rows:
        by_item.setdefault(r["item_id"], []).append(r)
    n_items = len(by_item)
    summary = {"task": task.name, "model": model.label, "path": model.path,
               "adapter": model.adapter, "iteration": model.iteration, "items": n_items,
               "samples": len(rows), "skipped": progress.skipped,
               "refused": progress.refused,
               "computed": progress.computed, "reused": progress.reused,
               # the mean score: the share right, or (a graded task) the mean grade
               "accuracy": sum(_score(r) for r in rows) / len(rows) if rows else 0.0,
               "rule_accuracy": sum(r["rule_correct"] for r in rows) / len(rows) if rows else 0.0,
               "mean_tokens": sum(r["tokens"] for r in rows) / len(rows) if rows else 0.0,
               "temperature": task.temperature}
    for k in task.pass_at:
        summary[f"pass@{k}"] = (sum(pass_at_k(len(s), sum(x["correct"] for x in s), k)
                                    for s in by_item.values()) / n_items) if n_items else 0.0
    judged = [r for r in rows if r["judge_correct"] is not None]
    summary.update(agreement(judged))
    if task.metric in official.OFFICIAL:
        summary.update(official.aggregate(task.metric, rows))
    return summary


def _score(row: dict) -> float:
    """A result row's score (rows written before scores were kept: its correctness)."""
    return row["score"] if row.get("score") is not None else float(row["correct"])


def agreement(judged: Sequence[dict]) -> dict:
    """How the rule grader and the judge agree on the responses both saw."""
    n = len(judged)
    both = sum(r["rule_correct"] and r["judge_correct"] for r in judged)
    rule_only = sum(r["rule_correct"] and not r["judge_correct"] for r in judged)
    judge_only = sum(r["judge_correct"] and not r["rule_correct"] for r in judged)
    neither = n - both - rule_only - judge_only
    out = {"judged": n, "judge_accuracy": (both + judge_only) / n if n else None,
           "agree": (both + neither) / n if n else None,
           "rule_only": rule_only, "judge_only": judge_only, "kappa": None}
    if n:
        p_rule, p_judge = (both + rule_only) / n, (both + judge_only) / n
        expected = p_rule * p_judge + (1 - p_rule) * (1 - p_judge)
        out["kappa"] = (out["agree"] - expected) / (1 - expected) if expected < 1 else 1.0
    return out


def write_summary(out: Path, rows: Sequence[dict]) -> Path:
    """Merge ``rows`` into OUT/summary.parquet (a (task, model) row replaces its old one)."""
    path = out / SUMMARY
    old = pq.read_table(path).to_pylist() if path.is_file() else []
    keys = {(r["task"], r["model"]) for r in rows}
    merged = [r for r in old if (r["task"], r["model"]) not in keys] + list(rows)
    columns: list[str] = []
    for r in merged:
        columns += [k for k in r if k not in columns]
    table = pa.Table.from_pylist([{c: r.get(c) for c in columns} for r in merged])
    atomic_parquet(path, table)
    return path
