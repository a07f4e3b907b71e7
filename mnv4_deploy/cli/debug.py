"""`mnv4-deploy debug`: where, layer by layer, int8 artifacts already written part from float, from their
simulation and from each other (mnv4_deploy/debug/)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ..infra import console
from ..infra.console import echo


def add_debug_command(sub: Any) -> None:
    dbg = sub.add_parser("debug", help="layer by layer: where int8 artifacts part from float, their simulation and "
                         "each other", description="Rebuild the convert's PyTorch int8 model from the manifests and "
                         "compare every quantized tensor of each artifact's runtime with it and with float; "
                         "writes OUT/debug/debug.json and debug.html.")
    dbg.add_argument("artifacts", nargs="+", type=Path, metavar="OUT/TARGET", help="int8 artifact folders of one convert")
    dbg.add_argument("--images", nargs="+", type=Path, metavar="DIR|FILE",
                     help="images to debug on (default: the held-back images the manifest verified on); up to 4 "
                          "are each traced to the layer where their top-1 flips")
    dbg.add_argument("--max-images", type=int, default=64, metavar="N", help="at most N images (default 64)")
    dbg.add_argument("--out", type=Path, metavar="DIR", help="where debug.json/html go (default: OUT/debug)")
    dbg.add_argument("--calib", type=Path, metavar="DIR|SET", help="the convert's --calib, where the manifest's "
                     "record does not find it")
    dbg.add_argument("--calib-root", type=Path, metavar="DIR", help="the convert's --calib-root")
    dbg.add_argument("--advice", type=int, default=3, metavar="N", help="fallback advice for the N worst layers "
                     "(and every flip layer); 0: none")
    dbg.add_argument("--json", action="store_true", help="print debug.json on stdout instead of the table")
    dbg.add_argument("--no-progress", action="store_true", help="no progress bars")
    dbg.set_defaults(func=cmd_debug)


def cmd_debug(args: argparse.Namespace) -> int:
    from ..debug import DebugOptions, debug, print_report

    report = debug(DebugOptions(folders=args.artifacts, out=args.out, images=args.images or [],
                                max_images=args.max_images, calib=args.calib, calib_root=args.calib_root,
                                advice=args.advice, progress=not args.no_progress and console.stderr().isatty()))
    if args.json:
        echo(json.dumps({k: v for k, v in report.items() if not k.startswith("_")}, indent=2))
    else:
        print_report(report, echo)
    return 0
