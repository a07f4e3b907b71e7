"""ExecuTorch (XNNPACK `.pte`) against LiteRT (XNNPACK `.tflite`): speed at native size and fidelity on real images.

Speed: conv_small 224, conv_medium 256, hybrid_medium 256 (random weights: speed does not depend on them), each
converted by `mnv4-deploy convert --to executorch,tflite` in fp32 and int8 (ptq-int8), then timed in one process,
batch 1, at 1 and 2 threads, the four artifacts interleaved round by round (median of all runs). Both runtimes run
XNNPACK, so a large gap at the same threads is a finding. Fidelity: the reference conv_small checkpoint at 64x64
(pinned calibration set), int8 top-1 agreement with float on the same held-out Tiny ImageNet val images in both.

  .venv/bin/python bench/bench_executorch.py                       # everything (tens of minutes on 2 cores)
  .venv/bin/python bench/bench_executorch.py --models conv_small:224 --val 0
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"
MODELS = ["conv_small:224", "conv_medium:256", "hybrid_medium:256"]


def build(model: str, size: int, out: Path, precision: str, weights: str = "random", **extra: Any) -> dict[str, Path]:
    from mnv4_deploy.pipeline import ConvertSettings, convert

    settings = ConvertSettings(model=f"mobilenetv4_{model}", out=out, targets="executorch,tflite",
                               precision=precision, weights=weights, preprocessing={"input_size": [size], **extra},
                               latency_runs=1, progress=False, verify_gate=False)
    return {r.target: r for r in convert(settings)}


def speed(model: str, size: int, rounds: int, work: Path) -> dict[str, Any]:
    from executorch.runtime import Runtime

    from mnv4_deploy.targets.executorch.runtime import set_threads
    from mnv4_deploy.targets.tflite.target import _interpreter

    arts = {p: build(model, size, work / f"{model}-{size}-{p}", p) for p in ("fp32", "int8")}
    x = np.random.default_rng(0).standard_normal((1, 3, size, size), dtype=np.float32)
    import torch

    xt = torch.from_numpy(x)
    times: dict[str, list[float]] = {}
    for threads in (1, 2):
        methods: dict[str, Any] = {}
        got = set_threads(threads)  # no program loaded here: the pool can be resized
        for p in ("fp32", "int8"):
            methods[p] = Runtime.get().load_program(arts[p]["executorch"].path).load_method("forward")
        interpreters = {}
        for p in ("fp32", "int8"):
            it = _interpreter(arts[p]["tflite"].path, delegates=True, threads=threads)
            interpreters[p] = (it, it.get_input_details()[0]["index"], it.get_output_details()[0]["index"])

        def run_et(p: str) -> float:
            start = time.perf_counter()
            methods[p].execute([xt])
            return time.perf_counter() - start

        def run_tflite(p: str) -> float:
            it, i, o = interpreters[p]
            start = time.perf_counter()
            it.set_tensor(i, x if it.get_input_details()[0]["dtype"] == np.float32 else x.astype(np.int8))
            it.invoke()
            it.get_tensor(o)
            return time.perf_counter() - start

        for p in ("fp32", "int8"):  # warm-up
            for _ in range(5):
                run_et(p), run_tflite(p)
        for _ in range(rounds):
            for p in ("fp32", "int8"):
                times.setdefault(f"executorch {p} t{got}", []).extend(run_et(p) for _ in range(5))
                times.setdefault(f"tflite {p} t{threads}", []).extend(run_tflite(p) for _ in range(5))
        methods.clear()
    med = {k: round(1000 * statistics.median(v), 3) for k, v in times.items()}
    ratios = {}
    for threads in (1, 2):
        for rt in ("executorch", "tflite"):
            f, q = med.get(f"{rt} fp32 t{threads}"), med.get(f"{rt} int8 t{threads}")
            if f and q:
                ratios[f"{rt} int8/fp32 t{threads}"] = round(q / f, 3)
        e, t = med.get(f"executorch int8 t{threads}"), med.get(f"tflite int8 t{threads}")
        if e and t:
            ratios[f"executorch/tflite int8 t{threads}"] = round(e / t, 3)
    compute = arts["int8"]["executorch"].manifest["structure"].get("int8_compute")
    return {"model": model, "size": size, "median_ms": med, "ratios": ratios, "runs": {k: len(v) for k, v in times.items()},
            "int8_compute": compute}


def fidelity(n_val: int, work: Path) -> dict[str, Any]:
    """Reference conv_small 64x64: both runtimes' int8 against float on the same val images."""
    from mnv4_deploy.load.images import load_images, scan_folder
    from mnv4_deploy.pipeline import ConvertSettings, convert
    from mnv4_deploy.verify.fidelity import compare, run_batched, torch_logits

    from mnv4_deploy.load.models import load_model
    from mnv4_deploy.preparation.prepare import prepare
    from mnv4_deploy.targets import ExportRequest, get_target

    ckpt = SHARED / "models" / "mnv4_conv_small_tin202.pth"
    data = SHARED / "data" / "tiny-imagenet-202"
    settings = ConvertSettings(model="mobilenetv4_conv_small", out=work / "fidelity", targets="executorch,tflite",
                               precision="int8", weights=str(ckpt), num_classes=202,
                               preprocessing={"input_size": [64], "crop_pct": 1.0}, calib=Path("reference-tin202"),
                               calib_root=data / "train", latency_runs=1, progress=False)
    results = {r.target: r for r in convert(settings)}
    loaded = load_model("mobilenetv4_conv_small", str(ckpt), 202, {"input_size": [64], "crop_pct": 1.0})
    prepare(loaded.model)
    val = load_images(scan_folder(data / "val").sample(n_val, seed=0), loaded.preprocessing)
    reference = torch_logits(loaded.model, val.x)
    out: dict[str, Any] = {"val_images": len(val.x)}
    for name, r in results.items():
        target = get_target(name)
        request = ExportRequest(loaded, "int8", target.Options(), None, None)
        runner = target.load(r.path, request)
        f = compare(run_batched(runner, val.x, 64, runner.max_batch), reference, val.labels)
        out[name] = {"top1_agreement": f.top1_agreement, "top1": f.top1, "float_top1": f.reference_top1,
                     "cosine": f.cosine, "int8_compute": r.manifest["structure"].get("int8_compute")}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*", default=MODELS, help="name:size, e.g. conv_small:224")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--val", type=int, default=2000, help="val images for the fidelity check (0: skip it)")
    parser.add_argument("--json-out", type=Path, default=REPO / "bench" / "results" / "executorch.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    result: dict[str, Any] = {"cores": os.cpu_count(), "load_before": os.getloadavg()[0], "speed": [], "fidelity": None}
    with tempfile.TemporaryDirectory() as tmp:
        for spec in args.models:
            model, size = spec.split(":")
            row = speed(model, int(size), args.rounds, Path(tmp))
            result["speed"].append(row)
            print(f"\n{model} {size}: " + ", ".join(f"{k} {v} ms" for k, v in row["median_ms"].items()))
            print("  " + ", ".join(f"{k} {v}" for k, v in row["ratios"].items()))
            print(f"  int8 compute in ExecuTorch: {row['int8_compute']}", flush=True)
        if args.val:
            result["fidelity"] = fid = fidelity(args.val, Path(tmp))
            print(f"\nreference conv_small 64x64, {fid['val_images']} val images, int8 vs float:")
            for name in ("executorch", "tflite"):
                r = fid[name]
                print(f"  {name:10s} agreement {r['top1_agreement']:.2%}  top-1 {r['top1']:.2%} "
                      f"(float {r['float_top1']:.2%})  cosine {r['cosine']:.4f}")
    result["load_after"] = os.getloadavg()[0]
    args.json_out.parent.mkdir(parents=True, exist_ok=True)
    args.json_out.write_text(json.dumps(result, indent=1))
    print(f"wrote {args.json_out}", file=sys.stderr)


if __name__ == "__main__":
    main()
