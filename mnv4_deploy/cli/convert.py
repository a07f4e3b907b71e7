"""`mnv4-deploy convert` and `mnv4-deploy qat`: build artifacts (PTQ or QAT), verify them, print the results."""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Sequence

from ..errors import UserError
from ..infra import console
from ..infra.console import echo
from ..verify.manifest import PRECISIONS
from .common import (add_model_command, add_target_option_flags, add_verify_gate_flag, preprocessing_overrides,
                     target_option_values)

EPILOG_CONVERT = """\
examples:
  # int8 ONNX from timm's pretrained weights, calibrated on your own images
  mnv4-deploy convert --model mobilenetv4_conv_small --to onnx --int8 --calib ./my_images --out build/

  # a local checkpoint trained on 202 classes at 64x64, checked against a labelled val folder
  mnv4-deploy convert --model mobilenetv4_conv_small --weights model.pth --num-classes 202 \\
      --input-size 64 --crop-pct 1.0 --to onnx --int8 --calib train/ --val val/ --out build/

Each artifact lands in OUT/<target>/ with a manifest.json (model, weights hash, recipe, tool versions,
input/output spec, size, verification numbers). An artifact is written only when it passes the recipe's
verification thresholds (finite outputs, agreement and cosine with float and with the PyTorch simulation);
otherwise the command exits 1 and OUT/<target>/manifest.failed.json says what was measured. Keep a failing
artifact knowingly with --no-verify-gate (its manifest then says it failed).
"""


EPILOG_QAT = """\
examples:
  # fine-tune the reference checkpoint for the recipe's 2 epochs, export to ONNX and TFLite
  mnv4-deploy qat --model mobilenetv4_conv_small --weights model.pth --num-classes 202 --input-size 64 \\
      --crop-pct 1.0 --train train/ --val val/ --to onnx,tflite --out build/qat

  # start from the same PTQ model as `convert --recipe ptq-int8 --calib reference-tin202 ...` (epoch 0 = that model)
  mnv4-deploy qat ... --calib reference-tin202 --calib-root train/

  # continue an interrupted run
  mnv4-deploy qat ... --resume build/qat/qat/last.pt

  # data-parallel over 4 GPUs (or CPU processes with Gloo)
  torchrun --nproc_per_node 4 -m mnv4_deploy qat ...

Training starts from the recipe's PTQ model (epoch 0) and ships the last epoch, unless an earlier one agrees
with float more often on held-back train images beyond noise (a log line says which; --keep-last ships the last).
The recipe's qat: section sets epochs, optimizer, learning rate schedule, distillation loss, when observers freeze
and whether activation ranges are learned; see recipes/qat-int8-kd.yaml.
"""

_TO_HELP = ("a target, a comma list, or 'all' (every installed one; default: onnx); targets: "
            "`mnv4-deploy inspect --list`")


def _add_run_options(g: argparse._ArgumentGroup) -> None:
    """Options `convert` and `qat` share: decoding workers, latency runs, output format, progress bars."""
    g.add_argument("--workers", type=int, default=0, metavar="N", help="image-decoding worker processes")
    g.add_argument("--latency-runs", type=int, default=30, metavar="N", help="timed runs per artifact")
    g.add_argument("--json", action="store_true", help="print the manifests as JSON on stdout instead of a table")
    add_verify_gate_flag(g)
    g.add_argument("--no-progress", action="store_true", help="no progress bars")


def add_convert_command(sub: Any) -> None:
    conv = add_model_command(
        sub, "convert", "export (and quantize) a model for one or more targets",
        "Load -> prepare -> quantize once -> export per target -> verify (gate) -> manifest.", EPILOG_CONVERT)
    g = conv.add_argument_group("what to build")
    g.add_argument("--to", default="onnx", metavar="TARGETS", help=_TO_HELP)
    g.add_argument("--int8", action="store_true", help="int8 quantization (same as --precision int8)")
    g.add_argument("--precision", choices=PRECISIONS,
                   help="artifact precision (default fp32); bf16: OpenVINO computing in bfloat16")
    g.add_argument("--recipe", metavar="NAME|FILE", help="a shipped recipe name (e.g. ptq-int8) or a YAML file")
    g.add_argument("--out", type=Path, default=Path("build"), metavar="DIR", help="output folder (default: build/)")
    add_target_option_flags(conv)
    g = conv.add_argument_group("data")
    g.add_argument("--calib", type=Path, metavar="DIR|SET",
                   help="calibration images (flat or class sub-folders; some are held back for verification), or a "
                        "calibration set (name from `mnv4-deploy calib list`, or .yaml). Default: the recipe's set, "
                        "else sample photos shipped with scikit-image")
    g.add_argument("--calib-root", type=Path, metavar="DIR",
                   help="the folder a calibration set's paths are relative to (default: $MNV4_CALIB_ROOT)")
    g.add_argument("--calib-allow-changed", action="store_true",
                   help="calibrate on a set whose files are missing or changed (the manifest's digest says what "
                        "was used)")
    g.add_argument("--val", type=Path, metavar="DIR", help="labelled ImageFolder to measure top-1/top-5 on")
    g.add_argument("--val-labels", type=Path, metavar="FILE",
                   help="ground truth for a flat --val folder (ImageNet val: LOC_val_solution.csv or '<file> <wnid>' "
                        "lines), in timm's 1000-class order")
    g.add_argument("--val-limit", type=int, metavar="N", help="evaluate on a random N images of --val")
    _add_run_options(g)
    conv.set_defaults(func=cmd_convert)


def add_qat_command(sub: Any) -> None:
    qat = add_model_command(
        sub, "qat", "quantization-aware fine-tuning with distillation, then export like convert",
        "PTQ calibration -> QAT fine-tuning (the float model teaches the int8 one) -> export per target -> verify "
        "-> manifest. Runs on CPU, a GPU when present, and data-parallel under torchrun.", EPILOG_QAT)
    g = qat.add_argument_group("training")
    g.add_argument("--train", type=Path, required=True, metavar="DIR",
                   help="train images (flat or class sub-folders); held-back images (verification, and the images "
                        "that choose the shipped epoch) come from here, and calibration unless --calib")
    g.add_argument("--calib", type=Path, metavar="DIR|SET",
                   help="calibration images or set for the PTQ start, as in convert (default: --train)")
    g.add_argument("--calib-root", type=Path, metavar="DIR",
                   help="the folder a calibration set's paths are relative to (default: $MNV4_CALIB_ROOT)")
    g.add_argument("--val", type=Path, metavar="DIR",
                   help="labelled images the artifacts are scored on at export (never used to choose the epoch)")
    g.add_argument("--val-limit", type=int, metavar="N", help="use a random N images of --val for the final check")
    g.add_argument("--recipe", default="qat-int8-kd", metavar="NAME|FILE",
                   help="recipe with a qat: section (default: qat-int8-kd)")
    g.add_argument("--epochs", type=int, metavar="N", help="override the recipe's qat.epochs")
    g.add_argument("--max-steps", type=int, metavar="N", help="stop after N optimizer steps (smoke runs, budgets)")
    g.add_argument("--resume", type=Path, metavar="CKPT", help="continue from a checkpoint (OUT/qat/last.pt)")
    g.add_argument("--keep-last", action="store_true",
                   help="ship the last epoch even when an earlier one (epoch 0 = the PTQ model) agrees with float "
                        "more often on the held-back images beyond noise")
    g.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="default: cuda when present")
    g = qat.add_argument_group("what to build")
    g.add_argument("--to", default="onnx", metavar="TARGETS", help=_TO_HELP)
    g.add_argument("--out", type=Path, default=Path("build/qat"), metavar="DIR",
                   help="output folder; checkpoints go to OUT/qat/ (default: build/qat)")
    add_target_option_flags(qat)
    g = qat.add_argument_group("other")
    _add_run_options(g)
    qat.set_defaults(func=cmd_qat)


def cmd_convert(args: argparse.Namespace) -> int:
    from ..pipeline import convert

    if args.int8 and args.precision not in (None, "int8"):
        raise UserError(f"--int8 conflicts with --precision {args.precision}: give one of them")
    settings = _settings(args, precision="int8" if args.int8 else (args.precision or "fp32"), calib=args.calib)
    _print_results(convert(settings), args.json)
    return 0


def _print_tensorwise(results: list) -> None:
    """One line per int8 artifact: its quantized tensors against the PyTorch simulation's."""
    checked = [(r.target, r.manifest["verification"]["tensorwise"]) for r in results
               if "tensorwise" in r.manifest["verification"]]
    if checked:
        from ..verify.tensorwise import summary_line

        echo("tensor by tensor vs the PyTorch simulation (tensorwise.json beside each manifest):")
        for target, summary in checked:
            echo("  " + summary_line(target, summary))


def _settings(args: argparse.Namespace, **kw: Any) -> Any:
    """ConvertSettings from the options `convert` and `qat` share."""
    from ..pipeline import ConvertSettings

    return ConvertSettings(
        model=args.model, out=args.out, targets=args.to, weights=args.weights, num_classes=args.num_classes,
        preprocessing=preprocessing_overrides(args), val=args.val, val_limit=args.val_limit, recipe=args.recipe,
        workers=args.workers, latency_runs=args.latency_runs,
        target_options=target_option_values(args), verify_gate=args.verify_gate,
        calib_root=getattr(args, "calib_root", None), calib_allow_changed=getattr(args, "calib_allow_changed", False),
        val_labels=getattr(args, "val_labels", None),
        progress=not args.no_progress and console.stderr().isatty(), **kw)


def _print_results(results: list, as_json: bool) -> None:
    if as_json:
        echo(json.dumps([r.manifest for r in results], indent=2))
    else:
        echo(summary_table(results))
        _print_tensorwise(results)
        for r in results:
            echo(f"wrote {r.path} and {r.manifest_path}")


def summary_table(results: Sequence[Any]) -> str:
    """A short plain-text table: one row per artifact and evaluation set."""
    from ..verify.fidelity import Fidelity

    header = ("target", "precision", "eval", "images", "size MB", "cosine", "SQNR dB", "top1 agree",
              "top1 float", "top1 model", "latency ms")
    rows = []
    for r in results:
        v = r.manifest["verification"]
        for name in ("held_back", "val"):
            if name not in v:
                continue
            f = Fidelity(**v[name]["vs_float"])
            pct = lambda a: "-" if a is None else f"{100 * a:.2f}%"
            median = v["latency"]["median_ms"]
            rows.append((r.target, r.precision + ("" if v["numbers"] == "measured" else f" ({v['numbers']})"), name,
                         str(f.images), f"{r.manifest['artifact']['size_bytes'] / 1e6:.2f}", f"{f.cosine:.4f}",
                         f"{f.sqnr_db:.1f}", pct(f.top1_agreement), pct(f.reference_top1), pct(f.top1),
                         "not timed" if median is None else f"{median:.2f}"))
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(header)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])



def cmd_qat(args: argparse.Namespace) -> int:
    from ..pipeline import start_run
    from ..quantization import qat

    dist = qat.init_distributed(args.device)
    settings = _settings(args, precision="int8", calib=args.calib or args.train)
    for flag, value, low in (("--epochs", args.epochs, 0), ("--max-steps", args.max_steps, 1)):
        if value is not None and value < low:
            raise UserError(f"{flag} must be at least {low}, got {value}")
    run = start_run(settings, lock=dist.main)  # only the main process of a torchrun job writes artifacts
    try:
        return _train_and_deploy(args, run, dist)
    finally:
        run.release()


def _train_and_deploy(args: argparse.Namespace, run: Any, dist: Any) -> int:
    """QAT on the run's model, then export and verify like convert (the output folders stay locked)."""
    from ..load.images import scan_folder
    from ..pipeline import deploy
    from ..quantization import qat

    settings, recipe = run.settings, run.recipe
    train_images, selection = qat.split_train(scan_folder(args.train), run.evals[0].images.files,
                                              run.calibration.files, recipe.qat, run.loaded, settings.workers)
    options = qat.QatOptions(checkpoint_dir=Path(args.out) / "qat", resume=args.resume, device=args.device,
                             epochs=args.epochs, max_steps=args.max_steps, progress=settings.progress,
                             keep_last=args.keep_last)
    quantized = qat.train(run.loaded.model, run.loaded.name, train_images, run.loaded.preprocessing,
                          run.calibration, recipe, options, selection, dist)
    if not dist.main:
        return 0
    _print_results(deploy(run, lambda _target: quantized), args.json)
    return 0
