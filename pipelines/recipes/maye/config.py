"""Settings of the MAYE recipe (the ``maye:`` section of a config)."""

from __future__ import annotations

from dataclasses import dataclass

from pipelines.config import param


# The original's request (maye/datasets/math.py), in our words: no <think> tags asked for,
# though the format reward pays for one block.
ORIGINAL_INSTRUCTION = "Solve the problem step by step and put the final answer in \\boxed{}."
THINK_TAGS_INSTRUCTION = ("Please reason step by step inside <think> </think> tags, and put "
                          "your final answer within \\boxed{}.")


@dataclass
class MayeConfig:
    """The maye recipe (docs/maye.md): Reinforce++ on a labeled data set, one response per
    question, many optimizer steps per generation step, evaluated every epoch."""

    train: str = param(
        "shapes:256", "Training data: jsonl:PATH, hf:ID_OR_FOLDER or shapes:COUNT "
        "(pipelines/recipes/labeled.py).")
    validation: str = param("", "Validation data (same forms); empty: none.")
    test: str = param("shapes:32", "Test data (same forms); empty: none.")
    eval_limit: int = param(0, "Evaluate on the first N items of each set (0: all).", ge=0)
    epochs: int = param(1, "Passes over the training set.", ge=1)
    prompts_per_step: int = param(
        896, "Questions per generation step (one response each); an epoch is "
        "len(train) // prompts_per_step steps (the remainder waits for the next epoch's order).",
        ge=1)
    updates_per_step: int = param(
        32, "Optimizer steps per generation step (the batch is split into this many "
        "mini-batches).", ge=1)
    max_tokens: int = param(2048, "Response budget (tokens); a response cut here scores "
                                  "invalid_score.", ge=1)
    min_tokens: int = param(1, "A response shorter than this (tokens) scores invalid_score.",
                            ge=0)
    temperature: float = param(1.0, "Rollout sampling temperature.", ge=0)
    top_p: float = param(1.0, "Rollout nucleus sampling threshold.", gt=0, le=1)
    instruction: str = param(
        ORIGINAL_INSTRUCTION, "Appended to each question (training and evaluation). The "
        "default asks what the original asks (step by step, the answer in \\boxed{}), not "
        "for <think> tags, so the format reward and the reflection curves compare with the "
        "paper's; the tiny preset asks for the tags its warm start teaches "
        "(THINK_TAGS_INSTRUCTION, pipelines/recipes/maye/config.py).")
    language_penalty: float = param(0.1, "Score penalty per unit share of CJK characters.",
                                    ge=0)
    invalid_score: float = param(
        -0.1, "Score of a response without end-of-sequence or shorter than min_tokens.")
    eval_max_tokens: int = param(0, "Evaluation response budget (0: max_tokens).", ge=0)
    eval_every: int = param(1, "Evaluate every K epochs (and after the last).", ge=1)
    pass_k: int = param(8, "Samples per item of the T 1.0 evaluation (pass@k).", ge=1)
