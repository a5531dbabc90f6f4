"""R3V on the engine: self-training through reflection on a labeled set (docs/r3v.md).

One SFT phase per iteration k, trained from the base model (``from_base``):

    prepare   the newest model (k-1) samples ``samples`` rationales per training question
              (T 0.9, top_p 0.95, top_k 50) into iter_k/sft/samples.jsonl; the pool is every
              iteration's file so far (models 0..k-1); ``mix.build_mix`` makes the SFT mix
    train     the SFT objective over the mix for ``epochs`` epochs (LoRA in the presets)
    finish    the new model on the test set: Test@1 (greedy), and for each candidate count N
              self-select over N sampled answers beside majority vote and oracle (pass@N)

Iteration 1 also evaluates the base model first. Every evaluation is saved as
``r3v_eval/<model>.json`` in the run folder (a resumed run reuses it), and
``r3v_report.md`` / ``r3v_report.png`` show all models so far.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from actors.sampling import Request, Sampling
from pipelines.algorithms.grading import grade
from pipelines.eval.engines import read_adapter
from pipelines.eval.tasks import item_seed
from pipelines.recipes.labeled import LabeledRecipe, load_items, usable
from pipelines.recipes.r3v.mix import (
    Sample,
    build_mix,
    cot_messages,
    majority_answer,
    rationale_answer,
    select_messages,
)
from pipelines.runtime.rundir import RunDir, atomic_path, atomic_write
from pipelines.runtime.sft import SFTPhase

logger = logging.getLogger(__name__)
SAMPLES = "samples.jsonl"
EVAL = "r3v_eval"
REPORT = "r3v_report"
TOP_K = 50  # the original's sampling for rationales and test-time candidates
CHUNK = 256  # questions per engine call while sampling (saved as each returns)
ADAPTER = "r3v"  # the engines' name of the model being sampled or evaluated (LoRA)


def grader(item):
    """The answer check of one item (its options, for a multiple-choice item)."""

    options = item.options or None
    return lambda pred, ref: grade(pred, ref, options=options)


class R3VPhase:
    name = "sft"
    role = "policy"
    objective = "sft"
    from_base = True
    data_roles = ("policy",)  # samples with the role's engines (check_layouts)

    def __init__(self, cfg, settings):
        # a self-select prompt holds up to max(select_candidates) rationales, then an answer
        need = (max(settings.select_candidates) + 1) * settings.max_tokens
        if need > cfg.generator.max_model_len:
            raise ValueError(f"r3v: self-select over {max(settings.select_candidates)} "
                             f"rationales of up to {settings.max_tokens} tokens needs "
                             f"generator.max_model_len >= {need} (it is "
                             f"{cfg.generator.max_model_len}); raise it or lower r3v.max_tokens")
        if min(settings.select_candidates) < 1:
            raise ValueError("r3v.select_candidates: counts must be at least 1")
        self.cfg, self.s = cfg, settings
        self.steps = settings.epochs  # until prepare() has built the mix
        self._sft: SFTPhase | None = None

    # -- data ----------------------------------------------------------------------

    def prepare(self, ctx) -> dict:
        s = self.s
        items, skipped = usable(load_items(s.train, "train"), "r3v.train")
        self.test, _ = usable(load_items(s.test, "test", s.test_limit or None), "r3v.test")
        pool, adapter = self.serve(ctx, ctx.iteration - 1)  # the newest model: k - 1
        if ctx.iteration == 1:
            self.evaluate(ctx, pool, adapter, "base", 0)
        made = ctx.dir / SAMPLES
        if not made.exists():
            self.sample(pool, adapter, items, ctx.iteration, made)
        samples = read_pool(ctx.run_dir, ctx.iteration)
        rng = np.random.default_rng([*ctx.seed_path, 1])
        examples, counts = build_mix(
            items, samples, rng, direct_qa=s.direct_qa, distilled=s.distilled,
            self_refine=s.self_refine, self_select=s.self_select,
            filter_rationales=s.filter_rationales)
        if examples:
            self._sft = SFTPhase(self.name, self.role, examples, s.batch_size, s.epochs,
                                 val_fraction=s.val_fraction)
            self.steps = self._sft.steps
        else:
            self.steps = 0
        newest = [x for x in samples if x.iteration == ctx.iteration]
        return {**{f"mix_{k}": float(v) for k, v in counts.items()},
                "mix_examples": float(len(examples)), "pool_samples": float(len(samples)),
                "train_skipped": float(skipped),
                "sample_accuracy": float(np.mean([x.correct for x in newest])) if newest else 0.0}

    def serve(self, ctx, k: int):
        """(pool, adapter) serving model k (0: the base). With LoRA every model is the base
        plus its adapter (``iter_k/sft/hf/adapter``), so one pool on the base serves them
        all and no engine restarts between iterations; without, the merged export."""
        folder = RunDir(ctx.run_dir).phase(k, self.name).hf()
        if not self.cfg.trainer.lora.enabled:
            return ctx.serve(self.role, str(folder) if k else ctx.start_weights), None
        pool = ctx.serve(self.role, ctx.start_weights)
        if k == 0:
            return pool, None

        pool.load_adapter(ADAPTER, read_adapter(folder / "adapter"), k)
        return pool, ADAPTER

    def sample(self, pool, adapter, items, iteration: int, path: Path) -> None:
        """``samples`` rationales per question from the pool's model into ``path``.

        Questions go to the engines ``CHUNK`` at a time, each chunk appended to a partial
        file as it returns, so a killed run keeps what it sampled (per-question seeds make
        the rest the same as in an uninterrupted run); the file is renamed when complete.
        """
        partial = path.with_name(f".{path.name}.partial")
        done: set[str] = set()
        if partial.exists():
            lines = partial.read_text().splitlines(keepends=True)
            complete = [line for line in lines if line.endswith("\n")]  # a torn last line
            partial.write_text("".join(complete))
            by_item: dict[str, int] = {}
            for line in complete:
                item_id = json.loads(line)["item_id"]
                by_item[item_id] = by_item.get(item_id, 0) + 1
            done = {k for k, n in by_item.items() if n == self.s.samples}
        todo = [item for item in items if item.id not in done]
        for start in range(0, len(todo), CHUNK):
            chunk = todo[start:start + CHUNK]
            requests = [Request(
                cot_messages(item), images=item.image_bytes(), meta=item, adapter=adapter,
                sampling=Sampling(n=self.s.samples, temperature=self.s.temperature,
                                  top_p=self.s.top_p, top_k=TOP_K, max_tokens=self.s.max_tokens,
                                  seed=item_seed(self.cfg.run.seed, "r3v", iteration, item.id)))
                for item in chunk]
            rows = []
            for request, group in zip(requests, pool.generate(requests)):
                item = request.meta
                for c in group:
                    answer = rationale_answer(c.text)
                    rows.append({"item_id": item.id, "text": c.text, "answer": answer,
                                 "correct": answer is not None
                                 and grader(item)(answer, item.answer),
                                 "iteration": iteration})
            with partial.open("a") as f:
                f.write("".join(json.dumps(r) + "\n" for r in rows))
            logger.info("r3v iteration %d: sampled %d of %d questions", iteration,
                        len(items) - len(todo) + start + len(chunk), len(items))
        # the items' own order, whatever order the chunks were made in
        rows = [json.loads(line) for line in partial.read_text().splitlines()]
        rank = {item.id: n for n, item in enumerate(items)}
        rows.sort(key=lambda r: rank.get(r["item_id"], len(rank)))
        atomic_write(path, "".join(json.dumps(r) + "\n" for r in rows))
        partial.unlink()

    def batch_examples(self, step: int, seed_path):
        return self._sft.batch_examples(step, seed_path)

    def held_out(self, step: int) -> list:
        return self._sft.held_out(step)

    def finish(self, ctx) -> None:
        pool, adapter = self.serve(ctx, ctx.iteration)
        self.evaluate(ctx, pool, adapter, RunDir(ctx.run_dir).iteration(ctx.iteration).name,
                      ctx.iteration)

    # -- evaluation --------------------------------------------------------------------

    def evaluate(self, ctx, pool, adapter, label: str, iteration: int) -> dict:
        """Test@1 and test-time selection of the model ``pool`` serves (saved once)."""
        path = ctx.run_dir / EVAL / f"{label}.json"
        if path.exists():
            return json.loads(path.read_text())
        figures = evaluate_selection(pool, self.test, adapter=adapter, seed=self.cfg.run.seed,
                                     counts=self.s.select_candidates,
                                     temperature=self.s.eval_temperature, top_p=self.s.top_p,
                                     max_tokens=self.s.max_tokens)
        figures = {"model": label, "iteration": iteration, **figures}

        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, json.dumps(figures, indent=1))
        write_report(ctx.run_dir)
        logger.info("r3v %s: Test@1 %.3f", label, figures["test@1"])
        return figures


def read_pool(run_dir: Path, iteration: int) -> list[Sample]:
    """Every rationale sampled by iterations 1..``iteration`` (models 0..iteration-1)."""
    out = []
    for k in range(1, iteration + 1):
        path = RunDir(run_dir).phase(k, R3VPhase.name) / SAMPLES
        if not path.exists():
            raise FileNotFoundError(f"{path}: iteration {k}'s samples are missing")
        for line in path.read_text().splitlines():
            row = json.loads(line)
            out.append(Sample(row["item_id"], row["text"], row["answer"], row["correct"],
                              row["iteration"]))
    return out


def evaluate_selection(pool, items, *, seed: int, counts, temperature: float, top_p: float,
                       max_tokens: int, adapter: str | None = None) -> dict:
    """Test@1 (greedy); then max(counts) sampled answers per item and, for each N in
    ``counts``, accuracy of self-select (the model picks among the first N, greedy),
    majority vote and oracle (any of the N right)."""
    greedy = [Request(cot_messages(item), images=item.image_bytes(), meta=item, adapter=adapter,
                      sampling=Sampling(temperature=0.0, max_tokens=max_tokens))
              for item in items]
    most = max(counts)
    sampled = [Request(cot_messages(item), images=item.image_bytes(), meta=item, adapter=adapter,
                       sampling=Sampling(n=most, temperature=temperature, top_p=top_p,
                                         top_k=TOP_K, max_tokens=max_tokens,
                                         seed=item_seed(seed, "r3v-test", item.id)))
               for item in items]
    answers = pool.generate(greedy + sampled)
    first, candidates = answers[:len(items)], answers[len(items):]

    def right(item, text: str) -> bool:
        pred = rationale_answer(text)
        return pred is not None and grader(item)(pred, item.answer)

    figures = {"items": len(items),
               "test@1": float(np.mean([right(it, g[0].text) for it, g in zip(items, first)]))}
    select = [Request(select_messages(item, [c.text for c in group[:n]]),
                      images=item.image_bytes(), meta=item, adapter=adapter,
                      sampling=Sampling(temperature=0.0, max_tokens=max_tokens))
              for n in counts for item, group in zip(items, candidates)]
    picks = iter(pool.generate(select))
    for n in counts:
        chosen, majority, oracle = [], [], []
        for item, group in zip(items, candidates):
            texts = [c.text for c in group[:n]]
            chosen.append(right(item, next(picks)[0].text))
            vote = majority_answer([rationale_answer(t) for t in texts], grader(item))
            majority.append(vote is not None and grader(item)(vote, item.answer))
            oracle.append(any(right(item, t) for t in texts))
        figures[f"select@{n}"] = float(np.mean(chosen))
        figures[f"majority@{n}"] = float(np.mean(majority))
        figures[f"oracle@{n}"] = float(np.mean(oracle))
    return figures


def write_report(run_dir: Path) -> None:
    """r3v_report.md (a row per model) and r3v_report.png (Test@1 per model; test-time
    scaling of the newest model)."""

    rows = sorted((json.loads(p.read_text()) for p in (run_dir / EVAL).glob("*.json")),
                  key=lambda r: r["iteration"])
    if not rows:
        return
    counts = sorted(int(k.split("@")[1]) for k in rows[0] if k.startswith("select@"))
    header = ["model", "Test@1"] + [f"{kind}@{n}" for n in counts
                                    for kind in ("select", "majority", "oracle")]
    lines = ["# R3V evaluation", "",
             ("Test@1: greedy. select@N: the model picks among N sampled answers; majority@N: "
              "majority vote over them; oracle@N: any of them right (pass@N)."), "",
             "| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for r in rows:
        values = [r["test@1"]] + [r[f"{kind}@{n}"] for n in counts
                                  for kind in ("select", "majority", "oracle")]
        lines.append(f"| {r['model']} | " + " | ".join(f"{v:.3f}" for v in values) + " |")
    atomic_write(run_dir / f"{REPORT}.md", "\n".join(lines) + "\n")
    plot_report(rows, counts, run_dir / f"{REPORT}.png")


def plot_report(rows: list[dict], counts: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot([r["iteration"] for r in rows], [r["test@1"] for r in rows], marker="o")
    left.set(xlabel="iteration (0 = base)", ylabel="accuracy", title="Test@1 (greedy)",
             ylim=(0, 1))
    left.set_xticks([r["iteration"] for r in rows])
    newest = rows[-1]
    for kind in ("select", "majority", "oracle"):
        right.plot(counts, [newest[f"{kind}@{n}"] for n in counts], marker="o", label=kind)
    right.set(xlabel="candidates N", ylabel="accuracy", ylim=(0, 1),
              title=f"test-time scaling, {newest['model']}")
    right.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=80, format="png")
    plt.close(fig)


class R3VRecipe(LabeledRecipe):
    settings_section = "r3v"

    def warm_start_examples(self, count: int, seed: int, cfg) -> list:
        """``model.warm_start.data: recipe``: the training set's direct answers and worked
        solutions in R3V's prompts (the mix with an empty pool), cycled to ``count`` in an
        order drawn from ``seed``: a random tiny model learns the answer format first."""
        items, _ = usable(load_items(cfg.r3v.train, "train"), "r3v.train")
        examples, _ = build_mix(items, [], np.random.default_rng(seed), distilled=True)
        return [examples[i % len(examples)] for i in range(count)]

    def phases(self, iteration: int) -> list[R3VPhase]:
        return [R3VPhase(self.cfg, self.cfg.r3v)]

