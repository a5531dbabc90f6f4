"""Malformed and hostile configs: one line on stderr, exit status 2, never a traceback.

Each class of bad input (YAML syntax, unsafe tags, deep nesting, NUL bytes, binary files,
directories, FIFOs, duplicate keys, non-finite numbers, alias bombs) goes through
``coevolve config show`` and must name the file or the field and the problem; a fuzz test
checks that nothing else than ConfigError escapes ``load_config``.
"""

from __future__ import annotations

import dataclasses
import os
import re
import time
import typing

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from pipelines.cli import main
from pipelines.config import Config, ConfigError, load_config
from pipelines.config_yaml import MAX_MESSAGE


def config_show(capsys, *args: str) -> str:
    """The one-line error of ``coevolve config show ARGS``, which must exit with status 2."""
    status = main(["config", "show", *args])
    out, err = capsys.readouterr()
    assert status == 2 and out == ""
    assert err.startswith("coevolve: error: ") and err.endswith("\n")
    assert len(err.splitlines()) == 1, err
    return err


def alias_bomb(levels: int = 9) -> str:
    """A flow-style 'billion laughs': 9 ** levels strings from a few hundred characters."""
    items = ['&l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for i in range(1, levels + 1):
        items.append(f"&l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]")
    return "[" + ", ".join(items) + "]"


@pytest.mark.parametrize("text, problem", [
    ("trainer:\n  lr: [1e-6,\n",
     "line 3, column 1: while parsing a flow node, expected the node content"),
    ("trainer:\n  lr: 1\n lora: {}\n",
     "line 3, column 2: while parsing a block mapping, expected <block end>"),
    ("run: !!python/object/apply:os.system ['echo pwned']\n",
     "line 1, column 6: tag !!python/object/apply:os.system is not allowed"),
    ("trainer:\n  betas: " + "[" * 5000 + "]" * 5000 + "\n",
     "line 2, column 108: nested deeper than 100 levels"),
    ("run:\n  name: a\x00b\n", "line 2, column 10: control character '\\x00' is not allowed"),
    ("trainer:\n  lr: 1e-5\n  lr: 2e-5\n",
     "line 3, column 3: duplicate key 'lr' (first at line 2, column 3)"),
    ("trainer:\n  betas: &b [0.9, *b]\n", "line 2, column 10: this value contains itself"),
    ("run:\n  seed: 2024-13-01\n", "line 2, column 9: invalid !!timestamp value '2024-13-01'"),
    ("a: 1\n---\nb: 2\n", "line 2, column 1: expected a single document in the stream"),
], ids=["syntax", "indentation", "unsafe-tag", "deep-nesting", "nul-byte", "duplicate-key",
        "recursive-alias", "bad-timestamp", "two-documents"])
def test_malformed_yaml_files_name_the_file_line_and_problem(capsys, tmp_path, text, problem):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    assert f"coevolve: error: {path}: {problem}" in config_show(capsys, str(path))


def test_alias_bomb_is_refused_quickly_with_a_short_message(capsys, tmp_path):
    path = tmp_path / "bomb.yaml"
    path.write_text(f"trainer:\n  betas: {alias_bomb()}\n")
    start = time.perf_counter()
    err = config_show(capsys, str(path))
    assert time.perf_counter() - start < 2
    assert len(err) < 500 and str(path) in err and "aliases expand this value past" in err
    # the same in an override
    start = time.perf_counter()
    err = config_show(capsys, f"trainer.betas={alias_bomb()}")
    assert time.perf_counter() - start < 2
    assert len(err) < 500 and "override trainer.betas: line 1, column" in err


def test_binary_and_oversized_files_name_the_file(capsys, tmp_path):
    binary = tmp_path / "model.safetensors"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe" + bytes(range(256)))
    assert (f"{binary}: not UTF-8 text (byte 0x89 at offset 0); is it a binary file?"
            in config_show(capsys, str(binary)))
    huge = tmp_path / "huge.yaml"
    huge.write_text("# " + "x" * (1 << 20) + "\n")
    assert f"{huge}: larger than 1 MiB" in config_show(capsys, str(huge))


def test_directories_fifos_and_missing_files_are_told_apart(capsys, tmp_path):
    assert f"{tmp_path}: is a directory" in config_show(capsys, str(tmp_path))
    missing = tmp_path / "missing.yaml"
    assert f"{missing}: config file not found" in config_show(capsys, str(missing))
    if not hasattr(os, "mkfifo"):
        pytest.skip("no FIFOs on this platform")
    fifo = tmp_path / "fifo.yaml"
    os.mkfifo(fifo)  # reading it would block forever: it must be refused before
    assert f"{fifo}: is not a regular file" in config_show(capsys, str(fifo))


@pytest.mark.parametrize("override, problem", [
    ("trainer.betas=[0.9,", "override trainer.betas: line 1, column 6: while parsing a flow"),
    ("trainer.lr=!!python/object/apply:os.system ['echo pwned']",
     "override trainer.lr: line 1, column 1: tag !!python/object/apply:os.system is not allowed"),
    ("trainer.betas=" + "[" * 5000 + "]" * 5000,
     "override trainer.betas: line 1, column 101: nested deeper than 100 levels"),
    ("run.name=a\x00b", "override run.name: line 1, column 2: control character '\\x00'"),
    ("trainer.lora={rank: 4, rank: 8}",
     "override trainer.lora: line 1, column 11: duplicate key 'rank'"),
    ("run.seed=" + "1" * 5000, "override run.seed: line 1, column 1: invalid !!int value '111"),
    ("trainer.lr=1" + "0" * 400, "trainer.lr: 1000"),
], ids=["syntax", "unsafe-tag", "deep-nesting", "nul-byte", "duplicate-key", "huge-int",
        "float-overflow"])
def test_malformed_overrides_name_the_field_and_problem(capsys, override, problem):
    assert problem in config_show(capsys, override)


def test_echoed_values_and_keys_are_cut_to_one_short_line(capsys):
    err = config_show(capsys, "run.seed=" + "x" * 5000)
    assert "run.seed: expected an integer, got 'xxx" in err and "... (5002 characters)" in err
    assert len(err) < 200
    err = config_show(capsys, "trainer.l\nr" + "r" * 5000 + "=1")
    assert "unknown key in trainer" in err and "characters)" in err
    assert len(err) < 400


def float_fields(cls: type = Config, prefix: str = "") -> list[tuple[str, bool]]:
    """Dotted paths of every float field of the schema, and whether it is a list of floats."""
    found = []
    for f in dataclasses.fields(cls):
        tp, path = typing.get_type_hints(cls)[f.name], prefix + f.name
        if dataclasses.is_dataclass(tp):
            found += float_fields(tp, path + ".")
        elif tp == list[float]:
            found.append((path, True))
        elif float in (tp, *typing.get_args(tp)):
            found.append((path, False))
    return found


@pytest.mark.parametrize("literal", [".inf", "-.inf", ".nan", "inf", "nan", "1e999"])
def test_every_float_field_refuses_non_finite_numbers(literal):
    fields = float_fields()
    assert ("trainer.lr", False) in fields and ("trainer.betas", True) in fields
    for path, is_list in fields:
        override = f"{path}=[0.5, {literal}]" if is_list else f"{path}={literal}"
        field = f"{path}[1]" if is_list else path
        with pytest.raises(ConfigError, match=f"^{re.escape(field)}: must be a finite number"):
            load_config(None, [override])
    with pytest.raises(ConfigError, match="placement.phases.solver.gpu_memory_utilization: must "
                                          "be a finite number"):
        load_config(None, [f"placement.phases.solver.gpu_memory_utilization={literal}"])


def test_non_finite_number_in_a_file_names_the_field(capsys, tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("trainer:\n  lr: .inf\n")
    assert "trainer.lr: must be a finite number, got inf" in config_show(capsys, str(path))


# --------------------------------------------------------------------------
# Fuzzing: anything either loads or is a one-line ConfigError
# --------------------------------------------------------------------------

def field_names(cls: type = Config) -> set[str]:
    """Every field name of the schema, at any depth (dict values such as roles included)."""
    names = set()
    for f in dataclasses.fields(cls):
        names.add(f.name)
        tp = typing.get_type_hints(cls)[f.name]
        for inner in (tp, *typing.get_args(tp)):
            if dataclasses.is_dataclass(inner):
                names |= field_names(inner)
    return names


NAMES = sorted(field_names() | {"proposer", "codegen", "solver"})
# Pieces of YAML that reach deep into the loader; random text alone rarely does.
PIECES = [":", ": ", "\n", "  ", "- ", "[", "]", "{", "}", ", ", "&a ", "*a", "<<: ", "? ",
          "!!python/object/apply:os.system ", "!!binary ", "!!timestamp ", "!!int ", "!!float ",
          "!!bool ", "!!set ", "!custom ", ".inf", "-.nan", "1e999", "0x1f", "1", "-1", "0.5",
          "2", "true", "null", "~", "2024-13-01", "'", '"', "|", ">", "#", "---\n", "...\n",
          "%YAML 1.1\n", "\t", "\x00", "\\", "\ufeff", "é"]
yaml_text = st.lists(st.sampled_from(PIECES + NAMES) | st.text(max_size=4), max_size=40).map(
    "".join)
# Well-formed YAML with schema keys and values of any type: reaches the typed validation.
values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8) | yaml_text,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(NAMES), inner,
                                                                 max_size=3),
    max_leaves=12)
sections = st.dictionaries(st.sampled_from(NAMES), values, max_size=4) | values
documents = st.dictionaries(st.sampled_from([f.name for f in dataclasses.fields(Config)]),
                            sections, max_size=4).map(yaml.safe_dump)
file_bytes = st.one_of(yaml_text, documents).map(str.encode) | st.binary(max_size=200)
keys = st.lists(st.sampled_from(NAMES) | st.text(max_size=3), min_size=1, max_size=4)
override = st.builds(lambda k, v: f"{'.'.join(k)}={v}", keys, yaml_text) | st.text()


@settings(deadline=None, derandomize=True, max_examples=200, database=None)
@given(content=file_bytes, overrides=st.lists(override, max_size=3))
def test_fuzz_loads_or_raises_a_one_line_config_error(tmp_path_factory, content, overrides):
    path = tmp_path_factory.getbasetemp() / "fuzz.yaml"
    path.write_bytes(content)
    try:
        load_config(path, overrides)
    except ConfigError as err:
        message = str(err)
        assert message.isprintable() and len(message) <= MAX_MESSAGE, message
