"""Settings of the simple recipe (the ``simple:`` section of a config)."""

from __future__ import annotations

from dataclasses import dataclass

from pipelines.config import param


@dataclass
class SimpleConfig:
    """The `simple` recipe: one GRPO phase on your prompts with your reward function."""

    reward: str = param(
        "pipelines.recipes.simple.recipe:answer_length_reward",
        "Reward function as module:function, called as fn(sample) -> float for each completion "
        "(sample: prompt, response, token_ids, prompt_index; see README).")
    prompts: list[str] = param(
        ["Describe the chart.", "How many bars are in the chart?", "Which bar is the tallest?",
         "What colour are the bars?"], "Questions asked about the drawn charts, cycled.")
    images: bool = param(True, "Attach a locally drawn bar chart to each prompt.")
    data: str = param(
        "", "Labeled data instead of prompts and charts: jsonl:PATH, hf:ID_OR_FOLDER or "
        "shapes:COUNT (pipelines/recipes/labeled.py); the reward then sees each item's "
        "answer (e.g. simple.reward=pipelines.recipes.simple.recipe:correct_answer).")
    steps: int = param(4, "Optimizer steps of the phase.", ge=1)
    prompts_per_step: int = param(4, "Prompts per step (GRPO groups).", ge=1)
    n: int = param(4, "Samples per prompt (GRPO group size).", ge=2)
    max_tokens: int = param(32, "Completion budget (tokens).", ge=1)
