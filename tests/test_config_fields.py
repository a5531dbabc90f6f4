"""Every config field does what its documentation says: a field of the sections that
build actors (model, generator, trainer, algorithm, placement) changes what the config
builds (engine spec, trainer spec and objective, placement layouts) when set to a
non-default value, or it is on an explicit list with the reason and the tests that
cover it. No actor is started.
"""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import pytest

from pipelines.config import Config, load_config

ROOT = Path(__file__).resolve().parents[1]
BUILT_SECTIONS = ("model", "generator", "trainer", "algorithm", "placement")

# Fields of those sections read elsewhere than in the specs built here.
ELSEWHERE = {
    "generator.bucket_mb": "bucket size of the weight sync (rl_step.RLSteps.push); "
                           "tests/test_generator.py buckets",
    "generator.temperature": "sampling of the simple recipe's requests; tests/test_driver.py",
    "generator.top_p": "sampling of the simple recipe's requests; tests/test_driver.py",
    "algorithm.reward_budget_s": "the grading budget of a step's scoring; "
                                 "tests/test_hostile_output.py budget test",
    "placement.strategy": "placement groups' strategy; tests/test_placement.py two-node scenario",
    "generator.stall_timeout_s": "the pools' hung-engine detection (engines.Engines); "
                                 "tests/test_driver.py hung engine",
    "generator.call_timeout_s": "the pools' wait on weight pushes and other engine calls "
                                "(engines.Engines); tests/test_driver.py",
    "generator.start_timeout_s": "the pools' wait for an engine start (engines.Engines)",
    "generator.sync_timeout_s": "the pools' wait for a weight push (engines.Engines); "
                                "tests/test_phase_loop.py settings test",
    "trainer.call_timeout_s": "the trainer group's wait on one call (phase.PhaseRunner); "
                              "tests/test_trainer.py hung rank",
    "trainer.collective_timeout_s": "the trainer group's torch.distributed timeout "
                                    "(phase.PhaseRunner)",
    "generator.sync_check_every": "how often the sync probe runs after a push "
                                  "(rl_step.RLSteps.verify); tests/test_phase_loop.py probe test",
    "generator.sync_check_tol": "the sync probe's tolerance (rl_step.RLSteps.verify); "
                                "tests/test_phase_loop.py probe test, "
                                "tests/test_engine_shapes.py",
    "generator.min_kv_sequences": "coevolve plan's KV-cache check; tests/test_footprint.py "
                                  "refusal",
    "algorithm.behaviour_logprobs": "where a phase takes the PPO behaviour log-probs from "
                                    "(rl_step.RLSteps.behaviour_source); tests/test_phase_loop.py",
}
# Sections read elsewhere: the role and phase layouts and the cluster (tests/test_placement.py),
# the warm start (the driver's SFT phase before iteration 1; tests/test_warm_start.py).
SECTION_ELSEWHERE = ("placement.roles", "placement.phases", "placement.cluster",
                     "model.warm_start")
ROLES = ["placement.roles={proposer: {}, codegen: {}, solver: {}}"]  # MM-Zero's three


def leaves(cls, prefix: str = ""):
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        if dataclasses.is_dataclass(kind):
            yield from leaves(kind, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", kind


def other_value(path: str, kind, current):
    """A valid value of ``kind`` other than ``current`` (as an override string)."""
    if typing.get_origin(kind) is typing.Literal:
        return next(str(v) for v in typing.get_args(kind) if v != current)
    if kind is bool:
        return str(not current).lower()
    if kind is int:
        return str(current + 1 if path != "placement.gpus_per_rank" else 1)
    if path == "algorithm.gamma":
        return "0.99"
    if path == "algorithm.kl_target":
        return "0.05"
    if kind is float:
        return str(round(current * 0.5 + 0.01, 6) if current < 1 else current * 2)
    if path == "placement.colocate":
        return "[solver]"
    if path == "model.dtype":
        return "bfloat16"
    if kind is str:
        return "tiny://qwen3-vl" if path == "model.path" else f"{current}x"
    if typing.get_origin(kind) in (list, tuple):
        if path == "trainer.betas":
            return "[0.8, 0.99]"
        if path == "trainer.lora.target_modules":
            return "[q_proj]"
    raise AssertionError(f"{path}: no non-default value known for {kind}")


def built(cfg) -> dict:
    from pipelines.algorithms.estimators import make_estimator, make_kl_controller
    from pipelines.layouts import phase_layouts
    from pipelines.runtime.specs import engine_spec, trainer_spec

    estimator = make_estimator(cfg.algorithm)
    return {"engine": engine_spec(cfg, cfg.model.path, 1),
            "trainer": trainer_spec(cfg, cfg.model.path, steps=100),
            "layouts": phase_layouts(cfg.placement),
            "estimator": (type(estimator).__name__, {k: v for k, v in vars(estimator).items()
                                                     if not callable(v)}),
            "kl": make_kl_controller(cfg.algorithm)}


# Fields that act only beside another setting: the setting they need.
NEEDS = {"algorithm.baseline_decay": "algorithm.advantage=reinforce",
         "algorithm.gamma": "algorithm.advantage=reinforce_pp",
         "algorithm.kl_in_reward": "algorithm.advantage=reinforce_pp",
         "algorithm.whiten_size": "algorithm.advantage=reinforce_pp",
         "algorithm.kl_target": "algorithm.kl_control=adaptive",
         "algorithm.kl_rate": "algorithm.kl_control=adaptive"}


def value_at(cfg, path: str):
    for part in path.split("."):
        cfg = getattr(cfg, part)
    return cfg


FIELDS = [(path, kind) for path, kind in leaves(Config)
          if path.split(".")[0] in BUILT_SECTIONS
          and not path.startswith(SECTION_ELSEWHERE)]


@pytest.mark.parametrize("path, kind", FIELDS, ids=[p for p, _ in FIELDS])
def test_a_non_default_value_changes_what_is_built(path, kind):
    base = load_config(None, ROLES)
    change = other_value(path, kind, value_at(base, path))
    extra = ["trainer.lora.enabled=true"] if path.startswith("trainer.lora.") and \
        path != "trainer.lora.enabled" else []
    if path == "placement.gpus_per_rank":  # a GPU trainer needs GPU engines beside it
        extra += [f"placement.roles.{r}.gpus_per_engine=1" for r in ("proposer", "codegen",
                                                                      "solver")]
    if path in NEEDS:
        extra.append(NEEDS[path])
    if path == "trainer.logprob_chunk_tokens":
        change = "0"
    if path == "algorithm.kl_estimator":
        extra.append("trainer.logprob_chunk_tokens=0")  # "full" needs the full logits
    cfg = load_config(None, [*ROLES, *extra, f"{path}={change}"])
    assert value_at(cfg, path) != value_at(base, path)
    if path in ELSEWHERE:
        pytest.skip(f"read elsewhere: {ELSEWHERE[path]}")
    # (a GPU trainer beside GPU engines is compared with the CPU default layout)
    baseline = load_config(None, ROLES + ([] if path == "placement.gpus_per_rank" else extra))
    assert built(cfg) != built(baseline), (
        f"{path}={change} changes nothing that is built; wire it or list it in ELSEWHERE")


def test_every_built_section_field_is_walked_or_listed():
    walked = {p for p, _ in FIELDS}
    listed = set(ELSEWHERE)
    every = {p for p, _ in leaves(Config) if p.split(".")[0] in BUILT_SECTIONS}
    assert every - walked <= {p for p in every if p.startswith(SECTION_ELSEWHERE)}
    assert listed <= every, listed - every


def test_every_offered_estimator_is_built():
    from pipelines.algorithms.estimators import ESTIMATORS, make_estimator

    options = typing.get_args(typing.get_type_hints(type(load_config(None).algorithm))["advantage"])
    assert set(options) == set(ESTIMATORS)  # nothing offered that the loop cannot run
    for name in options:
        make_estimator(load_config(None, [f"algorithm.advantage={name}"]).algorithm)


def test_dual_clip_zero_is_off():
    from pipelines.runtime.specs import trainer_spec

    cfg = load_config(None, ["algorithm.dual_clip=0"])
    assert trainer_spec(cfg, "m", 1).objective.dual_clip is None
    assert trainer_spec(load_config(None), "m", 1).objective.dual_clip == 3.0


def test_max_pixels_reaches_engines_and_trainer_alike():
    from pipelines.runtime.specs import engine_spec, trainer_spec

    cfg = load_config(None, ["model.max_pixels=16384"])
    assert engine_spec(cfg, "m", 1).max_pixels == trainer_spec(cfg, "m", 1).max_pixels == 16384
    default = load_config(None)
    assert engine_spec(default, "m", 1).max_pixels == 0  # the model folder's own setting


def test_coevolve_generate_samples_with_the_engine_a_phase_builds():
    """One spec builder (pipelines/runtime/specs.py): the CLI's engine is a phase's."""
    from pipelines.cli import generate_spec
    from pipelines.layouts import resolve_layout
    from pipelines.registry import build_recipe
    from pipelines.runtime.specs import role_engine_spec

    cfg = load_config(ROOT / "configs/simple/tiny-cpu.yaml",
                      ["generator.enforce_eager=false", "model.max_pixels=50176",
                       "generator.multiprocess=always"])
    layout = resolve_layout(cfg.placement, None, build_recipe(cfg).roles)
    spec = role_engine_spec(cfg, layout, "policy", cfg.model.path)
    assert generate_spec(cfg) == spec
    assert (spec.enforce_eager, spec.max_pixels, spec.multiprocess) == (False, 50176, True)
