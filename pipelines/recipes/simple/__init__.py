"""The simple recipe: GRPO on your prompts with your reward function."""
