"""onnxruntime's CPU provider: the runner an ONNX artifact is verified and timed in, and the graph onnxruntime
really executes (its optimized model: QDQ fusion, layout transforms), which `int8_compute` and the
tensor-by-tensor check read."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Optional

import numpy as np

from ..base import Runner


class OnnxRunner(Runner):
    def __init__(self, path: Path, threads: int = 0) -> None:
        import onnxruntime as ort

        so = ort.SessionOptions()
        if threads:
            so.intra_op_num_threads = threads
        self.threads = threads or f"onnxruntime default (one per physical core; {os.cpu_count()} logical here)"
        so.log_severity_level = 3
        self.session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        shape = self.session.get_inputs()[0].shape
        self._max_batch = shape[0] if isinstance(shape[0], int) else None

    @property
    def max_batch(self) -> Optional[int]:
        return self._max_batch

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: np.ascontiguousarray(x, dtype=np.float32)})[0]


def optimized_graph(path: Path) -> Any:
    """The graph onnxruntime builds from the artifact at its default optimization level (as the runner and apps
    use it): the exposed run then reproduces the deployed session's logits bit for bit."""
    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        opt = ort.SessionOptions()
        opt.log_severity_level = 3
        opt.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opt.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        ort.InferenceSession(str(path), opt, providers=["CPUExecutionProvider"])
        return onnx.load(opt.optimized_model_filepath)
