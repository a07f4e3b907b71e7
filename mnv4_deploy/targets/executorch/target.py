"""ExecuTorch target: XNNPACK `.pte`, verified (measured and timed) in ExecuTorch's Python runtime.

fp32: the prepared float model. int8: the project's shared PT2E model, lowered as it is: XNNPACK takes its
quantize/dequantize patterns (per-tensor int8 activations, per-channel int8 weights) as int8 kernels, and its own
quantizer would annotate MNv4 the same way (measured: same quantize nodes, same delegation), so one calibration
serves this target and the others. The attention matmuls and softmaxes of the hybrids run in float inside the
delegate: ExecuTorch 1.5's XNNPACK partitioner takes them in fp32 only (`int8_compute` lists them).
"""
from __future__ import annotations

import collections
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ...config.options import option
from ..base import ExportRequest, Runner, RuntimeTensors, Target
from . import program
from .lowering import to_pte
from .runtime import Program


@dataclass(frozen=True)
class ExecutorchOptions:
    # XNNPACK thread count, so latency numbers compare (0 = ExecuTorch's default: one per core).
    threads: int = option(2, low=0, high=1024)


class ExecutorchTarget(Target):
    name = "executorch"
    title = "ExecuTorch (XNNPACK)"
    extra = "executorch"
    artifact_name = "model.pte"
    work_seconds = 55
    exports_in_worker = True  # torch.export, three rewrites and XNNPACK's lowering
    precisions = ("fp32", "int8")
    requires = ("executorch",)
    Options = ExecutorchOptions

    def distributions(self) -> tuple[str, ...]:
        return ("executorch",)

    def export(self, request: ExportRequest, path: Path) -> dict[str, Any]:
        int8 = request.precision == "int8"
        model = request.quantized.converted(fold_weights=True) if int8 else request.loaded.model
        Path(path).write_bytes(to_pte(model, request.example))
        if int8 and self.deploys_simulated_model(request):  # for the tensor-by-tensor check, which removes it
            from .taps import build_tapped

            build_tapped(request.quantized.converted(fold_weights=True), request.example, Path(path))
        return {"converter": "torch.export -> executorch.exir.to_edge_transform_and_lower (XnnpackPartitioner)",
                "method": "pt2e (the shared int8 model)" if int8 else "float",
                "batch": 1}

    def load(self, path: Path, request: ExportRequest) -> Runner:
        return ExecutorchRunner(path, request.options)

    def describe(self, path: Path, request: ExportRequest) -> dict[str, Any]:
        p = program.plan(path)
        graphs = [program.summary(g) for g in program.xnnpack_graphs(path)]
        nodes: collections.Counter = collections.Counter()
        for g in graphs:
            nodes.update(g["node_types"])
        facts: dict[str, Any] = {
            "delegates": p["delegate_calls"], "portable_kernels": p["kernel_calls"],
            "xnnpack_nodes": dict(nodes.most_common()), "inputs": p["inputs"], "outputs": p["outputs"],
        }
        if request.precision == "int8":
            facts["int8_compute"] = program.int8_compute(path)
        return facts

    def quantized_tensors(self, path: Path, request: ExportRequest, x: np.ndarray) -> RuntimeTensors:
        from .taps import quantized_tensors

        return quantized_tensors(request.quantized.converted(fold_weights=True), request.example, x,
                                 request.options.threads, Path(path))


class ExecutorchRunner(Runner):
    """The `.pte` in executorch.runtime, one image per call (a batch-1 program, as apps run it)."""

    def __init__(self, path: Path, options: ExecutorchOptions) -> None:
        self.program = Program(path, options.threads)
        self.threads = self.program.threads

    @property
    def max_batch(self) -> int:
        return 1

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return np.concatenate([self.program.run(x[i:i + 1])[0].numpy().copy() for i in range(len(x))])
