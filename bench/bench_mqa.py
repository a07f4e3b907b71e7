"""MobileMQA vs timm's MultiQueryAttention2d: runtime latency (same weights) and converted CoreML op counts.

For the attention blocks of mobilenetv4_hybrid_medium and _large at 224x224 input (stage 3: 14x14 with K/V
stride 2; stage 4: 7x7), this measures:
  - onnxruntime CPU and OpenVINO CPU latency of each module alone, timm's (non-fused, as prepare() used to
    run it) vs ours, as a ratio (same machine, same run: quote ratios, not absolute times);
  - the op histogram of each block converted to a CoreML ML Program (torch.export path, and jit tracing,
    which fails for timm's module), with transposes and reshapes called out.
Prints a table and writes JSON (bench/results/mqa.json).

  python bench/bench_mqa.py [--runs 200] [--threads 1]
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import copy
import io
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from mnv4_deploy.infra.fileio import write_json  # noqa: E402
from mnv4_deploy.preparation.mqa import MobileMQA  # noqa: E402

# (name, dim, heads, key_dim, kv_stride, spatial) as in timm's hybrid configs at 224 input.
BLOCKS = [
    ("hybrid_medium stage3", 160, 4, 64, 2, 14),
    ("hybrid_medium stage4", 256, 4, 64, 1, 7),
    ("hybrid_large stage3", 192, 8, 48, 2, 14),
    ("hybrid_large stage4", 512, 8, 64, 1, 7),
]


def _blocks() -> list[tuple[str, torch.nn.Module, torch.nn.Module, torch.Tensor]]:
    from timm.layers.attention2d import MultiQueryAttention2d

    out = []
    for name, dim, heads, key_dim, kv_stride, hw in BLOCKS:
        torch.manual_seed(0)
        ref = MultiQueryAttention2d(dim, dim, num_heads=heads, key_dim=key_dim, value_dim=key_dim,
                                    kv_stride=kv_stride).eval()
        ref.fused_attn = False
        ours = MobileMQA.from_timm(copy.deepcopy(ref)).eval()
        out.append((name, ref, ours, torch.randn(1, dim, hw, hw)))
    return out


def _time(fn: Callable[[], Any], runs: int) -> float:
    for _ in range(10):
        fn()
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def _onnx(module: torch.nn.Module, x: torch.Tensor, path: Path) -> None:
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (x,), str(path), dynamo=True, opset_version=18, input_names=["x"],
                          output_names=["y"], external_data=False)


def _ort_ms(path: Path, x: np.ndarray, runs: int, threads: int) -> tuple[float, dict[str, int]]:
    import onnx
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    ops = collections.Counter(n.op_type for n in onnx.load(str(path)).graph.node)
    return _time(lambda: sess.run(None, {"x": x}), runs), dict(ops)


def _ov_ms(module: torch.nn.Module, x: torch.Tensor, runs: int, threads: int) -> float:
    import openvino as ov

    core = ov.Core()
    compiled = core.compile_model(ov.convert_model(module, example_input=x), "CPU",
                                  {"INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": "f32"})
    request = compiled.create_infer_request()
    data = x.numpy()
    return _time(lambda: request.infer([data]), runs)


def _coreml_ops(module: torch.nn.Module, x: torch.Tensor, conversion: str) -> dict[str, Any]:
    import coremltools as ct

    from mnv4_deploy.infra.converter_output import captured

    try:
        with torch.no_grad():
            source = (torch.export.export(module, (x,)).run_decompositions({}) if conversion == "export"
                      else torch.jit.trace(module, x))
        with captured("coremltools.convert"):
            ml = ct.convert(source, inputs=[ct.TensorType(name="x", shape=tuple(x.shape))],
                            convert_to="mlprogram", minimum_deployment_target=ct.target.iOS17, skip_model_load=True)
    except Exception as exc:
        return {"error": f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:120] if str(exc).strip() else ''}"}
    ops = collections.Counter(op.op_type for f in ml._mil_program.functions.values() for op in f.operations)
    ops.pop("const", None)
    return {"ops": dict(sorted(ops.items(), key=lambda kv: -kv[1])), "total": sum(ops.values()),
            "transpose": ops.get("transpose", 0), "reshape": ops.get("reshape", 0)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "mqa.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, ref, ours, x in _blocks():
            with torch.no_grad():
                diff = (ref(x) - ours(x)).abs().max().item()
            row: dict[str, Any] = {"block": name, "input": list(x.shape), "max_abs_diff": diff}
            for label, module in (("timm", ref), ("ours", ours)):
                path = Path(tmp) / f"{label}.onnx"
                _onnx(module, x, path)
                ms, ops = _ort_ms(path, x.numpy(), args.runs, args.threads)
                row[f"ort_ms_{label}"] = ms
                row[f"onnx_ops_{label}"] = ops
                try:
                    row[f"ov_ms_{label}"] = _ov_ms(module, x, args.runs, args.threads)
                except Exception as exc:
                    row[f"ov_ms_{label}"] = None
                    row[f"ov_error_{label}"] = f"{type(exc).__name__}: {exc}"[:200]
                for conversion in ("export", "trace"):
                    row[f"coreml_{conversion}_{label}"] = _coreml_ops(module, x, conversion)
            row["ort_ratio_ours_over_timm"] = row["ort_ms_ours"] / row["ort_ms_timm"]
            if row.get("ov_ms_ours") and row.get("ov_ms_timm"):
                row["ov_ratio_ours_over_timm"] = row["ov_ms_ours"] / row["ov_ms_timm"]
            rows.append(row)
            print(f"done: {name}", file=sys.stderr, flush=True)

    def cm(row: dict[str, Any], key: str) -> str:
        r = row[key]
        return "fails" if "error" in r else f"{r['transpose']}T/{r['reshape']}R/{r['total']}"

    header = ("block", "ort timm ms", "ort ours ms", "ratio", "ov timm ms", "ov ours ms", "ratio",
              "CoreML export timm", "ours", "CoreML trace timm", "ours")
    lines = [header]
    for r in rows:
        ov = lambda k: "-" if r.get(k) is None else f"{r[k]:.3f}"
        lines.append((r["block"], f"{r['ort_ms_timm']:.3f}", f"{r['ort_ms_ours']:.3f}", f"{r['ort_ratio_ours_over_timm']:.2f}",
                      ov("ov_ms_timm"), ov("ov_ms_ours"),
                      f"{r['ov_ratio_ours_over_timm']:.2f}" if "ov_ratio_ours_over_timm" in r else "-",
                      cm(r, "coreml_export_timm"), cm(r, "coreml_export_ours"),
                      cm(r, "coreml_trace_timm"), cm(r, "coreml_trace_ours")))
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(header))]
    for line in lines:
        print("  ".join(str(c).ljust(w) for c, w in zip(line, widths)).rstrip())
    print("CoreML columns: transposes T / reshapes R / all non-const ops of the converted block")
    write_json(args.out, {"threads": args.threads, "runs": args.runs, "torch": torch.__version__, "blocks": rows})
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
