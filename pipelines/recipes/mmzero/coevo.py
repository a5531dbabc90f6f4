"""Co-evolution metrics of MM-Zero, one record per iteration, their figures and a sample gallery.

Definitions: MM-Zero's co-evolution metrics per iteration (arXiv:2603.09206;
docs/mmzero.md). The input is one ``FunnelItem`` per Proposer_i proposal as it
moves through the Solver-phase data pipeline of iteration i: parsed ->
rendered by CodeGen_i -> evaluated by the Solver (10 answers to each question)
-> kept for Solver training.

Files, in the run layout of ``pipelines/runtime/driver.py``::

    runs/<name>/iter_0003/coevo.json   this iteration's metrics            (write_coevo)
    runs/<name>/iter_0003/coevo.png    curves over iterations 1..3, plus
                                       iteration 3's funnel and content types
    runs/<name>/coevo.png              curves over all iterations          (write_run_figure,
                                                                         plot_run)

``coevolve plot RUN_DIR`` redraws every figure from the JSON files.
"""

from __future__ import annotations

import io
import itertools
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

from pipelines.runtime.rundir import atomic_write

FUNNEL = ("proposals", "parsed", "rendered", "evaluated", "kept")
PHASES = ("proposer", "codegen", "solver")


@dataclass
class FunnelItem:
    """One Proposer proposal in the Solver-phase data pipeline of one iteration."""

    parsed: bool  # all required tags present
    content_type: str | None = None  # None on a parsed item counts as "other" (the parser's default)
    rendered: bool = False  # CodeGen's SVG rendered to a PNG
    svg_chars: int | None = None  # length of the extracted SVG code; None when none was extracted
    evaluated: bool = False  # the Solver answered both questions
    easy_consistency: float | None = None  # Solver self-consistency c on the easy question
    hard_consistency: float | None = None  # ... on the hard question (h in the formulas)
    kept: bool = False  # passed the Solver data filter
    # the majority (pseudo-label) equals the Proposer's hard answer; None: not evaluated
    label_right: bool | None = None


def coevo_metrics(items: list[FunnelItem], codegen_kept: int, solver_kept: int,
                  content_types: tuple[str, ...]) -> dict:
    """The co-evolution record of one iteration (MM-Zero's co-evolution metrics).

    - ``difficulty`` = mean over evaluated items of ``2 * min(h, 1 - h)``: 1 when the
      Solver splits evenly on the hard question, 0 when it always or never agrees.
    - ``solvability`` = mean easy self-consistency over evaluated items.
    - ``hard_consistency`` = mean hard self-consistency over evaluated items.
    - ``easy_hard_gap`` = solvability - hard_consistency: how much more consistently
      the Solver answers the easy question than the hard one (> 0 is the intent).
    - ``render_rate`` = rendered / proposals, unparsed proposals included.
    - ``content_types`` = share of each type among parsed items (every type present);
      ``content_type_entropy`` = H / ln(len(content_types)), H in nats.
    - ``funnel`` = counts {proposals, parsed, rendered, evaluated, kept}.
    - ``mean_svg_chars`` = mean SVG length over items that have one (rendered or not).
    - ``codegen_kept`` / ``solver_kept`` = training items of this iteration's phases.
    - ``pseudo_label_accuracy`` = share of evaluated items whose pseudo-label (the
      Solver's majority answer to the hard question) equals the hidden answer, the
      Proposer's hard answer that CodeGen drew; ``kept_pseudo_label_accuracy`` = the same
      over kept items, the labels the Solver trains on.

    A mean over nothing is None (not 0: a difficulty of 0 would read as "too easy");
    counts are 0, the entropy of no parsed items is 0 and their shares are all 0.
    Raises ValueError on an item that skips a funnel stage, an evaluated item
    without both consistencies in [0, 1], or a content type not in ``content_types``.
    """
    if not content_types:
        raise ValueError("content_types is empty: pass the Proposer's content types")
    if codegen_kept < 0 or solver_kept < 0:
        raise ValueError(f"kept counts must be >= 0, got {codegen_kept=} {solver_kept=}")
    for index, item in enumerate(items):
        _check(index, item, content_types)
    parsed = [it for it in items if it.parsed]
    evaluated = [it for it in items if it.evaluated]
    hard = [it.hard_consistency for it in evaluated]
    solvability = _mean([it.easy_consistency for it in evaluated])
    hard_mean = _mean(hard)
    counts = dict.fromkeys(content_types, 0)
    for it in parsed:
        counts[it.content_type or "other"] += 1
    shares = {t: (c / len(parsed) if parsed else 0.0) for t, c in counts.items()}
    return {
        "difficulty": _mean([2 * min(h, 1 - h) for h in hard]),
        "solvability": solvability,
        "hard_consistency": hard_mean,
        "easy_hard_gap": None if solvability is None else solvability - hard_mean,
        "render_rate": sum(it.rendered for it in items) / len(items) if items else None,
        "content_types": shares,
        "content_type_entropy": _normalised_entropy(list(shares.values())),
        "funnel": {"proposals": len(items), "parsed": len(parsed),
                   "rendered": sum(it.rendered for it in items), "evaluated": len(evaluated),
                   "kept": sum(it.kept for it in items)},
        "mean_svg_chars": _mean([it.svg_chars for it in items if it.svg_chars is not None]),
        "codegen_kept": codegen_kept,
        "solver_kept": solver_kept,
        "pseudo_label_accuracy": _mean([float(bool(it.label_right)) for it in evaluated]),
        "kept_pseudo_label_accuracy": _mean([float(bool(it.label_right)) for it in items
                                             if it.kept]),
    }


def _check(index: int, it: FunnelItem, content_types: tuple[str, ...]) -> None:
    stages = [("parsed", it.parsed), ("rendered", it.rendered), ("evaluated", it.evaluated),
              ("kept", it.kept)]
    for (before, done_before), (stage, done) in itertools.pairwise(stages):
        if done and not done_before:
            raise ValueError(f"item {index} is {stage} but not {before}")
    if it.parsed and (it.content_type or "other") not in content_types:
        raise ValueError(f"item {index}: content type {it.content_type!r} is not one of "
                         f"{content_types}")
    if it.evaluated:
        for name in ("easy_consistency", "hard_consistency"):
            value = getattr(it, name)
            if value is None or not 0.0 <= value <= 1.0:
                raise ValueError(f"item {index} is evaluated but {name} is {value!r} "
                                 "(expected a share in [0, 1])")


def phase_rewards(iter_dir: Path) -> dict[str, float | None]:
    """``<phase>_reward_mean`` and ``<phase>_reward_std`` for the three phases of an
    iteration: the means over the phase's steps of the step's mean reward and of its
    reward standard deviation (``metrics.jsonl``: reward/mean, reward/std); None for a
    phase that trained no step. A std of 0 in every step means no learning signal."""
    out: dict[str, float | None] = {}
    for phase in PHASES:
        path = Path(iter_dir) / phase / "metrics.jsonl"
        lines = path.read_text().splitlines() if path.exists() else []
        steps = [rec for rec in map(json.loads, lines) if "reward/mean" in rec]
        out[f"{phase}_reward_mean"] = _mean([rec["reward/mean"] for rec in steps])
        out[f"{phase}_reward_std"] = _mean([rec["reward/std"] for rec in steps])
    return out


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _normalised_entropy(shares: list[float]) -> float:
    """Shannon entropy in nats divided by ln(K): 1 for a uniform spread over K types."""
    if len(shares) < 2:
        return 0.0
    return -sum(p * math.log(p) for p in shares if p > 0) / math.log(len(shares))


def write_coevo(iter_dir: Path, metrics: dict, iteration: int) -> None:
    """Write ``iter_dir/coevo.json`` (atomically) and draw ``iter_dir/coevo.png`` over
    the run's iterations 1..iteration found in ``iter_dir.parent``."""
    iter_dir = Path(iter_dir)
    record = {"iteration": iteration, **metrics}
    atomic_write(iter_dir / "coevo.json", json.dumps(record, indent=1, allow_nan=False) + "\n")
    history = [rec for _, rec in _read_run(iter_dir.parent) if rec["iteration"] <= iteration]
    _write_bytes(iter_dir / "coevo.png", _figure(history, iter_dir.parent.name, per_iteration=True))


def write_run_figure(run_dir: Path) -> Path:
    """Draw ``run_dir/coevo.png``: the curves over every iteration with a coevo.json."""
    found = _read_run(Path(run_dir))
    return _write_bytes(Path(run_dir) / "coevo.png", _figure(
        [rec for _, rec in found], Path(run_dir).name, per_iteration=False))


def plot_run(run_dir: Path) -> list[Path]:
    """Redraw every ``iter_*/coevo.png`` and the run-level ``run_dir/coevo.png``.

    Raises FileNotFoundError when ``run_dir`` is missing or holds no ``iter_*/coevo.json``.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir} does not exist")
    found = _read_run(run_dir)
    if not found:
        raise FileNotFoundError(f"{run_dir} has no iter_*/coevo.json (MM-Zero writes one per "
                                "iteration once its Solver data are built)")
    written = []
    for k, (iter_dir, _) in enumerate(found):
        history = [rec for _, rec in found[:k + 1]]
        written.append(_write_bytes(iter_dir / "coevo.png",
                                    _figure(history, run_dir.name, per_iteration=True)))
    history = [rec for _, rec in found]
    written.append(_write_bytes(run_dir / "coevo.png",
                                _figure(history, run_dir.name, per_iteration=False)))
    return written


def _read_run(run_dir: Path) -> list[tuple[Path, dict]]:
    """(iteration folder, record) for every iter_*/coevo.json, in iteration order."""
    found = [(p.parent, json.loads(p.read_text())) for p in run_dir.glob("iter_*/coevo.json")]
    return sorted(found, key=lambda pair: pair[1]["iteration"])


def _write_bytes(path: Path, data: bytes) -> Path:
    atomic_write(path, data)
    return path


# (panel title, y label, keys plotted, y range); published endpoints from arXiv:2603.09206.
CURVES = (
    ("difficulty = mean 2·min(h, 1−h)\npaper (Qwen3-VL-8B) 0.49 → 0.40, iters 1 → 6",
     "difficulty", ("difficulty",), (0, 1.05)),
    ("solvability = mean easy self-consistency\npaper 0.87 → 0.96, iters 1 → 6",
     "solvability", ("solvability",), (0, 1.05)),
    ("render rate = rendered / proposals\npaper 95.5% → 99.0%, iters 1 → 6",
     "render rate", ("render_rate",), (0, 1.05)),
    ("easy−hard gap\n= solvability − mean hard consistency", "gap", ("easy_hard_gap",), (-1.05, 1.05)),
    ("content-type entropy\n(1 = all types equally often)", "H / ln(#types)",
     ("content_type_entropy",), (0, 1.05)),
    ("mean SVG length", "characters", ("mean_svg_chars",), None),
    ("kept training items", "items", ("codegen_kept", "solver_kept"), None),
    ("Solver against known answers: held-out figures (T 0.6)\nand pseudo-labels "
     "(majority = the Proposer's hard answer)", "accuracy",
     ("heldout_accuracy_before", "heldout_accuracy", "pseudo_label_accuracy",
      "kept_pseudo_label_accuracy"), (0, 1.05)),
    ("mean reward over the phase's steps", "reward",
     tuple(f"{p}_reward_mean" for p in PHASES), "auto"),
    ("reward std within steps (0 = no learning signal)", "std",
     tuple(f"{p}_reward_std" for p in PHASES), None),
)

LABELS = {"codegen_kept": "CodeGen (render-rate filter)", "solver_kept": "Solver (consistency filter)",
          "heldout_accuracy_before": "before the Solver phase",
          "heldout_accuracy": "after the Solver phase",
          "pseudo_label_accuracy": "pseudo-labels, evaluated items",
          "kept_pseudo_label_accuracy": "pseudo-labels, kept items",
          **{f"{p}_reward_{k}": p for p in PHASES for k in ("mean", "std")}}


def _figure(history: list[dict], run_name: str, per_iteration: bool) -> bytes:
    """A 4x3 PNG (1500x1600 px): ten metric curves over the iterations of ``history``,
    then either the last iteration's funnel and content-type shares as bars
    (``per_iteration``) or both across all iterations (run-level figure)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(15, 16), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(4, 3).ravel()
    iters = [rec["iteration"] for rec in history]
    for ax, (title, ylabel, keys, ylim) in zip(axes, CURVES):
        _curves(ax, iters, {LABELS.get(k, k): [rec.get(k) for rec in history] for k in keys},
                title, ylabel)
        if ylim == "auto":
            pass
        elif ylim:
            ax.set_ylim(*ylim)
        else:
            ax.set_ylim(bottom=0)  # counts and lengths start at 0, not at their minimum
    last = history[-1]
    if per_iteration:
        fig.suptitle(f"{run_name}: co-evolution metrics, iteration {last['iteration']}",
                     fontsize=15)
        _funnel_bars(axes[10], last)
        _share_bars(axes[11], last)
    else:
        fig.suptitle(f"{run_name}: co-evolution metrics, iterations {iters[0]}–{iters[-1]}",
                     fontsize=15)
        _curves(axes[10], iters, {s: [rec["funnel"][s] for rec in history] for s in FUNNEL},
                "pipeline funnel", "proposals")
        axes[10].set_ylim(bottom=0)
        _share_stack(axes[11], iters, history)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _curves(ax, iters: list[int], series: dict[str, list], title: str, ylabel: str) -> None:
    # None (a mean over no items) becomes a gap in the line; distinct markers keep
    # equal series (e.g. rendered == evaluated) visible.
    for (label, values), marker in zip(series.items(), "osD^v"):
        ax.plot(iters, [math.nan if v is None else v for v in values], marker=marker, label=label)
    if len(series) > 1:
        ax.legend(fontsize=8)
    ax.set_title(title, fontsize=10)
    ax.set_ylabel(ylabel)
    _iteration_axis(ax, iters)
    ax.grid(alpha=0.3)


def _iteration_axis(ax, iters: list[int]) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.set_xlabel("iteration")
    ax.set_xlim(min(iters) - 0.5, max(iters) + 0.5)
    if len(iters) <= 15:
        ax.set_xticks(iters)
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _funnel_bars(ax, rec: dict) -> None:
    bars = ax.bar(FUNNEL, [rec["funnel"][s] for s in FUNNEL], color="tab:blue")
    ax.bar_label(bars)
    ax.set_title(f"pipeline funnel, iteration {rec['iteration']}", fontsize=10)
    ax.set_ylabel("proposals")
    ax.margins(y=0.15)


def _share_bars(ax, rec: dict) -> None:
    types = list(rec["content_types"])
    bars = ax.bar(types, [rec["content_types"][t] for t in types], color="tab:green")
    ax.bar_label(bars, fmt="%.2f")
    ax.set_ylim(0, 1.1)
    ax.set_title(f"content types of parsed proposals, iteration {rec['iteration']}", fontsize=10)
    ax.set_ylabel("share")
    ax.tick_params(axis="x", labelrotation=30)


def _share_stack(ax, iters: list[int], history: list[dict]) -> None:
    types = list(dict.fromkeys(t for rec in history for t in rec["content_types"]))
    bottom = [0.0] * len(history)
    for t in types:
        shares = [rec["content_types"].get(t, 0.0) for rec in history]
        ax.bar(iters, shares, bottom=bottom, label=t)
        bottom = [b + s for b, s in zip(bottom, shares)]
    ax.set_ylim(0, 1.05)
    ax.set_title("content types of parsed proposals", fontsize=10)
    ax.set_ylabel("share")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    _iteration_axis(ax, iters)


def save_samples(out_dir: Path, samples: list[dict], limit: int = 16) -> None:
    """A folder a person can open: ``sample_XX.png`` and an ``index.md`` listing the
    first ``limit`` samples (image, caption, questions, answers, kept or not).

    Each sample: ``png`` (bytes or None), ``question``, ``answer`` and optionally
    ``caption``, ``easy_question``, ``easy_answer``, ``kept``. A sample without a
    PNG is listed as "not rendered". Images of an earlier call that are not part
    of this one are removed so the folder matches its index.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    shown = samples[:limit]
    width = max(2, len(str(len(shown) - 1)))
    lines = [f"# Samples ({len(shown)} of {len(samples)})", ""]
    written = set()
    for i, sample in enumerate(shown):
        name = f"sample_{i:0{width}d}"
        status = [] if "kept" not in sample else ["kept" if sample["kept"] else "filtered out"]
        if sample.get("png"):
            _write_bytes(out_dir / f"{name}.png", sample["png"])
            written.add(f"{name}.png")
            image = f"![{name}]({name}.png)"
        else:
            status.append("not rendered")
            image = "*(not rendered: no image)*"
        lines += [f"## {name}" + (f" ({', '.join(status)})" if status else ""), "", image, ""]
        if sample.get("caption"):
            lines += ["**Caption:**", ""] + [f"> {line}" for line in
                                             str(sample["caption"]).splitlines()] + [""]
        for key, label in (("easy_question", "Easy question"), ("easy_answer", "Easy answer")):
            if key in sample:
                lines.append(f"- **{label}:** {_one_line(sample[key])}")
        lines += [f"- **Question:** {_one_line(sample['question'])}",
                  f"- **Answer:** {_one_line(sample['answer'])}"]
        lines.append("")
    for stale in out_dir.glob("sample_*.png"):
        if re.fullmatch(r"sample_\d+\.png", stale.name) and stale.name not in written:
            stale.unlink()
    atomic_write(out_dir / "index.md", "\n".join(lines))


def _one_line(value) -> str:
    return "*(none)*" if value is None else " ".join(str(value).split())
