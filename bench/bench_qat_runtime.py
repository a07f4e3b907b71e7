"""QAT against PTQ in the runtimes: `mnv4-deploy convert --recipe ptq-int8` and `mnv4-deploy qat` (recipe
`qat-int8-kd`) on the same reference checkpoint, calibration set and val images, each artifact scored in its own
runtime (onnxruntime, the LiteRT interpreter) on every Tiny ImageNet val image (never seen by calibration or
training), the QAT artifact compared with the PTQ artifact of the same target image by image:

  agreement   top-1 agreement with the float model (the manifests' per-image predictions)
  change      QAT minus PTQ, with its paired 95% interval (Newcombe)
  top-1       top-1 on the val labels, and its paired change

Both commands run as the README shows them (`--calib reference-tin202`, so epoch 0 of QAT is the PTQ model),
with `--no-verify-gate` (the 1-epoch hybrid's PTQ model fails the gate: that is what QAT is for) and one torch
thread (OMP_NUM_THREADS=1). Results go to bench/results/qat_runtime_<model>.json with the commands.

  .venv/bin/python bench/bench_qat_runtime.py --model conv_small                    # the recipe's 2 epochs
  .venv/bin/python bench/bench_qat_runtime.py --model hybrid --epochs 1
  .venv/bin/python bench/bench_qat_runtime.py --model conv_small --reuse OUT        # score earlier runs in OUT
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench_qat import DATA, MODELS  # noqa: E402  (the same checkpoints and images as the schedule bench)
from mnv4_deploy.infra.fileio import write_json  # noqa: E402
from mnv4_deploy.verify.predictions import decode_classes  # noqa: E402
from mnv4_deploy.verify.significance import paired_counts, paired_difference_interval  # noqa: E402


def commands(model: str, targets: str, epochs: int | None, out: Path) -> dict[str, list[str]]:
    name, weights = MODELS[model]
    common = ["--model", name, "--weights", str(weights), "--num-classes", "202", "--input-size", "64",
              "--crop-pct", "1.0", "--calib", "reference-tin202", "--calib-root", str(DATA / "train"),
              "--val", str(DATA / "val"), "--to", targets, "--no-progress", "--json", "--no-verify-gate"]
    qat = ["qat", *common, "--train", str(DATA / "train"), "--out", str(out / "qat")]
    if epochs is not None:
        qat += ["--epochs", str(epochs)]
    return {"ptq": ["convert", *common, "--int8", "--recipe", "ptq-int8", "--out", str(out / "ptq")], "qat": qat}


def run(args: list[str], log: Path) -> tuple[list[dict[str, Any]], float]:
    """One mnv4-deploy command; its manifests (--json) and wall seconds."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    start = time.perf_counter()
    with open(log, "w") as err:
        proc = subprocess.run([sys.executable, "-m", "mnv4_deploy", *args], stdout=subprocess.PIPE, stderr=err,
                              text=True, env=env, cwd=REPO)
    if proc.returncode != 0:
        raise SystemExit(f"mnv4-deploy {' '.join(args)} failed; see {log}")
    return json.loads(proc.stdout), time.perf_counter() - start


def val_entries(manifests: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {m["target"]: m["verification"]["val"] for m in manifests}


def compare(ptq: dict[str, Any], qat: dict[str, Any]) -> dict[str, Any]:
    """Agreement and top-1 of both artifacts of one target, and the paired change QAT - PTQ."""
    a, b = ptq["predictions"], qat["predictions"]
    if a["float_top1"] != b["float_top1"] or a["labels"] != b["labels"]:
        raise SystemExit("the two runs were not scored on the same images")
    float_top1, labels = decode_classes(a["float_top1"]), decode_classes(a["labels"])
    p, q = decode_classes(a["top1"]), decode_classes(b["top1"])
    out: dict[str, Any] = {"images": len(labels), "float_top1": round(float(np.mean(float_top1 == labels)), 5)}
    for what, ok_p, ok_q in (("agreement", p == float_top1, q == float_top1), ("top1", p == labels, q == labels)):
        lo, hi = paired_difference_interval(*paired_counts(ok_q, ok_p))
        out[what] = {"ptq": round(float(ok_p.mean()), 5), "qat": round(float(ok_q.mean()), 5),
                     "change": round(float(ok_q.mean() - ok_p.mean()), 5), "change_ci95": [round(lo, 5), round(hi, 5)]}
    return out


def table(rows: dict[str, dict[str, Any]]) -> str:
    lines = ["| target | agreement PTQ | agreement QAT | change [95%] | top-1 PTQ | top-1 QAT | change [95%] |",
             "|---|---|---|---|---|---|---|"]
    pct = lambda v: f"{100 * v:.2f}%"  # noqa: E731
    pt = lambda r: f"{100 * r['change']:+.2f} [{100 * r['change_ci95'][0]:+.2f}, {100 * r['change_ci95'][1]:+.2f}]"  # noqa: E731
    for target, r in rows.items():
        g, t = r["agreement"], r["top1"]
        lines.append(f"| {target} | {pct(g['ptq'])} | {pct(g['qat'])} | {pt(g)} | {pct(t['ptq'])} | {pct(t['qat'])} | {pt(t)} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=sorted(MODELS), default="conv_small")
    ap.add_argument("--to", default="onnx,tflite")
    ap.add_argument("--epochs", type=int, default=None, help="override the recipe's qat.epochs")
    ap.add_argument("--out", type=Path, default=Path("/tmp/bench_qat_runtime"))
    ap.add_argument("--reuse", action="store_true", help="score the ptq.json / qat.json already in --out")
    args = ap.parse_args()
    out = args.out / args.model
    out.mkdir(parents=True, exist_ok=True)
    cmds = commands(args.model, args.to, args.epochs, out)
    manifests, seconds = {}, {}
    for kind, cmd in cmds.items():
        saved = out / f"{kind}.json"
        if args.reuse:
            manifests[kind] = json.loads(saved.read_text())
        else:
            manifests[kind], seconds[kind] = run(cmd, out / f"{kind}.log")
            saved.write_text(json.dumps(manifests[kind]))
    ptq, qat = val_entries(manifests["ptq"]), val_entries(manifests["qat"])
    rows = {t: compare(ptq[t], qat[t]) for t in ptq if t in qat}
    shipped = manifests["qat"][0]["quantization"].get("qat", {})
    print(table(rows))
    saved_result = REPO / "bench" / "results" / f"qat_runtime_{args.model}.json"
    kept: dict[str, Any] = {}
    if args.reuse and saved_result.exists():  # the runs' own wall times, when an earlier result recorded them
        earlier = json.loads(saved_result.read_text())
        if isinstance(earlier.get("seconds"), dict):
            seconds = earlier["seconds"]
            kept = {k: earlier[k] for k in ("seconds_note",) if k in earlier}
    result = {"model": args.model, "commands": {k: "mnv4-deploy " + " ".join(v) for k, v in cmds.items()},
              "seconds": {k: round(v, 1) for k, v in seconds.items()} or "reused", "threads": 1,
              "qat_epochs": shipped.get("epochs"), "qat_shipped": shipped.get("shipped"), "targets": rows, **kept}
    write_json(saved_result, result)


if __name__ == "__main__":
    main()
