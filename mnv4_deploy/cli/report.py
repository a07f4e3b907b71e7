"""`mnv4-deploy report`: build-and-measure mode, and the cheap `--compare NEW --baseline OLD` mode CI uses.

Exit codes: 0 all good; 1 a cell regressed against the baseline or failed to build; 2 a user mistake.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Optional

from ..errors import UserError
from ..infra import console
from ..infra.console import echo

EPILOG = """\
examples:
  # every registered target x fp32/fp16/int8 for the reference checkpoint, gated against the committed baseline
  mnv4-deploy report --model mobilenetv4_conv_small --weights model.pth --num-classes 202 \\
      --input-size 64 --crop-pct 1.0 --calib train/ --val val/ --val-limit 1000 --out reports/run/ \\
      --baseline reports/baseline.json --max-drop 0.5 --max-latency-regression 10%

  # compare two existing reports only (seconds; what CI runs after the build job)
  mnv4-deploy report --compare reports/run/report.json --baseline reports/baseline.json

  # a zoo, split over CI jobs: each job builds one shard, a last job merges and gates
  mnv4-deploy report --models mobilenetv4_conv_small,mobilenetv4_conv_medium --shard 1/2 --out shard1/
  mnv4-deploy report --models zoo.yaml --shard 2/2 --out shard2/
  mnv4-deploy report --merge shard1/report.json shard2/report.json --out reports/run/ --baseline reports/baseline.json

Writes OUT/report.json (versioned schema; every number with unit and method: measured / simulated /
estimated; accuracies with their image count and 95% interval), OUT/report.md (prints it too) and a
self-contained OUT/report.html. Artifacts go to OUT/<model>/<precision>/<target>/ and are reused when their
manifest hash matches. The gate tests accuracy drops image by image (exact McNemar, --alpha, Holm-corrected).
"""


def add_report_command(subparsers: Any) -> argparse.ArgumentParser:
    """Register `report` on the CLI's subparsers (cli/main.py's parser)."""
    from .common import add_model_command, add_verify_gate_flag

    # --model is only needed when building, not with --compare
    p = add_model_command(
        subparsers, "report", "build every target x precision, measure, report, and gate vs a baseline",
        "Build (or reuse) every artifact, measure each in its runtime, estimate latency on the paper's hardware, "
        "write report.json/.md/.html, and optionally fail on regressions against a baseline report.", EPILOG,
        model_required=False)
    g = p.add_argument_group("what to build")
    g.add_argument("--models", metavar="LIST|YAML",
                   help="a zoo: comma list of models (the other flags apply to each) or a .yaml file with a list "
                        "'models:' of entries with model and optionally name, weights, num_classes, input_size, "
                        "crop_pct, mean, std, interpolation, targets, precisions, recipe (unset: the flags')")
    g.add_argument("--shard", metavar="I/N", help="build only shard I of N (a stable split of the zoo's cells)")
    g.add_argument("--merge", nargs="+", type=Path, metavar="JSON",
                   help="merge the shards' report.json files into one report (builds nothing); gates with --baseline")
    g.add_argument("--targets", default="all", metavar="TARGETS", help="a target, a comma list, or 'all' (default)")
    g.add_argument("--precisions", default="fp32,fp16,bf16,int8", metavar="LIST",
                   help="comma list of fp32, fp16, bf16, int8 (default: all four); a target without a precision "
                        "(bf16: OpenVINO only) skips it with a note")
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
    g.add_argument("--alpha", type=float, default=0.05, metavar="P",
                   help="significance level an accuracy drop must also reach (paired exact test on the same "
                        "images, Holm-corrected over all cells gated; default 0.05)")
    p.set_defaults(func=cmd_report)
    return p


def _thresholds(args: argparse.Namespace) -> Any:
    from ..report.regression_gate import RegressionThresholds, parse_percent

    for flag, v in (("--max-drop", args.max_drop), ("--max-agreement-drop", args.max_agreement_drop)):
        if v is not None and v < 0:
            raise UserError(f"{flag} must be >= 0 percentage points, got {v}")
    if not 0 < args.alpha < 1:
        raise UserError(f"--alpha must be between 0 and 1 (e.g. 0.05), got {args.alpha}")
    return RegressionThresholds(args.max_drop, args.max_agreement_drop, parse_percent(args.max_latency_regression), args.alpha)


def _write_outputs(out: Path, report: dict[str, Any], gate: Optional[Any], baseline_name: str) -> str:
    from ..infra.fileio import write_json, write_text
    from ..report import markdown, page

    md = markdown.render(report, gate, baseline_name)
    if gate is not None:
        report = report | {"gate": gate.to_dict() | {"baseline": baseline_name}}
    write_json(out / "report.json", report)
    write_text(out / "report.md", md)
    write_text(out / "report.html", page.render(report, gate, baseline_name))
    print(f"wrote {out / 'report.json'}, {out / 'report.md'} and {out / 'report.html'}", file=console.stderr())
    return md


def _exit_code(report: dict[str, Any], gate: Optional[Any]) -> int:
    from ..report.schema import cell_id

    failed = [cell_id(c) for c in report["cells"] if c["status"] == "failed"]
    if failed:
        print(f"mnv4-deploy: {len(failed)} artifact(s) failed to build: {', '.join(failed)}", file=console.stderr())
    return 1 if failed or (gate is not None and not gate.passed) else 0


def cmd_report(args: argparse.Namespace) -> int:
    from ..report.regression_gate import compare_reports
    from ..report.schema import load_report

    thresholds = _thresholds(args)
    modes = [f for f, v in (("--compare", args.compare), ("--merge", args.merge)) if v]
    if len(modes) > 1:
        raise UserError("--compare and --merge are separate modes: use one")
    if modes and (args.model or args.models):
        raise UserError(f"{modes[0]} only reads existing reports: drop --model/--models (or drop {modes[0]} to build)")
    if args.model and args.models:
        raise UserError("give --model NAME or --models LIST|YAML, not both")
    baseline = load_report(args.baseline) if args.baseline else None
    if args.compare is not None:
        if baseline is None:
            raise UserError("--compare needs --baseline OLD.json: the report to compare against")
        new = load_report(args.compare)
        gate = compare_reports(new, baseline, thresholds)
        if args.out:
            md = _write_outputs(args.out, new, gate, str(args.baseline))
        else:
            from ..report.markdown import render

            md = render(new, gate, str(args.baseline))
        echo(md)
        return 0 if gate.passed else 1
    if args.merge:
        from ..report.grid import merge_reports

        report = merge_reports([load_report(p) for p in args.merge], [str(p) for p in args.merge])
        gate = compare_reports(report, baseline, thresholds) if baseline is not None else None
        echo(_write_outputs(args.out or Path("reports/run"), report, gate, str(args.baseline)))
        return _exit_code(report, gate)

    if not args.model and not args.models:
        raise UserError("report needs --model NAME or --models LIST|YAML to build artifacts, "
                        "--compare NEW.json --baseline OLD.json, or --merge SHARD.json ...")
    from ..pipeline import ConvertSettings
    from ..report.grid import ReportSettings, build_report, parse_precisions, parse_shard
    from ..report.zoo import read_zoo, zoo_settings
    from .common import preprocessing_overrides

    shard = parse_shard(args.shard)
    out = args.out or Path("reports/run")
    base = ConvertSettings(
        model=args.model or "", out=out, targets=args.targets, weights=args.weights, num_classes=args.num_classes,
        preprocessing=preprocessing_overrides(args), calib=args.calib, val=args.val, val_limit=args.val_limit,
        recipe=args.recipe, workers=args.workers, latency_runs=args.latency_runs, verify_gate=args.verify_gate,
        progress=not args.no_progress and console.stderr().isatty(),
    )
    rs = ReportSettings(base, parse_precisions(args.precisions), reuse=not args.no_reuse, roofline=not args.no_roofline,
                        sensitivity=not args.no_sensitivity)
    zoo = zoo_settings(read_zoo(args.models), rs, parse_precisions) if args.models else [rs]
    report = build_report(zoo, shard=shard, out=out)
    gate = compare_reports(report, baseline, thresholds) if baseline is not None and shard is None else None
    if baseline is not None and shard is not None:
        print("note: a shard is not gated on its own: gate the merged report (report --merge ... --baseline)",
              file=console.stderr())
    md = _write_outputs(out, report, gate, str(args.baseline))
    echo(md)
    return _exit_code(report, gate)
