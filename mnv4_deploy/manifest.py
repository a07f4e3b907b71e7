"""The manifest written beside every artifact: what it is, where it came from, how well it works."""
from __future__ import annotations

import datetime
import importlib.metadata
import platform
from pathlib import Path
from typing import Any, Optional

from .fileio import sha256_of, size_of

SCHEMA_VERSION = 1

# Where a runner's numbers come from. Manifests and reports carry the kind beside every number, and only
# "measured" runners are timed: an executor's or an emulator's wall clock says nothing about the device.
NUMBERS_KINDS: dict[str, str] = {
    "measured": "run in the target's real runtime on this host",
    "executed": "run by this project's reference executor of the artifact's own program (not the vendor runtime)",
    "emulated": "run by the vendor runtime emulating the device on this host (not the device)",
    "simulated": "PyTorch simulation of the same quantization, not the artifact",
}


def tool_versions(extra: dict[str, str]) -> dict[str, str]:
    out = {"python": platform.python_version()}
    for dist in ("mnv4-deploy", "torch", "timm", "torchao", "litert-torch", "numpy"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    out.update(extra)
    return out


def input_spec(shape: list[Any], pre: Any, dtype: str = "float32", layout: str = "NCHW",
               normalization_inside: bool = False, quantization: Optional[dict[str, float]] = None) -> dict[str, Any]:
    return {
        "shape": shape,
        "layout": layout,
        "dtype": dtype,
        "color": "RGB",
        "normalization": {
            "mean": list(pre.mean), "std": list(pre.std), "scale": "1/255 then (x - mean) / std",
            "inside_model": normalization_inside,
        },
        "resize": {"interpolation": pre.interpolation, "crop_pct": pre.crop_pct, "crop": "center"},
        "quantization": quantization,
    }


def artifact_facts(path: Path) -> dict[str, Any]:
    return {"file": path.name, "size_bytes": size_of(path), "sha256": sha256_of(path)}


def build_manifest(**sections: Any) -> dict[str, Any]:
    return {
        "schema_version": SCHEMA_VERSION,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **sections,
    }
