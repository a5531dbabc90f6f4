"""Settings of the iReasoner recipe (the ``ireasoner:`` section of a config)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pipelines.config import param
from pipelines.recipes.evolmm.config import EvoLMMConfig


@dataclass
class IReasonerConfig(EvoLMMConfig):
    """The ireasoner recipe (iReasoner; docs/ireasoner.md): EvoLMM's loop with a
    numbered-step Solver and a reward for reasoning steps that agree within the majority
    answer group."""

    length_lambda: float = param(0.05, "Weight of the outcome reward's length penalty.",
                                 ge=0, le=1)
    length_target: float = param(64.0, "T: words before <answer> that cost nothing.", gt=0)
    max_tokens: int = param(256, "Completion budget of both roles (tokens).", ge=1)
    mix: Literal["both", "soft", "step"] = param(
        "both", "Solver reward: the warm-up mix of both, the outcome (soft) reward only, or the "
        "step reward only (ablations).")
    step_weight: float = param(0.7, "Share of the step reward at the end of training.",
                               ge=0, le=1)
    warmup: bool = param(True, "Hold the step reward at 0 before warmup_start, then ramp it "
                               "up linearly (false: step_weight throughout).")
    warmup_start: float = param(0.3, "Training progress where the step reward starts.",
                                ge=0, lt=1)
    position_decay: float = param(0.15, "Step position weight exp(-decay * j); 0 = flat.", ge=0)
    density_gamma: float = param(0.7, "Exponent of the majority group's share; 0 = off.", ge=0)
    min_group: int = param(2, "Majority groups smaller than this get no step reward.", ge=2)
    max_steps: int = param(8, "Steps read per answer.", ge=1)
    step_tokens: int = param(64, "Tokens of a step that its embedding averages.", ge=1)
