"""coremltools, imported without executorch, and converting without its per-pass self-checks.

When executorch is installed, `import coremltools` imports `executorch.exir` for its EXECUTORCH frontend,
which this package never uses: seconds on every CoreML export (bench/bench_convert_time.py). The first import
of coremltools in a process goes through `import_coremltools()`, which hides executorch from that one import
(coremltools then records it as absent); executorch itself stays importable afterwards. A process that has
imported executorch already imports coremltools as usual.

`validated_once()`: coremltools' pass pipelines re-validate the whole program after each of its ~100 graph
passes (a consistency check of coremltools' own passes, a third of `ct.convert`'s time on our programs). Inside
it the program is validated once, after the last pass, with the same check; the saved program is then
executed and compared with the PyTorch simulation tensor by tensor, which no invalid program passes.
"""
from __future__ import annotations

import contextlib
import importlib.abc
import sys
import threading
from types import ModuleType
from typing import Any, Iterator, Optional

HIDDEN = "executorch"


class _HideExecutorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Optional[Any]:
        if name.partition(".")[0] == HIDDEN:
            raise ImportError(f"{HIDDEN} is not imported with coremltools "
                              "(mnv4_deploy.targets.coreml.mlprogram.toolchain)")
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


_VALIDATION = threading.local()


@contextlib.contextmanager
def validated_once() -> Iterator[list[Any]]:
    """Within: coremltools' `Program.validate` does nothing on this thread; each program it was asked to
    validate is validated once, for real, on leaving (an error raises there), with the strictest check any call
    asked for. Yields the list of (program, scope check) pairs."""
    from coremltools.converters.mil.mil.program import Program

    if not getattr(Program.validate, "_deferred", False):
        real = Program.validate

        def validate(self: Any, *args: Any, **kwargs: Any) -> None:
            programs = getattr(_VALIDATION, "programs", None)
            if programs is None:
                return validate._real(self, *args, **kwargs)  # type: ignore[attr-defined]
            scope = bool(kwargs.get("check_essential_scope", args[0] if args else False))
            for i, (program, checked) in enumerate(programs):
                if program is self:
                    programs[i] = (program, checked or scope)
                    return
            programs.append((self, scope))

        validate._deferred = True  # type: ignore[attr-defined]
        validate._real = real  # type: ignore[attr-defined]
        Program.validate = validate
    outer = getattr(_VALIDATION, "programs", None)
    _VALIDATION.programs = programs = []
    try:
        yield programs
    finally:
        _VALIDATION.programs = outer
    for program, scope in programs:  # as after the pass that asked (dead code elimination checks scopes)
        Program.validate._real(program, check_essential_scope=scope)  # type: ignore[attr-defined]
