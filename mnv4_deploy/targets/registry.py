"""The target registry: which targets exist (one line each) and how a name becomes a Target. Adding a target: its
package targets/<name>/ and one line in _REGISTRY (targets/README.md has the whole checklist).

A recipe's `targets:` sections are checked here, against each target's Options (`check_recipe_targets`): config
sits below the targets and never imports them."""
from __future__ import annotations

import dataclasses
import importlib
from typing import Any

from ..config.recipes import Recipe, TargetSection, build_section
from ..errors import UserError, did_you_mean
from .base import Target

_REGISTRY: dict[str, str] = {
    "onnx": "mnv4_deploy.targets.onnx.target:OnnxTarget",
    "tflite": "mnv4_deploy.targets.tflite.target:TfliteTarget",
    "openvino": "mnv4_deploy.targets.openvino.target:OpenVinoTarget",
    "coreml": "mnv4_deploy.targets.coreml.target:CoremlTarget",
    "qnn": "mnv4_deploy.targets.qnn.target:QnnTarget",
    "executorch": "mnv4_deploy.targets.executorch.target:ExecutorchTarget",
}


def register_target(name: str, spec: str) -> None:
    """Add a target: `spec` is 'package.module:ClassName' (imported when first used)."""
    if ":" not in spec:
        raise ValueError(f"target spec must be 'module:Class', got {spec!r}")
    _REGISTRY[name] = spec


def unregister_target(name: str) -> None:
    _REGISTRY.pop(name, None)


def target_names() -> list[str]:
    return list(_REGISTRY)


def get_target(name: str) -> Target:
    if name not in _REGISTRY:
        raise UserError(
            f"unknown target '{name}'{did_you_mean(name, _REGISTRY)}; valid targets: {', '.join(_REGISTRY)} or 'all'"
        )
    module, cls = _REGISTRY[name].split(":")
    return getattr(importlib.import_module(module), cls)()


def parse_targets(text: str) -> list[str]:
    """'onnx', 'onnx,tflite' or 'all' -> validated target names."""
    names = target_names() if text.strip() == "all" else [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise UserError(f"--to needs a target: one of {', '.join(_REGISTRY)}, a comma list, or 'all'")
    for n in names:
        get_target(n)
    return list(dict.fromkeys(names))


def check_recipe_targets(recipe: Recipe) -> Recipe:
    """`recipe` with each `targets.<name>:` section (as config read it) checked and built by that target's Options;
    a mistake names the file and line: an unknown target, an unknown key, a value out of its range. Every entry
    point that loads a recipe runs this at once, before any slow work."""
    checked = {}
    for name, section in recipe.targets.items():
        if not isinstance(section, TargetSection):  # already checked
            checked[name] = section
            continue
        if name not in _REGISTRY:
            raise UserError(f"{section.where}: unknown target 'targets.{name}'{did_you_mean(name, _REGISTRY)}; "
                            f"valid targets: {', '.join(_REGISTRY)}")
        checked[name] = build_section(get_target(name).Options, section)
    return dataclasses.replace(recipe, targets=checked)


def options_for(recipe: Recipe, name: str) -> Any:
    """The recipe's options for target `name` (its section checked now if it was not yet), or its defaults."""
    section = recipe.targets.get(name)
    if isinstance(section, TargetSection):
        return build_section(get_target(name).Options, section)
    return section if section is not None else get_target(name).Options()
