"""MM-Zero: Proposer -> SVG CodeGen -> Solver self-play (arXiv:2603.09206; docs/mmzero.md).

Per iteration i, three GRPO phases, each training one role from its own
weights of iteration i-1 (the base model for i = 1):

    proposer  topics -> six-field proposals; reward through CodeGen_{i-1}
              (k SVGs, rendered) and Solver_{i-1} (solvability, difficulty),
              minus the content-type and text-diversity penalties
    codegen   data: Proposer_i's proposals whose render rate under the current
              CodeGen is in [0.25, 0.75]; reward: renders, then judged by the
              latest Solver (Solver_{i-1}; the original judged with the CodeGen
              checkpoint itself, a defect fixed here)
    solver    data: Proposer_i's proposals drawn by CodeGen_i, answered 10 times
              by the current Solver; kept when easy self-consistency >= 0.5 and
              hard self-consistency in [0.25, 0.75]; the hard majority answer is
              the pseudo-label; reward 0.9 * correct + 0.1 * format

The data sets of the codegen and solver phases are built once (``prepare``)
and saved in the phase folder (``data.json`` / ``data.parquet``), so a
resumed phase trains on the same items. The solver phase writes the
iteration's ``coevo.json`` and ``coevo.png``, and redraws the run's ``coevo.png``
(``finish``).

Unparsable output is scored as the spec says (proposal -1, SVG penalties,
answer 0) and counted in the metrics; an empty filtered data set makes that
phase train no step (its hf/ is its starting weights) unless ``bootstrap``
tops it up with built-in examples.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections import Counter
from pathlib import Path

import numpy as np

from actors.renderer import PoolConfig, RendererPool, RenderLimits
from actors.sampling import Request, Sampling
from actors.svg_checks import svg_like
from pipelines.algorithms.grading import grade
from pipelines.recipes.base import Scores
from pipelines.recipes.mmzero import coevo, warm_start
from pipelines.recipes.mmzero.examples import EXAMPLES
from pipelines.recipes.mmzero.judge import ask_solver, seed, write_svgs
from pipelines.recipes.mmzero.prompts import codegen_messages, proposer_messages, solver_messages
from pipelines.recipes.mmzero.rewards import (
    CONTENT_TYPES,
    SEED_TOPICS,
    Proposal,
    SampleJudgement,
    clamp_batch,
    codegen_keep,
    codegen_reward,
    format_ok,
    parse_proposal,
    proposer_rewards,
    solver_keep,
    solver_reward,
)
from pipelines.runtime.rundir import PhaseDir, atomic_parquet, atomic_write

logger = logging.getLogger(__name__)


class MMZeroRecipe:
    roles = ("proposer", "codegen", "solver")
    # `coevolve eval`: the policy evaluated after every iteration, and on what (docs/eval.md)
    eval_role = "solver"
    benchmarks = tuple(f"mmzero_{b}" for b in (
        "mmsi", "mathverse", "mathvision", "mathvista", "mmvet", "mmmu_pro", "mmmu_pro_4",
        "mmmu_pro_vision", "visnumbench", "hallusionbench", "mmmu", "chartqa"))

    def __init__(self, cfg):
        self.cfg, self.m = cfg, cfg.mmzero
        self._renderer: RendererPool | None = None
        self._heldout: list[tuple[bytes, str, str]] | None = None  # (png, question, answer)

    def phases(self, iteration: int) -> list:
        return [ProposerPhase(self), CodeGenPhase(self), SolverPhase(self)]

    @property
    def renderer(self) -> RendererPool:
        if self._renderer is None:
            self._renderer = RendererPool(
                RenderLimits(wall_seconds=self.m.render_seconds, max_output_side=self.m.image_side),
                PoolConfig(num_workers=self.m.render_workers,
                           grace_seconds=self.m.render_grace_s))
        return self._renderer

    def render(self, codes: list[str | None], early_stop: bool = True) -> list:
        return self.renderer.render_many(codes, early_stop=early_stop) if codes else []

    def warm_start_examples(self, count: int, seed: int, cfg) -> list:
        """``model.warm_start.data: recipe``: the three formats on drawn figures
        (pipelines/recipes/mmzero/warm_start.py), images from this recipe's renderer."""
        return warm_start.sft_examples(count, seed,
                                       lambda svgs: self.render(svgs, early_stop=False))

    def heldout_accuracy(self, pool) -> float | None:
        """The Solver's accuracy on the held-out set (``mmzero.heldout`` figures, both
        questions), one answer each at T 0.6 / top_p 0.95 with seeds run.seed + k, so two
        Solvers are compared on the same draws. None when off."""
        from pipelines.algorithms.answers import extract_answer

        if not self.m.heldout:
            return None
        seed = self.cfg.run.seed
        if self._heldout is None:
            w = self.cfg.model.warm_start  # held out from the built-in warm start's figures
            seen = frozenset(fig.svg for _, fig in warm_start.warm_figures(w.examples, seed)) \
                if w.data == "recipe" else frozenset()
            figures = warm_start.heldout_figures(self.m.heldout, seed, seen)
            renders = self.render([fig.svg for fig in figures], early_stop=False)
            self._heldout = [(r.png, q, a) for fig, r in zip(figures, renders) if r.ok
                             for q, a in ((fig.proposal.easy_question, fig.proposal.easy_answer),
                                          (fig.proposal.hard_question, fig.proposal.hard_answer))]
        requests = [Request(solver_messages(q), images=[png], sampling=Sampling(
            n=1, temperature=0.6, top_p=0.95, max_tokens=self.m.max_tokens, seed=seed + k))
            for k, (png, q, _) in enumerate(self._heldout)]
        answers = [group[0].text for group in pool.generate(requests)]
        return float(np.mean([grade(extract_answer(t), a)
                              for t, (_, _, a) in zip(answers, self._heldout)]))

    def close(self) -> None:
        if self._renderer is not None:
            self._renderer.close()
            self._renderer = None


# ---------------------------------------------------------------------- proposer


class ProposerPhase:
    name = role = "proposer"
    uses = ("codegen", "solver")  # the previous CodeGen and Solver judge the proposals

    def __init__(self, recipe: MMZeroRecipe):
        self.recipe, self.m = recipe, recipe.m
        self.steps = self.m.train_steps
        self.mini_batches = self.m.proposer_mini_batches  # updates per generation step

    def requests(self, step: int, rng: np.random.Generator) -> list[Request]:
        b = self.m.proposer_batch
        return [topic_request(SEED_TOPICS[(step * b + k) % len(SEED_TOPICS)], self.m, rng)
                for k in range(b)]

    def score(self, requests, completions, ctx) -> Scores:
        m, k = self.m, self.m.judge_samples
        rng = judge_rng(requests)
        proposals = [parse_proposal(c.text) for group in completions for c in group]
        parsed = [i for i, p in enumerate(proposals) if p is not None]
        svgs = write_svgs(ctx.pool_for("codegen"), [proposals[i] for i in parsed], k, m, rng)
        renders = self.recipe.render([s for group in svgs for s in group])
        judgements = [[SampleJudgement(rendered=False)] * k for _ in proposals]
        items, owners = [], []
        for j, i in enumerate(parsed):
            judgements[i] = list(judgements[i])
            for s in range(k):
                result = renders[j * k + s]
                if result.ok:
                    p = proposals[i]
                    items.append((result.png, p.easy_question, p.easy_answer, p.hard_question))
                    owners.append((i, s))
        answers = ask_solver(ctx.pool_for("solver"), items, m, rng, judge=True)
        for (i, s), a in zip(owners, answers):
            judgements[i][s] = SampleJudgement(
                rendered=True, solv=a.solvability if a else None,
                hard_consistency=a.hard_consistency if a else None)
        flat, metrics = proposer_rewards(proposals, judgements, k)
        metrics.update(render_counts(renders))
        save_rendered(ctx.dir / "samples", items, [proposals[i] for i, _ in owners], m)
        shape = [len(g) for g in completions]
        return Scores(unflatten(flat, shape), metrics, columns={
            "parsed": unflatten([p is not None for p in proposals], shape),
            "content_type": unflatten([p.content_type if p else None for p in proposals], shape),
            "rendered": unflatten([sum(j.rendered for j in js) for js in judgements], shape)})


# ---------------------------------------------------------------------- codegen


class CodeGenPhase:
    name = role = "codegen"
    uses = ("solver",)  # the latest Solver judges the SVGs
    data_roles = ("proposer", "codegen")  # proposals, and the render-rate filter's SVGs

    def __init__(self, recipe: MMZeroRecipe):
        self.recipe, self.m = recipe, recipe.m
        self.steps = self.m.train_steps
        self.mini_batches = self.m.codegen_mini_batches  # updates per generation step
        self.items: list[dict] = []
        self.batch = self.m.codegen_batch

    def prepare(self, ctx) -> dict:
        path = ctx.dir / "data.json"
        if not path.exists():
            atomic_write(path, json.dumps(self._make(ctx)))
        data = json.loads(path.read_text())
        self.items = data["items"]
        self.batch, self.steps = plan_steps(self.m.codegen_batch, len(self.items), self.m, "codegen")
        self.mini_batches = min(self.mini_batches, self.batch)  # a clamped batch
        return {**data["metrics"], "batch": float(self.batch)}

    def _make(self, ctx) -> dict:
        m = self.m
        rng = np.random.default_rng([*ctx.seed_path, 1 << 20])
        proposals = propose(ctx.pool_for("proposer"), m.codegen_proposals, m, rng)
        parsed = [p for p in proposals if p is not None]
        n = m.codegen_filter_samples
        svgs = write_svgs(ctx.pool, parsed, n, m, rng)  # the current CodeGen
        renders = self.recipe.render([s for group in svgs for s in group])
        rates = [sum(r.ok for r in renders[j * n:(j + 1) * n]) / n for j in range(len(parsed))]
        low, high = m.codegen_render_rate
        items = [{**dataclasses.asdict(p), "render_rate": rate, "bootstrap": False}
                 for p, rate in zip(parsed, rates) if codegen_keep(rate, low, high)]
        kept = len(items)
        while len(items) < m.bootstrap:
            example = EXAMPLES[(len(items) - kept) % len(EXAMPLES)]
            items.append({**dataclasses.asdict(proposal_of(example)), "render_rate": None,
                          "bootstrap": True})
        order = rng.permutation(len(items)).tolist()
        return {"items": [items[i] for i in order], "metrics": {
            "proposals": float(len(proposals)), "parsed": float(len(parsed)),
            "filter_render_rate": float(np.mean(rates)) if rates else 0.0,
            "kept": float(kept), "bootstrap": float(len(items) - kept)}}

    def requests(self, step: int, rng: np.random.Generator) -> list[Request]:
        m = self.m
        out = []
        for k in range(self.batch):  # meta: the item score() judges against
            item = self.items[(step * self.batch + k) % len(self.items)]
            out.append(Request(codegen_messages(proposal_of(item)), meta=item, sampling=Sampling(
                n=m.codegen_n, temperature=m.codegen_temperature, top_p=m.codegen_top_p,
                max_tokens=m.max_tokens, seed=seed(rng))))
        return out

    def score(self, requests, completions, ctx) -> Scores:
        from actors.svg_checks import extract_svg

        m = self.m
        rng = judge_rng(requests)
        shape = [len(g) for g in completions]
        step_items = [r.meta for r in requests]
        owner = [p for p, g in enumerate(completions) for _ in g]
        codes = [extract_svg(c.text) for group in completions for c in group]
        renders = self.recipe.render(codes)
        rendered = [i for i, r in enumerate(renders) if r.ok]
        proposals = [proposal_of(it) for it in step_items]
        items = [(renders[i].png, proposals[owner[i]].easy_question,
                  proposals[owner[i]].easy_answer, proposals[owner[i]].hard_question)
                 for i in rendered]
        answers = dict(zip(rendered, ask_solver(ctx.pool_for("solver"), items, m, rng,
                                                 judge=True)))
        flat = []
        for i, (code, result) in enumerate(zip(codes, renders)):
            a = answers.get(i)
            flat.append(codegen_reward(code, result.ok, a.solvability if a else None,
                                       a.hard_consistency if a else None))
        save_rendered(ctx.dir / "samples", items, [proposals[owner[i]] for i in rendered], m)
        metrics = {"render_rate": float(np.mean([r.ok for r in renders])),
                   "empty_frac": float(np.mean([not c for c in codes])),
                   "svg_like_frac": float(np.mean([svg_like(c) for c in codes])),
                   "judge_solvability_mean": mean([a.solvability for a in answers.values() if a]),
                   **render_counts(renders)}
        return Scores(unflatten(flat, shape), metrics, columns={
            "rendered": unflatten([r.ok for r in renders], shape),
            "render_failure": unflatten([r.failure for r in renders], shape)})


# ---------------------------------------------------------------------- solver


class SolverPhase:
    name = role = "solver"
    data_roles = ("proposer", "codegen", "solver")  # proposals, SVGs, pseudo-labels

    def __init__(self, recipe: MMZeroRecipe):
        self.recipe, self.m = recipe, recipe.m
        self.steps = self.m.train_steps
        self.mini_batches = self.m.solver_mini_batches  # updates per generation step
        self.items: list[dict] = []
        self.batch = self.m.solver_batch

    def prepare(self, ctx) -> dict:
        import pyarrow.parquet as pq

        path = ctx.dir / "data.parquet"
        if not path.exists():
            self._make(ctx, path)
        self.items = pq.read_table(path).to_pylist()
        info = json.loads((ctx.dir / "funnel.json").read_text())
        self.batch, self.steps = plan_steps(self.m.solver_batch, len(self.items), self.m, "solver")
        self.mini_batches = min(self.mini_batches, self.batch)  # a clamped batch
        return {**info["metrics"], "batch": float(self.batch)}

    def _make(self, ctx, path: Path) -> None:
        import pyarrow as pa

        m = self.m
        rng = np.random.default_rng([*ctx.seed_path, 1 << 20])
        proposals = propose(ctx.pool_for("proposer"), m.solver_proposals, m, rng)
        parsed = [i for i, p in enumerate(proposals) if p is not None]
        svgs = write_svgs(ctx.pool_for("codegen"), [proposals[i] for i in parsed], 1, m, rng)
        renders = self.recipe.render([group[0] for group in svgs])
        rendered = [(i, r) for i, r in zip(parsed, renders) if r.ok]
        answers = ask_solver(ctx.pool, [(r.png, proposals[i].easy_question,
                                         proposals[i].easy_answer, proposals[i].hard_question)
                                        for i, r in rendered], m, rng, judge=False)
        funnel = [coevo.FunnelItem(parsed=p is not None, content_type=p and p.content_type)
                  for p in proposals]
        for i, code in zip(parsed, (g[0] for g in svgs)):
            funnel[i].svg_chars = len(code) if code else None
        items, samples = [], []
        for (i, result), a in zip(rendered, answers):
            f, p = funnel[i], proposals[i]
            f.rendered = True
            if a is not None:
                f.evaluated, f.easy_consistency, f.hard_consistency = (
                    True, a.easy_consistency, a.hard_consistency)
                f.kept = solver_keep(a.easy_consistency, a.hard_consistency, True, a.label,
                                     m.solver_easy_min, tuple(m.solver_hard_range))
                # the hidden answer: the Proposer's, which CodeGen drew and the Solver never saw
                f.label_right = a.label is not None and grade(a.label, p.hard_answer)
            if f.kept:
                items.append({"png": result.png, "question": p.hard_question, "label": a.label,
                              "bootstrap": False})
            samples.append({"png": result.png, "caption": p.caption, "question": p.hard_question,
                            "answer": a.label if a else None, "easy_question": p.easy_question,
                            "easy_answer": p.easy_answer, "kept": f.kept})
        kept = len(items)
        if kept < m.bootstrap:
            examples = [EXAMPLES[j % len(EXAMPLES)] for j in range(m.bootstrap - kept)]
            renders = self.recipe.render([e["svg"] for e in examples], early_stop=False)
            for example, result in zip(examples, renders):
                if result.ok:
                    items.append({"png": result.png, "question": example["hard_question"],
                                  "label": example["hard_answer"], "bootstrap": True})
        order = rng.permutation(len(items)).tolist()
        coevo.save_samples(ctx.dir / "samples", samples, m.samples_saved)
        before = self.recipe.heldout_accuracy(ctx.pool)
        metrics = {"proposals": float(len(proposals)), "parsed": float(len(parsed)),
                   "rendered": float(len(rendered)),
                   "evaluated": float(sum(a is not None for a in answers)),
                   "kept": float(kept), "bootstrap": float(len(items) - kept),
                   **render_counts(renders),
                   **({} if before is None else {"heldout_accuracy_before": before})}
        atomic_write(ctx.dir / "funnel.json", json.dumps({
            "metrics": metrics, "items": [dataclasses.asdict(f) for f in funnel]}))
        schema = pa.schema([("png", pa.binary()), ("question", pa.string()),
                            ("label", pa.string()), ("bootstrap", pa.bool_())])
        atomic_parquet(path, pa.Table.from_pylist([items[i] for i in order], schema=schema))

    def requests(self, step: int, rng: np.random.Generator) -> list[Request]:
        m = self.m
        out = []
        for k in range(self.batch):  # meta: the item score() grades against
            item = self.items[(step * self.batch + k) % len(self.items)]
            out.append(Request(solver_messages(item["question"]), images=[item["png"]], meta=item,
                               sampling=Sampling(n=m.solver_n, temperature=m.solver_temperature,
                                                 top_p=m.solver_top_p, max_tokens=m.max_tokens,
                                                 seed=seed(rng))))
        return out

    def score(self, requests, completions, ctx) -> Scores:
        labels = [r.meta["label"] for r in requests]
        rewards = [[solver_reward(c.text, label) for c in group]
                   for group, label in zip(completions, labels)]
        texts = [c.text for group in completions for c in group]
        return Scores(rewards, {
            "format_rate": float(np.mean([format_ok(t) for t in texts])),
            "accuracy": float(np.mean([r >= 0.9 for group in rewards for r in group]))})

    def finish(self, ctx) -> None:
        """The iteration's co-evolution figures (coevo.json, coevo.png in iter_NNNN/)."""
        info = json.loads((ctx.dir / "funnel.json").read_text())
        funnel = [coevo.FunnelItem(**f) for f in info["items"]]
        codegen = ctx.dir.parent / "codegen" / "data.json"
        codegen_kept = json.loads(codegen.read_text())["metrics"]["kept"] if codegen.exists() else 0
        metrics = coevo.coevo_metrics(funnel, int(codegen_kept), int(info["metrics"]["kept"]),
                                      CONTENT_TYPES)
        metrics.update(coevo.phase_rewards(ctx.dir.parent))
        if self.m.heldout:  # the trained Solver (its hf/ export), on the same draws as before
            # no step trained: hf/ holds the starting weights, which the phase's pool serves
            trained = ctx.pool if self.steps == 0 else \
                ctx.serve(self.role, str(PhaseDir(ctx.dir).hf()))
            metrics["heldout_accuracy_before"] = info["metrics"].get("heldout_accuracy_before")
            metrics["heldout_accuracy"] = self.recipe.heldout_accuracy(trained)
        coevo.write_coevo(ctx.dir.parent, metrics, ctx.iteration)
        coevo.write_run_figure(ctx.run_dir)


# ---------------------------------------------------------------------- helpers


def topic_request(topic: str, m, rng: np.random.Generator) -> Request:
    return Request(proposer_messages(topic), sampling=Sampling(
        n=m.proposer_n, temperature=m.proposer_temperature, top_p=m.proposer_top_p,
        max_tokens=m.max_tokens, seed=seed(rng)))


def propose(pool, count: int, m, rng: np.random.Generator) -> list[Proposal | None]:
    """``count`` parsed-or-None proposals from a Proposer pool (topics cycled)."""
    requests = [topic_request(SEED_TOPICS[j % len(SEED_TOPICS)], m, rng)
                for j in range(math.ceil(count / m.proposer_n))]
    texts = [c.text for group in pool.generate(requests) for c in group][:count]
    return [parse_proposal(t) for t in texts]


def proposal_of(item: dict) -> Proposal:
    return Proposal(content_type=item["content_type"], caption=item["caption"],
                    easy_question=item["easy_question"], easy_answer=item["easy_answer"],
                    hard_question=item["hard_question"], hard_answer=item["hard_answer"],
                    type_inferred=item.get("type_inferred", False))


def plan_steps(batch: int, available: int, m, phase: str) -> tuple[int, int]:
    """(batch, steps) for a filtered data set: no data -> no step; small -> clamped batch."""
    if available == 0:
        logger.warning("%s: the filtered data set is empty; the phase trains no step "
                       "(see data/* in the metrics; mmzero.bootstrap fills it for tiny models)",
                       phase)
        return batch, 0
    clamped, note = clamp_batch(batch, available, m.batch_floor)
    if note:
        logger.warning("%s: %s", phase, note)
    return clamped, m.train_steps


def judge_rng(requests: list[Request]) -> np.random.Generator:
    """Sampling seeds of a step's judge calls: a function of the step's own seeds."""
    return np.random.default_rng([r.sampling.seed or 0 for r in requests])


def render_counts(renders: list) -> dict[str, float]:
    counts = Counter(r.failure for r in renders if not r.ok)
    return {f"render_fail/{reason}": float(n) for reason, n in sorted(counts.items())}


def save_rendered(folder: Path, items: list, proposals: list[Proposal], m) -> None:
    if items and m.samples_saved:
        coevo.save_samples(folder, [
            {"png": png, "caption": p.caption, "question": p.hard_question,
             "answer": p.hard_answer, "easy_question": p.easy_question,
             "easy_answer": p.easy_answer} for (png, *_), p in zip(items, proposals)],
            m.samples_saved)


def unflatten(values: list, shape: list[int]) -> list[list]:
    out, i = [], 0
    for n in shape:
        out.append(list(values[i:i + n]))
        i += n
    return out


def mean(values: list[float]) -> float:
    return float(np.mean(values)) if values else 0.0
