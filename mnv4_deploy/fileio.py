"""Atomic writes: an interrupted run never leaves a half-written artifact behind."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from .errors import UserError


def _reason(exc: OSError) -> str:
    """The OS's own words for why (e.g. 'Not a directory'), without the path it repeats."""
    return exc.strerror or type(exc).__name__


def ensure_writable_dir(path: Path) -> None:
    """Create the --out folder if needed and prove it is writable, before any slow work starts.

    Checking up front turns a late FileNotFoundError/PermissionError traceback (after minutes of
    calibration) into one line naming the folder and the fix.
    """
    path = Path(path).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
        # A real write: os.access lies under root, ACLs and read-only mounts.
        fd, probe = tempfile.mkstemp(prefix=".mnv4-write-test.", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise UserError(f"cannot write to --out '{path}': {_reason(exc)}; choose a writable folder") from None


@contextlib.contextmanager
def atomic_path(final: Path) -> Iterator[Path]:
    """Yield a temporary path beside `final`; rename it into place only if the block succeeds.

    Works for files and for directories (an `.mlpackage` is a directory). The temporary name keeps
    the final suffix, because some writers (onnx, coremltools) choose a format by suffix.
    """
    final = Path(final)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp_dir = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    except OSError as exc:  # only the folder set-up: the writer's own errors below stay what they are
        raise UserError(f"cannot write to '{final.parent}': {_reason(exc)}; choose a writable folder") from None
    tmp = tmp_dir / final.name
    try:
        yield tmp
        if not tmp.exists():
            raise RuntimeError(f"writer produced nothing at {tmp}")
        if final.is_dir() and not final.is_symlink():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically (sorted keys off: manifests read top-down)."""
    with atomic_path(Path(path)) as tmp:
        tmp.write_text(json.dumps(data, indent=2, default=_json_default) + "\n")


def read_json(path: Path, what: str, fix: str) -> Any:
    """Read a JSON `what` (report, manifest) the user pointed at; missing or malformed is a UserError naming `fix`."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"no {what} at '{path}': {fix}")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"'{path}' is not valid JSON ({exc}): {fix}") from None


def write_text(path: Path, text: str) -> None:
    with atomic_path(Path(path)) as tmp:
        tmp.write_text(text)


def _json_default(obj: Any) -> Any:
    import numpy as np

    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def sha256_of(path: Path) -> str:
    """sha256 of a file, or of a directory's files in sorted order (for .mlpackage)."""
    path = Path(path)
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        if path.is_dir():
            h.update(str(f.relative_to(path)).encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def size_of(path: Path) -> int:
    path = Path(path)
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size
