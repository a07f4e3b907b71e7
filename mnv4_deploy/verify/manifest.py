"""The manifest written beside every artifact: what it is, where it came from, how well it works."""
from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
from pathlib import Path
from typing import Any, Optional

from ..infra.fileio import read_json, sha256_of, size_of
from ..infra.json_check import BOOL, COUNT, STR, Invalid, Nullable, Obj, OneOf, Spec, Type, check

SCHEMA_VERSION = 1
# bf16: a float artifact whose runtime computes in bfloat16 (OpenVINO CPU: the float it runs by default on CPUs
# with bf16 support).
PRECISIONS = ("fp32", "fp16", "bf16", "int8")

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


def _plain_name(value: Any, path: str) -> None:
    try:
        size = len(os.fsencode(value))
    except UnicodeEncodeError:
        size = -1
    if value in ("", ".", "..") or "/" in value or "\\" in value or "\0" in value or not 0 < size <= 255:
        raise Invalid(path, f"must be a file name inside the manifest's folder, got {value[:60]!r}")


def _sha(value: Any, path: str) -> None:
    if len(value) != 64 or any(c not in "0123456789abcdef" for c in value):
        raise Invalid(path, "must be 64 lowercase hex digits")


class _Checked(Spec):
    """A string further checked by `rule`."""

    def __init__(self, rule: Any) -> None:
        self.rule = rule

    def check(self, value: Any, path: str) -> None:
        STR.check(value, path)
        self.rule(value, path)


# What `inspect`, report reuse and the CLI read from a manifest (convert writes more).
MANIFEST_SCHEMA = Obj(
    required={"schema_version": OneOf(SCHEMA_VERSION), "target": STR, "precision": OneOf(*PRECISIONS),
              "model": Obj({"name": STR}), "artifact": Obj({"file": _Checked(_plain_name), "size_bytes": COUNT,
                                                            "sha256": _Checked(_sha)}),
              "verification": Obj(optional={"gate": Obj(optional={"passed": BOOL, "enforced": BOOL})})},
    optional={"created": STR, "recipe": Type(dict), "quantization": Nullable(Type(dict)), "export": Type(dict),
              "input": Type(dict), "output": Type(dict), "structure": Type(dict), "tool_versions": Type(dict)})


def validate_manifest(data: Any, source: str) -> dict[str, Any]:
    """`data` when it has the fields readers rely on; otherwise one UserError line naming the field."""
    return check(data, MANIFEST_SCHEMA, source, "give a manifest.json written by `mnv4-deploy convert` (or rebuild it)")


def read_manifest(path: Path) -> dict[str, Any]:
    """A manifest.json the user pointed at, validated (one line naming the problem otherwise)."""
    data = read_json(path, "manifest", "give a manifest.json written by `mnv4-deploy convert`")
    return validate_manifest(data, str(path))
