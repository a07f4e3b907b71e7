"""litert-torch's PT2E quantizer, imported without the rest of litert-torch.

Every target quantizes with litert-torch's PT2E quantizer (`pt2e_quantizer`, `pt2e_quantizer_utils`: torch and
torchao code only), but `import litert_torch.quantize.pt2e_quantizer` first runs `litert_torch/__init__.py`,
which imports the whole TFLite converter and JAX: two seconds of every int8 convert, also for targets that never
touch TFLite. `quantizer_modules()` loads the two modules from the installed package with its `__init__` files
skipped, and leaves them in `sys.modules` under their own names, so a later `import litert_torch` (the tflite
target) runs the package as usual and finds these same modules (one PT2EQuantizer class in the process). If
that fails (a litert-torch whose quantizer needs more of the package), the package is imported as usual.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import logging
import sys
import types
from typing import Any, Optional

logger = logging.getLogger(__name__)

PACKAGE = "litert_torch"
QUANTIZE = f"{PACKAGE}.quantize"
MODULES = (f"{QUANTIZE}.pt2e_quantizer_utils", f"{QUANTIZE}.pt2e_quantizer")


def quantizer_modules() -> tuple[types.ModuleType, types.ModuleType]:
    """(pt2e_quantizer_utils, pt2e_quantizer) of the installed litert-torch."""
    if PACKAGE not in sys.modules and not all(m in sys.modules for m in MODULES):
        try:
            _load_without_package_init()
        except Exception as exc:  # noqa: BLE001 - any failure: the regular import below (which raises if broken)
            logger.debug(f"litert-torch's quantizer without its package __init__ failed ({exc!r}); importing it whole")
            for name in MODULES:
                sys.modules.pop(name, None)
    utils, quantizer = (importlib.import_module(m) for m in MODULES)
    return utils, quantizer


def _load_without_package_init() -> None:
    """Import MODULES through placeholder parent packages (their search paths only), then drop the placeholders."""
    spec = importlib.util.find_spec(PACKAGE)  # finds the package without executing it
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"{PACKAGE} is not installed")
    placeholders = []
    for name, path in ((PACKAGE, list(spec.submodule_search_locations)),
                       (QUANTIZE, [f"{p}/quantize" for p in spec.submodule_search_locations])):
        if name not in sys.modules:
            module = types.ModuleType(name)
            module.__path__ = path
            module.__package__ = name
            sys.modules[name] = module
            placeholders.append(name)
    try:
        for name in MODULES:
            importlib.import_module(name)
    finally:
        for name in placeholders:  # the real packages run their __init__ when something imports them
            sys.modules.pop(name, None)
    if not any(isinstance(f, _AttachLoaded) for f in sys.meta_path):
        sys.meta_path.insert(0, _AttachLoaded())


class _AttachLoaded(importlib.abc.MetaPathFinder):
    """When the real `litert_torch.quantize` is imported, the modules loaded earlier become its attributes (as
    they would had the package loaded them), before and after its `__init__` runs; then this finder retires."""

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Optional[importlib.machinery.ModuleSpec]:
        if name != QUANTIZE:
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        run_init = spec.loader.exec_module

        def exec_module(module: types.ModuleType) -> None:
            _attach(module)
            run_init(module)
            _attach(module)

        spec.loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


def _attach(package: types.ModuleType) -> None:
    for full in MODULES:
        if full in sys.modules:
            setattr(package, full.rpartition(".")[2], sys.modules[full])
