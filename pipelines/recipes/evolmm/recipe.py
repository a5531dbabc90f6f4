"""EvoLMM on the engine: one backbone, two LoRA adapters (Proposer, Solver).

Per step (docs/evolmm.md): the Proposer writes one question about an image;
the Solver samples N answers; the Solver's reward is its answer's share
among the N (continuous self-consistency, with a length penalty), the
Proposer's a Gaussian band on the answers' entropy. Both are trained with
REINFORCE against an EMA baseline of their own and a KL term to the base model
(adapters disabled) with an adaptive coefficient per role: the presets set
``algorithm.advantage: reinforce``, ``algorithm.loss: reinforce``,
``algorithm.kl_control: adaptive`` and ``algorithm.kl_estimator: full``.

Schedules: ``faithful`` (the original) takes one image per step, updates the
Solver once per sample in sample order and the Proposer every
``proposer_update_freq`` steps; ``batched`` takes ``images_per_step`` images
in one engine call per role and updates each role once per step.
"""

from __future__ import annotations

import json

import numpy as np

from actors.sampling import Request, Sampling
from pipelines.layouts import resolve_layout
from pipelines.recipes.base import Rollout, Scores
from pipelines.recipes.evolmm import known, prompts
from pipelines.recipes.evolmm.data import ANSWERS, ImageFolder
from pipelines.recipes.evolmm.rewards import (
    answer_entropy,
    discrete_rewards,
    final_answer,
    parse_question,
    proposer_reward,
    soft_rewards,
    well_formed,
    words_before_answer,
)
from pipelines.runtime.rundir import atomic_write

DEMO_IMAGES = 64
HELDOUT_BEFORE = "heldout_before.json"


def draw_demo_images(folder, count: int = DEMO_IMAGES, seed: int = 0) -> None:
    """``count`` drawn figures as PNG files in ``folder``: the warm start's kinds (rows of
    shapes, bar charts, tables; pipelines/recipes/evolmm/warm_start.py) from a seed
    stream of their own, so the tiny presets' questions are about what it taught; their
    two questions and answers each in ``answers.jsonl`` (hidden answers, data.py)."""
    from pipelines.recipes.evolmm.warm_start import SIDE, demo_figures, render

    folder.mkdir(parents=True, exist_ok=True)
    missing = [i for i in range(count) if not (folder / f"figure_{i:03d}.png").exists()]
    if not missing and (folder / ANSWERS).exists():
        return
    drawn = demo_figures(count, seed)
    for i, result in zip(missing, render([drawn[i].svg for i in missing], SIDE)):
        if result.ok:
            atomic_write(folder / f"figure_{i:03d}.png", result.png)
    rows = [{"image": f"figure_{i:03d}.png", "question": q, "answer": a}
            for i, fig in enumerate(drawn) for q, a in (
                (fig.proposal.easy_question, fig.proposal.easy_answer),
                (fig.proposal.hard_question, fig.proposal.hard_answer))]
    atomic_write(folder / ANSWERS, "".join(json.dumps(r) + "\n" for r in rows))


class EvoLMMPhase:
    name = "evolmm"
    role = "policy"
    policies = ("solver", "proposer")

    def __init__(self, cfg, settings, solver_prompt: str = prompts.SOLVER):
        ranks = resolve_layout(cfg.placement, self.name).trainer_ranks
        if settings.schedule == "faithful" and ranks > 1:
            raise ValueError(f"evolmm.schedule: faithful updates on one sample at a time, which "
                             f"cannot feed {ranks} trainer ranks; set placement.trainer_ranks=1 "
                             "or evolmm.schedule=batched")
        self.cfg, self.s = cfg, settings
        self.steps = settings.steps
        self.solver_prompt = solver_prompt
        self.images: ImageFolder | None = None
        self._heldout: list[tuple[bytes, str, str]] | None = None

    # -- data ------------------------------------------------------------------

    def prepare(self, ctx) -> dict:
        folder = self.s.data_dir
        if not folder:
            folder = ctx.run_dir / "demo_images"
            draw_demo_images(folder, seed=self.cfg.run.seed)
        self.images = ImageFolder(folder, self.s.include_subfolders, seed=self.cfg.run.seed)
        if self.s.questions == "known":
            unasked = sum(not self.images.known(i) for i in range(len(self.images)))
            if unasked:
                raise ValueError(f"evolmm.questions: known needs a question for every image in "
                                 f"{folder}/{ANSWERS}; {unasked} of {len(self.images)} have none")
        return self.images.stats()

    def heldout(self, ctx) -> dict[str, float]:
        """The Solver's held-out figures (``evolmm.heldout``; known.score_heldout)."""
        if self._heldout is None:
            self._heldout = self._heldout_items()
        return known.score_heldout(ctx.pool, self._heldout, self.solver_prompt, self.s,
                                   seed=self.cfg.run.seed)

    def _heldout_items(self) -> list[tuple[bytes, str, str]]:
        s, seed = self.s, self.cfg.run.seed
        if not s.heldout_dir:
            w = self.cfg.model.warm_start
            drawn = known.heldout_items(-(-s.heldout // 2), seed,
                                        w.examples if w.data == "recipe" else 0,
                                        0 if s.data_dir else DEMO_IMAGES)
            return drawn[:s.heldout]
        folder = ImageFolder(s.heldout_dir, seed=seed)
        items = [(folder.image(i), q, a) for i in range(len(folder)) for q, a in folder.known(i)]
        if not items:
            raise ValueError(f"evolmm.heldout_dir: no question in {s.heldout_dir}/{ANSWERS}")
        return items[:s.heldout]

    def after_step(self, step: int, ctx) -> dict:
        """The held-out scores: before training (measured at the first step's start,
        kept in heldout_before.json for a resume) in the first row, after training in
        the rows of every ``heldout_every`` steps and the last."""
        if not self.s.heldout:
            return {}
        out = {}
        if step == 0:
            before = json.loads((ctx.dir / HELDOUT_BEFORE).read_text())
            out.update({f"heldout/{k}_before": v for k, v in before.items()})
        every = self.s.heldout_every
        if step + 1 == self.steps or (every and (step + 1) % every == 0):
            out.update({f"heldout/{k}": v for k, v in self.heldout(ctx).items()})
        return out

    # -- one step ---------------------------------------------------------------

    def solver_rewards(self, texts: list[str], finals: list[str], step: int,
                       ctx) -> tuple[list[float], dict[str, float]]:
        """The rewards of one question's N answers, and metrics about them."""
        if self.s.reward == "discrete":
            return discrete_rewards(finals), {}
        return soft_rewards(finals, [words_before_answer(t) for t in texts], gamma=self.s.gamma,
                            length_lambda=self.s.length_lambda,
                            length_target=self.s.length_target), {}

    def _sampling(self, rng, n: int = 1, proposer: bool = False) -> Sampling:
        s = self.s
        budget = s.proposer_max_tokens if proposer and s.proposer_max_tokens else s.max_tokens
        return Sampling(n=n, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k,
                        repetition_penalty=s.repetition_penalty, max_tokens=budget,
                        seed=int(rng.integers(1 << 31)))

    def finish(self, ctx) -> None:
        """The phase's step curves: curves.png beside metrics.jsonl (figure.py)."""
        from pipelines.recipes.evolmm.figure import write_curves

        write_curves(ctx.dir)

    def _questions(self, indices: list[int], images: list[bytes], rng, ctx):
        """The step's questions, their hidden answers (None: unknown) and the Proposer's
        requests and completions (None when ``questions: known``: the images' own)."""
        if self.s.questions == "known":
            picked = [self.images.known(i)[rng.integers(len(self.images.known(i)))]
                      for i in indices]
            return [q for q, _ in picked], [a for _, a in picked], None, None, 0
        ask = [Request(prompts.image_message(prompts.PROPOSER), images=[im],
                       sampling=self._sampling(rng, proposer=True), adapter="proposer")
               for im in images]
        proposals = ctx.pool.generate(ask)
        parsed = [parse_question(p[0].text) for p in proposals]
        questions = [q for q, _ in parsed]
        hidden = [known.hidden_answer(q, self.images.known(i)) for q, i in zip(questions, indices)]
        return questions, hidden, ask, proposals, sum(fallback for _, fallback in parsed)

    def rollout(self, step: int, rng: np.random.Generator, ctx) -> list[Rollout]:
        per_step = 1 if self.s.schedule == "faithful" else self.s.images_per_step
        indices = [step * per_step + k for k in range(per_step)]
        images = [self.images.image(i) for i in indices]
        if step == 0 and self.s.heldout and not (ctx.dir / HELDOUT_BEFORE).exists():
            atomic_write(ctx.dir / HELDOUT_BEFORE, json.dumps(self.heldout(ctx)))
        questions, hidden, ask, proposals, fallbacks = self._questions(indices, images, rng, ctx)
        n = self.s.solver_samples
        if self.s.schedule == "faithful":  # N requests of one sample: one update each
            answer = [Request(prompts.image_message(self.solver_prompt.format(question=q)),
                              images=[images[0]], sampling=self._sampling(rng),
                              adapter="solver") for q in questions for _ in range(n)]
        else:
            answer = [Request(prompts.image_message(self.solver_prompt.format(question=q)),
                              images=[im], sampling=self._sampling(rng, n), adapter="solver")
                      for q, im in zip(questions, images)]
        answers = ctx.pool.generate(answer)
        if self.s.schedule == "faithful":
            groups = [[a for group in answers for a in group]]  # one image's N answers
        else:
            groups = answers
        solver_rewards, proposer_rewards, metrics = self._score(groups, hidden, step, rng, ctx)
        metrics["question_fallbacks"] = float(fallbacks)
        if self.s.schedule == "faithful":
            solver = Rollout("solver", answer, answers,
                             Scores([[r] for r in solver_rewards[0]], metrics), mini_batches=n)
        else:
            solver = Rollout("solver", answer, answers, Scores(solver_rewards, metrics))
        out = [solver]
        if ask is not None and (step + 1) % self.s.proposer_update_freq == 0:  # K, 2K, ...
            out.append(Rollout("proposer", ask, proposals,
                               Scores([[r] for r in proposer_rewards],
                                      {"entropy_reward": float(np.mean(proposer_rewards))})))
        return out

    def _score(self, groups, hidden, step: int, rng, ctx):
        """Per group (one question's answers): the Solver's rewards, the Proposer's reward
        and the step's metrics, the majority votes checked against ``hidden``."""
        solver_rewards, proposer_rewards, entropies, extra, finals_all = [], [], [], [], []
        for group in groups:
            texts = [a.text for a in group]
            finals = [final_answer(t) for t in texts]
            rewards, more = self.solver_rewards(texts, finals, step, ctx)
            solver_rewards.append(rewards)
            extra.append(more)
            finals_all.append(finals)
            entropies.append(answer_entropy(finals))
            proposer_rewards.append(proposer_reward(finals, target=self.s.entropy_target,
                                                    sigma=self.s.entropy_sigma))
        if self.s.reward == "shuffled":  # the control: the same rewards, to other answers
            solver_rewards = shuffled(solver_rewards, rng)
        flat = [c.text for group in groups for c in group]
        metrics = {
            "answer_entropy": float(np.mean(entropies)),
            "answer_tag_share": float(np.mean([well_formed(t, "answer") for t in flat])),
            "proposer_reward": float(np.mean(proposer_rewards)),
            **{k: float(np.mean([m[k] for m in extra])) for k in (extra[0] if extra else {})},
            **known.pseudo_label_metrics(finals_all, hidden),
        }
        return solver_rewards, proposer_rewards, metrics


def shuffled(rewards: list[list[float]], rng: np.random.Generator) -> list[list[float]]:
    """``rewards`` permuted across all groups, each group keeping its size."""
    flat = [r for group in rewards for r in group]
    order = rng.permutation(len(flat))
    out, k = [], 0
    for group in rewards:
        out.append([flat[i] for i in order[k:k + len(group)]])
        k += len(group)
    return out


class EvoLMMRecipe:
    roles = ("policy",)
    # `coevolve eval`: the policy evaluated after every iteration, and on what (docs/eval.md)
    eval_role = "policy"
    # the benchmarks of its table that coevolve reads (InfoVQA, AI2D, ScienceQA: lmms:<task>)
    benchmarks = ("evolmm_chartqa", "mathvista", "mathvision", "mathverse", "mmmu")

    def __init__(self, cfg):
        self.cfg = cfg

    def warm_start_examples(self, count: int, seed: int, cfg) -> list:
        """``model.warm_start.data: recipe``: the Proposer's and both Solver formats on
        drawn figures (pipelines/recipes/evolmm/warm_start.py; the same examples for
        EvoLMM and iReasoner, so one cached warm start serves both)."""
        from pipelines.recipes.evolmm.warm_start import sft_examples

        return sft_examples(count, seed)

    def phases(self, iteration: int) -> list[EvoLMMPhase]:
        return [EvoLMMPhase(self.cfg, self.cfg.evolmm)]
