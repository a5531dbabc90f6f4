"""MAYE on the engine: Reinforce++ on labeled data, with its evaluation scheme.

One phase, ``epochs`` passes over the training set (docs/maye.md). A generation
step takes ``prompts_per_step`` questions in the epoch's order and samples one
response each at ``temperature``; ``rewards.score_response`` scores them; the
trainer takes ``updates_per_step`` optimizer steps over the batch (PPO-clip
against the behaviour log-probs, k3 KL loss) with REINFORCE++ advantages
(token returns whitened over the batch, mean kept: ``algorithm.advantage:
reinforce_pp``), and the new weights go to the engines before the next step.

The evaluation scheme: every step logs the score's components, the reflection
analysis (``rewards.reflection_stats``) and the trainer's losses, KL, clip
fraction, entropy and ratio; before training and after every ``eval_every``
epochs the policy answers the validation and test sets at pass@1 (T 0.01),
pass@1 (T 0.6) and pass@k (T 1.0), and ``maye_report.md`` / ``.json`` in the run
folder give each figure before training, its mean over the evaluated epochs and
its maximum.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from actors.sampling import Completion, Request, Sampling
from pipelines.algorithms.grading import grade
from pipelines.eval.runner import Model, evaluate_model
from pipelines.recipes.base import Scores
from pipelines.recipes.labeled import (
    LabeledRecipe,
    item_messages,
    load_items,
    usable,
)
from pipelines.recipes.maye.rewards import reflection_stats, score_response
from pipelines.runtime.rundir import atomic_write

logger = logging.getLogger(__name__)
REPORT = "maye_report"


def eval_settings(pass_k: int) -> list[tuple[str, float, float, int]]:
    """(name, temperature, top_p, samples) of MAYE's three evaluation settings."""
    return [("pass@1_t0.01", 0.01, 0.001, 1), ("pass@1_t0.6", 0.6, 1.0, 1),
            (f"pass@{pass_k}_t1.0", 1.0, 1.0, pass_k)]


class MayePhase:
    name = "policy"
    role = "policy"

    def __init__(self, cfg, settings):
        if settings.prompts_per_step < settings.updates_per_step:
            raise ValueError(f"maye.updates_per_step ({settings.updates_per_step}) splits the "
                             f"{settings.prompts_per_step} questions of a step into mini-batches:"
                             " it cannot exceed maye.prompts_per_step")
        self.cfg, self.s = cfg, settings
        self.mini_batches = settings.updates_per_step
        self.per_epoch = 0  # generation steps per epoch, known once the data is read
        self.steps = settings.epochs  # until prepare() has read the training set
        self.train: list = []
        self.eval_sets: dict[str, list] = {}

    # -- data and the evaluation before training -------------------------------

    def prepare(self, ctx) -> dict:
        s = self.s
        limit = s.eval_limit or None
        self.train, skipped = usable(load_items(s.train, "train"), "maye.train")
        self.eval_sets = {name: load_items(source, name, limit) for name, source in
                          (("validation", s.validation), ("test", s.test)) if source}
        self.per_epoch = len(self.train) // s.prompts_per_step
        if self.per_epoch == 0:
            raise ValueError(f"maye.train has {len(self.train)} items, fewer than "
                             f"maye.prompts_per_step ({s.prompts_per_step})")
        self.steps = self.per_epoch * s.epochs
        self.evaluate(ctx, epoch=0)
        return {"train_items": float(len(self.train)), "train_skipped": float(skipped),
                "steps_per_epoch": float(self.per_epoch),
                **{f"{k}_items": float(len(v)) for k, v in self.eval_sets.items()}}

    # -- one step ------------------------------------------------------------------

    def requests(self, step: int, rng: np.random.Generator) -> list[Request]:
        epoch, k = divmod(step, self.per_epoch)
        order = np.random.default_rng([self.cfg.run.seed, epoch]).permutation(len(self.train))
        size = self.s.prompts_per_step
        out = []
        for i in order[k * size:(k + 1) * size]:
            item = self.train[i]
            out.append(Request(
                item_messages(item, self.s.instruction), images=item.image_bytes(), meta=item,
                sampling=Sampling(n=1, temperature=self.s.temperature, top_p=self.s.top_p,
                                  max_tokens=self.s.max_tokens, seed=int(rng.integers(1 << 31)))))
        return out

    def score(self, requests: list[Request], completions: list[list[Completion]],
              ctx) -> Scores:

        s = self.s

        def check(options):
            return lambda pred, ref: grade(pred, ref, options=options)

        scores = [[score_response(c.text, r.meta.answer, finished=c.finish_reason == "stop",
                                  tokens=len(c.token_ids), grade=check(r.meta.options or None),
                                  min_tokens=s.min_tokens,
                                  language_penalty=s.language_penalty,
                                  invalid_score=s.invalid_score) for c in group]
                  for r, group in zip(requests, completions)]
        flat = [x for group in scores for x in group]
        texts = [c.text for group in completions for c in group]
        metrics = {"accuracy": float(np.mean([x.accuracy for x in flat])),
                   "format": float(np.mean([x.format for x in flat])),
                   "language": float(np.mean([x.language for x in flat])),
                   "penalised": float(np.mean([x.penalised for x in flat])),
                   **reflection_stats(texts, [x.accuracy > 0 for x in flat])}
        return Scores([[x.score for x in group] for group in scores], metrics,
                      columns={"correct": [[x.accuracy > 0 for x in g] for g in scores],
                               "answer": [[x.answer for x in g] for g in scores]})

    def after_step(self, step: int, ctx) -> dict:
        """At an epoch's end (every ``eval_every`` epochs, and the last): the evaluation."""
        if (step + 1) % self.per_epoch:
            return {}
        epoch = (step + 1) // self.per_epoch
        if epoch % self.s.eval_every and epoch != self.s.epochs:
            return {}
        return self.evaluate(ctx, epoch)

    # -- evaluation ------------------------------------------------------------------

    def tasks(self, name: str):
        from pipelines.eval.tasks import TaskSpec

        instruction = self.s.instruction.replace("{", "{{").replace("}", "}}")
        budget = self.s.eval_max_tokens or self.s.max_tokens
        return [TaskSpec(name=f"{name}_{setting}", data="items", prompt="{question}{choices}\n"
                         + instruction, answer="boxed", temperature=t, top_p=top_p,
                         max_tokens=budget, samples=n, pass_at=tuple(sorted({1, n})))
                for setting, t, top_p, n in eval_settings(self.s.pass_k)]

    def evaluate(self, ctx, epoch: int) -> dict:
        """The policy the engines serve on every evaluation set; the figures as metrics
        (``eval/<set>_<setting>``), also saved in ``eval/epoch_NNN`` and the report."""

        if not self.eval_sets:
            return {}
        tasks, items = [], {}
        for name, loaded in self.eval_sets.items():
            for task in self.tasks(name):
                tasks.append(task)
                items[task.name] = loaded
        served = str(ctx.start_weights) if epoch == 0 else f"{ctx.dir}@{ctx.version}"
        model = Model(label=f"epoch_{epoch:03d}", path=served, iteration=epoch)
        rows = evaluate_model(ctx.pool, model, tasks, ctx.dir / "eval" / f"epoch_{epoch:03d}",
                              run_seed=self.cfg.run.seed, items=items)
        figures = {}
        for row, task in zip(rows, tasks):
            k = task.samples
            figures[task.name] = row[f"pass@{k}"]
        write_report(ctx.run_dir, ctx.dir / "eval", epoch, figures)
        logger.info("maye epoch %d: %s", epoch,
                    ", ".join(f"{k} {v:.3f}" for k, v in figures.items()))
        return {f"eval/{k}": v for k, v in figures.items()}


def write_report(run_dir: Path, eval_dir: Path, epoch: int, figures: dict[str, float]) -> dict:
    """Add one epoch's figures to ``eval/epochs.json`` and rewrite the run's report:
    per figure its value before training (epoch 0), the mean and the maximum over the
    evaluated epochs after it."""

    path = eval_dir / "epochs.json"
    epochs = json.loads(path.read_text()) if path.exists() else {}
    epochs[str(epoch)] = figures
    atomic_write(path, json.dumps(epochs, indent=1, sort_keys=True))
    report = summarise_epochs({int(k): v for k, v in epochs.items()})
    atomic_write(run_dir / f"{REPORT}.json", json.dumps(report, indent=1))
    atomic_write(run_dir / f"{REPORT}.md", report_markdown(report))
    return report


def summarise_epochs(epochs: dict[int, dict[str, float]]) -> dict:
    """{"epochs": {...}, "figures": {name: {before, mean, max, last}}} (mean and max over
    the epochs after 0; None where there are none yet)."""
    names = sorted({k for v in epochs.values() for k in v})
    trained = [e for e in sorted(epochs) if e > 0]
    figures = {}
    for name in names:
        after = [epochs[e][name] for e in trained if name in epochs[e]]
        figures[name] = {"before": epochs.get(0, {}).get(name),
                         "mean": float(np.mean(after)) if after else None,
                         "max": float(max(after)) if after else None,
                         "last": after[-1] if after else None}
    return {"epochs": {str(e): epochs[e] for e in sorted(epochs)}, "figures": figures}


def report_markdown(report: dict) -> str:
    def cell(v):
        return "-" if v is None else f"{v:.3f}"

    lines = ["# MAYE evaluation", "",
             ("Before training (epoch 0), then the mean and the maximum over the evaluated "
              "epochs, and the last one."), "",
             "| figure | before | mean | max | last |", "| --- | --- | --- | --- | --- |"]
    for name, f in report["figures"].items():
        lines.append(f"| {name} | {cell(f['before'])} | {cell(f['mean'])} | {cell(f['max'])} "
                     f"| {cell(f['last'])} |")
    lines += ["", "Per epoch:", "", "| epoch | " + " | ".join(report["figures"]) + " |",
              "| --- |" + " --- |" * len(report["figures"])]
    for epoch, values in report["epochs"].items():
        lines.append(f"| {epoch} | " + " | ".join(cell(values.get(n)) for n in report["figures"])
                     + " |")
    return "\n".join(lines) + "\n"


class MayeRecipe(LabeledRecipe):
    settings_section = "maye"

    def warm_start_examples(self, count: int, seed: int, cfg) -> list:
        """``model.warm_start.data: recipe``: the training items that have a worked
        solution, as ``<think>solution</think> \\boxed{answer}`` in the recipe's prompt,
        cycled to ``count`` examples in an order drawn from ``seed`` (a random tiny model
        learns the answer format before the RL; docs/maye.md)."""
        from pipelines.runtime.sft import SFTExample

        items = [i for i in usable(load_items(cfg.maye.train, "train"), "maye.train")[0]
                 if i.solution]
        if not items:
            raise ValueError(f"maye.train ({cfg.maye.train}) has no item with a solution "
                             "to warm-start on")
        order = np.random.default_rng(seed).permutation(count) % len(items)
        return [SFTExample(item_messages(items[i], cfg.maye.instruction),
                           f"<think>{items[i].solution}</think> \\boxed{{{items[i].answer}}}",
                           items[i].image_bytes()) for i in order]

    def phases(self, iteration: int) -> list[MayePhase]:
        return [MayePhase(self.cfg, self.cfg.maye)]
