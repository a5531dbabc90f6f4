"""The three MM-Zero prompts (arXiv:2603.09206), as chat messages.

Proposer and CodeGen are text-only; the Solver sees the rendered image first,
then the question. Wording follows the spec's description of each prompt, and
the Proposer's requirements (complexity, no clichés or repeats, a hard question
that does not state its values, short answers) those of the original's proposer
template, in our own words; the fields, tags and output formats are exactly the
ones the parsers and rewards check.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pipelines.recipes.mmzero.rewards import Proposal

CONTENT_TYPE_LIST = "data_chart, diagram, geometry, timeline, map, table, other"

PROPOSER = """You design visual reasoning problems. Topic: {topic}.

Invent one image that could be drawn as a vector graphic (SVG) and two questions about it.
- Show at least three data elements, and at least three of: several series, labels,
  an inset, distinct colours, derived values, an irregular pattern, a construction.
- No clichés (monthly sales, steadily rising data, generic axes), no repeats.
- The hard question takes several steps and must not state the values it needs.
- Each answer is a single number, a single word or a very short phrase.
Answer with exactly these six tagged fields and nothing else:
<content_type>one of: {types}; the kind of image described</content_type>
<caption>a detailed specification of the image: every element, its position, colour, every
label and every number shown, so that someone can draw it exactly</caption>
<easy_question>a question whose answer can be read directly from the image</easy_question>
<easy_answer>the answer</easy_answer>
<hard_question>the multi-step question</hard_question>
<hard_answer>the answer</hard_answer>"""

CODEGEN = """Write SVG code for the image described below.

Visual type: svg
Caption: {caption}
Easy question: {easy_question}
Easy answer: {easy_answer}
Hard question: {hard_question}
Hard answer: {hard_answer}

Requirements:
- one self-contained <svg> element with a viewBox; no external images, fonts or links;
- readable <text> labels with a font size of at least 12 px;
- the easy answer must be visibly present in the image; the questions must be answerable
  from the image alone.
Output the code in a single fenced block:
```svg
<svg ...>...</svg>
```"""

SOLVER = """{question}

Think step by step inside <think></think>, then give the final answer inside \\boxed{{}} as a
single number, word or short phrase."""


def proposer_messages(topic: str) -> list[dict]:
    return [{"role": "user", "content": [
        {"type": "text", "text": PROPOSER.format(topic=topic, types=CONTENT_TYPE_LIST)}]}]


def codegen_messages(p: Proposal) -> list[dict]:
    text = CODEGEN.format(caption=p.caption, easy_question=p.easy_question,
                          easy_answer=p.easy_answer, hard_question=p.hard_question,
                          hard_answer=p.hard_answer)
    return [{"role": "user", "content": [{"type": "text", "text": text}]}]


def solver_messages(question: str) -> list[dict]:
    return [{"role": "user", "content": [
        {"type": "image"}, {"type": "text", "text": SOLVER.format(question=question)}]}]
