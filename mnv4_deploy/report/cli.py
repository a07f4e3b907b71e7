"""`mnv4-deploy report`: build-and-measure mode, and the cheap `--compare NEW --baseline OLD` mode CI uses.

Exit codes: 0 all good; 1 a cell regressed against the baseline or failed to build; 2 a user mistake.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Optional

from ..errors import UserError

EPILOG = """\
examples:
  # every registered target x fp32/fp16/int8 for the reference checkpoint, gated against the committed baseline
  mnv4-deploy report --model mobilenetv4_conv_small --weights model.pth --num-classes 202 \\
      --input-size 64 --crop-pct 1.0 --calib train/ --val val/ --val-limit 1000 --out reports/run/ \\
      --baseline reports/baseline.json --max-drop 0.5 --max-latency-regression 10%

  # compare two existing reports only (seconds; what CI runs after the build job)
  mnv4-deploy report --compare reports/run/report.json --baseline reports/baseline.json

Writes OUT/report.json (versioned schema; every number with unit and method: measured / simulated /
estimated), OUT/report.md (prints it too) and a self-contained OUT/report.html. Artifacts go to
OUT/<precision>/<target>/ and are reused when their manifest hash matches.
"""


def add_report_command(subparsers: Any) -> argparse.ArgumentParser:
    """Register `report` on the CLI's subparsers (the only hook cli.py needs)."""
    from ..cli_common import add_model_command, add_verify_gate_flag

    # --model is only needed when building, not with --compare
    p = add_model_command(
        subparsers, "report", "build every target x precision, measure, report, and gate vs a baseline",
        "Build (or reuse) every artifact, measure each in its runtime, estimate latency on the paper's hardware, "
        "write report.json/.md/.html, and optionally fail on regressions against a baseline report.", EPILOG,
        model_required=False)
    g = p.add_argument_group("what to build")
    g.add_argument("--targets", default="all", metavar="TARGETS", help="a target, a comma list, or 'all' (default)")
    g.add_argument("--precisions", default="fp32,fp16,int8", metavar="LIST",
                   help="comma list of fp32, fp16, int8 (default: all three); unsupported pairs are skipped with a note")
    g.add_argument("--recipe", metavar="NAME|FILE", help="a shipped recipe name (e.g. ptq-int8) or a YAML file")
    g.add_argument("--out", type=Path, metavar="DIR", help="output folder (default: reports/run/ when building)")
    g.add_argument("--no-reuse", action="store_true", help="rebuild artifacts even when a matching manifest exists")
    g.add_argument("--no-roofline", action="store_true", help="skip the estimated (roofline) latency section")
    g.add_argument("--no-sensitivity", action="store_true", help="skip the per-layer int8 sensitivity analysis")
    g = p.add_argument_group("data")
    g.add_argument("--calib", type=Path, metavar="DIR", help="calibration images (some held back for verification)")
    g.add_argument("--val", type=Path, metavar="DIR", help="labelled ImageFolder to measure top-1/top-5 on")
    g.add_argument("--val-limit", type=int, metavar="N", help="evaluate on a random N images of --val")
    g.add_argument("--workers", type=int, default=0, metavar="N", help="image-decoding worker processes")
    g.add_argument("--latency-runs", type=int, default=30, metavar="N", help="timed runs per artifact")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_verify_gate_flag(g)
    g = p.add_argument_group("regression gate")
    g.add_argument("--baseline", type=Path, metavar="JSON", help="a committed report.json to compare against")
    g.add_argument("--compare", type=Path, metavar="NEW_JSON",
                   help="only compare this existing report.json with --baseline (builds nothing)")
    g.add_argument("--max-drop", type=float, default=0.5, metavar="PP",
                   help="largest allowed val top-1 drop vs baseline, percentage points (default 0.5)")
    g.add_argument("--max-agreement-drop", type=float, metavar="PP",
                   help="largest allowed drop of top-1 agreement with float, points (default: --max-drop)")
    g.add_argument("--max-latency-regression", default="10%", metavar="PCT",
                   help="largest allowed median latency increase, e.g. 10%% (default), or 'off'")
    p.set_defaults(func=cmd_report)
    return p


def _thresholds(args: argparse.Namespace) -> Any:
    from .gate import Thresholds, parse_percent

    for flag, v in (("--max-drop", args.max_drop), ("--max-agreement-drop", args.max_agreement_drop)):
        if v is not None and v < 0:
            raise UserError(f"{flag} must be >= 0 percentage points, got {v}")
    return Thresholds(args.max_drop, args.max_agreement_drop, parse_percent(args.max_latency_regression))


def _write_outputs(out: Path, report: dict[str, Any], gate: Optional[Any], baseline_name: str) -> str:
    from ..fileio import write_json, write_text
    from . import markdown, page

    md = markdown.render(report, gate, baseline_name)
    if gate is not None:
        report = report | {"gate": gate.to_dict() | {"baseline": baseline_name}}
    write_json(out / "report.json", report)
    write_text(out / "report.md", md)
    write_text(out / "report.html", page.render(report, gate, baseline_name))
    print(f"wrote {out / 'report.json'}, {out / 'report.md'} and {out / 'report.html'}", file=sys.stderr)
    return md


def cmd_report(args: argparse.Namespace) -> int:
    from .gate import compare_reports
    from .schema import load_report

    thresholds = _thresholds(args)
    baseline = load_report(args.baseline) if args.baseline else None
    if args.compare is not None:
        if baseline is None:
            raise UserError("--compare needs --baseline OLD.json: the report to compare against")
        if args.model:
            raise UserError("--compare only compares existing reports: drop --model (or drop --compare to build)")
        new = load_report(args.compare)
        gate = compare_reports(new, baseline, thresholds)
        if args.out:
            md = _write_outputs(args.out, new, gate, str(args.baseline))
        else:
            from .markdown import render

            md = render(new, gate, str(args.baseline))
        print(md)
        return 0 if gate.passed else 1

    if not args.model:
        raise UserError("report needs --model NAME to build artifacts, or --compare NEW.json --baseline OLD.json")
    from ..cli_common import preprocessing_overrides
    from ..pipeline import ConvertSettings
    from .runner import ReportSettings, build_report, parse_precisions

    out = args.out or Path("reports/run")
    base = ConvertSettings(
        model=args.model, out=out, targets=args.targets, weights=args.weights, num_classes=args.num_classes,
        preprocessing=preprocessing_overrides(args), calib=args.calib, val=args.val, val_limit=args.val_limit,
        recipe=args.recipe, workers=args.workers, latency_runs=args.latency_runs, verify_gate=args.verify_gate,
        progress=not args.no_progress and sys.stderr.isatty(),
    )
    rs = ReportSettings(base, parse_precisions(args.precisions), reuse=not args.no_reuse, roofline=not args.no_roofline,
                        sensitivity=not args.no_sensitivity)
    report = build_report(rs)
    gate = compare_reports(report, baseline, thresholds) if baseline is not None else None
    md = _write_outputs(out, report, gate, str(args.baseline))
    print(md)
    failed = [f"{c['target']}/{c['precision']}" for c in report["cells"] if c["status"] == "failed"]
    if failed:
        print(f"mnv4-deploy: {len(failed)} artifact(s) failed to build: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed or (gate is not None and not gate.passed) else 0
