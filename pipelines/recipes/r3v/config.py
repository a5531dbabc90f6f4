"""Settings of the R3V recipe (the ``r3v:`` section of a config)."""

from __future__ import annotations

from dataclasses import dataclass

from pipelines.config import param


@dataclass
class R3VConfig:
    """The r3v recipe (R3V, arXiv 2411.00855; docs/r3v.md): self-training on a labeled set
    through reflection. Each iteration the earlier models' sampled rationales become an SFT
    mix (direct answers, self-CoT, self-refine, self-select) for a LoRA SFT from the base."""

    train: str = param(
        "shapes:256", "Training data: jsonl:PATH, hf:ID_OR_FOLDER or shapes:COUNT "
        "(pipelines/recipes/labeled.py).")
    test: str = param("shapes:32", "Test data (same forms).")
    test_limit: int = param(0, "Evaluate on the first N test items (0: all).", ge=0)
    samples: int = param(3, "Rationales each model samples per training question.", ge=1)
    temperature: float = param(0.9, "Sampling temperature of the rationales.", ge=0)
    top_p: float = param(0.95, "Nucleus threshold of the rationales.", gt=0, le=1)
    max_tokens: int = param(200, "Budget of a rationale and of an evaluation answer (tokens; "
                            "the original's 200, its older scripts' 384).", ge=1)
    direct_qa: bool = param(True, "Add each question with its short answer to the SFT mix.")
    distilled: bool = param(False, "Add each item's `solution` (a written rationale) to the "
                            "SFT mix: the LLaVA version's GPT rationales; off in the Qwen2-VL "
                            "version, which trains on the model's own rationales only.")
    filter_rationales: bool = param(True, "Leave rationales of 50 characters or fewer, or "
                                    "starting with \"Answer\", out of self-CoT, self-refine "
                                    "and self-select (bare answers, not reasoning), as the "
                                    "original.")
    self_refine: bool = param(True, "Add self-refine examples (a wrong rationale to correct).")
    self_select: bool = param(True, "Add self-select examples (pick the right one of three).")
    epochs: int = param(3, "SFT epochs over the mix.", ge=1)
    val_fraction: float = param(0.1, "Share of the (shuffled) mix held out of SFT and scored "
                                "after every epoch (sft/val_loss), as the original's 10%.",
                                ge=0, lt=1)
    batch_size: int = param(64, "Examples per SFT optimizer step (global batch).", ge=1)
    select_candidates: list[int] = param(
        [2, 3, 4, 5, 6], "Test-time scaling: candidate counts for self-select, majority "
        "vote and oracle (pass@N).")
    eval_temperature: float = param(0.9, "Temperature of the test-time candidates.", ge=0)
