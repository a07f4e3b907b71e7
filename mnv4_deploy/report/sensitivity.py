"""Per-layer int8 sensitivity: which layers hurt most when quantized, to guide fallback recipes.

For each conv / linear layer alone, its weights are fake-quantized to int8 (per output channel, symmetric)
and its input activation to int8 (per tensor, affine, min-max range from the same images), everything
else stays float; we record the logits' SQNR and top-1 agreement against the float model. This is a
PyTorch simulation (method `simulated`) of what PT2E does to that one layer, on unfolded BatchNorm (per-channel
weight quantization commutes with BN's per-channel scale, so the weight error is the same as after folding).
Lower SQNR = more sensitive.
"""
from __future__ import annotations

from typing import Any, Optional

import numpy as np
import torch
from torch import nn

METHOD = ("one layer at a time: int8 per-channel symmetric weights and int8 per-tensor affine (min-max) input, "
          "rest float, PyTorch fake-quant; logits SQNR and top-1 agreement vs float on the same images")


def _fq_weight(w: torch.Tensor) -> torch.Tensor:
    flat = w.reshape(w.shape[0], -1)
    scale = flat.abs().amax(1).clamp(min=2**-12) / 127.0
    shape = (-1,) + (1,) * (w.dim() - 1)
    return (torch.round(w / scale.reshape(shape)).clamp(-127, 127) * scale.reshape(shape)).to(w.dtype)


def _fq_act(x: torch.Tensor) -> torch.Tensor:
    lo, hi = float(x.min().clamp(max=0)), float(x.max().clamp(min=0))
    scale = max(hi - lo, 2**-12) / 255.0
    zero = round(-lo / scale) - 128
    return (torch.round(x / scale + zero).clamp(-128, 127) - zero) * scale


def _sqnr(ref: torch.Tensor, out: torch.Tensor) -> float:
    noise = float(((out - ref) ** 2).sum())
    return float("inf") if noise == 0 else round(10.0 * float(np.log10(float((ref ** 2).sum()) / noise)), 3)


def layer_sensitivity(model: nn.Module, x: np.ndarray, batch_size: int = 64) -> dict[str, Any]:
    """The report's `sensitivity` section (one entry per conv/linear module, network order)."""
    inputs = torch.from_numpy(np.ascontiguousarray(x[:batch_size]))
    threads = torch.get_num_threads()
    # One thread: on a shared, busy machine torch's 2-thread spin-waits made this ~25x slower (measured).
    torch.set_num_threads(1)
    try:
        return _run(model, inputs)
    finally:
        torch.set_num_threads(threads)


def _run(model: nn.Module, inputs: torch.Tensor) -> dict[str, Any]:
    with torch.no_grad():
        ref = model(inputs)
        layers = []
        for name, module in model.named_modules():
            if not isinstance(module, (nn.Conv2d, nn.Linear)):
                continue
            original = module.weight.data
            module.weight.data = _fq_weight(original)
            handle = module.register_forward_pre_hook(lambda _m, args: (_fq_act(args[0]),) + tuple(args[1:]))
            try:
                out = model(inputs)
            finally:
                handle.remove()
                module.weight.data = original
            layers.append({"name": name, "sqnr_db": _sqnr(ref, out),
                           "top1_agreement": round(float((out.argmax(1) == ref.argmax(1)).float().mean()), 5)})
    return {"method": METHOD, "images": int(len(inputs)),
            "units": {"sqnr_db": "dB (logits vs float)", "top1_agreement": "fraction"}, "layers": layers}


def images_for(model_pre: Any, calib: Optional[Any], n: int = 64, workers: int = 0) -> np.ndarray:
    """A few real images: from --calib if given, else scikit-image's sample photos (as convert does)."""
    from ..data import default_calibration, load_images, scan_folder

    if calib is None:
        return default_calibration(model_pre, n, seed=7)[0].x
    return load_images(scan_folder(calib).sample(n, seed=7), model_pre, workers).x
