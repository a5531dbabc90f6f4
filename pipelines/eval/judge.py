"""An LLM judge served from a second generator pool: a Yes/No verdict per response.

MM-Zero (arXiv 2603.09206) scores its benchmarks with the rule grader first
(the last ``\\boxed{}`` against the reference) and then asks an LLM whether a
response's final answer matches the reference. The judge sees the question as
the model was asked it (with its lettered options, so a letter reference can be
judged), the reference answer and the response (text only, so any instruction
model can judge), samples greedily, and must begin its reply with Yes or No; any other
reply is "no verdict" (None), counted and treated as not accepted.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from actors.sampling import Request, Sampling

PROMPT = """You check answers against a reference.

Question: {question}
Reference answer: {reference}
Response: {response}

Is the response's final answer the same as the reference answer (equal value, same \
option, or an equivalent phrasing)? Reply with Yes or No only."""

MAX_RESPONSE_CHARS = 4000  # the tail of a longer response (the final answer is at the end)
_VERDICT = re.compile(r"\s*[\"'*]*\s*(yes|no)\b", re.IGNORECASE)


def parse_verdict(text: str) -> bool | None:
    """True for a reply starting with Yes, False for No, None for anything else."""
    found = _VERDICT.match(text[:64])
    return None if found is None else found.group(1).lower() == "yes"


class Judge:
    """Verdicts from ``pool`` (a GeneratorPool serving the judge model)."""

    def __init__(self, pool, max_tokens: int = 4, adapter: str | None = None):
        self.pool = pool
        self.max_tokens = max_tokens
        self.adapter = adapter
        self.unparsed = 0

    def requests(self, triples: Sequence[tuple[str, str, str]]) -> list[Request]:
        out = []
        for question, reference, response in triples:
            text = PROMPT.format(question=question, reference=reference,
                                 response=response[-MAX_RESPONSE_CHARS:])
            out.append(Request([{"role": "user", "content": [{"type": "text", "text": text}]}],
                               sampling=Sampling(n=1, temperature=0.0,
                                                 max_tokens=self.max_tokens),
                               adapter=self.adapter))
        return out

    def judge(self, triples: Sequence[tuple[str, str, str]]) -> list[tuple[bool | None, str]]:
        """(verdict, the judge's reply) per (question, reference, response)."""
        replies = [samples[0].text for samples in self.pool.generate(self.requests(triples))]
        verdicts = [parse_verdict(r) for r in replies]
        self.unparsed += sum(v is None for v in verdicts)
        return list(zip(verdicts, replies))
