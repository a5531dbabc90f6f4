"""iReasoner: EvoLMM's loop (pipelines/recipes/evolmm) with a numbered-step Solver and
a reward for reasoning steps that agree within the majority answer group.

The Solver's reward mixes EvoLMM's outcome reward (here with lambda 0.05 and T 64
words) and the step-agreement reward (``steps.py``): ``r = (1 - w) r_soft + w r_step``,
w rising from 0 at 30% of training to 0.7 at the end. Step embeddings are the mean
input-embedding rows of a step's first ``step_tokens`` tokens, computed by the trainer
group, which holds the weights (the driver holds no model).
"""

from __future__ import annotations

import numpy as np

from pipelines.recipes.evolmm import prompts
from pipelines.recipes.evolmm.recipe import EvoLMMPhase, EvoLMMRecipe
from pipelines.recipes.evolmm.rewards import (
    evolmm_normalize,
    majority_answer,
    soft_rewards,
    words_before_answer,
)
from pipelines.recipes.ireasoner.steps import extract_steps, mix_weight, step_agreement


class IReasonerPhase(EvoLMMPhase):
    name = "ireasoner"

    def __init__(self, cfg, settings):
        super().__init__(cfg, settings, solver_prompt=prompts.SOLVER_STEPS)

    def solver_rewards(self, texts, finals, step, ctx):
        s = self.s
        soft = soft_rewards(finals, [words_before_answer(t) for t in texts], gamma=s.gamma,
                            length_lambda=s.length_lambda, length_target=s.length_target)
        weight = {"soft": 0.0, "step": 1.0}.get(s.mix) if s.mix != "both" else mix_weight(
            step / max(self.steps, 1), start=s.warmup_start, top=s.step_weight, warmup=s.warmup)
        metrics = {"mix_weight": weight}
        if weight == 0.0:
            return soft, metrics
        keys = [evolmm_normalize(f) for f in finals]
        majority = majority_answer(finals)
        group = [i for i, k in enumerate(keys) if k == majority]
        steps = [extract_steps(t, s.max_steps) if i in group else [] for i, t in enumerate(texts)]
        flat = [step_text for i in group for step_text in steps[i]]
        vectors = iter(ctx.embed(flat, max_tokens=s.step_tokens) if flat else [])
        embedded = [[next(vectors) for _ in steps[i]] for i in range(len(texts))]
        rewards, info = step_agreement(group, embedded, len(texts),
                                       position_decay=s.position_decay,
                                       density_gamma=s.density_gamma, min_group=s.min_group)
        step_rewards = [rewards.get(i, 0.0) for i in range(len(texts))]
        metrics.update({"step_reward": float(np.mean(step_rewards)),
                        "dominant_group": info["group_size"],
                        "step_positions": info["positions"],
                        "step_cosine": info["mean_cosine"]})
        return [(1 - weight) * a + weight * b for a, b in zip(soft, step_rewards)], metrics


class IReasonerRecipe:
    roles = ("policy",)
    # `coevolve eval`: the policy evaluated after every iteration, and on what (docs/eval.md)
    eval_role = "policy"
    # the benchmarks of its table that coevolve reads (InfoVQA, AI2D, ScienceQA: lmms:<task>)
    benchmarks = ("evolmm_chartqa", "mathvista", "mathvision", "mathverse", "mmmu")

    def __init__(self, cfg):
        self.cfg = cfg

    # EvoLMM's examples: both Solver formats are in them, so one cached warm start serves both
    warm_start_examples = EvoLMMRecipe.warm_start_examples

    def phases(self, iteration: int) -> list[IReasonerPhase]:
        return [IReasonerPhase(self.cfg, self.cfg.ireasoner)]
