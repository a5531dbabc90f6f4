"""Settings of the EvoLMM recipe (the ``evolmm:`` section of a config)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pipelines.config import param


@dataclass
class EvoLMMConfig:
    """The evolmm recipe (EvoLMM; docs/evolmm.md): a Proposer and a Solver LoRA adapter on
    one backbone, trained on unlabeled images by the Solver's self-consistency."""

    data_dir: str = param(
        "", "Folder of images (png, jpg, jpeg, webp, bmp, tiff): every first-level subfolder "
            "recursively, its own files only when it has no subfolder, hidden names "
            "skipped (the original's walk); empty: 64 figures drawn locally (a demo: rows "
            "of shapes, bar charts, tables).")
    include_subfolders: list[str] | None = param(
        None, "Only these first-level subfolders of data_dir (default: all).")
    steps: int = param(100, "Generation steps of the phase.", ge=1)
    schedule: Literal["faithful", "batched"] = param(
        "faithful", "faithful: one image per step, one Solver update per sample and a Proposer "
        "update every proposer_update_freq steps (the original); batched: images_per_step images "
        "in one engine call and one update per role per step (faster).")
    images_per_step: int = param(8, "Images per step in the batched schedule.", ge=1)
    solver_samples: int = param(5, "N: answers the Solver samples per question.", ge=2)
    proposer_update_freq: int = param(5, "Update the Proposer every K steps.", ge=1)
    reward: Literal["soft", "discrete", "shuffled"] = param(
        "soft", "Solver reward: soft p(a)^gamma with the length penalty, discrete (1 for the "
        "majority answer, the paper's ablation), or shuffled (the soft rewards permuted across "
        "the step's answers: a control with the same compute and no signal, "
        "benchmarks/label_free.py).")
    questions: Literal["proposer", "known"] = param(
        "proposer", "proposer: the Proposer writes each image's question (the original); known: "
        "the Solver answers the image's own questions from data_dir/answers.jsonl (the drawn "
        "demo figures have them) and the Proposer is neither asked nor trained, test-time RL "
        "on fixed questions (TTRL, arXiv:2504.16084). The answers are never rewarded: they "
        "only score the majority vote (reward/pseudo_label_accuracy).")
    heldout: int = param(
        0, "Held-out questions the Solver is scored on before the first step and after every "
        "heldout_every steps and the last: heldout/greedy, heldout/sampled (mean of "
        "heldout_samples answers at the run's temperature) and heldout/majority (their "
        "majority vote); the first this many of heldout_dir's, or without it both questions "
        "of drawn bar charts and tables that neither the warm start nor the demo folder "
        "holds; 0: off.", ge=0)
    heldout_dir: str = param(
        "", "A folder of held-out images with an answers.jsonl (as data_dir's; "
        "docs/evolmm.md), never trained on; empty: drawn figures.")
    heldout_samples: int = param(8, "Answers per held-out question for heldout/sampled and "
                                 "heldout/majority.", ge=1)
    heldout_every: int = param(0, "Score the held-out set every this many steps too (0: only "
                               "before the first step and after the last).", ge=0)
    gamma: float = param(0.7, "Exponent of the answer share in the soft reward.", gt=0)
    length_lambda: float = param(0.10, "Weight of the length penalty.", ge=0, le=1)
    length_target: float = param(6.0, "T: words before <answer> that cost nothing.", gt=0)
    entropy_target: float = param(0.9, "Proposer reward: answer entropy (nats) it peaks at.", ge=0)
    entropy_sigma: float = param(0.35, "Proposer reward: width of its Gaussian band.", gt=0)
    max_tokens: int = param(128, "Completion budget of both roles (tokens).", ge=1)
    temperature: float = param(1.0, "Sampling temperature of both roles.", gt=0)
    top_p: float = param(1.0, "Nucleus sampling of both roles.", gt=0, le=1)
    top_k: int = param(0, "Top-k sampling of both roles (0: off). The original's HF generate "
                       "took Qwen2.5-VL-Instruct's generation config, top_k 1: near-greedy "
                       "answers (docs/evolmm.md); 1 reproduces it.", ge=0)
    repetition_penalty: float = param(
        1.0, "Repetition penalty of both roles (1: off); the original's was the model's "
        "generation config's 1.05.", gt=0)
    proposer_max_tokens: int = param(0, "The Proposer's completion budget (tokens); 0: "
                                     "max_tokens.", ge=0)
