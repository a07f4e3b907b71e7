"""`mnv4-deploy inspect`: list models, targets, recipes and calibration sets, summarise a manifest, or measure
per-layer int8 sensitivity (with the fallback that reaches an agreement budget)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..infra import console
from ..infra.console import echo
from .common import preprocessing_overrides


def add_inspect_command(sub: Any) -> None:
    from .common import add_model_options

    insp = sub.add_parser("inspect", help="list models, targets and recipes, or show a manifest")
    insp.add_argument("--list", action="store_true", help="list MNv4 variants, targets and shipped recipes")
    insp.add_argument("manifest", nargs="?", type=Path, help="a manifest.json (or its folder) to summarise")
    insp.add_argument("--sensitivity", action="store_true",
                      help="per-layer int8 sensitivity of --model: each quantizer alone, and each left float")
    insp.add_argument("--calib", type=Path, metavar="DIR", help="calibration images for --sensitivity")
    insp.add_argument("--recipe", metavar="NAME|FILE", help="recipe for --sensitivity (default ptq-int8)")
    insp.add_argument("--images", type=int, default=128, metavar="N", help="images to judge sensitivity on")
    insp.add_argument("--budget", type=_agreement, metavar="AGREEMENT",
                      help="with --sensitivity: which activations a fallback must take out of int8 to reach this "
                           "top-1 agreement with float (e.g. 0.97 or 97%%), as quantization.fallback would")
    insp.add_argument("--json-out", type=Path, metavar="FILE", help="write the sensitivity table as JSON")
    add_model_options(insp, required=False)
    insp.set_defaults(func=cmd_inspect)


def cmd_inspect(args: argparse.Namespace) -> int:
    if args.budget is not None and not args.sensitivity:
        raise UserError("--budget goes with --sensitivity (inspect --sensitivity --model ... --budget 0.97)")
    if args.sensitivity:
        return _inspect_sensitivity(args)
    if args.manifest is not None:
        from ..infra.transaction import check_artifact
        from ..verify.manifest import read_manifest

        path = args.manifest / "manifest.json" if args.manifest.is_dir() else args.manifest
        manifest = read_manifest(path)
        gate = manifest["verification"].get("gate") or {}
        if not (gate.get("enforced") and gate.get("passed") is False):  # a refused artifact was never kept
            manifest = check_artifact(path.parent, path.name, read_manifest)
        # Per-image predictions stay in the file: kilobytes of encoded classes help nobody on a terminal.
        verification = {name: ({k: v for k, v in entry.items() if k != "predictions"}
                               if isinstance(entry, dict) else entry)
                        for name, entry in (manifest.get("verification") or {}).items()}
        manifest = manifest | {"verification": verification}
        echo(json.dumps({k: manifest.get(k) for k in ("model", "target", "precision", "artifact", "verification")},
                         indent=2))
        return 0
    from ..config.recipes import shipped_recipes
    from ..load.models import list_variants
    from ..targets import target_names

    echo("models:  " + ", ".join(list_variants()))
    echo("targets: " + ", ".join(_target_entry(n) for n in target_names()))
    echo("recipes: " + ", ".join(shipped_recipes()))
    from ..load.calibration_sets import shipped_sets

    echo("calibration sets: " + ", ".join(shipped_sets()))
    return 0


def _target_entry(name: str) -> str:
    """'onnx (ONNX)', or with what installs it when its toolchain is missing."""
    from ..targets import get_target

    target = get_target(name)
    try:
        target.check_installed()
        return f"{name} ({getattr(target, 'title', name)})"
    except UserError:
        return f"{name} ({getattr(target, 'title', name)}; not installed: pip install 'mnv4-deploy[{target.extra}]')"


def _inspect_sensitivity(args: argparse.Namespace) -> int:
    from ..infra.fileio import write_json
    from ..pipeline import ConvertSettings
    from ..report.sensitivity_section import recipe_sensitivity

    if not args.model:
        raise UserError("--sensitivity needs --model (and usually --weights and --calib)")
    settings = ConvertSettings(model=args.model, out=Path("."), precision="int8", weights=args.weights,
                               num_classes=args.num_classes, preprocessing=preprocessing_overrides(args),
                               calib=args.calib, recipe=args.recipe, progress=console.stderr().isatty())
    result = recipe_sensitivity(settings, args.images, args.budget)
    full = result["all_quantized"]
    echo(f"all quantizers on: top-1 agreement {100 * full['top1_agreement']:.2f}%, SQNR {full['sqnr_db']:.1f} dB "
          f"({result['images']} images; most sensitive first)")
    echo(f"{'layer':44} {'op':10} {'kind':10} {'alone SQNR dB':>13} {'alone agree':>11} {'float-others agree':>18}")
    for r in result["sites"]:
        echo(f"{r['layer'][:44]:44} {r['op'][:10]:10} {r['kind']:10} {r['only_this_sqnr_db']:13.1f} "
              f"{100 * r['only_this_agreement']:10.1f}% {100 * r['all_but_this_agreement']:17.1f}%")
    fallback = result.get("fallback")
    if fallback:
        history, n = fallback["agreement_history"], result["images"]
        verdict = "reached" if fallback["reached"] else "not reached with every activation out of int8"
        noise = 100 * (fallback["budget_agreement"] * (1 - fallback["budget_agreement"]) / n) ** 0.5
        echo(f"\nbudget {100 * fallback['budget_agreement']:.1f}% top-1 agreement: {verdict}; "
              f"{len(fallback['float_sites'])} of {fallback['activation_sites']} activations out of int8 "
              f"(agreement {100 * history[0]:.1f}% -> {100 * history[-1]:.1f}% on {n} images, "
              f"+-{noise:.1f} points sampling noise; a recipe's fallback judges on fallback.images calibration images):")
        for layer in fallback["float_layers"]:
            echo(f"  {layer}")
        echo(f"in a recipe: quantization: fallback: {{target_agreement: {fallback['budget_agreement']}, "
              f"max_layers: {max(1, len(fallback['float_sites']))}, precision: float}}  (or int16 for ONNX)")
    if args.json_out:
        write_json(args.json_out, result)
        echo(f"wrote {args.json_out}")
    return 0


def _agreement(text: str) -> float:
    """'0.97' or '97%' -> 0.97."""
    try:
        value = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not an agreement: give a fraction (0.97) or a percentage (97%)")
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"'{text}' is outside (0, 1]: give a fraction (0.97) or a percentage (97%)")
    return value
