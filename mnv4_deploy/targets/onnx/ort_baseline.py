"""onnxruntime's own `quantize_static` on the float model: the onnx target's `method: onnxruntime`, kept as the
baseline reports compare the project's shared PT2E quantization against."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import numpy as np

from ...infra.converter_output import captured
from ..base import ExportRequest
from .export import INPUT_NAME


def ort_quantize_static(float_path: Path, path: Path, request: ExportRequest, opts: Any) -> dict[str, Any]:
    from onnxruntime.quantization import CalibrationDataReader

    calib = request.calibration
    if calib is None:
        raise ValueError("onnxruntime quantize_static needs calibration images")

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._it = iter(calib.x[i:i + 1] for i in range(len(calib)))

        def get_next(self) -> Optional[dict[str, np.ndarray]]:
            batch = next(self._it, None)
            return None if batch is None else {INPUT_NAME: batch}

    with captured("onnxruntime.quantization.quantize_static"):
        _quantize_static(float_path, path, Reader(), opts)
    return {"method": f"onnxruntime.quantize_static (QDQ, per_channel={opts.ort_per_channel}, "
                      f"{opts.ort_calibrate_method} calibration, {len(calib)} images)"}


def _quantize_static(float_path: Path, path: Path, reader: Any, opts: Any) -> None:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    quantize_static(
        str(float_path), str(path), reader, quant_format=QuantFormat.QDQ,
        per_channel=opts.ort_per_channel, weight_type=QuantType.QInt8, activation_type=QuantType.QInt8,
        calibrate_method=getattr(CalibrationMethod, opts.ort_calibrate_method),
    )
