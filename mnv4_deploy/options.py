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


def option(default: Any, flag: Optional[str] = None, unit_interval: bool = False) -> Any:
    """A plain dataclass field; `flag`: its CLI help (None: recipe only); `unit_interval`: must lie in [0, 1]."""
    return field(default=default, metadata={"flag": flag, "unit_interval": unit_interval})


def flag_fields(options_cls: type) -> Iterator[dataclasses.Field]:
    """The fields of an Options dataclass that the CLI exposes as flags."""
    for f in dataclasses.fields(options_cls):
        if f.metadata.get("flag"):
            yield f


def field_names(options_cls: Any) -> set[str]:
    return {f.name for f in dataclasses.fields(options_cls)}
