"""YAML → :class:`~callcap.config.schema.Config`, with every problem located to a line.

Why nodes and not ``yaml.safe_load``: a loaded ``dict`` has forgotten where each value was
written, and it silently keeps the *last* of two duplicate keys (YAML 1.2 §3.2.1.1 forbids
duplicates, PyYAML does not enforce it). Composing gives nodes with marks, so every error is
``ConfigError(file, line, key.path, problem)`` rendered ``FILE:LINE: key.path: problem``.

Conversion is generic — it follows the dataclass type hints — so extending the schema is
declaring a field. Supported: ``int``, ``float`` (integers accepted), ``bool`` (only
``true``/``false``: YAML 1.1's ``yes``/``no``/``on``/``off`` are one typo away from a
country code), ``str``, ``Literal[...]`` of strings, ``tuple[T, ...]``, fixed
``tuple[A, B]``, ``X | None``, ``dict[str, T]`` (free-form keys such as header names,
duplicates compared case-insensitively), nested dataclasses (including tuples of them),
classes read from a string by their ``parse`` (:class:`Duration`, :class:`Network`), and
octal file modes (``metadata={"octal": True}``). Integers follow
YAML 1.2's core schema (``0640`` is 640; ``0o640`` and ``0x…`` are explicit) rather than
YAML 1.1's implicit octal, which surprises everyone who writes a port number with a leading
zero.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import types
import typing
from importlib import resources
from pathlib import Path
from typing import Any, Literal, NoReturn, TypeVar, get_args, get_origin

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from callcap.config.schema import Check, Config
from callcap.errors import ConfigError

T = TypeVar("T")

_Y = "tag:yaml.org,2002:"
_STR, _INT, _FLOAT, _BOOL, _NULL, _MERGE = (
    _Y + "str",
    _Y + "int",
    _Y + "float",
    _Y + "bool",
    _Y + "null",
    _Y + "merge",
)

_INT_RE = re.compile(r"[-+]?(?:0x[0-9a-fA-F]+|0o[0-7]+|0b[01]+|[0-9]+)")
_FLOAT_RE = re.compile(r"[-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][-+]?[0-9]+)?")
_MODE_RE = re.compile(r"(?:0o|0)?([0-7]{3})")
_MAX_SHOWN = 40
_MAX_NUMBER_TEXT = 64  # beyond, int() hits its digit limit; no setting needs it


def default_config_path() -> Path:
    """The ``default.yaml`` shipped inside the package: documentation that loads as defaults."""
    return Path(str(resources.files("callcap.config").joinpath("default.yaml")))


def load_config(path: str | os.PathLike[str] | None) -> Config:
    """Load and check a config file; ``None`` means the built-in defaults.

    Raises :class:`ConfigError` for an unreadable file, invalid UTF-8 or YAML, and every
    schema violation — never anything else, so a daemon reloading on SIGHUP can keep the
    running config on any error.
    """
    if path is None:
        return Config()
    name = os.fspath(path)
    try:
        data = Path(name).read_bytes()
    except OSError as exc:
        raise ConfigError(
            name, None, "", f"cannot read config file: {exc.strerror or exc}"
        ) from exc
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise ConfigError(
            name, line, "", f"not valid UTF-8 (byte 0x{data[exc.start]:02x})"
        ) from exc
    return load_config_text(text, source=name)


def load_config_text(text: str, source: str = "<string>") -> Config:
    """Load and check config text; ``source`` names it in errors and in ``Config.source``."""
    config = convert(Config, text, source)
    return dataclasses.replace(config, source=source)


def convert(cls: type[T], text: str, source: str = "<string>") -> T:
    """Build any schema dataclass ``cls`` from YAML text (an empty document gives ``cls()``).

    Public so schema extensions can be exercised on their own before they join
    :class:`Config`.
    """
    node = _compose(text, source)
    builder = _Builder(source)
    if node is None or _is_null(node):
        return builder.build(cls, None, "")
    if not isinstance(node, MappingNode):
        builder.fail(
            node, "", f"the top level must be a mapping of sections, got {_describe(node)}"
        )
    return builder.build(cls, node, "")


def _compose(text: str, source: str) -> Node | None:
    try:
        return yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else None
        problem = exc.problem or exc.context or "syntax error"
        if exc.context and exc.problem:
            problem = f"{problem} ({exc.context})"
        raise ConfigError(source, line, "", f"invalid YAML: {problem}") from exc
    except yaml.reader.ReaderError as exc:
        line = text.count("\n", 0, exc.position) + 1
        char = exc.character if isinstance(exc.character, int) else ord(exc.character)
        raise ConfigError(
            source, line, "", f"invalid YAML: unacceptable character #x{char:04x}"
        ) from exc
    except yaml.YAMLError as exc:
        raise ConfigError(source, None, "", f"invalid YAML: {exc}") from exc
    except RecursionError as exc:
        raise ConfigError(source, None, "", "invalid YAML: nested too deeply") from exc


def _is_null(node: Node) -> bool:
    return isinstance(node, ScalarNode) and node.tag == _NULL


def _shown(text: str) -> str:
    return text if len(text) <= _MAX_SHOWN else text[:_MAX_SHOWN] + "…"


def _describe(node: Node) -> str:
    """What was found, in the words an operator uses ("string 'abc'", "a list")."""
    if isinstance(node, MappingNode):
        return "a mapping"
    if isinstance(node, SequenceNode):
        return "a list"
    text = str(node.value)
    if node.tag == _NULL:
        return "nothing" if text in ("", "~") else "null"
    if node.tag == _BOOL:
        return f"boolean {text}" if text.lower() in ("true", "false") else repr(_shown(text))
    if node.tag == _INT:
        return f"integer {_shown(text)}"
    if node.tag == _FLOAT:
        return f"number {_shown(text)}"
    if node.tag == _STR:
        return f"string {_shown(text)!r}"
    kind = node.tag.removeprefix(_Y)
    if kind == "timestamp":
        kind = "date"
    return f"{kind} {_shown(text)!r}"


def _num(value: float) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _expected(tp: Any, meta: typing.Mapping[str, Any]) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin is tuple:
        args = get_args(tp)
        return (
            "a list" if len(args) == 2 and args[1] is Ellipsis else f"a list of {len(args)} items"
        )
    if isinstance(tp, type) and hasattr(tp, "EXPECTED"):
        return str(tp.EXPECTED)
    if origin is dict:
        return "a mapping"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    if tp is bool:
        return "true or false"
    if tp is int:
        return 'an octal file mode like "0640"' if meta.get("octal") else "an integer"
    if tp is float:
        return "a number"
    if tp is str:
        return "a string"
    return str(tp)


class _Builder:
    """Walks nodes alongside type hints; the first problem found raises."""

    def __init__(self, source: str) -> None:
        self.source = source
        self._hints: dict[type, dict[str, Any]] = {}

    def fail(self, node: Node, path: str, problem: str) -> NoReturn:
        raise ConfigError(self.source, node.start_mark.line + 1, path, problem)

    def mismatch(self, node: Node, tp: Any, path: str, meta: typing.Mapping[str, Any]) -> NoReturn:
        self.fail(node, path, f"expected {_expected(tp, meta)}, got {_describe(node)}")

    def hints(self, cls: type) -> dict[str, Any]:
        if cls not in self._hints:
            self._hints[cls] = typing.get_type_hints(cls)
        return self._hints[cls]

    def build(self, cls: type[T], node: Node | None, path: str) -> T:
        """A dataclass from a mapping; a missing or empty section means all defaults."""
        fields = {
            f.name: f
            for f in dataclasses.fields(cls)  # type: ignore[arg-type]
            if f.init and not f.metadata.get("internal")
        }
        required = [
            name
            for name, f in fields.items()
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        ]
        if node is None or _is_null(node):
            if required:
                where = node.start_mark.line + 1 if node is not None else 1
                key_path = f"{path}.{required[0]}" if path else required[0]
                raise ConfigError(self.source, where, key_path, "missing required key")
            return cls()
        if not isinstance(node, MappingNode):
            self.mismatch(node, cls, path, {})
        hints = self.hints(cls)
        seen: dict[str, int] = {}
        kwargs: dict[str, Any] = {}
        lines: dict[str, Node] = {}
        for key_node, value_node in node.value:
            if key_node.tag == _MERGE:
                self.fail(key_node, path, "merge keys (<<) are not supported; repeat the keys")
            if not isinstance(key_node, ScalarNode) or key_node.tag != _STR:
                where = path or "top level"
                self.fail(
                    key_node, path, f"keys must be names, got {_describe(key_node)} in {where}"
                )
            key = str(key_node.value)
            key_path = f"{path}.{key}" if path else key
            line = key_node.start_mark.line + 1
            if key in seen:
                self.fail(key_node, key_path, f"duplicate key (first set on line {seen[key]})")
            seen[key] = line
            if key not in fields:
                self.fail(key_node, key_path, _unknown(key, list(fields)))
            meta = fields[key].metadata
            value = self.convert(value_node, hints[key], key_path, meta)
            self.check(value_node, value, key_path, meta)
            if "unique" in meta:
                self._unique(value_node, value, key_path, meta["unique"])
            kwargs[key] = value
            lines[key] = key_node
        for name in required:
            if name not in kwargs:
                self.fail(node, f"{path}.{name}" if path else name, "missing required key")
        built = cls(**kwargs)
        problems = getattr(built, "config_problems", None)
        if problems is not None:
            for name, problem in problems():
                self.fail(lines.get(name, node), f"{path}.{name}" if path else name, problem)
        return built

    def _unique(self, node: Node, items: tuple[Any, ...], path: str, attr: str) -> None:
        """No two items share ``attr``; the error names the repeat and where the first is."""
        first: dict[object, int] = {}
        for i, (item, item_node) in enumerate(zip(items, node.value, strict=True)):
            value = getattr(item, attr)
            if value in first:
                where = item_node
                for key_node, _value_node in item_node.value:
                    if key_node.value == attr:
                        where = key_node
                self.fail(
                    where,
                    f"{path}[{i}].{attr}",
                    f"{value!r} is already the {attr} of {path}[{first[value]}]; "
                    f"{attr}s must be unique",
                )
            first[value] = i

    def _dict(self, node: Node, tp: Any, path: str) -> dict[str, Any]:
        """A mapping of free-form string keys (header names) to values of one type."""
        key_tp, value_tp = get_args(tp)
        if key_tp is not str:
            raise TypeError(f"unsupported config type {tp!r} at {path}")
        if not isinstance(node, MappingNode):
            self.fail(node, path, f"expected a mapping, got {_describe(node)}")
        out: dict[str, Any] = {}
        seen: dict[str, int] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, ScalarNode) or key_node.tag != _STR:
                self.fail(key_node, path, f"keys must be names, got {_describe(key_node)}")
            key = str(key_node.value)
            key_path = f"{path}.{key}"
            folded = key.lower()
            if folded in seen:
                self.fail(key_node, key_path, f"duplicate key (first set on line {seen[folded]})")
            seen[folded] = key_node.start_mark.line + 1
            out[key] = self.convert(value_node, value_tp, key_path, {})
        return out

    def convert(self, node: Node, tp: Any, path: str, meta: typing.Mapping[str, Any]) -> Any:
        origin = get_origin(tp)
        if origin is typing.Union or origin is types.UnionType:
            args = get_args(tp)
            if type(None) in args and _is_null(node):
                return None
            rest = [a for a in args if a is not type(None)]
            if len(rest) != 1:
                raise TypeError(f"unsupported config type {tp!r} at {path}")
            return self.convert(node, rest[0], path, meta)
        if origin is tuple:
            return self._tuple(node, tp, path, meta)
        if origin is Literal:
            choices = get_args(tp)
            if not isinstance(node, ScalarNode) or node.tag != _STR:
                self.mismatch(node, tp, path, meta)
            if node.value not in choices:
                close = difflib.get_close_matches(node.value, [str(c) for c in choices], n=1)
                hint = f" (did you mean {close[0]}?)" if close else ""
                self.fail(node, path, f"must be {_expected(tp, meta)}, got {node.value!r}{hint}")
            return node.value
        if origin is dict:
            return self._dict(node, tp, path)
        if isinstance(tp, type) and hasattr(tp, "EXPECTED") and hasattr(tp, "parse"):
            # a class may take a plain whole number as its text too (``reserve: 0`` is a size)
            tags = (_STR, _INT) if getattr(tp, "TAKES_INTEGERS", False) else (_STR,)
            if not isinstance(node, ScalarNode) or node.tag not in tags:
                self.fail(node, path, f"expected {tp.EXPECTED}, got {_describe(node)}")
            try:
                return tp.parse(node.value)
            except ValueError as exc:
                self.fail(node, path, str(exc))
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            return self.build(tp, node, path)
        if not isinstance(node, ScalarNode):
            self.mismatch(node, tp, path, meta)
        text = str(node.value)
        if tp in (int, float) and len(text) > _MAX_NUMBER_TEXT:
            self.fail(node, path, f"number too long ({len(text)} characters): {_shown(text)}")
        if tp is bool:
            if node.tag == _BOOL and text.lower() in ("true", "false"):
                return text.lower() == "true"
            self.mismatch(node, tp, path, meta)
        if tp is int and meta.get("octal"):
            match = _MODE_RE.fullmatch(text) if node.tag in (_STR, _INT) else None
            if match is None:
                self.mismatch(node, tp, path, meta)
            return int(match.group(1), 8)
        if tp is int:
            # PyYAML's YAML 1.1 resolver leaves "0o17" a string; a plain scalar is a number.
            plain = node.tag == _INT or (node.tag == _STR and node.style is None)
            if not plain or _INT_RE.fullmatch(text.replace("_", "")) is None:
                self.mismatch(node, tp, path, meta)
            return int(text.replace("_", ""), 0 if re.search(r"0[xob]", text) else 10)
        if tp is float:
            return self._float(node, tp, path, meta)
        if tp is str:
            if node.tag != _STR:
                self.fail(
                    node,
                    path,
                    f"expected a string, got {_describe(node)} (quote it if it is meant as text)",
                )
            return text
        raise TypeError(f"unsupported config type {tp!r} at {path}")

    def _tuple(self, node: Node, tp: Any, path: str, meta: typing.Mapping[str, Any]) -> Any:
        args = get_args(tp)
        if not isinstance(node, SequenceNode):
            self.mismatch(node, tp, path, meta)
        items: list[Node] = node.value
        if len(args) == 2 and args[1] is Ellipsis:
            types_ = [args[0]] * len(items)
        else:
            if len(items) != len(args):
                self.fail(node, path, f"expected a list of {len(args)} items, got {len(items)}")
            types_ = list(args)
        return tuple(
            self.convert(item, item_tp, f"{path}[{i}]", {})
            for i, (item, item_tp) in enumerate(zip(items, types_, strict=True))
        )

    def _float(self, node: ScalarNode, tp: Any, path: str, meta: typing.Mapping[str, Any]) -> float:
        text = str(node.value).replace("_", "")
        if node.tag == _INT and _INT_RE.fullmatch(text):
            return float(int(text, 0 if re.search(r"0[xob]", text) else 10))
        # PyYAML's YAML 1.1 resolver leaves "1e3" a string; a plain scalar is still a number.
        plain_number = node.tag == _STR and node.style is None and _FLOAT_RE.fullmatch(text)
        if node.tag == _FLOAT or plain_number:
            lowered = text.lower().lstrip("+-")
            if lowered in (".inf", ".nan"):
                self.fail(node, path, f"must be a finite number, got {node.value}")
            if _FLOAT_RE.fullmatch(text):
                value = float(text)
                if math.isfinite(value):
                    return value
                self.fail(node, path, f"must be a finite number, got {_shown(node.value)}")
        return self.mismatch(node, tp, path, meta)

    def check(self, node: Node, value: Any, path: str, meta: typing.Mapping[str, Any]) -> None:
        """Apply the field's ``check`` rule; a range on a tuple applies to each element."""
        rules = meta.get("check")
        if rules is None or value is None:
            return
        for rule in rules if isinstance(rules, list) else [rules]:
            self._check_one(node, value, path, rule)

    def _check_one(self, node: Node, value: Any, path: str, rule: Check) -> None:
        if callable(rule):
            problem = rule(value)
            if problem is not None:
                self.fail(node, path, problem)
            return
        if isinstance(value, tuple):
            for i, (item, item_node) in enumerate(zip(value, node.value, strict=True)):
                self._range(item_node, item, f"{path}[{i}]", rule)
            return
        self._range(node, value, path, rule)

    def _range(self, node: Node, value: float, path: str, rule: tuple[Any, Any]) -> None:
        low, high = rule
        if (low is None or value >= low) and (high is None or value <= high):
            return
        if low is not None and high is not None:
            problem = f"must be between {_num(low)} and {_num(high)}"
        elif low is not None:
            problem = f"must be at least {_num(low)}"
        else:
            problem = f"must be at most {_num(high)}"
        self.fail(node, path, f"{problem}, got {_num(value)}")


def _unknown(key: str, known: list[str]) -> str:
    close = difflib.get_close_matches(key, known, n=1)
    if close:
        return f"unknown key (did you mean {close[0]}?)"
    return "unknown key (expected one of: " + ", ".join(known) + ")"
