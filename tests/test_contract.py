"""pipelines/contract.py: what the driver reads of a recipe, checked when it is built."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipelines.config import load_config
from pipelines.contract import ContractError, Scores, check_recipe, phase_spec, recipe_spec
from pipelines.registry import build_recipe

ROOT = Path(__file__).resolve().parents[1]


class Judged:
    name, role, steps = "student", "student", 3
    uses = ("teacher",)
    mini_batches = 2

    def requests(self, step, rng):
        return []

    def score(self, requests, completions, ctx):
        return Scores([])

    def after_step(self, step, ctx):
        return {"seen": float(step)}


class NoScore:
    name, role, steps = "policy", "policy", 1

    def requests(self, step, rng):
        return []


class NoScoreRecipe:  # run.recipe=test_contract:NoScoreRecipe
    roles = ("policy",)

    def __init__(self, cfg):
        self.cfg = cfg

    def phases(self, iteration):
        return [NoScore()]


class Recipe:
    roles = ("student", "teacher")

    def __init__(self, *phases):
        self._phases = phases

    def phases(self, iteration):
        return list(self._phases)


def test_a_phase_spec_fills_the_defaults_and_binds_the_hooks():
    phase = Judged()
    spec = phase_spec(phase)
    assert (spec.kind, spec.uses, spec.data_roles, spec.mini_batches, spec.from_base) == (
        "rl", ("teacher",), (), 2, False)
    assert spec.prepare is None and spec.finish is None
    assert spec.after_step(4, None) == {"seen": 4.0}
    assert spec.samples and not spec.sft


def test_the_kind_decides_the_required_methods():
    class TwoPolicies:
        name, role, steps, policies = "pair", "student", 1, ("a", "b")

        def rollout(self, step, rng, ctx):
            return []

    class Supervised:
        name, role, steps, objective = "sft", "student", 1, "sft"

    assert phase_spec(TwoPolicies()).kind == "policies"
    assert phase_spec(TwoPolicies()).policies == ("a", "b")
    with pytest.raises(ContractError, match=r"^phase 'sft' \(sft\) lacks batch_examples "):
        phase_spec(Supervised())
    Supervised.objective = "dpo"
    with pytest.raises(ContractError, match="objective must be 'rl' or 'sft', not 'dpo'"):
        phase_spec(Supervised())


def test_an_incomplete_recipe_fails_in_one_line_naming_the_member():
    with pytest.raises(ContractError) as err:
        check_recipe(Recipe(NoScore()))
    assert str(err.value).startswith("phase 'policy' (rl) lacks score ")
    assert "\n" not in str(err.value)

    class NoPhases:
        roles = ("policy",)

    with pytest.raises(ContractError, match="^recipe NoPhases lacks phases "):
        recipe_spec(NoPhases())
    with pytest.raises(ContractError, match=r"names roles the recipe does not run \(teacher\)"):
        check_recipe(type("One", (Recipe,), {"roles": ("student",)})(Judged()))


def test_building_a_configured_recipe_checks_it():
    cfg = load_config(None, ["run.recipe=test_contract:NoScoreRecipe"])
    with pytest.raises(ContractError, match="lacks score"):
        build_recipe(cfg)


@pytest.mark.parametrize("recipe", ["simple", "mmzero", "evolmm", "ireasoner", "r3v", "maye"])
def test_every_built_in_recipe_keeps_the_contract(recipe):
    spec = check_recipe(build_recipe(load_config(ROOT / f"configs/{recipe}/tiny-cpu.yaml")))
    assert spec.roles and (spec.eval_role is None or spec.eval_role in spec.roles)
