"""Time to a verified artifact: wall time and the time of every stage of `mnv4-deploy convert`, per source tree.

Runs the README's main command (MNv4-Conv-Small at its native 224x224, `--to coreml --int8`, the default recipe
and calibration set), the same model `--to onnx,tflite,openvino,coreml --int8` (what `--to all` built with the
`all` extra when its time goal was set) and `--to onnx,tflite,openvino,coreml,executorch --int8` (what the `all`
extra installs today; `qnn`, outside `all`, emulates an NPU for minutes), each as its own process, once per source
tree given (`--tree before=/path/to/checkout`), so a change can be measured against the code before it on the
same machine. Weights are random (timm's pretrained weights need the hub; the time does not depend on them) unless
`--weights` says otherwise. The stage table comes from the manifests' `timings` (mnv4_deploy/infra/stages.py): the
run's shared stages, then each target's own.

  .venv/bin/python bench/bench_convert_time.py                      # this checkout
  .venv/bin/python bench/bench_convert_time.py --tree before=/tmp/before --tree after=. --repeat 3
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
RUNS = {
    "main (coreml int8)": ["--to", "coreml"],
    "all (onnx,tflite,openvino,coreml int8)": ["--to", "onnx,tflite,openvino,coreml"],
    "all extra (onnx,tflite,openvino,coreml,executorch int8)": ["--to", "onnx,tflite,openvino,coreml,executorch"],
}


def convert(tree: Path, to: list[str], weights: str, out: Path) -> dict[str, Any]:
    """One `mnv4-deploy convert` in a fresh process running `tree`'s code; its wall time and manifests."""
    cmd = [sys.executable, "-m", "mnv4_deploy", "convert", "--model", "mobilenetv4_conv_small", "--weights", weights,
           *to, "--int8", "--out", str(out), "--no-progress", "--no-verify-gate"]
    env = {**os.environ, "PYTHONPATH": str(tree), "HF_HUB_OFFLINE": "1"}
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed in {tree}:\n{proc.stderr[-3000:]}")
    manifests = {p.parent.name: json.loads(p.read_text()) for p in sorted(out.glob("*/manifest.json"))}
    return {"wall_s": round(wall, 1), "timings": {t: m.get("timings", {}) for t, m in manifests.items()}}


def stage_rows(result: dict[str, Any]) -> dict[str, float]:
    """{stage: seconds}: the shared stages once (from the first manifest), then every target's, prefixed."""
    timings = result["timings"]
    rows: dict[str, float] = {}
    if timings:
        rows |= next(iter(timings.values())).get("run", {})
    for target, t in timings.items():
        rows |= {f"{target}/{k}": v for k, v in t.get("target", {}).items()}
    return rows


def table(results: dict[str, dict[str, dict[str, Any]]], runs: list[str]) -> str:
    trees = list(results)
    lines = []
    for run in runs:
        lines.append(f"\n### {run}\n")
        lines.append("| stage | " + " | ".join(f"{t} s" for t in trees) + " |")
        lines.append("|---|" + "---|" * len(trees))
        rows = {t: stage_rows(results[t][run]) for t in trees}
        names = list(dict.fromkeys(n for t in trees for n in rows[t]))
        for n in names:
            lines.append(f"| {n} | " + " | ".join(f"{rows[t].get(n, 0):.1f}" for t in trees) + " |")
        lines.append("| **wall (process)** | " + " | ".join(f"**{results[t][run]['wall_s']:.1f}**" for t in trees) + " |")
        if any(len(results[t][run].get("walls_s", [])) > 1 for t in trees):
            lines.append("| every run's wall | " + " | ".join(
                " / ".join(f"{w:.1f}" for w in results[t][run]["walls_s"]) for t in trees) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tree", action="append", metavar="NAME=PATH",
                        help="a source tree to time (repeatable); default: this checkout")
    parser.add_argument("--weights", default="random")
    parser.add_argument("--runs", nargs="+", choices=list(RUNS), default=list(RUNS))
    parser.add_argument("--repeat", type=int, default=1,
                        help="runs per tree and command, interleaved; the table shows the median one's stages")
    parser.add_argument("--json-out", type=Path, default=REPO / "bench" / "results" / "convert_time.json")
    args = parser.parse_args()
    trees = dict(t.split("=", 1) for t in args.tree) if args.tree else {"this": str(REPO)}
    results: dict[str, dict[str, Any]] = {name: {} for name in trees}
    load = os.getloadavg()[0]
    repeats: dict[str, dict[str, list[dict[str, Any]]]] = {name: {run: [] for run in args.runs} for name in trees}
    for i in range(args.repeat):
        for run in args.runs:  # trees alternate within each run, so machine noise hits both
            for name, path in trees.items():
                with tempfile.TemporaryDirectory() as tmp:
                    print(f"{run} / {name} ({i + 1}/{args.repeat}) ...", file=sys.stderr, flush=True)
                    repeats[name][run].append(convert(Path(path).resolve(), RUNS[run], args.weights,
                                                      Path(tmp) / "out"))
    for name in trees:
        for run in args.runs:  # the run with the median wall time (its stages), and every wall time
            ordered = sorted(repeats[name][run], key=lambda r: r["wall_s"])
            results[name][run] = {**ordered[(len(ordered) - 1) // 2],
                                  "walls_s": [r["wall_s"] for r in repeats[name][run]]}
    print(table(results, args.runs))
    args.json_out.parent.mkdir(parents=True, exist_ok=True)
    args.json_out.write_text(json.dumps({"cores": os.cpu_count(), "load_before": load, "trees": trees,
                                         "results": results}, indent=2))
    print(f"\nwrote {args.json_out} (load average before: {load:.2f}, {os.cpu_count()} cores)", file=sys.stderr)


if __name__ == "__main__":
    main()
