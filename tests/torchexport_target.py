"""A whole target in one file, as a plugin would write it: torch.export programs (.pt2) run by PyTorch.

The conformance suite registers it beside the shipped targets (one `register_target` line) to prove that a
new target needs nothing else: CLI flag, recipe section, gate, manifest and the whole suite come for free.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mnv4_deploy.config.options import option
from mnv4_deploy.quantization.pt2e import export_program
from mnv4_deploy.targets.base import ExportRequest, Runner, Target


@dataclass(frozen=True)
class TorchExportOptions:
    # A flag of this target's own, to prove that CLI flags come from the Options dataclass.
    strict_export: bool = option(False, flag="torchexport: torch.export in strict mode")


class TorchExportTarget(Target):
    name = "torchexport"
    title = "torch.export (test plugin)"
    extra = "test"
    artifact_name = "model.pt2"
    precisions = ("fp32", "int8")
    requires = ("torch",)
    Options = TorchExportOptions

    def export(self, request: ExportRequest, path: Path) -> dict[str, Any]:
        int8 = request.precision == "int8"
        model = request.quantized.converted(fold_weights=True) if int8 else request.loaded.model
        program = export_program(model, request.example)
        torch.export.save(program, str(path))
        return {"method": "pt2e quantize/dequantize graph" if int8 else "float",
                "strict_export": request.options.strict_export}

    def load(self, path: Path, request: ExportRequest) -> Runner:
        return TorchExportRunner(path)


class TorchExportRunner(Runner):
    def __init__(self, path: Path) -> None:
        self.module = torch.export.load(str(path)).module()

    def __call__(self, x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return self.module(torch.from_numpy(np.ascontiguousarray(x, np.float32))).numpy()


class OwnQuantizerTarget(TorchExportTarget):
    """The same runtime with a PT2E quantizer of its own (here the shared recipe's, counted), so the pipeline
    must calibrate a second int8 model for it."""

    name = "torchexport_own"
    quantizers_built = 0

    def build_quantizer(self, quantization: Any) -> Any:
        from mnv4_deploy.quantization.pt2e import build_quantizer

        type(self).quantizers_built += 1
        return build_quantizer(quantization)
