"""mnv4-deploy: quantize MobileNetV4 models and ship them to edge runtimes, verified in each runtime.

The public API mirrors the pipeline: `load_model` -> `prepare` -> `quantize` -> `export_and_verify`
(or `convert` for the whole run). Targets are registered in `mnv4_deploy.targets`.
"""
from __future__ import annotations

__version__ = "0.1.0"

from .config.recipes import load_recipe  # noqa: E402
from .errors import UserError  # noqa: E402
from .load.models import list_variants, load_model  # noqa: E402
from .preparation.prepare import prepare  # noqa: E402

__all__ = ["UserError", "list_variants", "load_model", "prepare", "load_recipe", "quantize", "convert",
           "ConvertSettings", "__version__"]


def __getattr__(name: str):
    # quantize/pipeline import the quantization toolchain; load them only when used.
    if name == "quantize":
        from .quantization.pt2e import quantize

        return quantize
    if name in ("convert", "ConvertSettings"):
        from . import pipeline

        return getattr(pipeline, name)
    raise AttributeError(name)
