"""Named YAML files the package ships (recipes, calibration sets), overridable from a user folder.

The repository keeps them in top-level `recipes/` and `calibration/`; the wheel ships them as the data packages
`mnv4_deploy.shipped_recipes` / `mnv4_deploy.shipped_calibration` (pyproject's package-dir), read with
importlib.resources, so a regular `pip install` has them too. A file of the same name in the user folder
(`$MNV4_DEPLOY_HOME/<kind>/`, default `~/.config/mnv4-deploy/<kind>/`) wins over the shipped one.
"""
from __future__ import annotations

import importlib.resources
import importlib.util
import os
from pathlib import Path
from typing import Optional

KINDS = ("recipes", "calibration")
HOME_ENV = "MNV4_DEPLOY_HOME"
_SOURCE_ROOT = Path(__file__).resolve().parents[2]  # the repository (mnv4_deploy/config/ is two below)


def user_dir(kind: str) -> Path:
    """Where a user's own (or overriding) files of `kind` live."""
    home = os.environ.get(HOME_ENV)
    base = Path(home).expanduser() if home else Path(os.environ.get("XDG_CONFIG_HOME", "~/.config")).expanduser() / "mnv4-deploy"
    return base / kind


def shipped_dir(kind: str) -> Optional[Path]:
    """The package data folder of `kind`; a source checkout installed before the mapping existed reads the
    repository folder instead."""
    assert kind in KINDS, kind
    package = f"mnv4_deploy.shipped_{kind}"
    try:
        folder = importlib.resources.files(package)
    except ModuleNotFoundError:
        folder = None
    if folder is not None and not isinstance(folder, Path):  # a namespace package (no __init__.py): its folder
        spec = importlib.util.find_spec(package)
        folder = Path(next(iter(spec.submodule_search_locations))) if spec and spec.submodule_search_locations else None
    if folder is not None and folder.is_dir():
        return folder
    local = _SOURCE_ROOT / kind
    return local if local.is_dir() else None


def _yaml_files(folder: Optional[Path]) -> dict[str, Path]:
    if folder is None or not folder.is_dir():
        return {}
    return {f.name.rsplit(".", 1)[0]: f for f in folder.iterdir() if f.name.endswith((".yaml", ".yml")) and f.is_file()}


def named_files(kind: str) -> dict[str, Path]:
    """{name: file} for every shipped and user file of `kind` (user files override shipped ones)."""
    return _yaml_files(shipped_dir(kind)) | _yaml_files(user_dir(kind))


def find_named(kind: str, name: str) -> Optional[Path]:
    return named_files(kind).get(name)
