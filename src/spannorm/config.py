"""Configuration plumbing: user-facing errors, enum/field coercion, YAML presets, ``--set`` overrides.

Every config is a dataclass whose fields carry their doc (:func:`option`). Values are validated once, at the
edge: an invalid value raises :class:`ConfigError` naming the field, the value and what is
valid. Unknown keys are errors that list the valid ones.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import math
import os
import re
import select
import stat
import textwrap
import time
import types
import typing
from pathlib import Path
from typing import Any

import yaml


class SpannormError(Exception):
    """An error caused by user input; the CLI prints it on one line and exits with code 2."""


class ConfigError(SpannormError, ValueError):
    """An invalid configuration value."""


def short(value, limit: int = 60) -> str:
    """``repr(value)``, cut to ``limit`` characters (a value echoed in an error may be huge)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def invalid(field: str, value: Any, valid: str) -> ConfigError:
    return ConfigError(f"{field}={short(value)} is invalid: expected {valid}")


def require(ok: bool, field: str, value: Any, valid: str) -> None:
    """Raise a ConfigError naming ``field`` and ``value`` unless ``ok``."""
    if not ok:
        raise invalid(field, value, valid)


def coerce_enum(enum_cls: type[enum.Enum], field: str, value: Any) -> enum.Enum:
    """Turn a string (or enum member) into a member of ``enum_cls``; never fall back silently."""
    if isinstance(value, enum_cls):
        return value
    names = [m.value for m in enum_cls]
    if isinstance(value, str) and value in names:
        return enum_cls(value)
    raise invalid(field, value, "one of " + ", ".join(names))


def _coerce(tp: Any, field: str, value: Any) -> Any:
    """Check/convert one YAML value against a dataclass field type."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(args[0], field, value)
    if tp is Any:  # checked by the dataclass itself (its __post_init__)
        return value
    if origin is list:  # list[T]: each item a T, named field[i]
        require(isinstance(value, list), field, value, "a list")
        (item,) = typing.get_args(tp)
        return [_coerce(item, f"{field}[{i}]", v) for i, v in enumerate(value)]
    if origin is dict:  # dict[str, T]: each value a T, named field.key
        require(isinstance(value, dict), field, value, "a mapping")
        _, item = typing.get_args(tp)
        for key in value:
            require(isinstance(key, str), f"{field} key", key, "a string")
        return {key: _coerce(item, f"{field}.{key}", v) for key, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, field)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return coerce_enum(tp, field, value)
    if tp is bool:
        require(isinstance(value, bool), field, value, "true or false")
        return value
    if tp is int:
        require(isinstance(value, int) and not isinstance(value, bool), field, value, "an integer")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        require(ok, field, value, "a number")
        return float(value)
    if tp is str:
        require(isinstance(value, str), field, value, "a string")
        return value
    raise TypeError(f"unsupported config type {tp!r} for {field}")  # a bug, not user input


DEVICE_FORMS = "auto, cpu, cuda or cuda:N"


def valid_device(spec) -> bool:
    """Whether ``spec`` is a device setting: auto, cpu, cuda or cuda:N (N a device index, at most 4 digits)."""
    return isinstance(spec, str) and re.fullmatch(r"auto|cpu|cuda(:\d{1,4})?", spec) is not None


class Bound(typing.NamedTuple):
    """What a config field's value must be (``ok``) and the words an error names it with (``valid``)."""

    ok: typing.Callable[[Any], bool]
    valid: str


def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


BOOL = Bound(lambda v: isinstance(v, bool), "true or false")
POSITIVE_INT = Bound(lambda v: is_int(v) and v > 0, "a positive integer")
POSITIVE_NUMBER = Bound(lambda v: is_number(v) and v > 0, "a positive number")


def int_at_least(low: int, valid: str | None = None) -> Bound:
    return Bound(lambda v: is_int(v) and v >= low, valid or f"an integer >= {low}")


def number_in(interval: str, low: float, high: float, low_open: bool = False, high_open: bool = False) -> Bound:
    """A number in ``interval`` (its text: "[0, 1)"), from ``low`` to ``high``, each end open or closed."""

    def ok(v) -> bool:
        return is_number(v) and (low < v if low_open else low <= v) and (v < high if high_open else v <= high)

    return Bound(ok, f"a number in {interval}")


def option(
    default: Any = dataclasses.MISSING, doc: str = "", bound: Bound | None = None, *, factory: Any = dataclasses.MISSING
) -> Any:
    """A config field declared with its doc and, where it has one, its bound (dataclass field metadata):
    ``spannorm config show`` and the CLI's help print the doc, :func:`check_bounds` applies the bound."""
    return dataclasses.field(default=default, default_factory=factory, metadata={"doc": doc, "bound": bound})


def check_bounds(obj: Any, prefix: str) -> None:
    """Refuse, in one line, the first field of a config dataclass whose value is out of its declared bound."""
    for f in dataclasses.fields(obj):
        if (bound := f.metadata.get("bound")) is not None:
            value = getattr(obj, f.name)
            require(bound.ok(value), f"{prefix}.{f.name}", value, bound.valid)


def described(obj: Any, prefix: str = "") -> list[tuple[str, Any, str]]:
    """(key, value, doc) of every field of a config dataclass, nested sections flattened (``model.d_model``)."""
    rows = []
    for f in dataclasses.fields(obj):
        key, value = f"{prefix}{f.name}", getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            rows += described(value, key + ".")
        else:
            rows.append((key, to_dict(value), f.metadata.get("doc", "")))
    return rows


def commented_yaml(obj: Any, indent: int = 0) -> str:
    """A config dataclass as the YAML ``--config`` reads back, each field under its doc (as comments)."""
    pad, lines = "  " * indent, []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        lines += [f"{pad}# {line}" for line in textwrap.wrap(f.metadata.get("doc", ""), 118 - len(pad))]
        if dataclasses.is_dataclass(value):
            lines += [f"{pad}{f.name}:", commented_yaml(value, indent + 1)]
        else:  # (a one-element flow list, unwrapped: the scalar or list as YAML writes it inline)
            inline = yaml.safe_dump([to_dict(value)], default_flow_style=True, width=math.inf).strip()[1:-1]
            lines.append(f"{pad}{f.name}: {inline}")
    return "\n".join(lines)


def from_dict(cls: type, data: Any, prefix: str) -> Any:
    """Build dataclass ``cls`` from a mapping, checking keys and value types. ``prefix`` names the mapping in
    errors (``model``: model.n_layers); "" for a top-level mapping, whose keys are named as they are. A field
    without a default is a required key."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise invalid(prefix, data, "a mapping of " + ", ".join(f.name for f in dataclasses.fields(cls)))
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    required = [
        f.name
        for f in dataclasses.fields(cls)
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]

    def name(key: str) -> str:
        return f"{prefix}.{key}" if prefix else key

    for key in data:
        if key not in names:
            raise ConfigError(f"unknown key {name(key)}; valid keys: " + ", ".join(name(n) for n in names))
    for key in required:
        if key not in data:
            raise ConfigError(f"missing key {name(key)}; required keys: " + ", ".join(name(n) for n in required))
    return cls(**{key: _coerce(hints[key], name(key), value) for key, value in data.items()})


def to_dict(obj: Any) -> Any:
    """A dataclass as plain YAML-safe data (enums become their string values; lists and dicts are copied)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, list):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


# --- the old flat keys ----------------------------------------------------------------------

# a key from before the option groups (issue 27) -> its key in its group now. Config files, presets, --set, study
# files, saved runs and exported folders written with the old keys are read through this table (upgrade_config,
# upgrade_key); nothing is written with them. (An old key that names a group now, train.guard, is the old key
# where its value is not a mapping.)
LEGACY_KEYS = {
    "model.dyt_alpha0": "model.dyt.alpha0",
    "model.dyt_recipe": "model.dyt.recipe",
    "model.dyt_alpha0_attn": "model.dyt.alpha0_attn",
    "model.dyt_alpha0_other": "model.dyt.alpha0_other",
    "model.span_scale": "model.span.scale",
    "model.span_c": "model.span.c",
    "model.n_experts": "model.moe.n_experts",
    "model.top_k": "model.moe.top_k",
    "model.n_shared_experts": "model.moe.n_shared_experts",
    "model.expert_d_ff": "model.moe.expert_d_ff",
    "model.capacity_factor": "model.moe.capacity_factor",
    "model.moe_aux_coef": "model.moe.aux_coef",
    "model.moe_z_coef": "model.moe.z_coef",
    "train.guard": "train.guard.enabled",  # (before the other guard keys: they go into the mapping it becomes)
    "train.guard_skip_limit": "train.guard.skip_limit",
    "train.guard_spike_z": "train.guard.spike_z",
    "train.guard_window": "train.guard.window",
    "train.guard_lr_factor": "train.guard.lr_factor",
    "train.guard_max_rollbacks": "train.guard.max_rollbacks",
}
_OLD_KEYS = {new: old for old, new in LEGACY_KEYS.items()}


def upgrade_key(key: str) -> str:
    """A config key as it is now: an old flat one (``model.span_scale``) is its group's (``model.span.scale``)."""
    return LEGACY_KEYS.get(key, key)


def legacy_key(key: str) -> str:
    """A dotted config key as it was before the option groups (the key itself where it did not move)."""
    return _OLD_KEYS.get(key, key)


def upgrade_config(data: dict) -> dict:
    """A run config mapping (model, data, train) with each value under an old flat key (:data:`LEGACY_KEYS`) moved to
    its place in its group; one given under both its old and its new key is a one-line ConfigError naming both. The
    mapping is not changed: what changes is copied."""
    data = dict(data)
    for old, new in LEGACY_KEYS.items():
        section, name = old.split(".")
        node = data.get(section)
        if (
            not isinstance(node, dict)
            or name not in node
            or (new.startswith(old + ".") and isinstance(node[name], dict))
        ):
            continue
        _, group, leaf = new.split(".")
        node = data[section] = dict(node)
        value = node.pop(name)
        members = node.get(group, {})
        require(isinstance(members, dict), f"{section}.{group}", members, "a mapping")
        if leaf in members:
            raise ConfigError(f"{old} and {new} are the same option, given twice: give it once, as {new}")
        node[group] = {**members, leaf: value}
    return data


def moved_keywords(section: str):
    """A class decorator for a config dataclass of ``section``: its constructor called with an option under its old
    flat name (:data:`LEGACY_KEYS`: ``ModelConfig(n_experts=4)``) raises a one-line ConfigError naming where it
    moved and how to pass it (``moe={'n_experts': 4}``), not a bare TypeError."""

    def decorate(cls: type) -> type:
        init, fields = cls.__init__, {f.name for f in dataclasses.fields(cls)}

        @functools.wraps(init)
        def __init__(self, *args, **kwargs):
            for name, value in kwargs.items():
                new = LEGACY_KEYS.get(f"{section}.{name}")
                # (train.guard is a field again, the group: only its old value, a switch, is the old option)
                if new is not None and (name not in fields or isinstance(value, bool)):
                    _, group, leaf = new.split(".")
                    raise ConfigError(
                        f"{cls.__name__}({name}={short(value)}): {section}.{name} is now {new}; "
                        f"pass {group}={{{leaf!r}: {short(value)}}}"
                    )
            init(self, *args, **kwargs)

        cls.__init__ = __init__
        return cls

    return decorate


def legacy_view(section: str, data: dict) -> dict:
    """A section's mapping (``to_dict`` of a ModelConfig: section ``model``) as it was before the option groups:
    each grouped value under its old flat key (what keys made then, such as an init probe cache's, are made of)."""
    flat = {}
    for key, value in data.items():
        if isinstance(value, dict) and any(k.startswith(f"{section}.{key}.") for k in _OLD_KEYS):
            flat |= {legacy_key(f"{section}.{key}.{leaf}").split(".", 1)[1]: v for leaf, v in value.items()}
        else:
            flat[key] = value
    return flat


def dotted(data: dict, prefix: str = "") -> dict:
    """A nested mapping flattened: each value that is not a mapping under its dotted key (``{"span": {"c": 1}}``:
    ``{"span.c": 1}``)."""
    flat = {}
    for key, value in data.items():
        flat |= dotted(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value}
    return flat


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``section.key=value`` strings to a nested dict; values are parsed as YAML (:func:`parse_yaml`). An old
    flat key is its group's now (:func:`upgrade_key`): give ``data`` upgraded (:func:`upgrade_config`)."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {short(item)} is invalid: expected KEY=VALUE, e.g. model.scheme=span")
        try:
            value = parse_yaml(raw, f"--set {key}") if raw != "" else ""
        except yaml.YAMLError:  # (not YAML: the text itself)
            value = raw
        key = key if isinstance(value, dict) else upgrade_key(key)  # (train.guard={...}: the group itself)
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {short(item)} is invalid: {part} is not a section")
        node[parts[-1]] = value
    return data


MAX_YAML_BYTES = 1 << 20  # a config or study file larger than this is not one (/dev/zero, a log given by mistake)
MAX_YAML_DEPTH = 20  # nesting: a config needs 3 levels, a study 5
MAX_YAML_VALUES = 100_000  # values once aliases are expanded: a study holds a few hundred
PIPE_WAIT_S = 30.0  # how long a pipe (--config <(...)) may take to deliver its text


class _StrictLoader(yaml.SafeLoader):
    """YAML's safe loader without what an attacker can use: aliases are allowed (a study shares its search grids
    with ``&search``/``*search``) but what they expand to is counted (a 400-byte file of nested aliases expands to
    gigabytes, one that holds itself never ends), keys given twice are refused (the second would win silently) and
    so is deep nesting (a RecursionError)."""

    depth = 0

    def compose_node(self, parent, index):
        event = self.peek_event()
        if not self.check_event(yaml.AliasEvent) and self.depth >= MAX_YAML_DEPTH:
            raise yaml.composer.ComposerError(
                None, None, f"values nested more than {MAX_YAML_DEPTH} deep are not allowed", event.start_mark
            )
        self.depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1

    def compose_document(self):
        node = super().compose_document()
        sizes: dict[int, int] = {}  # id(node) -> values it expands to; -1 while it is being counted

        def size(n) -> int:  # (nodes shared through aliases are counted once each time they are used, walked once)
            if sizes.get(id(n)) == -1:
                raise yaml.composer.ComposerError(
                    None, None, "an alias inside its own anchor is not allowed", n.start_mark
                )
            if id(n) not in sizes:
                sizes[id(n)] = -1
                children = [] if isinstance(n, yaml.ScalarNode) else n.value
                pairs = [c for pair in children for c in pair] if isinstance(n, yaml.MappingNode) else children
                sizes[id(n)] = 1 + sum(size(c) for c in pairs)
            if sizes[id(n)] > MAX_YAML_VALUES:
                raise yaml.composer.ComposerError(
                    None, None, f"the text expands to more than {MAX_YAML_VALUES:,} values (aliases)", n.start_mark
                )
            return sizes[id(n)]

        size(node)
        return node

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, typing.Hashable):
                continue  # (refused later: a config's keys are strings)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {short(key)} is given twice", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep)


def _unshared(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _unshared(v) for k, v in value.items()}
    return [_unshared(v) for v in value] if isinstance(value, list) else value


def parse_yaml(text: str, what: str) -> Any:
    """YAML text as data (:class:`_StrictLoader`); an error of the content is a one-line ConfigError about ``what``
    (a YAML syntax error is raised as it is: the caller words it). What an alias shares is copied: changing one
    place never changes another."""
    try:
        return _unshared(yaml.load(text, Loader=_StrictLoader))  # noqa: S506 (a safe loader)
    except (yaml.composer.ComposerError, yaml.constructor.ConstructorError) as e:
        at = f" (line {e.problem_mark.line + 1}, column {e.problem_mark.column + 1})" if e.problem_mark else ""
        raise ConfigError(f"{what} is refused: {e.problem}{at}") from None


def read_bounded(path: Path, limit: int, what: str) -> bytes:
    """The bytes of a regular file or a pipe (``--config <(...)``), at most ``limit`` of them: a larger file, a
    device that never ends (/dev/zero) and a FIFO no one writes to are one-line errors (``what`` names the file)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # (a FIFO without a writer: not a wait forever)
    except FileNotFoundError:
        raise ConfigError(f"{what} {str(path)!r} does not exist") from None
    except OSError as e:
        raise ConfigError(f"{what} {str(path)!r} cannot be read: {e.strerror}") from None
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise ConfigError(f"{what} {str(path)!r} is a directory, not a file")
        kind = None if stat.S_ISREG(mode) else "pipe" if stat.S_ISFIFO(mode) else "device"  # (a terminal: a device)
        chunks, size, deadline = [], 0, time.monotonic() + PIPE_WAIT_S
        while True:  # (what is not a regular file is waited on, never read in a loop that spins)
            if kind and not select.select([fd], [], [], max(0.0, deadline - time.monotonic()))[0]:
                raise ConfigError(f"{what} {str(path)!r} is a {kind} that sent nothing for {PIPE_WAIT_S:.0f} s")
            try:
                chunk = os.read(fd, 1 << 16)
            except BlockingIOError:
                continue
            except OSError as e:
                raise ConfigError(f"{what} {str(path)!r} cannot be read: {e.strerror}") from None
            if not chunk:
                break
            size += len(chunk)
            if size > limit:
                raise ConfigError(f"{what} {str(path)!r} is larger than {limit:,} bytes: it is not one")
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def read_yaml(path: Path) -> dict:
    """Read a YAML mapping (a regular file or a pipe, :func:`read_bounded`; parsed by :func:`parse_yaml`), with
    one-line errors for a missing, huge or malformed file."""
    what = "config file"
    raw = read_bounded(Path(path), MAX_YAML_BYTES, what)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{what} {str(path)!r} is not a UTF-8 text file") from None
    try:
        data = parse_yaml(text, f"{what} {str(path)!r}")
    except yaml.YAMLError as e:
        raise ConfigError(f"{what} {str(path)!r} is not valid YAML: {str(e).splitlines()[0]}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{what} {str(path)!r} must hold a mapping, got {type(data).__name__}")
    return data
