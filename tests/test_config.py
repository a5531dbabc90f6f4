"""Typed configuration: YAML + dotted overrides, validation messages that name the field."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipelines.config import Config, ConfigError, config_from_dict, dump_config, load_config

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path, text: str):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_defaults_match_the_spec():
    cfg = Config()
    # MM-Zero / GRPO defaults (arXiv:2603.09206 and its public configs)
    assert cfg.trainer.lr == 1e-6 and cfg.trainer.weight_decay == 1e-2 and cfg.trainer.grad_clip == 1.0
    assert (cfg.algorithm.clip_low, cfg.algorithm.clip_high, cfg.algorithm.dual_clip) == (0.2, 0.3, 3.0)
    assert cfg.algorithm.kl_estimator == "low_var_kl" and cfg.algorithm.kl_coef == 1e-2
    assert cfg.algorithm.loss_agg == "token-mean"


def test_yaml_and_overrides(tmp_path):
    path = write(tmp_path, "trainer:\n  lr: 1e-5\n  lora:\n    rank: 8\nrun:\n  name: exp\n")
    cfg = load_config(path, ["trainer.lr=2e-6", "trainer.lora.enabled=true", "run.iterations=3",
                             "placement.roles.solver.engines=2"])
    # YAML 1.1 reads 1e-5 as a string; the schema says float, so it is a float.
    assert cfg.trainer.lr == 2e-6 and isinstance(cfg.trainer.lr, float)
    assert cfg.trainer.lora.rank == 8 and cfg.trainer.lora.enabled is True
    assert cfg.run.name == "exp" and cfg.run.iterations == 3
    assert cfg.placement.roles["solver"].engines == 2
    assert cfg.placement.roles["solver"].cpus_per_engine == 1  # unset fields keep their default
    assert list(cfg.placement.roles) == ["solver"]  # no roles but the config's own


def test_round_trip_through_yaml():
    cfg = load_config(None, ["trainer.lr=3e-6", "placement.trainer_ranks=2"])
    again = config_from_dict(yaml.safe_load(dump_config(cfg)))
    assert again == cfg


@pytest.mark.parametrize("overrides, message", [
    (["trainer.lrr=1e-6"], "trainer.lrr: unknown key in trainer; did you mean 'trainer.lr'?"),
    (["trainr.lr=1e-6"], "trainr: unknown key in the top level; did you mean 'trainer'?"),
    (["trainer.lr=fast"], "trainer.lr: expected a number, got 'fast'"),
    (["trainer.lr=-1e-6"], "trainer.lr: must be > 0, got -1e-06"),
    (["run.iterations=1.5"], "run.iterations: expected an integer, got 1.5"),
    (["run.iterations=0"], "run.iterations: must be >= 1, got 0"),
    (["trainer.gradient_checkpointing=yes please"], "trainer.gradient_checkpointing: expected true or false"),
    (["trainer.schedule=cosin"], "trainer.schedule: must be one of ['constant', 'warmup', 'cosine'], "
                                 "got 'cosin'; did you mean 'cosine'?"),
    (["algorithm.dual_clip=0.5"], "algorithm.dual_clip: must be 0 (off) or > 1, got 0.5"),
    (["placement.roles.solver.gpus_per_engine=1", "placement.roles.solver.tensor_parallel=2"],
     "placement.roles.solver.gpus_per_engine: must be >= tensor_parallel (2), got 1"),
    (["trainer.betas=0.9"], "trainer.betas: expected a list, got 0.9"),
    (["trainer"], "override 'trainer': expected KEY=VALUE"),
])
def test_bad_values_name_the_field_and_the_fix(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert message in str(err.value)


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(write(tmp_path, "- a\n- b\n"))
    with pytest.raises(ConfigError, match="trainer: expected a mapping of fields"):
        load_config(write(tmp_path, "trainer: 3\n"))


def test_config_show_cli(tmp_path):
    path = write(tmp_path, "trainer:\n  lr: 5e-6\n")
    out = subprocess.run([sys.executable, "-m", "pipelines.cli", "config", "show", str(path),
                          "run.seed=7"], capture_output=True, text=True, cwd=ROOT, check=True).stdout
    shown = yaml.safe_load(out)
    assert shown["trainer"]["lr"] == 5e-6 and shown["run"]["seed"] == 7
    documented = subprocess.run([sys.executable, "-m", "pipelines.cli", "config", "show", "--doc"],
                                capture_output=True, text=True, cwd=ROOT, check=True).stdout
    assert "# AdamW learning rate." in documented
    assert yaml.safe_load(documented) == yaml.safe_load(dump_config(load_config(None)))
    bad = subprocess.run([sys.executable, "-m", "pipelines.cli", "config", "show", str(path),
                          "trainer.lr=-1"], capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode == 2 and "trainer.lr: must be > 0" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_a_config_file_can_name_a_base_file(tmp_path):
    """``base: other.yaml`` (relative to the file): read first, this file merged over it
    section by section; a cycle or a bad value is a one-line error."""
    from pipelines.config import ConfigError

    (tmp_path / "sub").mkdir()
    (tmp_path / "sub/base.yaml").write_text("run: {name: a, iterations: 3}\ntrainer: {lr: 2.0e-6}\n")
    (tmp_path / "variant.yaml").write_text("base: sub/base.yaml\nrun: {name: b}\n")
    cfg = load_config(tmp_path / "variant.yaml", ["trainer.lr=3e-6"])
    assert (cfg.run.name, cfg.run.iterations, cfg.trainer.lr) == ("b", 3, 3e-6)
    (tmp_path / "x.yaml").write_text("base: y.yaml\n")
    (tmp_path / "y.yaml").write_text("base: x.yaml\n")
    with pytest.raises(ConfigError, match="base files form a cycle"):
        load_config(tmp_path / "x.yaml")
    (tmp_path / "bad.yaml").write_text("base: [a, b]\n")
    with pytest.raises(ConfigError, match="base must be the path of another config file"):
        load_config(tmp_path / "bad.yaml")
    (tmp_path / "gone.yaml").write_text("base: missing.yaml\n")
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "gone.yaml")


def test_the_no_filter_ablation_keeps_every_item():
    """configs/mmzero/nofilter-qwen3-vl-8b.yaml: the 8-GPU preset with both data
    filters opened (the original's MM-zero_noFilter run) and 10 steps per phase."""
    from pipelines.recipes.mmzero.rewards import codegen_keep, solver_keep

    full = load_config(ROOT / "configs/mmzero/qwen3-vl-8b-8gpu.yaml")
    ablation = load_config(ROOT / "configs/mmzero/nofilter-qwen3-vl-8b.yaml")
    m = ablation.mmzero
    assert ablation.model == full.model and ablation.placement == full.placement
    assert m.train_steps == 10 and full.mmzero.train_steps == 20
    assert all(codegen_keep(rate, *m.codegen_render_rate) for rate in (0.0, 0.1, 1.0))
    assert not codegen_keep(0.0, *full.mmzero.codegen_render_rate)
    assert solver_keep(0.0, 1.0, True, "7", m.solver_easy_min, tuple(m.solver_hard_range))
    assert not solver_keep(0.0, 1.0, True, "7", full.mmzero.solver_easy_min,
                           tuple(full.mmzero.solver_hard_range))
    assert not solver_keep(1.0, 0.5, True, None, m.solver_easy_min, tuple(m.solver_hard_range))
