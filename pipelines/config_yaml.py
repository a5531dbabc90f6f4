"""Reading config files that may be wrong or hostile, and saying so in one line.

A config file is read only if it is a regular file of at most MAX_FILE_BYTES;
YAML is parsed with a loader that refuses duplicate keys, unknown tags and
alias expansion past MAX_EXPANDED or nesting past MAX_DEPTH; every message
echoes user input cut to MAX_ECHO characters and is one printable line of at
most MAX_MESSAGE characters (``ConfigError``).
"""

from __future__ import annotations

import copy
import stat
from dataclasses import field, is_dataclass
from pathlib import Path
from typing import Any

import yaml

MAX_FILE_BYTES = 1 << 20  # a config file is a few KiB; more is a wrong file
MAX_DEPTH = 100  # nesting levels of a YAML value; configs use about 5
MAX_EXPANDED = 4 * MAX_FILE_BYTES  # values + characters of a document with aliases expanded
MAX_ECHO = 80  # characters of a user value repeated in a message
MAX_MESSAGE = 1000


class ConfigError(ValueError):
    """A user error in a configuration: the message names the field and the fix.

    The message is made one printable line of at most MAX_MESSAGE characters, whoever raises
    it: messages echo user input (keys, values, file names), and the CLI prints them as one
    line on a terminal.
    """

    def __init__(self, message: str) -> None:
        super().__init__(_clip(_printable(message), MAX_MESSAGE))


# --------------------------------------------------------------------------
# Reading YAML that may be wrong or hostile
# --------------------------------------------------------------------------


def load_file(path: Path) -> dict:
    """The top-level mapping of a YAML config file."""
    loaded = parse_yaml(_read_text(path), str(path))
    if loaded is not None and not isinstance(loaded, dict):
        raise ConfigError(f"{path}: the top level must be a mapping, got {type(loaded).__name__}")
    return loaded or {}


def _read_text(path: Path) -> str:
    """The text of a config file, checking what the path is before reading it.

    A FIFO would block the read forever and a device or a huge file would fill memory, so the
    type comes first and the read is capped; a binary file gets a message, not a traceback.
    """
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except (OSError, ValueError) as err:  # ValueError: a NUL character in the path
        raise _unreadable(path, err) from None
    if stat.S_ISDIR(mode):
        raise ConfigError(f"{path}: is a directory, not a config file")
    if not stat.S_ISREG(mode):
        raise ConfigError(f"{path}: is not a regular file (a FIFO, socket or device?)")
    try:
        with path.open("rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)
    except OSError as err:
        raise _unreadable(path, err) from None
    if len(data) > MAX_FILE_BYTES:
        raise ConfigError(f"{path}: larger than {MAX_FILE_BYTES >> 20} MiB, "
                          f"the limit of a config file; is it the right file?")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text (byte 0x{data[err.start]:02x} at offset "
                          f"{err.start}); is it a binary file?") from None


def _unreadable(path: Path, err: Exception) -> ConfigError:
    reason = getattr(err, "strerror", None) or err  # "Permission denied", not "[Errno 13] ..."
    return ConfigError(f"{path}: cannot read the config file: {reason}")


def parse_yaml(text: str, where: str) -> Any:
    """``yaml.safe_load`` through _ConfigLoader; any failure is a ConfigError naming ``where``."""
    try:
        loader = _ConfigLoader(text)
        try:
            return loader.get_single_data()
        finally:
            loader.dispose()
    except yaml.YAMLError as err:
        raise ConfigError(f"{where}: {_yaml_problem(err, text)}") from None
    except RecursionError:  # a safety net: _ConfigLoader caps the depth long before
        raise ConfigError(f"{where}: nested too deeply") from None


def _yaml_problem(err: yaml.YAMLError, text: str) -> str:
    """A PyYAML error as 'line L, column C: problem', without its multi-line source excerpt."""
    if isinstance(err, yaml.reader.ReaderError):  # raised for the whole text, before parsing
        line = text.count("\n", 0, err.position) + 1
        column = err.position - (text.rfind("\n", 0, err.position) + 1) + 1
        hint = " (is it a binary file?)" if err.character == 0 else ""
        return (f"line {line}, column {column}: control character {chr(err.character)!r} "
                f"is not allowed{hint}")
    if isinstance(err, yaml.MarkedYAMLError):
        mark = err.problem_mark or err.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        return where + ", ".join(p for p in (err.context, err.problem) if p)
    return str(err)


_MERGE_TAG = "tag:yaml.org,2002:merge"


def _short_tag(tag: str) -> str:
    return _clip(tag.replace("tag:yaml.org,2002:", "!!"), MAX_ECHO)


class _ConfigLoader(yaml.SafeLoader):
    """``yaml.safe_load``'s loader, hardened against files a person got wrong or crafted.

    PyYAML's composer recurses once per nesting level (a value thousands deep is a
    RecursionError), keeps the last of duplicate keys silently, shares aliased values (a
    'billion laughs' loads in microseconds, then every later walk or message about it takes
    forever), and lets a scalar constructor's ValueError escape without a position. This loader
    caps the depth while composing, refuses duplicate keys, checks the expanded size before
    constructing, and turns every failure into a YAMLError with a line and column.
    """

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self._depth = 0

    def compose_node(self, parent, index):
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise yaml.composer.ComposerError(
                    None, None, f"nested deeper than {MAX_DEPTH} levels",
                    self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def compose_mapping_node(self, anchor):
        node = super().compose_mapping_node(anchor)
        _refuse_duplicate_keys(node)
        return node

    def compose_document(self):
        node = super().compose_document()
        _refuse_expansion(node)
        return node

    def construct_object(self, node, deep=False):
        try:
            return super().construct_object(node, deep=deep)
        except (ValueError, LookupError, AttributeError, TypeError) as err:
            # PyYAML's constructors fail in many ways on a value that does not fit its tag:
            # ValueError (2024-13-01, an int of 5000 digits), and for explicit tags
            # AttributeError (!!timestamp x), IndexError (!!float ""), KeyError (!!bool x).
            reason = f": {_clip(str(err), MAX_ECHO)}" if isinstance(err, ValueError) else ""
            raise yaml.constructor.ConstructorError(
                None, None, f"invalid {_short_tag(node.tag)} value {show(node.value)}{reason}",
                node.start_mark) from None

    def construct_undefined(self, node):
        raise yaml.constructor.ConstructorError(
            None, None, f"tag {_short_tag(node.tag)} is not allowed: a config holds plain "
            "YAML values (mappings, lists, strings, numbers, booleans)", node.start_mark)


_ConfigLoader.add_constructor(None, _ConfigLoader.construct_undefined)


def _refuse_duplicate_keys(node: yaml.MappingNode) -> None:
    """YAML forbids a key twice in a mapping; PyYAML would keep the last one silently."""
    first: dict[tuple[str, str], yaml.Mark] = {}
    for key, _ in node.value:
        if isinstance(key, yaml.ScalarNode) and key.tag != _MERGE_TAG:
            seen = first.setdefault((key.tag, key.value), key.start_mark)
            if seen is not key.start_mark:
                raise yaml.composer.ComposerError(
                    None, None, f"duplicate key {show(key.value)} (first at line "
                    f"{seen.line + 1}, column {seen.column + 1})", key.start_mark)


def _refuse_expansion(root: yaml.Node) -> None:
    """Refuse aliases that expand the document past MAX_EXPANDED or MAX_DEPTH, or into itself.

    Each node's expanded size (values + characters) and height are computed once, so a
    billion laughs is measured in as many steps as it has nodes in the file. An alias always
    follows its anchor, so the walk meets a node first where it is written: the recursion is
    no deeper than the composer's (capped), and an alias to a node still being walked is one
    inside that node, a value that contains itself.
    """
    measured: dict[int, tuple[int, int]] = {}
    walking: set[int] = set()

    def measure(node: yaml.Node) -> tuple[int, int]:
        if id(node) in measured:
            return measured[id(node)]
        if id(node) in walking:
            raise yaml.composer.ComposerError(
                None, None, "this value contains itself through an alias", node.start_mark)
        size, height = 1, 1
        if isinstance(node, yaml.ScalarNode):
            size += len(node.value)
        else:
            walking.add(id(node))
            pairs = node.value if isinstance(node, yaml.MappingNode) else [(n,) for n in node.value]
            for child in (n for pair in pairs for n in pair):
                child_size, child_height = measure(child)
                size, height = size + child_size, max(height, child_height + 1)
            walking.discard(id(node))
        if size > MAX_EXPANDED or height > MAX_DEPTH:
            limit = (f"past {MAX_EXPANDED:,} values and characters" if size > MAX_EXPANDED
                     else f"deeper than {MAX_DEPTH} levels")
            raise yaml.composer.ComposerError(
                None, None, f"aliases expand this value {limit} (a 'billion laughs'?)",
                node.start_mark)
        measured[id(node)] = size, height
        return size, height

    measure(root)


# --------------------------------------------------------------------------
# Echoing user input in messages
# --------------------------------------------------------------------------


def show(value: Any) -> str:
    """``repr(value)`` cut to MAX_ECHO characters: a message repeats a value, not a file."""
    return _clip(repr(value), MAX_ECHO)


def key_name(key: Any) -> str:
    """A user's key inside a field path: itself when short and printable, else cut like a value."""
    text = str(key)
    return text if len(text) <= MAX_ECHO and text.isprintable() else show(text)


def _clip(text: str, limit: int) -> str:
    """``text``, or as much as fits in ``limit`` characters followed by '... (N characters)'."""
    if len(text) <= limit:
        return text
    more = f"... ({len(text)} characters)"
    return text[:limit - len(more)] + more


def _printable(text: str) -> str:
    """``text`` with newlines and other control characters escaped as ``repr`` would."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def param(default: Any, doc: str, *, gt=None, ge=None, lt=None, le=None) -> Any:
    """A documented dataclass field with an optional numeric range.

    ``doc`` is shown by ``coevolve config show --doc``; the bounds are checked
    on load. Mutable defaults (lists, dicts, dataclasses) are copied per
    instance.
    """
    meta = {"doc": doc, "gt": gt, "ge": ge, "lt": lt, "le": le}
    if isinstance(default, (list, dict)) or is_dataclass(default):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return field(default=default, metadata=meta)
