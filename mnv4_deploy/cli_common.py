"""Argument groups and settings that several `mnv4-deploy` commands share (convert, qat, inspect, report)."""
from __future__ import annotations

import argparse
import dataclasses
import logging
import typing
from typing import Any

from .errors import UserError

_LOG_FORMAT = "%(message)s"


def add_model_command(subparsers: Any, name: str, summary: str, description: str, epilog: str,
                      model_required: bool = True) -> argparse.ArgumentParser:
    """A subcommand that works on a model: its help, examples (kept as written) and the model options."""
    p = subparsers.add_parser(name, help=summary, description=description, epilog=epilog,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_options(p, required=model_required)
    return p


def add_model_options(p: argparse.ArgumentParser, required: bool = True) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", required=required, metavar="NAME",
                   help="timm MNv4 variant, e.g. mobilenetv4_conv_small (see `mnv4-deploy inspect --list`)")
    g.add_argument("--weights", default="pretrained", metavar="SRC",
                   help="'pretrained' (timm hub weights, default), 'random', or a .pth/.pt/.safetensors state_dict")
    g.add_argument("--num-classes", type=int, metavar="N", help="classifier size (default: the variant's, 1000)")
    g = p.add_argument_group("preprocessing (defaults come from the checkpoint's timm pretrained_cfg)")
    g.add_argument("--input-size", metavar="N|H,W", help="model input size, e.g. 224 or 256,192")
    g.add_argument("--mean", metavar="R,G,B", help="normalisation mean, e.g. 0.5,0.5,0.5")
    g.add_argument("--std", metavar="R,G,B", help="normalisation std")
    g.add_argument("--crop-pct", type=float, metavar="F", help="centre-crop fraction (1.0 = no crop)")
    g.add_argument("--interpolation", choices=("bicubic", "bilinear", "nearest", "lanczos"))


def preprocessing_overrides(args: argparse.Namespace) -> dict[str, Any]:
    from .preprocessing import parse_floats

    size = None
    if args.input_size:
        try:
            size = [int(v) for v in args.input_size.split(",")]
        except ValueError:
            raise UserError(f"--input-size must be N or H,W, got '{args.input_size}'") from None
    return {"input_size": size, "mean": parse_floats(args.mean, "mean"), "std": parse_floats(args.std, "std"),
            "crop_pct": args.crop_pct, "interpolation": args.interpolation}


def _target_flag_fields() -> dict[str, tuple[dataclasses.Field, type, list[str]]]:
    """Every CLI-exposed field of every registered target's Options: {name: (field, type, [targets])}."""
    from .options import flag_fields
    from .targets import get_target, target_names

    found: dict[str, tuple[dataclasses.Field, type, list[str]]] = {}
    for name in target_names():
        options_cls = get_target(name).Options
        hints = typing.get_type_hints(options_cls)
        for f in flag_fields(options_cls):
            if f.name in found:
                found[f.name][2].append(name)
            else:
                found[f.name] = (f, hints[f.name], [name])
    return found


def add_target_option_flags(p: argparse.ArgumentParser) -> None:
    """One flag per CLI-exposed field of the targets' Options (declared there with `flag=` help)."""
    g = p.add_argument_group("target options (each applies to the targets that have it; see the recipe's "
                             "targets: section)")
    for name, (f, typ, _owners) in _target_flag_fields().items():
        flag, help_text = "--" + name.replace("_", "-"), f.metadata["flag"]
        if typ is bool:
            g.add_argument(flag, dest=name, action="store_const", const=True, help=help_text)
        elif f.metadata.get("choices"):
            g.add_argument(flag, dest=name, choices=f.metadata["choices"], type=typ, help=help_text)
        else:
            g.add_argument(flag, dest=name, type=typ, metavar="VALUE", help=help_text)


def target_option_values(args: argparse.Namespace) -> dict[str, Any]:
    """The target-option flags as given ({field: value or None})."""
    return {name: getattr(args, name, None) for name in _target_flag_fields()}


def add_verify_gate_flag(g: Any) -> None:
    g.add_argument("--no-verify-gate", dest="verify_gate", action="store_const", const=False,
                   help="write artifacts that fail the recipe's verification thresholds anyway (their manifest "
                        "says they failed); default: a failing artifact is not written and the command exits 1")


def add_logging_flags(p: argparse.ArgumentParser, subcommand: bool = False) -> None:
    """-v/-q, accepted before the command and after it (`mnv4-deploy convert ... -v`); a subcommand's copy leaves
    the value given before it alone unless it is given again."""
    default: Any = argparse.SUPPRESS if subcommand else False
    p.add_argument("-v", "--verbose", action="store_true", default=default,
                   help="more detail on stderr: other libraries' output, time per stage")
    p.add_argument("-q", "--quiet", action="store_true", default=default, help="only warnings and errors on stderr")


def add_logging_flags_everywhere(parser: argparse.ArgumentParser) -> None:
    """-v/-q on every subcommand, nested ones too (calib make, ...)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in dict.fromkeys(action.choices.values()):
                if not any("--verbose" in a.option_strings for a in sub._actions):
                    add_logging_flags(sub, subcommand=True)
                add_logging_flags_everywhere(sub)


class _ConsoleHandler(logging.Handler):
    """Writes to this program's stderr (`console.stderr()`), which other libraries' output does not reach, through
    tqdm so that a line never lands inside a progress bar."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm

        from . import console

        try:
            tqdm.write(self.format(record), file=console.stderr())
        except (OSError, ValueError):  # a closed or broken stderr (a pipe whose reader left)
            self.handleError(record)


def configure_logging(args: argparse.Namespace) -> None:
    """mnv4_deploy's log lines on stderr: INFO by default, DEBUG with -v, WARNING with -q."""
    level = logging.DEBUG if getattr(args, "verbose", False) else (
        logging.WARNING if getattr(args, "quiet", False) else logging.INFO)
    logger = logging.getLogger("mnv4_deploy")
    for h in list(logger.handlers):
        if getattr(h, "_mnv4_cli", False):
            logger.removeHandler(h)
    handler = _ConsoleHandler()
    handler.setFormatter(logging.Formatter(_LOG_FORMAT))
    handler._mnv4_cli = True  # type: ignore[attr-defined]
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
