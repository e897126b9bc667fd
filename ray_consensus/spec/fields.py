"""Typed, self-documenting fields: the building block of the run spec and of explainer parameters.

A field is a dataclass field whose metadata carries its help text and, where it has them, its
choices and its bounds. `build(cls, data, where)` turns plain data (parsed YAML) into the
dataclass, coercing each value to the field's type and checking choices and bounds, so that a
bad value is one `SpecError` line naming the key. `describe(cls)` lists the fields for
`ray-consensus validate --schema`. Only the standard library and `errors` are imported.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import field
from typing import Any, get_args, get_origin, get_type_hints

from ray_consensus.errors import SpecError, suggest


def spec_field(default: Any, help: str, choices: tuple | None = None, low: float | None = None,
               high: float | None = None, open_low: bool = False, open_high: bool = False,
               also: tuple = (), rule: str | None = None):
    """A field with its help text. `choices`: the values allowed; `low`/`high`: bounds (inclusive
    unless `open_low`/`open_high`); `also`: extra literal values accepted besides the type (e.g.
    "auto" for a number); `rule`: the phrase errors use instead of one derived from the above (such
    a field takes only values of its own type, uncoerced)."""
    meta = {"help": help, "choices": choices, "low": low, "high": high, "open_low": open_low,
            "open_high": open_high, "also": also, "rule": rule}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


def default_of(f: dataclasses.Field) -> Any:
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()


def coerce(value: Any, typ: Any, where: str) -> Any:
    """`value` as `typ` (int, float, bool, str, list[...], dict, a dataclass, or X | None); raises
    SpecError '<where>: expected ..., got ...'."""
    origin, args = get_origin(typ), get_args(typ)
    if value is None and (typ is type(None) or type(None) in args):
        return None
    if args and type(None) in args:  # X | None
        typ = next(a for a in args if a is not type(None))
        origin, args = get_origin(typ), get_args(typ)
    if dataclasses.is_dataclass(typ):
        if not isinstance(value, dict):
            raise SpecError(f"{where}: expected a mapping, got {type(value).__name__}")
        return build(typ, value, where)
    if origin is list:
        if not isinstance(value, list):
            raise SpecError(f"{where}: expected a list, got {type(value).__name__}")
        item = args[0] if args else Any
        return [coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if typ is dict or origin is dict:
        if not isinstance(value, dict):
            raise SpecError(f"{where}: expected a mapping, got {type(value).__name__}")
        return dict(value)
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise SpecError(f"{where}: expected true or false, got {value!r}")
    if typ in (int, float):
        if isinstance(value, bool):
            raise SpecError(f"{where}: expected a number, got {value!r}")
        try:
            out = typ(value)
        except (TypeError, ValueError, OverflowError):
            raise SpecError(f"{where}: expected {'an integer' if typ is int else 'a number'}, got {value!r}") from None
        if typ is int and float(value) != out:
            raise SpecError(f"{where}: expected an integer, got {value!r}")
        if typ is int and not -2**63 <= out < 2**63:  # what every stored int64 column and torch can hold
            raise SpecError(f"{where}: expected an integer within 64 bits, got {value!r}")
        if typ is float and not math.isfinite(out):  # NaN passes every bound check; inf is no setting
            raise SpecError(f"{where}: expected a finite number, got {value!r}")
        return out
    if typ is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise SpecError(f"{where}: expected a string, got {value!r}")
        return str(value)
    return value


def _base_type(typ: Any) -> Any:
    """X of `X | None`, else `typ`."""
    return next((a for a in get_args(typ) if a is not type(None)), typ) if get_args(typ) else typ


def rule_of(f: dataclasses.Field, typ: Any) -> str:
    """What a valid value of the field is, as a phrase: 'an integer >= 1', 'one of a, b', ..."""
    m = f.metadata
    if m.get("rule"):
        return m["rule"]
    if m.get("choices"):
        return f"one of {', '.join(map(str, m['choices']))}"
    base = _base_type(typ)
    kind = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(base, "a value")
    low, high = m.get("low"), m.get("high")
    if low is not None and high is not None:
        if m["open_low"] and m["open_high"]:
            kind += f" strictly between {low:g} and {high:g}"
        else:
            kind += f" in {'(' if m['open_low'] else '['}{low:g}, {high:g}{')' if m['open_high'] else ']'}"
    elif low is not None:
        kind += f" {'>' if m['open_low'] else '>='} {low:g}"
    elif high is not None:
        kind += f" {'<' if m['open_high'] else '<='} {high:g}"
    also = m.get("also") or ()
    return kind + "".join(f" or {a!r}" for a in also)


def in_bounds(f: dataclasses.Field, value: Any) -> bool:
    m = f.metadata
    if value is None or isinstance(value, str):
        return True
    low, high = m.get("low"), m.get("high")
    if low is not None and (value <= low if m["open_low"] else value < low):
        return False
    if high is not None and (value >= high if m["open_high"] else value > high):
        return False
    return True


def build(cls, data: dict, where: str, unknown: str = "key", ruled_choices: bool = False):
    """The dataclass `cls` from a mapping: unknown keys, bad types, choices and bounds raise SpecError.

    Messages: "unknown key 'run.shard_sise' (did you mean 'shard_size'?)"; a value of the wrong
    type "<where>.<key>: expected an integer >= 1, got 'many'"; out of bounds "<where>.<key> must
    be an integer >= 1, got 0"; outside the choices "<where>.<key>: unknown value 'x' (did you mean
    'y'?)". With `ruled_choices` (explainer parameters) every bad value reads "<where>.<key> must
    be <rule>, got <value>".
    """
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in fields:
            raise SpecError(f"unknown {unknown} '{path}'{suggest(str(key), fields)}")
        f = fields[key]
        kwargs[key] = check_value(f, hints[key], value, path, ruled_choices)
    return cls(**kwargs)


def check_value(f: dataclasses.Field, typ: Any, value: Any, path: str, ruled_choices: bool = False) -> Any:
    """One field's value, coerced and checked (see `build`)."""
    m = f.metadata
    ruled = m.get("rule") or m.get("low") is not None or m.get("high") is not None or m.get("also")
    if m.get("also") and value in m["also"]:
        return value
    if m.get("rule") and value is not None and not isinstance(value, _base_type(typ)):
        raise SpecError(f"{path} must be {m['rule']}, got {value!r}")  # a stated rule: no coercion
    try:
        out = coerce(value, typ, path)
    except SpecError:
        if ruled and ruled_choices:
            raise SpecError(f"{path} must be {rule_of(f, typ)}, got {value!r}") from None
        if ruled:
            raise SpecError(f"{path}: expected {rule_of(f, typ)}, got {value!r}") from None
        raise
    if m.get("choices") and out not in m["choices"]:
        if ruled_choices:
            raise SpecError(f"{path} must be {rule_of(f, typ)}, got {value!r}")
        raise SpecError(f"{path}: unknown value '{out}'{suggest(str(out), m['choices'])}")
    if not in_bounds(f, out):
        raise SpecError(f"{path} must be {rule_of(f, typ)}, got {value!r}")
    return out


def describe(cls, indent: str = "  ") -> list[str]:
    """Schema lines of a dataclass of fields: name, default, choices or rule, then the help text."""
    hints = get_type_hints(cls)
    lines = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        m = f.metadata
        extra = f" [{' | '.join(map(str, m['choices']))}]" if m.get("choices") else ""
        if not extra and (m.get("low") is not None or m.get("high") is not None or m.get("rule")):
            extra = f" [{rule_of(f, hints[f.name])}]"
        lines.append(f"{indent}{f.name}: {default_of(f)!r}{extra}\n{indent}    {m['help']}")
    return lines
