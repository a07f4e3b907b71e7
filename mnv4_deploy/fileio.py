"""Atomic writes: an interrupted run never leaves a half-written artifact behind.

A file is replaced by one rename. A folder (an `.mlpackage`, an OpenVINO `model/`, a whole `OUT/<target>/`) is
replaced by one atomic exchange (Linux `renameat2(RENAME_EXCHANGE)`), so a reader sees the old folder or the new
one, never neither and never a mix; elsewhere the portable fallback moves the old folder aside first, whose
worst case (a kill between its two renames) is a missing folder, never a mismatched one.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import os
import secrets
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

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
        if tmp.is_dir() or final.is_dir():
            swap_in(tmp, final)  # the old folder, if any, is now at `tmp` and goes with tmp_dir
        else:
            os.replace(tmp, final)
    finally:
        remove_tree(tmp_dir)


# ---------------------------------------------------------------- folders: one atomic exchange
_AT_FDCWD = -100
_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2
# The kernel or file system lacks renameat2 or that flag: use the portable fallback.
_UNSUPPORTED = {errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP}


def _load_renameat2() -> Optional[Callable[..., int]]:
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2  # glibc >= 2.28
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_renameat2 = _load_renameat2()


def _rename2(src: Path, dst: Path, flags: int) -> bool:
    """renameat2(src, dst, flags); False when this system cannot (the caller falls back), OSError otherwise."""
    if _renameat2 is None:
        return False
    if _renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    code = ctypes.get_errno()
    if code in _UNSUPPORTED:
        return False
    raise OSError(code, os.strerror(code), str(src), None, str(dst))


def swap_in(new: Path, final: Path) -> None:
    """Put `new` (a folder or a file) at `final` in one step; what was at `final` ends up at `new`'s path.

    Atomic for readers and for an interrupt on Linux; concurrent writers never fail (each exchange succeeds,
    the last one wins). The caller removes `new`'s path afterwards (the old content, or nothing).
    """
    from .signals import deferred_signals

    new, final = Path(new), Path(final)
    for _ in range(1000):  # another writer may create or remove `final` between two attempts
        try:
            if os.path.lexists(final):
                if _rename2(new, final, _RENAME_EXCHANGE):
                    return
                with deferred_signals():  # Ctrl-C/SIGTERM wait until both renames are done
                    _swap_portable(new, final)
                return
            if _rename2(new, final, _RENAME_NOREPLACE):
                return
            if not os.path.lexists(final):
                os.rename(new, final)
                return
        except FileNotFoundError:  # `final` was moved away between the check and the rename: try again
            continue
        except OSError as exc:
            if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
            # another writer put its `final` in place first: exchange with it on the next attempt
    raise OSError(errno.EBUSY, f"could not put {new.name} in place: {final} keeps changing")


def _swap_portable(new: Path, final: Path) -> None:
    """Move `final` aside, `new` into place, the old one to `new`'s path: a missing `final` at worst."""
    aside = final.with_name(f".{final.name}.old-{secrets.token_hex(4)}")
    os.rename(final, aside)
    try:
        os.rename(new, final)
    except OSError:
        os.rename(aside, final)  # put the old one back
        raise
    os.rename(aside, new)


def remove_tree(path: Path) -> None:
    """Remove a folder, a file or a link at `path`, whatever is there; nothing when it is gone."""
    path = Path(path)
    if path.is_symlink() or path.is_file():
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    else:
        shutil.rmtree(path, ignore_errors=True)


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
    except RecursionError:  # json's decoder recurses once per nesting level
        raise UserError(f"'{path}' nests too deeply to be a {what}: {fix}") from None
    except OSError as exc:
        raise UserError(f"cannot read '{path}': {_reason(exc)}: {fix}") from None


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
