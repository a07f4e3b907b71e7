"""A reference executor for Core ML ML Programs, so a .mlpackage can be run (and checked) off macOS.

Core ML itself runs only on Apple platforms and no public MIL interpreter exists; this package reads the saved
program (`reader`), gives each MIL op Core ML's semantics (`ops`) and runs it op by op (`executor`), with any
intermediate tensor available by name. Numbers it produces are "executed" (this project's executor of the
artifact's own program), not measured in Core ML.
"""
from __future__ import annotations

from pathlib import Path

from .executor import ExecutionError, Executor, UnsupportedOpError
from .ops import OPS, covered
from .reader import Program, ProgramFormatError, read_program


def load(path: Path) -> Executor:
    """The executor of a saved .mlpackage's main function."""
    return Executor(read_program(Path(path)))


__all__ = ["ExecutionError", "Executor", "OPS", "Program", "ProgramFormatError", "UnsupportedOpError", "covered",
           "load", "read_program"]
