"""Checking the JSON files a user hands back (manifests, report.json) against their schema on read.

These files are read back by `inspect`, `report --compare/--merge`, the gate and the renderers, which index
deep into them; an edited, truncated or hand-made file would otherwise surface as a KeyError or TypeError far
from its cause. A schema is plain data built from the specs below; a wrong field is one UserError line that
names the file, the field's path and the fix.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Optional, Sequence

from .errors import UserError

MAX_INT = 2 ** 63  # larger integers are not numbers a file of ours holds (and overflow float arithmetic)


class Invalid(Exception):
    """A field that does not match its spec: `path` and what is wrong (turned into a UserError by `check`)."""

    def __init__(self, path: str, problem: str) -> None:
        super().__init__(f"'{path}' {problem}")
        self.path, self.problem = path, problem


def describe(value: Any) -> str:
    """A short, one-line description of a JSON value for messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "a list"
    text = repr(value)
    kind = "a string" if isinstance(value, str) else "a number"
    return f"{kind} {text[:40]}{'...' if len(text) > 40 else ''}"


class Spec:
    """What one JSON value must be."""

    def check(self, value: Any, path: str) -> None:
        raise NotImplementedError


class Type(Spec):
    def __init__(self, *kinds: type, name: str = "") -> None:
        self.kinds, self.name = kinds, name or " or ".join(_NAMES[k] for k in kinds)

    def check(self, value: Any, path: str) -> None:
        if isinstance(value, bool) and bool not in self.kinds:
            raise Invalid(path, f"must be {self.name}, got {describe(value)}")
        if not isinstance(value, self.kinds):
            raise Invalid(path, f"must be {self.name}, got {describe(value)}")


_NAMES = {str: "a string", bool: "true or false", dict: "an object", list: "a list", type(None): "null"}
STR = Type(str)
BOOL = Type(bool)


class Num(Spec):
    """A number (never a bool); `integer`: an int; `finite`: no NaN or infinity; inclusive bounds."""

    def __init__(self, low: Optional[float] = None, high: Optional[float] = None, finite: bool = True,
                 integer: bool = False) -> None:
        self.low, self.high, self.finite, self.integer = low, high, finite, integer

    def check(self, value: Any, path: str) -> None:
        kinds = (int,) if self.integer else (int, float)
        if isinstance(value, bool) or not isinstance(value, kinds) or (isinstance(value, int) and abs(value) >= MAX_INT):
            raise Invalid(path, f"must be {'an integer' if self.integer else 'a number'}, got {describe(value)}")
        if self.finite and not math.isfinite(value):
            raise Invalid(path, f"must be a finite number, got {value}")
        if (self.low is not None and value < self.low) or (self.high is not None and value > self.high):
            bounds = f"between {self.low} and {self.high}" if self.low is not None and self.high is not None else (
                f">= {self.low}" if self.low is not None else f"<= {self.high}")
            raise Invalid(path, f"must be {bounds}, got {value}")


INT = Num(integer=True)
COUNT = Num(0, integer=True)
NUMBER = Num(finite=False)  # any number, NaN and infinity included (an SQNR of identical outputs is infinite)


class OneOf(Spec):
    def __init__(self, *values: Any) -> None:
        self.values = values

    def check(self, value: Any, path: str) -> None:
        if isinstance(value, bool) or not isinstance(value, (str, int, float, type(None))) or value not in self.values:
            raise Invalid(path, f"must be one of {', '.join(map(str, self.values))}, got {describe(value)}")


class Nullable(Spec):
    def __init__(self, spec: Spec) -> None:
        self.spec = spec

    def check(self, value: Any, path: str) -> None:
        if value is not None:
            self.spec.check(value, path)


class AnyValue(Spec):
    def check(self, value: Any, path: str) -> None:
        pass


ANY = AnyValue()


class ListOf(Spec):
    def __init__(self, item: Spec, min_len: int = 0, length: Optional[int] = None) -> None:
        self.item, self.min_len, self.length = item, min_len, length

    def check(self, value: Any, path: str) -> None:
        Type(list).check(value, path)
        if self.length is not None and len(value) != self.length:
            raise Invalid(path, f"must hold {self.length} items, got {len(value)}")
        if len(value) < self.min_len:
            raise Invalid(path, f"must hold at least {self.min_len} item(s)")
        for i, v in enumerate(value):
            self.item.check(v, f"{path}[{i}]")


class MapOf(Spec):
    """An object with any keys, each value matching `item`; `keys`: keys it must have."""

    def __init__(self, item: Spec, keys: Sequence[str] = (), min_len: int = 0) -> None:
        self.item, self.keys, self.min_len = item, tuple(keys), min_len

    def check(self, value: Any, path: str) -> None:
        Type(dict).check(value, path)
        for k in self.keys:
            if k not in value:
                raise Invalid(f"{path}.{k}", "is missing")
        if len(value) < self.min_len:
            raise Invalid(path, f"must hold at least {self.min_len} entr{'y' if self.min_len == 1 else 'ies'}")
        for k, v in value.items():
            self.item.check(v, f"{path}.{k}")


class Obj(Spec):
    """An object with `required` and `optional` keys (others are allowed: newer files may add some)."""

    def __init__(self, required: Optional[dict[str, Spec]] = None, optional: Optional[dict[str, Spec]] = None,
                 rule: Optional[Callable[[dict[str, Any], str], None]] = None) -> None:
        self.required, self.optional, self.rule = required or {}, optional or {}, rule

    def check(self, value: Any, path: str) -> None:
        Type(dict).check(value, path)
        for key, spec in self.required.items():
            where = f"{path}.{key}" if path else key
            if key not in value:
                raise Invalid(where, "is missing")
            spec.check(value[key], where)
        for key, spec in self.optional.items():
            if key in value:
                spec.check(value[key], f"{path}.{key}" if path else key)
        if self.rule is not None:
            self.rule(value, path)


def check(value: Any, spec: Spec, source: str, fix: str) -> Any:
    """`value` when it matches `spec`; otherwise one UserError line naming the file, the field and `fix`."""
    try:
        spec.check(value, "")
    except Invalid as exc:
        where = exc.path.lstrip(".") or "the file"
        raise UserError(f"{source}: '{where}' {exc.problem}: {fix}") from None
    except RecursionError:  # a document nested deeper than any of ours
        raise UserError(f"{source}: nests too deeply: {fix}") from None
    return value
