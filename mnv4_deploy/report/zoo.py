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
    from ..yamlio import safe_load

    path = Path(spec)
    if not path.is_file():
        raise UserError(f"no zoo file at '{spec}': give --models a .yaml file or a comma list of models")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read zoo file '{spec}': {exc}") from None
    data = safe_load(text, spec)  # a syntax error or a duplicate key names its line
    entries = data.get("models") if isinstance(data, dict) else data
    if not isinstance(entries, list) or not entries:
        raise UserError(f"{spec}: expected a list of models (under 'models:'), each with at least 'model:'")
    for i, e in enumerate(entries):
        if isinstance(e, str):
            entries[i] = e = {"model": e}
        if not isinstance(e, dict) or not isinstance(e.get("model"), str):
            raise UserError(f"{spec}: entry {i + 1} needs 'model: NAME'")
        for k in e:
            if k not in KEYS:
                raise UserError(f"{spec}: entry {i + 1} ({e['model']}) has unknown key '{k}'{did_you_mean(str(k), KEYS)}")
        for k, kinds, what in _TYPES:
            if k in e and (not isinstance(e[k], kinds) or isinstance(e[k], bool)):
                raise UserError(f"{spec}: entry {i + 1} ({e['model']}): '{k}' must be {what}, got {e[k]!r:.40}")
    return entries


# What each key may hold (a list where the command line takes a comma list).
_TYPES = (("name", (str,), "a string"), ("weights", (str,), "a string"), ("num_classes", (int,), "an integer"),
          ("input_size", (int, str, list), "N or [H, W]"), ("mean", (str, list), "three numbers"),
          ("std", (str, list), "three numbers"), ("crop_pct", (int, float), "a number"),
          ("interpolation", (str,), "a string"), ("targets", (str, list), "a comma list"),
          ("precisions", (str, list), "a comma list"), ("recipe", (str,), "a string"))


def zoo_settings(entries: list[dict[str, Any]], template: Any, parse_precisions: Callable[[str], list[str]]) -> list[Any]:
    """One ReportSettings per entry: the command line's settings with the entry's fields on top."""
    out = []
    for e in entries:
        base = template.base
        pre = dict(base.preprocessing)
        for k in PREPROCESSING:
            if k in e:
                v = e[k]
                try:
                    pre[k] = [int(x) for x in _csv(v).split(",")] if k == "input_size" else (
                        [float(x) for x in _csv(v).split(",")] if k in ("mean", "std") else v)
                except ValueError:
                    raise UserError(f"zoo entry '{e.get('name', e['model'])}': {k} must be numbers, got {v!r:.60}") from None
        base = dataclasses.replace(
            base, model=e["model"], preprocessing=pre,
            weights=str(e.get("weights", base.weights)), num_classes=e.get("num_classes", base.num_classes),
            targets=_csv(e.get("targets", base.targets)), recipe=e.get("recipe", base.recipe))
        precisions = parse_precisions(_csv(e["precisions"])) if "precisions" in e else template.precisions
        out.append(dataclasses.replace(template, base=base, precisions=precisions, key=str(e.get("name", e["model"]))))
    return out
