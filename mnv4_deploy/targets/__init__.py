"""The deployment targets: one package per runtime (targets/<name>/, its Target in target.py), the interface they
implement (base.py) and their registry (registry.py). How to add one: targets/README.md."""
from __future__ import annotations

from .base import ExportRequest, Runner, RuntimeTensors, Target
from .registry import (check_recipe_targets, get_target, options_for, parse_targets, register_target,
                       target_names, unregister_target)

__all__ = ["ExportRequest", "Runner", "RuntimeTensors", "Target", "check_recipe_targets", "get_target", "options_for",
           "parse_targets", "register_target", "target_names", "unregister_target"]
