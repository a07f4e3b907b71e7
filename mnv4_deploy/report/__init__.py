"""`mnv4-deploy report`: per target x precision accuracy, size and latency, roofline estimates, and a CI gate.

Modules, one job each: runner (build or reuse artifacts via the pipeline; shards and their merge), zoo (the
models of a run), roofline (estimated latency on the paper's hardware), schema (report.json), gate (paired
regression tests), markdown / page + svg (renderers), cli.
"""
from __future__ import annotations

from typing import Any


def add_report_command(subparsers: Any) -> Any:
    """Register the `report` subcommand (imported lazily so `mnv4-deploy --help` stays fast)."""
    from .cli import add_report_command as add

    return add(subparsers)


__all__ = ["add_report_command"]
