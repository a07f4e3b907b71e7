"""How many calibration images a native-resolution convert needs: `ptq-int8` calibrated on 512, 256 and 128
images of the pinned `reference-tin202` set, scored on the same held-out Tiny ImageNet val images.

The recipe caps calibration at `quantization.calibration.pixels` (512 images at 64x64, at least `min_images`,
128): at 224x224 that is 128 images instead of 512. This script is the evidence that the cap costs no fidelity.
The reference checkpoint was trained at 64x64, so at 224 its top-1 is near chance: top-1 agreement with float
and the logits' cosine similarity (measured on the PyTorch simulation of the int8 model) are the measures here.

  .venv/bin/python bench/bench_calibration_pixels.py --size 224 --val 2000
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--val", type=int, default=2000, help="held-out val images scored")
    parser.add_argument("--images", type=int, nargs="+", default=[512, 256, 128])
    parser.add_argument("--checkpoint", type=Path, default=SHARED / "models" / "mnv4_conv_small_tin202.pth")
    parser.add_argument("--data", type=Path, default=SHARED / "data" / "tiny-imagenet-202")
    parser.add_argument("--json-out", type=Path, default=REPO / "bench" / "results" / "calibration_pixels.json")
    args = parser.parse_args()

    from mnv4_deploy import load_model, prepare
    from mnv4_deploy.calibration import load_calibration
    from mnv4_deploy.data import load_images, scan_folder
    from mnv4_deploy.quantize import quantize
    from mnv4_deploy.recipes import load_recipe
    from mnv4_deploy.verify import compare, torch_logits

    loaded = load_model("mobilenetv4_conv_small", str(args.checkpoint), 202,
                        {"input_size": [args.size], "crop_pct": 1.0})
    prepare(loaded.model)
    val = load_images(scan_folder(args.data / "val").sample(args.val, seed=0), loaded.preprocessing)
    float_logits = torch_logits(loaded.model, val.x)
    base = load_recipe("ptq-int8")
    rows = {}
    for n in args.images:
        cal = dataclasses.replace(base.quantization.calibration, images=n, min_images=n)  # exactly n images
        recipe = dataclasses.replace(base, quantization=dataclasses.replace(base.quantization, calibration=cal))
        data = load_calibration("reference-tin202", args.data / "train", recipe, loaded.preprocessing)
        start = time.perf_counter()
        quantized = quantize(loaded.model, data.calibration, recipe)
        seconds = time.perf_counter() - start
        fid = compare(quantized.simulate(val.x), float_logits, val.labels)
        rows[n] = {"agreement": fid.top1_agreement, "cosine": fid.cosine, "top1": fid.top1,
                   "float_top1": fid.reference_top1, "quantize_s": round(seconds, 1)}
        print(f"{n:>6} images  agreement {fid.top1_agreement:.2%}  cosine {fid.cosine:.4f}  "
              f"quantize {seconds:.0f} s", flush=True)
    args.json_out.parent.mkdir(parents=True, exist_ok=True)
    args.json_out.write_text(json.dumps({"size": args.size, "val_images": args.val, "cores": os.cpu_count(),
                                         "rows": rows}, indent=1))
    print(f"wrote {args.json_out}", file=sys.stderr)


if __name__ == "__main__":
    main()
