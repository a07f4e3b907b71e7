"""The rebuilt int8 model, kept in debug's output folder so that running `debug` again skips calibration.

Rebuilding replays the convert's quantization (equalization, calibration, bias correction: most of a minute at
224x224). Its result is saved as `pt2e.saved_state` under OUT/debug/rebuilt/, named by a digest of everything
it depends on: the manifest's model, weights sha256, classes, recipe, calibration set digest and input spec,
the quantizer, and the versions and source of the preparation and quantization code. A file whose name matches is loaded
with `pt2e.restore`, which re-exports the graph and loads the state strictly; anything unreadable is rebuilt.
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Callable, Optional

logger = logging.getLogger(__name__)

FOLDER = "rebuilt"


def _code_digest() -> str:
    """sha256 of the source of the packages that make the int8 model (model preparation, quantization): a
    changed algorithm is a changed model."""
    from .. import preparation, quantization

    h = hashlib.sha256()
    for package in (preparation, quantization):
        root = Path(package.__file__).parent
        for f in sorted(root.rglob("*.py")):
            h.update(f"{package.__name__}/{f.relative_to(root)}".encode())
            h.update(f.read_bytes())
    return h.hexdigest()


def key_of(facts: dict[str, Any], quantizer_key: Any) -> str:
    """The cache file's name: a digest of what the calibrated model depends on."""
    import torch
    import torchao

    from .. import __version__

    data = {"facts": facts, "quantizer": str(quantizer_key), "mnv4_deploy": __version__, "torch": torch.__version__,
            "torchao": getattr(torchao, "__version__", "?"), "code": _code_digest()}
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:24]


def cached_ptq(run: Any, folder: Path, facts: dict[str, Any]) -> Callable[[Any], Any]:
    """`pipeline.ptq_for(run)`, with each quantized model read from `folder` when it was saved there before and
    saved there when it was not."""
    from ..pipeline import ptq_for

    fresh = ptq_for(run)
    models: dict[Any, Any] = {}

    def quantized_for(target: Any) -> Any:
        key = target.quantizer_key()
        if key not in models:
            path = Path(folder) / FOLDER / f"{key_of(facts, key)}.pt"
            q = _load(path, run, target)
            if q is None:
                q = fresh(target)
                _save(path, q)
            models[key] = q
        return models[key]

    return quantized_for


def _load(path: Path, run: Any, target: Any) -> Optional[Any]:
    import torch

    from ..infra.stages import stage
    from ..quantization.pt2e import restore

    if not path.is_file():
        return None
    try:
        with stage("debug_cached", f"the rebuilt int8 model from {path.parent}"):
            saved = torch.load(path, weights_only=True)
            return restore(run.loaded.model, run.calibration, run.recipe, saved,
                           quantizer=target.build_quantizer(run.recipe.quantization))
    except Exception as exc:  # noqa: BLE001 - a cache that does not load is rebuilt, never an error
        logger.info(f"note: could not reuse {path} ({type(exc).__name__}: {exc}); rebuilding")
        return None


def _save(path: Path, quantized: Any) -> None:
    import torch

    from ..quantization.pt2e import saved_state

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save(saved_state(quantized), tmp)
        tmp.replace(path)
    except OSError as exc:
        logger.info(f"note: could not keep the rebuilt int8 model in {path.parent} ({exc})")
