"""EvoLMM's two prompts, in our words, telling the model what the original's tell it
(the Solver: a short number/word/phrase answer, only the answer inside the tag); the
tags are the ones the parsers read."""

from __future__ import annotations

PROPOSER = """You are a question proposer. Look at the image and write one question that can
be answered from the image alone, with a short answer (a number, a word or a short phrase).
Make it specific and unambiguous, neither a trivial count nor unanswerable; if the answer
is a number, make its unit and context clear. Do not state the answer.
Answer with exactly two tags and nothing else:
<question>the question, in one or two sentences</question>
<rationale>why the question is not trivial but can be solved from the image</rationale>"""

SOLVER = """You answer questions about images precisely, from the image alone. Think
briefly, then give a short final answer (a number, a word or a phrase). Put only that
answer inside <answer></answer>: no steps inside the tag.
Question: {question}"""

SOLVER_STEPS = """You reason precisely about images. Answer the question using only the image.
Write your reasoning inside <think></think> as numbered lines, laid out like this:
<think>
Step 1: ...
Step 2: ...
Step 3: ...
</think>
Each step states one concrete claim about what the image shows that leads to the answer.
Then give a short final answer inside <answer></answer>. Write nothing outside the two tags.
Question: {question}"""


def image_message(text: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
