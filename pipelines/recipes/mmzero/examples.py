"""Built-in example items for ``mmzero.bootstrap`` (off by default).

A random tiny model writes no parsable proposal and no renderable SVG, so a
faithful MM-Zero iteration on it has empty CodeGen and Solver data sets. With
``mmzero.bootstrap: N`` a data set with fewer than N items is topped up from
these hand-written proposals (each with its SVG): the CodeGen phase trains on
the proposals, the Solver phase on their rendered images with the hard answer
as the label. Bootstrap items are marked and counted (``data/bootstrap``);
the filters and rewards are unchanged.
"""

from __future__ import annotations

EXAMPLES = [
    {
        "content_type": "data_chart",
        "caption": "A bar chart of fruit sold on Monday: apples 12, pears 7, plums 9. Each bar "
                   "is labelled with its fruit below and its count above.",
        "easy_question": "How many apples were sold?",
        "easy_answer": "12",
        "hard_question": "How many more apples than pears were sold?",
        "hard_answer": "5",
        "svg": """<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 240 180">
<rect width="240" height="180" fill="white"/>
<rect x="30" y="40" width="40" height="120" fill="#c0392b"/>
<rect x="100" y="90" width="40" height="70" fill="#27ae60"/>
<rect x="170" y="70" width="40" height="90" fill="#8e44ad"/>
<text x="50" y="34" font-size="14" text-anchor="middle">12</text>
<text x="120" y="84" font-size="14" text-anchor="middle">7</text>
<text x="190" y="64" font-size="14" text-anchor="middle">9</text>
<text x="50" y="176" font-size="12" text-anchor="middle">apples</text>
<text x="120" y="176" font-size="12" text-anchor="middle">pears</text>
<text x="190" y="176" font-size="12" text-anchor="middle">plums</text>
</svg>""",
    },
    {
        "content_type": "geometry",
        "caption": "A right triangle with legs labelled 3 and 4 and the hypotenuse unlabelled; "
                   "the right angle is marked with a small square.",
        "easy_question": "What is the length of the shorter leg?",
        "easy_answer": "3",
        "hard_question": "What is the length of the hypotenuse?",
        "hard_answer": "5",
        "svg": """<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 240 180">
<rect width="240" height="180" fill="white"/>
<polygon points="40,150 200,150 40,30" fill="none" stroke="black" stroke-width="2"/>
<rect x="40" y="136" width="14" height="14" fill="none" stroke="black"/>
<text x="120" y="170" font-size="14" text-anchor="middle">4</text>
<text x="24" y="95" font-size="14" text-anchor="middle">3</text>
</svg>""",
    },
    {
        "content_type": "table",
        "caption": "A table with two columns, City and Rain (mm): Oslo 60, Rome 35, Lima 2.",
        "easy_question": "How much rain does Rome get?",
        "easy_answer": "35",
        "hard_question": "What is the total rain of the three cities?",
        "hard_answer": "97",
        "svg": """<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 240 180">
<rect width="240" height="180" fill="white"/>
<g font-size="14">
<text x="30" y="40">City</text><text x="140" y="40">Rain (mm)</text>
<text x="30" y="75">Oslo</text><text x="140" y="75">60</text>
<text x="30" y="110">Rome</text><text x="140" y="110">35</text>
<text x="30" y="145">Lima</text><text x="140" y="145">2</text>
</g>
<line x1="20" y1="50" x2="220" y2="50" stroke="black"/>
<line x1="125" y1="20" x2="125" y2="160" stroke="black"/>
</svg>""",
    },
    {
        "content_type": "diagram",
        "caption": "Three circles A, B and C in a row joined by arrows A to B and B to C; "
                   "the arrow A to B is labelled 2 and the arrow B to C is labelled 6.",
        "easy_question": "Which node does the first arrow start from?",
        "easy_answer": "A",
        "hard_question": "What is the product of the two arrow labels?",
        "hard_answer": "12",
        "svg": """<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 240 180">
<rect width="240" height="180" fill="white"/>
<circle cx="40" cy="90" r="22" fill="#f1c40f"/><text x="40" y="95" font-size="14" text-anchor="middle">A</text>
<circle cx="120" cy="90" r="22" fill="#f1c40f"/><text x="120" y="95" font-size="14" text-anchor="middle">B</text>
<circle cx="200" cy="90" r="22" fill="#f1c40f"/><text x="200" y="95" font-size="14" text-anchor="middle">C</text>
<line x1="62" y1="90" x2="98" y2="90" stroke="black" stroke-width="2"/>
<line x1="142" y1="90" x2="178" y2="90" stroke="black" stroke-width="2"/>
<text x="80" y="80" font-size="13" text-anchor="middle">2</text>
<text x="160" y="80" font-size="13" text-anchor="middle">6</text>
</svg>""",
    },
]
