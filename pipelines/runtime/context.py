"""The ``ctx`` a recipe's code gets (pipelines/contract.py, ``PhaseContext``): the
phase's folders, iteration and seeds, its engines and other roles', the trained
model's embeddings; a narrow view of the phase runner (pipelines/runtime/phase.py),
never the runner itself."""

from __future__ import annotations

import numpy as np


class RunnerContext:
    """The ``ctx`` a phase's score, rollout and hooks get (contract.PhaseContext): a
    narrow view of its runner."""

    def __init__(self, runner):
        self._runner = runner
        self.dir, self.run_dir = runner.dir, runner.run_dir
        self.iteration, self.seed_path = runner.iteration, runner.seed_path
        self.start_weights = runner.start_weights

    @property
    def version(self) -> int:
        return self._runner.version

    @property
    def pool(self):
        return self._runner.pool

    def pool_for(self, role: str):
        return self._runner.other_pool(role)

    def serve(self, role: str, weights: str):
        r = self._runner
        return r.engines.pool(role, weights, r.placement)

    def embed(self, texts: list[str], max_tokens: int) -> np.ndarray:
        """Per text, the mean of the trainer model's input embeddings of its first
        ``max_tokens`` tokens, L2-normalised: [len(texts), hidden] (iReasoner's steps)."""
        tokenizer = self._runner.processor.tokenizer
        ids = [tokenizer(t, add_special_tokens=False)["input_ids"][:max_tokens] for t in texts]
        return self._runner.group.embed_mean(ids)
