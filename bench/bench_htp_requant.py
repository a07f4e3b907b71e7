"""How Qualcomm HTP requantizes, measured in onnxruntime-qnn's HTP emulator (the evidence behind
mnv4_deploy/targets/qnn/htp_semantics.py).

Single QDQ ops are compiled for HTP and fed synthetic inputs; each output is compared with exact rounding
(what onnxruntime CPU and the PyTorch simulation compute) and with the modelled HTP rule:

1. `accumulators`: a 2-input-channel conv (weights 1 and 127) whose 65,536 pixels cover every accumulator value
   of the range once, for several output scales;
2. `kernels`: random convs (1x1, 3x3, stride 2, depthwise, with float biases and per-channel scales), modelled
   with round(bias / scale) and with the bias HTP compiles (probed); strided depthwise convs by their own rule;
3. `socs`: the accumulator probe and a strided depthwise conv compiled for every SoC the target offers (the conv
   rule holds from HTP v73 on, the strided depthwise rule on all);
4. `adds`: 8-bit Adds over all 65,536 input pairs.

  python bench/bench_htp_requant.py [--soc SM8550]

Writes bench/results/htp_requant.json and prints a table.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from mnv4_deploy.targets.qnn.htp_semantics import requantize, requantize_strided_depthwise  # noqa: E402
from mnv4_deploy.targets.qnn.probes import htp_add_table, htp_conv_biases, run_qdq_conv, scale_of  # noqa: E402


def run_conv(soc: str, w: np.ndarray, sw: np.ndarray, bias: np.ndarray, s_in: float, z_in: int, s_out: float,
             z_out: int, xq: np.ndarray, **conv: int) -> tuple[np.ndarray, np.ndarray]:
    """HTP's uint8 outputs and the exact int accumulators (without bias) for integer inputs `xq` (batch 1)."""
    got = run_qdq_conv(soc, w, sw, bias, s_in, z_in, s_out, z_out, xq, **conv)[None]
    acc = torch.nn.functional.conv2d(torch.from_numpy(xq.astype(np.float64) - z_in), torch.from_numpy(w.astype(np.float64)),
                                     None, conv.get("stride", 1), conv.get("pad", 0), 1, conv.get("group", 1)).numpy()
    return got, acc


def rates(got: np.ndarray, exact: np.ndarray, modelled: np.ndarray) -> dict[str, Any]:
    inside = (exact > 0.5) & (exact < 254.5)  # saturated outputs say nothing about rounding
    return {"outputs": int(inside.sum()),
            "exact_rounding_matches": round(float((np.floor(exact + 0.5) == got)[inside].mean()), 5),
            "htp_rule_matches": round(float((modelled == got)[inside].mean()), 5)}


def accumulators(soc: str) -> list[dict[str, Any]]:
    w = np.array([[[[1]], [[127]]]], np.int8)
    xq = np.zeros((1, 2, 256, 256), np.int64)
    xq[0, 0], xq[0, 1] = np.arange(256)[None, :], np.arange(256)[:, None]
    rows = []
    for s_out in (0.4, 0.1, 0.07, 0.05, 0.03, 0.013, 0.0059, 0.0035, 0.0016):
        got, acc = run_conv(soc, w, np.array([2 ** -7]), np.zeros(1), 1 / 16, 128, s_out, 128, xq)
        multiplier = scale_of(1 / 16, np.array([2 ** -7]))[0] / np.float64(np.float32(s_out))
        rows.append({"s_out": s_out, "multiplier": round(float(multiplier), 6),
                     "shift": int(np.floor(np.log2(1 / (8 * multiplier)))),
                     **rates(got, acc * multiplier + 128, requantize(acc, multiplier, 128, 0, 255))})
    return rows


def kernels(soc: str) -> list[dict[str, Any]]:
    rng = np.random.default_rng(0)
    rows = []
    for name, c, k, kh, stride, group in (("1x1", 64, 64, 1, 1, 1), ("3x3", 16, 32, 3, 1, 1),
                                          ("3x3 stride 2", 16, 32, 3, 2, 1), ("depthwise 3x3", 32, 32, 3, 1, 32),
                                          ("depthwise 5x5", 32, 32, 5, 1, 32), ("depthwise 3x3 stride 2", 32, 32, 3, 2, 32),
                                          ("depthwise 5x5 stride 2", 32, 32, 5, 2, 32)):
        w = rng.integers(-127, 128, size=(k, c // group, kh, kh)).astype(np.int8)
        sw = (rng.uniform(0.5, 1.5, size=k) * 0.004).astype(np.float32)
        bias = rng.normal(0, 0.3, size=k).astype(np.float32)
        s_in, z_in, z_out = 0.05, 128, 100
        s_out = 0.09 * (c // group * kh * kh / 9) ** 0.5
        xq = rng.integers(0, 256, size=(4, c, 32, 32))
        outs = [run_conv(soc, w, sw, bias, s_in, z_in, s_out, z_out, xq[i:i + 1], group=group, stride=stride,
                         pad=kh // 2) for i in range(len(xq))]
        got, acc = np.concatenate([o[0] for o in outs]), np.concatenate([o[1] for o in outs])
        scale = scale_of(s_in, sw)
        multiplier = (scale / np.float64(np.float32(s_out)))[None, :, None, None]
        nominal = np.round(bias.astype(np.float64) / scale)[None, :, None, None]
        probed = htp_conv_biases(soc, s_in, z_in, sw, bias)[None, :, None, None]
        exact = (acc + nominal) * multiplier + z_out
        strided_dw = group > 1 and stride > 1
        requant = requantize_strided_depthwise if strided_dw else requantize
        def rule(b: np.ndarray, acc: np.ndarray = acc, multiplier: np.ndarray = multiplier, z_out: int = z_out,
                 requant: Any = requant) -> np.ndarray:
            return requant(acc + b, multiplier, z_out, 0, 255)
        rows.append({"kernel": name, "model": "strided depthwise rule" if strided_dw else "HTP rule",
                     **rates(got, exact, rule(nominal)),
                     "htp_rule_with_probed_bias_matches": rates(got, exact, rule(probed))["htp_rule_matches"],
                     "channels_whose_probed_bias_differs": int((probed != nominal).sum())})
    return rows


def adds(soc: str) -> list[dict[str, Any]]:
    rows = []
    a, b = np.meshgrid(np.arange(256), np.arange(256))
    for s_a, z_a, s_b, z_b, s_out, z_out in ((0.0924, 119, 0.0500, 130, 0.0965, 124), (0.0819, 130, 0.0509, 131, 0.0924, 119),
                                             (0.05, 128, 0.07, 120, 0.09, 125)):
        got = htp_add_table(soc, s_a, z_a, s_b, z_b, s_out, z_out).astype(np.int64)
        exact = ((a - z_a) * np.float64(np.float32(s_a)) + (b - z_b) * np.float64(np.float32(s_b))) / np.float64(np.float32(s_out)) + z_out
        inside = (exact > 0.5) & (exact < 254.5)
        rows.append({"scales": [s_a, s_b, s_out], "outputs": int(inside.sum()),
                     "exact_rounding_matches": round(float((np.floor(exact + 0.5) == got)[inside].mean()), 5)})
    return rows


def strided_depthwise(soc: str) -> dict[str, Any]:
    """A random 3x3 stride-2 depthwise conv (float biases, output zero point 200) under its own rule."""
    rng = np.random.default_rng(1)
    c = 32
    w = rng.integers(-40, 41, size=(c, 1, 3, 3)).astype(np.int8)
    sw = (rng.uniform(0.5, 1.5, size=c) * 0.004).astype(np.float32)
    bias = rng.normal(0, 0.3, size=c).astype(np.float32)
    got, acc = run_conv(soc, w, sw, bias, 0.05, 128, 0.03, 200, rng.integers(0, 256, size=(1, c, 128, 128)),
                        group=c, stride=2, pad=1)
    scale = scale_of(0.05, sw)
    multiplier = (scale / np.float64(np.float32(0.03)))[None, :, None, None]
    acc = acc + np.round(bias / scale)[None, :, None, None]
    return rates(got, acc * multiplier + 200, requantize_strided_depthwise(acc, multiplier, 200, 0, 255))


def socs() -> list[dict[str, Any]]:
    """The accumulator probe (s_out 0.07 and 0.05) and a strided depthwise conv compiled for each SoC: where
    each rule holds."""
    from mnv4_deploy.targets.qnn.context import SOCS

    rows = []
    for soc, (_, arch, name) in SOCS.items():
        measured = [r for r in accumulators(soc) if r["s_out"] in (0.07, 0.05)]
        rows.append({"soc": soc, "name": name, "htp_arch": f"v{arch}",
                     "exact_rounding_matches": min(r["exact_rounding_matches"] for r in measured),
                     "htp_rule_matches": min(r["htp_rule_matches"] for r in measured),
                     "strided_depthwise": strided_depthwise(soc)})
    return rows


def table(result: dict[str, Any]) -> str:
    lines = ["| probe | outputs | exact rounding | HTP rule | HTP rule, probed bias |", "|---|---|---|---|---|"]
    for r in result["accumulators"]:
        lines.append(f"| every accumulator, s_out {r['s_out']} (shift {r['shift']}) | {r['outputs']} | "
                     f"{100 * r['exact_rounding_matches']:.2f}% | {100 * r['htp_rule_matches']:.2f}% | - |")
    for r in result["kernels"]:
        lines.append(f"| {r['kernel']} conv, float bias ({r['model']}) | {r['outputs']} | {100 * r['exact_rounding_matches']:.2f}% | "
                     f"{100 * r['htp_rule_matches']:.2f}% | {100 * r['htp_rule_with_probed_bias_matches']:.2f}% |")
    for r in result["socs"]:
        lines.append(f"| every accumulator on {r['soc']} (HTP {r['htp_arch']}), worst of s_out 0.07 / 0.05 | - | "
                     f"{100 * r['exact_rounding_matches']:.2f}% | {100 * r['htp_rule_matches']:.2f}% | - |")
        dw = r["strided_depthwise"]
        lines.append(f"| depthwise 3x3 stride 2 on {r['soc']}, strided depthwise rule | {dw['outputs']} | "
                     f"{100 * dw['exact_rounding_matches']:.2f}% | {100 * dw['htp_rule_matches']:.2f}% | - |")
    for r in result["adds"]:
        lines.append(f"| Add, scales {r['scales']} | {r['outputs']} | {100 * r['exact_rounding_matches']:.2f}% | "
                     "table from the emulator | - |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--soc", default="SM8550")
    args = parser.parse_args()
    result = {"soc": args.soc, "accumulators": accumulators(args.soc), "kernels": kernels(args.soc),
              "socs": socs(), "adds": adds(args.soc)}
    out = REPO / "bench" / "results" / "htp_requant.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(table(result))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
