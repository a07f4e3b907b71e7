"""ONNX benchmark on the reference checkpoint: our int8 vs float vs onnxruntime's own quantize_static.

Prints a table and writes JSON (bench/results/onnx.json). Quote ratios measured in one run; absolute
times on a shared CI machine are noise.

  python bench/bench_onnx.py [--shared ../shared] [--val-limit N]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from mnv4_deploy.infra.fileio import write_json  # noqa: E402
from mnv4_deploy.pipeline import ConvertSettings, convert  # noqa: E402

ORT_PER_CHANNEL = """name: ort-per-channel
description: onnxruntime quantize_static with per-channel weights (baseline)
targets:
  onnx: {method: onnxruntime, ort_per_channel: true}
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shared", type=Path, default=REPO.parent / "shared")
    ap.add_argument("--val-limit", type=int, default=None, help="random subset of the 5,050 val images")
    ap.add_argument("--latency-runs", type=int, default=200)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "onnx.json")
    args = ap.parse_args()
    ckpt = args.shared / "models" / "mnv4_conv_small_tin202.pth"
    data = args.shared / "data" / "tiny-imagenet-202"
    if not ckpt.is_file():
        print(f"reference checkpoint not found at {ckpt}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        per_channel = Path(tmp) / "ort-per-channel.yaml"
        per_channel.write_text(ORT_PER_CHANNEL)
        rows = []
        for label, precision, recipe in [
            ("float", "fp32", None),
            ("mnv4-deploy ptq-int8", "int8", "ptq-int8"),
            ("onnxruntime quantize_static default", "int8", "ort-baseline"),
            ("onnxruntime quantize_static per-channel", "int8", str(per_channel)),
        ]:
            settings = ConvertSettings(
                model="mobilenetv4_conv_small", weights=str(ckpt), num_classes=202, targets="onnx",
                preprocessing={"input_size": [64], "crop_pct": 1.0}, calib=data / "train", val=data / "val",
                val_limit=args.val_limit, recipe=recipe, precision=precision, out=Path(tmp) / label.replace(" ", "_"),
                latency_runs=args.latency_runs, progress=False,
                verify_gate=False,  # the baselines fail the gate (1% agreement): measure them anyway
            )
            [r] = convert(settings)
            v = r.manifest["verification"]
            f = v["val"]["vs_float"]
            rows.append({
                "method": label, "precision": precision, "images": f["images"],
                "top1_float": f["reference_top1"], "top1": f["top1"], "drop_points": round(100 * (f["reference_top1"] - f["top1"]), 2),
                "top1_agreement": f["top1_agreement"], "sqnr_db": f["sqnr_db"], "size_mb": r.manifest["artifact"]["size_bytes"] / 1e6,
                "latency_ms": v["latency"]["median_ms"], "calibration_s": (r.manifest["quantization"] or {}).get("seconds"),
            })
    base = rows[0]["latency_ms"]
    for row in rows:
        row["latency_vs_fp32"] = round(row["latency_ms"] / base, 3)
    header = ["method", "top1_float", "top1", "drop_points", "top1_agreement", "sqnr_db", "size_mb", "latency_ms", "latency_vs_fp32"]
    print(" | ".join(header))
    for row in rows:
        print(" | ".join(f"{row[h]:.4g}" if isinstance(row[h], float) else str(row[h]) for h in header))
    write_json(args.out, {"benchmark": "onnx", "model": "mobilenetv4_conv_small (reference checkpoint)", "rows": rows})
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
