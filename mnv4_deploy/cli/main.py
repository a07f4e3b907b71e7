"""The `mnv4-deploy` command line: the parser (one module per command: convert.py for convert and qat,
inspect.py, report.py, calib.py; common.py for what they share) and `main`, where a user mistake becomes one
'error:' line and exit 2."""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from typing import Optional, Sequence

from ..errors import UserError, VerificationError, one_line
from ..infra import console
from ..infra.stages import timing
from .common import add_logging_flags, add_logging_flags_everywhere, configure_logging

logger = logging.getLogger("mnv4_deploy")


def description() -> str:
    """What the tool does, naming every registered target (also the package's description, tested)."""
    from ..targets import get_target, target_names

    titles = [getattr(get_target(n), "title", n) for n in target_names()]
    return (f"Quantize MobileNetV4 models and ship them to {', '.join(titles[:-1])} and {titles[-1]}, verified in "
            "each target's real runtime.")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mnv4-deploy", description=description())
    from .. import __version__

    parser.add_argument("--version", action="version", version=f"mnv4-deploy {__version__}")
    add_logging_flags(parser)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    from .calib import add_calib_command
    from .convert import add_convert_command, add_qat_command
    from .debug import add_debug_command
    from .inspect import add_inspect_command
    from .report import add_report_command

    add_convert_command(sub)
    add_qat_command(sub)
    add_inspect_command(sub)
    add_report_command(sub)
    add_calib_command(sub)
    add_debug_command(sub)
    add_logging_flags_everywhere(parser)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    from ..infra.signals import SIGINT_EXIT, SIGTERM_EXIT, Terminated, sigterm_as_interrupt

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(args)
    verbose = getattr(args, "verbose", False)
    try:
        # Other libraries' output (Python and native) goes to -v only: their lines read as errors to a user.
        with sigterm_as_interrupt(), \
                contextlib.nullcontext() if verbose else console.foreign_output_captured():  # noqa: E501
            bars = not getattr(args, "no_progress", False) and console.stderr().isatty()
            with timing(bars) as clock:
                try:
                    return args.func(args)  # a CI cancel or `kill` (SIGTERM) cleans up as Ctrl-C does
                finally:
                    if clock.seconds:
                        logger.debug("time per stage:\n%s", clock.table())
    except UserError as exc:
        print(f"mnv4-deploy: error: {one_line(str(exc))}", file=sys.stderr)
        return 2
    except VerificationError as exc:  # an artifact was built but fails what was asked: not written
        print(f"mnv4-deploy: verification failed: {one_line(str(exc))}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as exc:
        what = "terminated (SIGTERM)" if isinstance(exc, Terminated) else "interrupted"
        print(f"mnv4-deploy: {what}; no partial artifacts were left", file=sys.stderr)
        return SIGTERM_EXIT if isinstance(exc, Terminated) else SIGINT_EXIT


if __name__ == "__main__":
    sys.exit(main())
