"""Evaluation: tasks, a resumable runner on the generator pools, an LLM judge, reports,
and the lmms-eval model plugin (docs/eval.md)."""
