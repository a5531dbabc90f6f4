"""The disk a run fills, for ``coevolve plan``: step checkpoints and hf/ exports.

    checkpoint  4 (P + A) + 8 T     DCP of the model's fp32 parameters (A: LoRA adapter
                                    parameters) and AdamW's two fp32 moments of the T
                                    trained ones (actors/checkpoint.py)
    export      e P (+ e A)         hf/ in the model's dtype, e = 2 for bfloat16, 4 for
                                    float32 (with LoRA: the merged weights + the adapters)

The running phase holds run.keep_checkpoints checkpoints, one more for a moment while
the next is saved (it is complete before the oldest is pruned); a finished phase keeps
only its export (the driver deletes its checkpoints after its DONE marker); with
run.keep_exports K only each role's newest K exports stay, but every one of the role
``coevolve eval`` evaluates per iteration (the recipe's eval_role). So the run never holds more
than (keep_checkpoints + 1) checkpoints + the exports it ends with (its peak, while the
last phase saves; a bound, since a checkpoint outweighs an export when a phase exports
next to its kept checkpoints), and ends with the exports alone. Rollouts, metrics,
logs and recipe data (rendered images) are small beside them and not counted.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipelines.contract import phase_spec
from pipelines.registry import build_recipe, eval_role
from pipelines.runtime.memory import GIB, ModelSizes, lora_params, optimizer_state


@dataclass(frozen=True)
class DiskPlan:
    checkpoint: dict[str, float]  # one step checkpoint, by term
    export: float                 # one hf/ export
    export_dtype: str
    phases: int                   # phases the run trains, warm start included
    exports_kept: int             # exports on disk at the end
    keep_checkpoints: int         # run.keep_checkpoints
    keep_exports: int             # run.keep_exports (0: all)

    @property
    def end(self) -> float:
        return self.exports_kept * self.export

    @property
    def peak(self) -> float:
        return (self.keep_checkpoints + 1) * sum(self.checkpoint.values()) + self.end


def disk_plan(cfg, m: ModelSizes, gpu: bool) -> DiskPlan:
    """The run's checkpoints and exports; ``gpu``: its trainer computes on GPUs (a
    model.dtype of auto exports bfloat16 there, float32 on CPU hosts)."""

    t = cfg.trainer
    lora = lora_params(m, t.lora.rank, t.lora.target_modules) if t.lora.enabled else 0
    state = optimizer_state(m, ranks=1, lora=lora, freeze_vision=t.freeze_vision,
                            freeze_projector=t.freeze_projector)
    dtype = cfg.model.dtype if cfg.model.dtype != "auto" else "bfloat16" if gpu else "float32"
    export = (2 if dtype == "bfloat16" else 4) * (m.params + lora)
    recipe = build_recipe(cfg)
    phases = [p for i in range(1, cfg.run.iterations + 1) for p in recipe.phases(i)]
    exports: dict[str, list[int]] = {}  # role -> the exports of each of its phases
    for p in phases:  # a phase of several LoRA policies exports hf/ and hf-<policy>/ each
        exports.setdefault(p.role, []).append(max(1, len(phase_spec(p).policies)))
    keep, evaluated = cfg.run.keep_exports, eval_role(recipe)
    kept = sum(sum(each[-keep:] if keep and role != evaluated else each)
               for role, each in exports.items())
    warm = 1 if cfg.model.warm_start.data else 0
    return DiskPlan({"fp32 parameters": state["master"], "AdamW moments": state["adamw"]},
                    export, dtype, len(phases) + warm, kept + warm,
                    cfg.run.keep_checkpoints, keep)


def describe(disk: DiskPlan) -> list[str]:
    """The plan's lines about the disk."""
    ckpt = sum(disk.checkpoint.values())
    terms = " + ".join(f"{k} {v / GIB:.1f}" for k, v in disk.checkpoint.items())
    kept = (f"run.keep_exports {disk.keep_exports}: each role's newest, every one of the "
            "evaluated role's" if disk.keep_exports else "run.keep_exports 0: every phase's")
    first = (f"disk      step checkpoint {ckpt / GIB:.1f} GiB ({terms}); hf/ export "
             f"{disk.export / GIB:.1f} GiB ({disk.export_dtype}); "
             f"{_count(disk.phases, 'phase')}, each keeping only its export when done ({kept})")
    second = (f"          at the end {_count(disk.exports_kept, 'export')} = "
              f"{disk.end / GIB:.1f} GiB; peak while the last phase saves "
              f"(run.keep_checkpoints {disk.keep_checkpoints} + 1) x {ckpt / GIB:.1f} + "
              f"{disk.end / GIB:.1f} = {disk.peak / GIB:.1f} GiB ({disk.peak / 1e9:.0f} GB)")
    return [first, second]


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'s' * (n != 1)}"
