"""Evaluation tasks: where the items come from, how they are asked, how answers count.

A task is declarative (``TaskSpec``): a data source, a prompt, an answer
extraction, a metric and sampling settings. coevolve defines its own tasks
only where a seed's protocol differs from lmms-eval's task definitions, and
for local data:

- ``mmzero_<benchmark>``: MM-Zero's protocol (arXiv 2603.09206): the Solver's
  prompt, temperature 0.6, the last ``\\boxed{}`` matched by the rule grader,
  then optionally an LLM judge (``coevolve eval --judge``).
- ``evolmm_chartqa``: ChartQA with relaxed accuracy (a number within 5% of the
  reference counts), greedy, a short-answer prompt.
- ``jsonl:PATH``: a local file in the labeled data format
  (``pipelines/eval/data.py``), greedy, last ``\\boxed{}`` else the last line.
- ``smoke``: a built-in fixture drawn locally (circle counting and tricky
  answer formats) that needs no data.
- a YAML file with ``TaskSpec``'s fields: your own task.

Other benchmarks run through lmms-eval's own task definitions with the
``coevolve`` model plugin (``lmms_eval --model coevolve ...``, see docs/eval.md).
"""

from __future__ import annotations

import dataclasses
import io
from dataclasses import dataclass, field
from pathlib import Path

from actors.tiny import cache_root
from pipelines.algorithms.answers import extract_answer
from pipelines.config_yaml import ConfigError, load_file
from pipelines.eval import official
from pipelines.eval.benchmarks import LAYOUTS
from pipelines.eval.data import (
    DataError,
    DataMissing,
    Item,
    item_seed,
    last_line,
    read_hf,
    read_jsonl,
    write_jsonl,
)
from pipelines.runtime.rundir import atomic_write

ANSWER_MODES = ("boxed", "boxed_or_last_line")
# exact: the rule grader on the extracted answer; relaxed: ChartQA's relaxed accuracy on
# it; a benchmark's name: that benchmark's official scoring (pipelines/eval/official.py)
METRICS = ("exact", "relaxed", *official.OFFICIAL)


@dataclass(frozen=True)
class TaskSpec:
    name: str
    data: str  # "jsonl:PATH" | "hf:ID_OR_FOLDER" | "smoke"
    split: str = "test"
    config: str | None = None  # the data set's config (None: its default; "*": all)
    fields: dict = field(default_factory=dict)  # this format's field -> the data set's column
    layout: str | None = None  # a published benchmark's row format (benchmarks.LAYOUTS)
    prompt: str = "{question}{choices}"
    system: str | None = None
    answer: str = "boxed_or_last_line"  # see ANSWER_MODES
    metric: str = "exact"  # see METRICS
    temperature: float = 0.0
    top_p: float = 1.0
    max_tokens: int = 1024
    samples: int = 1  # responses per item (pass@k needs k of them)
    pass_at: tuple[int, ...] = (1,)
    limit: int | None = None  # first N items only
    description: str = ""

    def __post_init__(self):
        if self.answer not in ANSWER_MODES:
            raise ValueError(f"task {self.name}: answer must be one of {ANSWER_MODES}")
        if self.metric not in METRICS:
            raise ValueError(f"task {self.name}: metric must be one of {METRICS}")
        if self.samples < 1 or any(k < 1 or k > self.samples for k in self.pass_at):
            raise ValueError(f"task {self.name}: pass_at values must lie in 1..samples "
                             f"({self.samples})")
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.max_tokens < 1:
            raise ValueError(f"task {self.name}: bad sampling settings")
        if self.layout is not None and self.layout not in LAYOUTS:
            raise ValueError(f"task {self.name}: layout must be one of {sorted(LAYOUTS)}")

    # -- asking ----------------------------------------------------------------

    def prompt_text(self, item: Item) -> str:
        """The text the model is asked: ``prompt`` with the question, its lettered
        options and the item's text fields (``Item.meta``, e.g. MathVista's hint)."""
        choices = ""
        if item.choices:
            choices = "\n" + "\n".join(f"{letter}. {text}" for letter, text in item.options.items())
        fields = {k: v for k, v in item.meta.items() if isinstance(v, str)}
        return self.prompt.format(**fields, question=item.question, choices=choices)

    def messages(self, item: Item) -> list[dict]:
        text = self.prompt_text(item)
        content = [{"type": "image"} for _ in item.images] + [{"type": "text", "text": text}]
        messages = [{"role": "user", "content": content}]
        if self.system:
            messages.insert(0, {"role": "system", "content": [{"type": "text",
                                                                "text": self.system}]})
        return messages

    def seed(self, item: Item, run_seed: int = 0) -> int:
        """The item's sampling seed: the same on any engine and in any batch."""
        return item_seed(run_seed, self.name, item.id)

    # -- scoring ---------------------------------------------------------------

    def extract(self, response: str) -> str | None:
        if self.answer == "boxed":
            return extract_answer(response)
        return extract_answer(response, fallback=last_line)

    def correct(self, item: Item, response: str, grader) -> tuple[str | None, bool]:
        """What was read from the response and whether it answers the item."""
        if self.metric not in ("exact", "relaxed"):
            return official.score(self.metric, item, response, grader)
        pred = self.extract(response)
        if self.metric == "relaxed":
            targets = item.meta.get("answers") or [item.answer]
            return pred, pred is not None and any(
                official.relaxed_correctness(str(t), pred.strip()) for t in targets)
        return pred, grader.grade(pred, item.answer, options=item.options or None)

    # -- data ------------------------------------------------------------------

    def load(self, data_dir: str | Path | None = None) -> list[Item]:
        """The task's items from the first copy found: ``DATA_DIR/<name>.jsonl``,
        ``DATA_DIR/<name>/`` (a ``save_to_disk`` folder), ``DATA_DIR/<hub id>/`` (the
        dataset repository's files), else the task's own source. ``DataMissing`` when
        there is none, ``DataError`` with the cause when one does not load."""
        kind, _, source = self.data.partition(":")
        row = LAYOUTS[self.layout].row if self.layout else None
        if data_dir is not None:
            local = Path(data_dir) / f"{self.name}.jsonl"
            if local.is_file():
                return read_jsonl(local, self.limit)
            folders = [Path(data_dir) / self.name]
            if kind == "hf" and not Path(source).is_absolute():
                folders.append(Path(data_dir) / source)
            for folder in folders:
                if folder.is_dir():
                    return read_hf(str(folder), self.split, self.fields, self.limit,
                                   self.config, row)
        if kind == "smoke":
            return read_jsonl(smoke_fixture(), self.limit)
        if kind == "jsonl":
            if not Path(source).is_file():
                raise DataMissing(f"task {self.name}: no file {source}")
            return read_jsonl(source, self.limit)
        if kind == "hf":
            return read_hf(source, self.split, self.fields, self.limit, self.config, row)
        raise DataError(f"task {self.name}: unknown data source {self.data!r}")

    def needs(self, data_dir: str | Path | None) -> str:
        """Where this task's data must be, in one line (for a missing task)."""
        kind, _, source = self.data.partition(":")
        if kind != "hf":
            return source or self.data
        config = "" if self.config is None else (
            ", every config" if self.config == "*" else f", config {self.config!r}")
        place = f"{data_dir}/{source}/" if data_dir else "--data-dir DIR with DIR/" + source + "/"
        return (f"{source}{config}, split {self.split!r}: `hf download {source} --repo-type "
                f"dataset --local-dir {place.rstrip('/')}` (or the hub cache, or "
                f"{self.name}.jsonl / a save_to_disk folder {self.name}/ in --data-dir)")


# ---------------------------------------------------------------- built-in tasks

# MM-Zero's Solver prompt (pipelines/recipes/mmzero/prompts.py), used to evaluate it.
_MMZERO_PROMPT = ("{question}{choices}\n\nThink step by step inside <think></think>, then give "
                  "the final answer inside \\boxed{{}} as a single number, word or short phrase.")

# Benchmarks MM-Zero reports (arXiv 2603.09206), each read in its published layout
# (pipelines/eval/benchmarks.py).
MMZERO_BENCHMARKS = ("chartqa", "mathvista", "mathverse", "mathvision", "mmmu", "mmmu_pro",
                     "mmmu_pro_4", "mmmu_pro_vision", "mmvet", "hallusionbench", "visnumbench",
                     "mmsi")


def benchmark_task(bench: str, **settings) -> TaskSpec:
    """A task reading ``bench`` from its published source and layout."""
    layout = LAYOUTS[bench]
    return TaskSpec(data=f"hf:{layout.hub}", split=layout.split, config=layout.config,
                    layout=bench, **settings)


def _mmzero(bench: str) -> TaskSpec:
    # MMMU-Pro's vision setting shows the question and options in the image only
    prompt = _MMZERO_PROMPT.replace("{question}{choices}", "Answer the multiple-choice "
                                    "question in the image.") if bench.endswith("vision") \
        else _MMZERO_PROMPT
    return benchmark_task(bench, name=f"mmzero_{bench}", prompt=prompt, answer="boxed",
                          temperature=0.6, max_tokens=2048,
                          description=f"{bench} under MM-Zero's protocol: T 0.6, last \\boxed{{}}")


# Each benchmark under its official protocol (named after the benchmark): the prompt
# lmms-eval 0.7.3 or the benchmark's authors ask it with, greedy, its own scoring
# (pipelines/eval/official.py). MM-Vet's score is the judge's graded answer (--judge).
_MC = "Answer with the option's letter from the given choices directly."
OFFICIAL_TASKS = [
    benchmark_task("chartqa", name="chartqa", metric="chartqa", max_tokens=16,
                   prompt="{question}\nAnswer the question with a single word."),
    benchmark_task("mathvista", name="mathvista", metric="mathvista", max_tokens=512,
                   prompt="{question}{choices}\n{hint}"),
    benchmark_task("mathverse", name="mathverse", metric="mathverse", max_tokens=1024,
                   prompt="{query_wo}"),
    benchmark_task("mathvision", name="mathvision", metric="mathvision", max_tokens=1024,
                   prompt='Please solve the problem step by step and put your answer in one '
                          '"\\boxed{{}}".{question}{choices_block}'),
    benchmark_task("mmmu", name="mmmu", metric="mmmu", max_tokens=128,
                   prompt="{question}{choices}\n\n{instruction}"),
    benchmark_task("mmmu_pro", name="mmmu_pro", metric="mmmu_pro", max_tokens=256,
                   prompt="{question}{choices}\n" + _MC.replace("option's", "option")),
    benchmark_task("mmmu_pro_4", name="mmmu_pro_4", metric="mmmu_pro", max_tokens=256,
                   prompt="{question}{choices}\n" + _MC.replace("option's", "option")),
    benchmark_task("mmmu_pro_vision", name="mmmu_pro_vision", metric="mmmu_pro",
                   max_tokens=256, prompt=_MC.replace("option's", "option") + " The last line "
                   "of your response should be of the following format: 'Answer: $LETTER' "
                   "(without quotes) where LETTER is one of options."),
    benchmark_task("hallusionbench", name="hallusionbench", metric="hallusionbench",
                   max_tokens=128, prompt="{question}"),
    benchmark_task("visnumbench", name="visnumbench", metric="visnumbench", max_tokens=1024,
                   prompt="Question: {question}\nOptions: {option}\nAnswer the question "
                          "based on the most likely options."),
    benchmark_task("mmvet", name="mmvet", metric="mmvet", max_tokens=1024, prompt="{question}"),
    benchmark_task("mmsi", name="mmsi", metric="mmsi", max_tokens=2048,
                   prompt="{question}\n" + _MC + " Enclose the option's letter within ``."),
]

BUILTIN: dict[str, TaskSpec] = {t.name: t for t in [
    TaskSpec(name="smoke", data="smoke", prompt="{question}{choices}\nAnswer inside \\boxed{{}}.",
             max_tokens=32, description="built-in fixture drawn locally (no data needed)"),
    benchmark_task("chartqa", name="evolmm_chartqa",
                   prompt="{question}\nAnswer the question using a single word or phrase.",
                   metric="relaxed", max_tokens=64,
                   description="ChartQA, relaxed accuracy (numbers within 5%), greedy"),
    *(_mmzero(b) for b in MMZERO_BENCHMARKS),
    *OFFICIAL_TASKS,
]}


def resolve_task(name: str) -> TaskSpec:
    """A built-in task, ``jsonl:PATH``, or a YAML file of TaskSpec fields."""
    if name in BUILTIN:
        return BUILTIN[name]
    if name.startswith("jsonl:"):
        path = Path(name[len("jsonl:"):])
        return TaskSpec(name=path.stem, data=f"jsonl:{path.resolve()}")
    if name.endswith((".yaml", ".yml")):
        return _task_file(Path(name))
    raise ValueError(f"unknown task {name!r}: use one of {sorted(BUILTIN)}, jsonl:PATH, "
                     "a task YAML file, or lmms:<task> for lmms-eval's tasks")


def _task_file(path: Path) -> TaskSpec:
    raw = load_file(path)
    names = {f.name for f in dataclasses.fields(TaskSpec)}
    unknown = set(raw) - names
    if unknown:
        raise ConfigError(f"{path}: unknown task field(s) {sorted(map(str, unknown))[:5]}; "
                          f"fields are {sorted(names)}")
    raw.setdefault("name", path.stem)
    if "pass_at" in raw:
        raw["pass_at"] = tuple(raw["pass_at"])
    data = str(raw.get("data", ""))
    if data.startswith("jsonl:") and not Path(data[6:]).is_absolute():
        raw["data"] = f"jsonl:{(path.parent / data[6:]).resolve()}"
    try:
        return TaskSpec(**raw)
    except TypeError as err:
        raise ConfigError(f"{path}: {err}") from None


# ------------------------------------------------------------------ the fixture

def smoke_fixture(root: str | Path | None = None) -> Path:
    """The ``smoke`` task's data, drawn once into the model cache: 8 circle-counting
    images and 4 items with tricky answer formats (thousands, percent, fraction,
    multiple choice). Deterministic; returns the jsonl path."""

    root = Path(root) if root is not None else cache_root().parent / "eval-smoke-v1"
    path = root / "smoke.jsonl"
    if path.is_file():
        return path
    rows = []
    for i in range(8):
        count = 1 + (i * 3) % 5
        name = f"img/circles-{i}.png"
        _save(_circles(count, seed=i), root / name)
        rows.append({"id": f"count-{i}", "question": "How many circles are in the image?",
                     "answer": str(count), "image": name})
    tricky = [("What is 25 times 40?", "1,000", []),
              ("What share of the bar is filled?", "50%", []),
              ("What is one divided by two?", "\\frac{1}{2}", []),
              ("Which shape is drawn?", "B", ["square", "circle", "triangle"])]
    for i, (question, answer, choices) in enumerate(tricky):
        name = f"img/tricky-{i}.png"
        _save(_circles(1 + i, seed=100 + i), root / name)
        row = {"id": f"tricky-{i}", "question": question, "answer": answer, "image": name}
        if choices:
            row["choices"] = choices
        rows.append(row)
    return write_jsonl(path, rows)


def _circles(count: int, seed: int) -> bytes:
    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    image = Image.new("RGB", (96, 72), "white")
    draw = ImageDraw.Draw(image)
    for k in range(count):
        x, y = 12 + 16 * k, 20 + int(rng.integers(0, 30))
        draw.ellipse([x, y, x + 12, y + 12], fill=tuple(int(c) for c in rng.integers(0, 200, 3)))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _save(data: bytes, path: Path) -> None:
    atomic_write(path, data)
