"""The target registry: which targets exist (one line each) and how a name becomes a Target. Adding a target: its
package targets/<name>/ and one line in _REGISTRY (targets/README.md has the whole checklist)."""
from __future__ import annotations

import importlib

from ..errors import UserError, did_you_mean
from .base import Target

_REGISTRY: dict[str, str] = {
    "onnx": "mnv4_deploy.targets.onnx.target:OnnxTarget",
    "tflite": "mnv4_deploy.targets.tflite.target:TfliteTarget",
    "openvino": "mnv4_deploy.targets.openvino.target:OpenVinoTarget",
    "coreml": "mnv4_deploy.targets.coreml.target:CoremlTarget",
    "qnn": "mnv4_deploy.targets.qnn.target:QnnTarget",
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


