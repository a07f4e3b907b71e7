"""PTQ recipes and algorithms on the reference checkpoint: how close each int8 model stays to float.

For mobilenetv4_conv_small (../shared/models/mnv4_conv_small_tin202.pth, 202 classes, 64x64), calibrated on
Tiny ImageNet train images (the same draw the convert pipeline makes) and judged on a fixed sample of the
labelled val images: float top-1, then per configuration the int8 top-1, its drop, top-1 agreement with
float, logit SQNR and the seconds `quantize()` took (calibration plus the PTQ algorithms, on this machine:
noisy when it is shared). Numbers are from the PyTorch simulation of the int8 graph (convert_pt2e), which
every target's runtime matches to within 1-2% agreement (see the manifests' `vs_pytorch_simulation`).
Prints a table and writes JSON (bench/results/recipes.json).

  python bench/bench_recipes.py [--val-images 1000] [--only NAME ...] [--list]   (--only updates those rows)
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any


REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from mnv4_deploy.infra.fileio import write_json  # noqa: E402

SHARED = REPO.parent / "shared"
CHECKPOINT = SHARED / "models" / "mnv4_conv_small_tin202.pth"
DATA = SHARED / "data" / "tiny-imagenet-202"

# name -> recipe text (YAML); "recipe:NAME" loads a shipped recipe. Algorithms alone, then combinations.
CONFIGS: dict[str, str] = {
    "ptq-int8 (shipped default)": "recipe:ptq-int8",
    "percentile (no algorithms)": "",
    "observer: mse": "quantization:\n  activations: {observer: mse}\n",
    "observer: kl": "quantization:\n  activations: {observer: kl}\n",
    "equalization: cle": "quantization:\n  equalization: {method: cle}\n",
    "equalization: activation": "quantization:\n  equalization: {method: activation, alpha: 0.5}\n",
    "bias_correction": "quantization:\n  bias_correction: {enabled: true, images: 512}\n",
    "adaround": "quantization:\n  adaround: {enabled: true, iterations: 50, images: 128}\n",
    "range_learning": "quantization:\n  range_learning: {steps: 100}\n",
    "activation eq + bias_correction": "quantization:\n  equalization: {method: activation}\n"
                                       "  bias_correction: {enabled: true, images: 512}\n",
    "activation eq + adaround + bias_correction": "quantization:\n  equalization: {method: activation}\n"
                                                  "  adaround: {enabled: true, iterations: 50, images: 128}\n"
                                                  "  bias_correction: {enabled: true, images: 512}\n",
}


def _recipe(text: str) -> Any:
    from mnv4_deploy.config.recipes import load_recipe, parse_recipe

    return load_recipe(text[len("recipe:"):]) if text.startswith("recipe:") else parse_recipe(text, "<bench>")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--val-images", type=int, default=1000, help="fixed random sample of the val folder (seed 0)")
    ap.add_argument("--only", nargs="*", help="configuration names to run (default: all)")
    ap.add_argument("--list", action="store_true", help="list the configurations and exit")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "recipes.json"))
    args = ap.parse_args(argv)
    if args.list:
        print("\n".join(CONFIGS))
        return 0
    if not CHECKPOINT.is_file():
        print(f"reference checkpoint not found at {CHECKPOINT}", file=sys.stderr)
        return 2

    import torch  # noqa: F401

    from mnv4_deploy.load.images import load_images, scan_folder
    from mnv4_deploy.load.models import load_model
    from mnv4_deploy.preparation.prepare import prepare
    from mnv4_deploy.quantization.pt2e import quantize
    from mnv4_deploy.verify.fidelity import compare, torch_logits

    loaded = load_model("mobilenetv4_conv_small", str(CHECKPOINT), 202, {"input_size": [64, 64], "crop_pct": 1.0})
    prepare(loaded.model)
    val = load_images(scan_folder(DATA / "val").sample(args.val_images, seed=0), loaded.preprocessing)
    float_logits = torch_logits(loaded.model, val.x)
    float_top1 = float((float_logits.argmax(1) == val.labels).mean())
    cal_cache: dict[tuple, Any] = {}
    rows = []
    names = args.only or list(CONFIGS)
    for name in names:
        recipe = _recipe(CONFIGS[name])
        c = recipe.quantization.calibration
        key = (c.images, c.seed)
        if key not in cal_cache:  # the convert pipeline's draw: calibration images, then held-back ones
            cal_set, _ = scan_folder(DATA / "train").split(c.images, recipe.verification.images, c.seed)
            cal_cache[key] = load_images(cal_set, loaded.preprocessing)
        start = time.perf_counter()
        q = quantize(loaded.model, cal_cache[key], recipe)
        seconds = time.perf_counter() - start
        f = compare(q.simulate(val.x), float_logits, val.labels)
        rows.append({"config": name, "recipe": CONFIGS[name], "int8_top1": f.top1,
                     "drop_pt": round(100 * (float_top1 - f.top1), 2), "agreement": f.top1_agreement,
                     "sqnr_db": f.sqnr_db, "seconds": round(seconds, 1),
                     "algorithms": q.calibration.get("algorithms", {})})
        print(_row(rows[-1]), flush=True)
    out = Path(args.out)
    if args.only and out.is_file():  # a partial run updates its rows in the existing results
        import json

        old = json.loads(out.read_text())
        if old.get("val_images") == len(val):
            mine = {r["config"] for r in rows}
            rows = [r for r in old["rows"] if r["config"] not in mine] + rows
            rows.sort(key=lambda r: list(CONFIGS).index(r["config"]) if r["config"] in CONFIGS else len(CONFIGS))
    result = {"model": "mobilenetv4_conv_small", "checkpoint": str(CHECKPOINT.name), "val_images": len(val),
              "calibration": "Tiny ImageNet train (recipe calibration.images, seed)", "float_top1": float_top1,
              "numbers": "PyTorch simulation of the int8 graph", "rows": rows}
    write_json(out, result)
    print()
    print(table(result))
    return 0


def _row(r: dict[str, Any]) -> str:
    return (f"{r['config']:<46} {100 * r['int8_top1']:6.2f}% {r['drop_pt']:+6.2f} {100 * r['agreement']:6.2f}% "
            f"{r['sqnr_db']:6.2f} {r['seconds']:7.1f}")


def table(result: dict[str, Any]) -> str:
    head = (f"float top-1 {100 * result['float_top1']:.2f}% on {result['val_images']} val images "
            f"({result['numbers']})\n"
            f"{'config':<46} {'top-1':>7} {'drop':>6} {'agree':>7} {'SQNR':>6} {'seconds':>7}")
    return "\n".join([head] + [_row(r) for r in result["rows"]])


if __name__ == "__main__":
    sys.exit(main())
