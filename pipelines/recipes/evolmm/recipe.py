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

import numpy as np

from actors.sampling import Request, Sampling
from pipelines.layouts import resolve_layout
from pipelines.recipes.base import Rollout, Scores
from pipelines.recipes.evolmm import prompts
from pipelines.recipes.evolmm.data import ImageFolder
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


def draw_demo_images(folder, count: int = DEMO_IMAGES, seed: int = 0) -> None:
    """``count`` drawn figures as PNG files in ``folder``: the warm start's kinds (rows of
    shapes, bar charts, tables; pipelines/recipes/evolmm/warm_start.py) from a seed
    stream of their own, so the tiny presets' questions are about what it taught."""
    from pipelines.recipes.evolmm.warm_start import SIDE, demo_figures, render

    folder.mkdir(parents=True, exist_ok=True)
    missing = [i for i in range(count) if not (folder / f"figure_{i:03d}.png").exists()]
    if not missing:
        return
    drawn = demo_figures(count, seed)
    for i, result in zip(missing, render([drawn[i].svg for i in missing], SIDE)):
        if result.ok:
            atomic_write(folder / f"figure_{i:03d}.png", result.png)


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

    # -- data ------------------------------------------------------------------

    def prepare(self, ctx) -> dict:
        folder = self.s.data_dir
        if not folder:
            folder = ctx.run_dir / "demo_images"
            draw_demo_images(folder, seed=self.cfg.run.seed)
        self.images = ImageFolder(folder, self.s.include_subfolders, seed=self.cfg.run.seed)
        return self.images.stats()

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

    def rollout(self, step: int, rng: np.random.Generator, ctx) -> list[Rollout]:
        per_step = 1 if self.s.schedule == "faithful" else self.s.images_per_step
        images = [self.images.image(step * per_step + k) for k in range(per_step)]
        ask = [Request(prompts.image_message(prompts.PROPOSER), images=[im],
                       sampling=self._sampling(rng, proposer=True), adapter="proposer")
               for im in images]
        proposals = ctx.pool.generate(ask)
        questions = [parse_question(p[0].text) for p in proposals]
        n = self.s.solver_samples
        if self.s.schedule == "faithful":  # N requests of one sample: one update each
            answer = [Request(prompts.image_message(self.solver_prompt.format(question=q)),
                              images=[images[0]], sampling=self._sampling(rng),
                              adapter="solver") for q, _ in questions for _ in range(n)]
        else:
            answer = [Request(prompts.image_message(self.solver_prompt.format(question=q)),
                              images=[im], sampling=self._sampling(rng, n), adapter="solver")
                      for (q, _), im in zip(questions, images)]
        answers = ctx.pool.generate(answer)
        if self.s.schedule == "faithful":
            groups = [[a for group in answers for a in group]]  # one image's N answers
        else:
            groups = answers
        solver_rewards, proposer_rewards, entropies, extra = [], [], [], []
        for group in groups:
            texts = [a.text for a in group]
            finals = [final_answer(t) for t in texts]
            rewards, more = self.solver_rewards(texts, finals, step, ctx)
            solver_rewards.append(rewards)
            extra.append(more)
            entropies.append(answer_entropy(finals))
            proposer_rewards.append(proposer_reward(finals, target=self.s.entropy_target,
                                                    sigma=self.s.entropy_sigma))
        flat = [c.text for group in answers for c in group]
        metrics = {
            "answer_entropy": float(np.mean(entropies)),
            "question_fallbacks": float(sum(fallback for _, fallback in questions)),
            "answer_tag_share": float(np.mean([well_formed(t, "answer") for t in flat])),
            "proposer_reward": float(np.mean(proposer_rewards)),
            **{k: float(np.mean([m[k] for m in extra])) for k in (extra[0] if extra else {})},
        }
        if self.s.schedule == "faithful":
            solver = Rollout("solver", answer, answers,
                             Scores([[r] for r in solver_rewards[0]], metrics), mini_batches=n)
        else:
            solver = Rollout("solver", answer, answers, Scores(solver_rewards, metrics))
        out = [solver]
        if (step + 1) % self.s.proposer_update_freq == 0:  # steps K, 2K, ... (1-based)
            out.append(Rollout("proposer", ask, proposals,
                               Scores([[r] for r in proposer_rewards],
                                      {"entropy_reward": float(np.mean(proposer_rewards))})))
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
