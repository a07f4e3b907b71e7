"""`mnv4-deploy calib make|check|list`: build a pinned calibration set from a folder, and verify one against
the files a machine has (mnv4_deploy/load/calibration_sets.py)."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..infra.console import echo

EPILOG = """\
examples:
  # 512 images balanced over the classes of an ImageFolder, hashed, paths relative to the folder
  mnv4-deploy calib make ../shared/data/tiny-imagenet-202/train --images 512 --seed 0 \\
      --name reference-tin202 --out calibration/reference-tin202.yaml
  # are the files a set lists present and unchanged here? (one line per missing or changed file; exit 1)
  mnv4-deploy calib check reference-tin202 --root ../shared/data/tiny-imagenet-202/train
  # calibrate on it
  mnv4-deploy convert ... --int8 --calib reference-tin202 --calib-root ../shared/data/tiny-imagenet-202/train
"""


def add_calib_command(subparsers: Any) -> None:
    p = subparsers.add_parser("calib", help="make, check and list pinned calibration sets (calibration/*.yaml)",
                              description="Calibration sets: image lists with sha256 per file, relative to a root "
                                          "given at run time, so that int8 runs on any machine calibrate alike.",
                              epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="calib_command", metavar="ACTION")
    sub.required = True
    make = sub.add_parser("make", help="choose images from a folder (balanced per class, seeded) into a set file")
    make.add_argument("folder", type=Path, help="images, flat or in class sub-folders (the set's root)")
    count = make.add_mutually_exclusive_group(required=True)
    count.add_argument("--per-class", type=int, metavar="N", help="N images from every class")
    count.add_argument("--images", type=int, metavar="N", help="N images in all, spread evenly over the classes")
    make.add_argument("--seed", type=int, default=0, help="which images are drawn (default 0)")
    make.add_argument("--name", metavar="NAME", help="the set's name (default: the --out file's name)")
    make.add_argument("--description", default="", help="one line on what the set is for")
    make.add_argument("--out", type=Path, required=True, metavar="FILE",
                      help="the .yaml to write, e.g. calibration/NAME.yaml")
    make.set_defaults(func=cmd_make)
    check = sub.add_parser("check", help="verify a set's files under a root: missing or changed files, one line each")
    check.add_argument("set", metavar="NAME|FILE", help="a set name (see `calib list`) or a .yaml file")
    check.add_argument("--root", type=Path, metavar="DIR", help="the folder the set's paths are relative to "
                                                                "(default: $MNV4_CALIB_ROOT)")
    check.set_defaults(func=cmd_check)
    lst = sub.add_parser("list", help="the calibration sets --calib accepts by name")
    lst.set_defaults(func=cmd_list)


def cmd_make(args: argparse.Namespace) -> int:
    from ..infra.fileio import write_text
    from ..load.calibration_sets import dump_set, make_set, summary

    if args.out.suffix not in (".yaml", ".yml"):
        raise UserError(f"--out '{args.out}' must be a .yaml file (e.g. calibration/NAME.yaml)")
    for flag, value in (("--per-class", args.per_class), ("--images", args.images)):
        if value is not None and value < 1:
            raise UserError(f"{flag} must be at least 1, got {value}")
    cs = make_set(args.folder, args.name or args.out.stem, args.per_class, args.images, args.seed, args.description)
    write_text(args.out, dump_set(cs))
    echo(summary(cs))
    echo(f"wrote {args.out}")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from ..load.calibration_sets import check_set, load_set, resolve_root, summary

    cs = load_set(args.set)
    root = resolve_root(cs, args.root)
    problems, _ = check_set(cs, root)
    for line in problems:
        echo(line)
    if problems:
        echo(f"{cs.name}: {len(problems)} of {len(cs.images)} images missing or changed under {root}")
        return 1
    hashes = "unchanged" if cs.hashed else "present (names only: no hashes to compare)"
    echo(f"ok: all {len(cs.images)} images {hashes} under {root}; {summary(cs)}")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from ..load.calibration_sets import load_set, shipped_sets, summary

    for name in shipped_sets():
        echo(summary(load_set(name)))
    return 0
