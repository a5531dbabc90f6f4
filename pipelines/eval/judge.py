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

    def grade(self, triples: Sequence[tuple[str, str, str]]) -> list[tuple[float | None, str]]:
        """MM-Vet's graded judgement (``MMVET_PROMPT``): (score in 0..1 or None, reply)
        per (question, reference, response)."""
        requests = []
        for question, reference, response in triples:
            spaced = reference.replace("<AND>", " <AND> ").replace("<OR>", " <OR> ")
            line = " | ".join([question, spaced, response[-MAX_RESPONSE_CHARS:], ""])
            requests.append(Request(
                [{"role": "user", "content": [{"type": "text", "text": MMVET_PROMPT + line}]}],
                sampling=Sampling(n=1, temperature=0.0, max_tokens=8), adapter=self.adapter))
        replies = [samples[0].text for samples in self.pool.generate(requests)]
        scores = [parse_score(r) for r in replies]
        self.unparsed += sum(s is None for s in scores)
        return list(zip(scores, replies))


def parse_score(text: str) -> float | None:
    """The first word of a graded reply as a score in [0, 1] (MM-Vet's parse); else None."""
    word = text.strip().split(" ")[0][:16] if text.strip() else ""
    try:
        value = float(word)
    except ValueError:
        return None
    return value if 0.0 <= value <= 1.0 else None


# MM-Vet's grader prompt (arXiv 2308.02490; its evaluator's few-shot table), verbatim: the
# benchmark's score is defined by it. The graded line follows it.
MMVET_PROMPT = """Compare the ground truth and prediction from AI models, to give a correctness score for the prediction. <AND> in the ground truth means it is totally right only when all elements in the ground truth are present in the prediction, and <OR> means it is totally right when any one element in the ground truth is present in the prediction. The correctness score is 0.0 (totally wrong), 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, or 1.0 (totally right). Just complete the last space of the correctness score.

Question | Ground truth | Prediction | Correctness
--- | --- | --- | ---
What is x in the equation? | -1 <AND> -5 | x = 3 | 0.0
What is x in the equation? | -1 <AND> -5 | x = -1 | 0.5
What is x in the equation? | -1 <AND> -5 | x = -5 | 0.5
What is x in the equation? | -1 <AND> -5 | x = -5 or 5 | 0.5
What is x in the equation? | -1 <AND> -5 | x = -1 or x = -5 | 1.0
Can you explain this meme? | This meme is poking fun at the fact that the names of the countries Iceland and Greenland are misleading. Despite its name, Iceland is known for its beautiful green landscapes, while Greenland is mostly covered in ice and snow. The meme is saying that the person has trust issues because the names of these countries do not accurately represent their landscapes. | The meme talks about Iceland and Greenland. It's pointing out that despite their names, Iceland is not very icy and Greenland isn't very green. | 0.4
Can you explain this meme? | This meme is poking fun at the fact that the names of the countries Iceland and Greenland are misleading. Despite its name, Iceland is known for its beautiful green landscapes, while Greenland is mostly covered in ice and snow. The meme is saying that the person has trust issues because the names of these countries do not accurately represent their landscapes. | The meme is using humor to point out the misleading nature of Iceland's and Greenland's names. Iceland, despite its name, has lush green landscapes while Greenland is mostly covered in ice and snow. The text 'This is why I have trust issues' is a playful way to suggest that these contradictions can lead to distrust or confusion. The humor in this meme is derived from the unexpected contrast between the names of the countries and their actual physical characteristics. | 1.0
"""
