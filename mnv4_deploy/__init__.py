"""mnv4-deploy: quantize MobileNetV4 models and ship them to edge runtimes, verified in each runtime.

The public API mirrors the pipeline: `load_model` -> `prepare` -> `quantize` -> `export_and_verify`
(or `convert` for the whole run). Targets are registered in `mnv4_deploy.targets`.
"""
from __future__ import annotations

from typing import Any, Optional

__version__ = "0.1.0"

from .errors import UserError  # noqa: E402
from .load.models import list_variants, load_model  # noqa: E402
from .preparation.prepare import prepare  # noqa: E402

__all__ = ["UserError", "list_variants", "load_model", "prepare", "load_recipe", "quantize", "convert",
           "ConvertSettings", "__version__"]


def load_recipe(name_or_path: Optional[str] = None) -> Any:
    """A recipe by shipped name ('ptq-int8') or path (None: the default), with its `targets:` sections checked by
    the targets (config.recipes reads a recipe; targets.check_recipe_targets checks those sections)."""
    from .config.recipes import load_recipe as read_recipe
    from .targets import check_recipe_targets

    return check_recipe_targets(read_recipe(name_or_path))


def __getattr__(name: str):
    # quantize/pipeline import the quantization toolchain; load them only when used.
    if name == "quantize":
        from .quantization.pt2e import quantize

        return quantize
    if name in ("convert", "ConvertSettings"):
        from . import pipeline

        return getattr(pipeline, name)
    raise AttributeError(name)
