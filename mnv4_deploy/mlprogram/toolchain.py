"""coremltools, imported without executorch.

When executorch is installed, `import coremltools` imports `executorch.exir` for its EXECUTORCH frontend,
which this package never uses: seconds on every CoreML export (bench/bench_convert_time.py). The first import
of coremltools in a process goes through `import_coremltools()`, which hides executorch from that one import
(coremltools then records it as absent); executorch itself stays importable afterwards. A process that has
imported executorch already imports coremltools as usual.
"""
from __future__ import annotations

import importlib.abc
import sys
from types import ModuleType
from typing import Any, Optional

HIDDEN = "executorch"


class _HideExecutorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Optional[Any]:
        if name.partition(".")[0] == HIDDEN:
            raise ImportError(f"{HIDDEN} is not imported with coremltools (mnv4_deploy.mlprogram.toolchain)")
        return None


def import_coremltools() -> ModuleType:
    """The coremltools module (see the module docstring for why not a plain import)."""
    if "coremltools" in sys.modules or HIDDEN in sys.modules:
        import coremltools
        return coremltools
    finder = _HideExecutorch()
    sys.meta_path.insert(0, finder)
    try:
        import coremltools
    finally:
        sys.meta_path.remove(finder)
    return coremltools
