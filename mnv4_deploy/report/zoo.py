"""A model zoo for `mnv4-deploy report`: `--models a,b,c` (the other flags apply to each) or a small YAML.

    models:
      - model: mobilenetv4_conv_small
        name: small-tin          # optional; the model's key in the report (default: model)
        weights: ckpt.pth
        num_classes: 202
        input_size: 64           # or [H, W]; default: the checkpoint's native size
        crop_pct: 1.0
        targets: onnx,tflite     # default: --targets
        precisions: fp32,int8    # default: --precisions
        recipe: ptq-int8         # default: --recipe

Anything an entry leaves out comes from the command line, so a zoo file only lists what differs.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable

from ..errors import UserError, did_you_mean

KEYS = ("name", "model", "weights", "num_classes", "input_size", "mean", "std", "crop_pct", "interpolation",
        "targets", "precisions", "recipe")
PREPROCESSING = ("input_size", "mean", "std", "crop_pct", "interpolation")


def _csv(v: Any) -> str:
    return ",".join(str(x) for x in v) if isinstance(v, (list, tuple)) else str(v)


def read_zoo(spec: str) -> list[dict[str, Any]]:
    """`spec`: a comma list of model names, or a .yaml/.yml file of entries (see the module docstring)."""
    if not spec.endswith((".yaml", ".yml")):
        names = [n.strip() for n in spec.split(",") if n.strip()]
        if not names:
            raise UserError("--models takes a comma list of models or a zoo .yaml file, got nothing")
        return [{"model": n} for n in names]
    import yaml

    path = Path(spec)
    if not path.is_file():
        raise UserError(f"no zoo file at '{spec}': give --models a .yaml file or a comma list of models")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise UserError(f"{spec} is not valid YAML: {str(exc).splitlines()[0]}") from None
    entries = data.get("models") if isinstance(data, dict) else data
    if not isinstance(entries, list) or not entries:
        raise UserError(f"{spec}: expected a list of models (under 'models:'), each with at least 'model:'")
    for i, e in enumerate(entries):
        if isinstance(e, str):
            entries[i] = e = {"model": e}
        if not isinstance(e, dict) or "model" not in e:
            raise UserError(f"{spec}: entry {i + 1} needs 'model: NAME'")
        for k in e:
            if k not in KEYS:
                raise UserError(f"{spec}: entry {i + 1} ({e['model']}) has unknown key '{k}'{did_you_mean(str(k), KEYS)}")
    return entries


def zoo_settings(entries: list[dict[str, Any]], template: Any, parse_precisions: Callable[[str], list[str]]) -> list[Any]:
    """One ReportSettings per entry: the command line's settings with the entry's fields on top."""
    out = []
    for e in entries:
        base = template.base
        pre = dict(base.preprocessing)
        for k in PREPROCESSING:
            if k in e:
                v = e[k]
                pre[k] = [int(x) for x in _csv(v).split(",")] if k == "input_size" else (
                    [float(x) for x in _csv(v).split(",")] if k in ("mean", "std") else v)
        base = dataclasses.replace(
            base, model=e["model"], preprocessing=pre,
            weights=str(e.get("weights", base.weights)), num_classes=e.get("num_classes", base.num_classes),
            targets=_csv(e.get("targets", base.targets)), recipe=e.get("recipe", base.recipe))
        precisions = parse_precisions(_csv(e["precisions"])) if "precisions" in e else template.precisions
        out.append(dataclasses.replace(template, base=base, precisions=precisions, key=str(e.get("name", e["model"]))))
    return out
