"""Typed option fields shared by recipes and targets: allowed values, and the CLI flag a field gets.

A target's Options dataclass is the single source of its settings: the recipe's `targets:` section is validated
against it, and every field declared with a `flag` help text becomes a `mnv4-deploy convert/qat` flag of the same
name (`io_dtype` -> `--io-dtype`), so adding an option never touches the CLI.
"""
from __future__ import annotations

import dataclasses
from dataclasses import field
from typing import Any, Iterator, Optional


def choice(default: Any, *choices: Any, flag: Optional[str] = None) -> Any:
    """A dataclass field whose value must be one of `choices`; `flag`: its CLI help (None: recipe only)."""
    return field(default=default, metadata={"choices": choices, "flag": flag})


def option(default: Any, flag: Optional[str] = None, unit_interval: bool = False, low: Optional[float] = None,
           high: Optional[float] = None, above: Optional[float] = None) -> Any:
    """A plain dataclass field; `flag`: its CLI help (None: recipe only). Numbers get their range here, checked
    when a recipe is read: `unit_interval` [0, 1], or `low`/`above` (inclusive/exclusive) to `high`."""
    if unit_interval:
        low, high = 0.0, 1.0
    return field(default=default, metadata={"flag": flag, "low": low, "high": high, "above": above})


def numeric_range(f: dataclasses.Field) -> Optional[tuple[Optional[float], Optional[float], Optional[float]]]:
    """A field's declared (low, above, high), or None when it declares none."""
    meta = f.metadata
    if meta.get("low") is None and meta.get("above") is None and meta.get("high") is None:
        return None
    return meta.get("low"), meta.get("above"), meta.get("high")


def range_text(low: Optional[float], above: Optional[float], high: Optional[float]) -> str:
    """'between 1 and 4096', '> 0 and <= 1', ... for messages."""
    fmt = lambda v: f"{v:g}" if isinstance(v, float) else str(v)  # noqa: E731
    if above is not None:
        return f"> {fmt(above)}" + (f" and <= {fmt(high)}" if high is not None else "")
    if low is not None and high is not None:
        return f"between {fmt(low)} and {fmt(high)}"
    return f">= {fmt(low)}" if low is not None else f"<= {fmt(high)}"


def flag_fields(options_cls: type) -> Iterator[dataclasses.Field]:
    """The fields of an Options dataclass that the CLI exposes as flags."""
    for f in dataclasses.fields(options_cls):
        if f.metadata.get("flag"):
            yield f


def field_names(options_cls: Any) -> set[str]:
    return {f.name for f in dataclasses.fields(options_cls)}
