"""`OUT/<target>/` as one transaction: one writer at a time, everything staged, one atomic swap.

A run takes a lock per target folder before any slow work (`OUT/.<target>.lock`, `flock`, holding the pid,
host and command of the run), so a second run into the same folder is refused at once in one line naming the
first. Everything the folder will hold (the artifact, `manifest.json`, `tensorwise.json`) is written into a
sibling staging folder `OUT/.<target>.staging-XXXX/`, and `commit` swaps it with `OUT/<target>/` in one atomic
exchange (fileio.swap_in): a reader sees the old folder or the new one, never a model beside a manifest that is
not its own, and nothing of the old folder survives. An artifact the verification gate refuses is not
committed: the previous folder stays as it was and gains `manifest.failed.json` (one atomic file rename).

Why a staged folder and a swap, not versioned folders behind a `current` link: `OUT/<target>/` stays a plain
folder (what the README, scripts and reports point at, also on Windows), and the swap needs no garbage
collection of old versions. A run killed with SIGKILL leaves its staging folder; the next run that takes the
lock removes it (only a lock holder cleans, so a live run's staging folder is never touched).
"""
from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import platform
import secrets
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

from .errors import UserError
from .fileio import remove_tree, sha256_of, swap_in, write_json

logger = logging.getLogger(__name__)

try:
    import fcntl
except ImportError:  # Windows: an exclusively created lock file instead of flock
    fcntl = None  # type: ignore[assignment]


def lock_path(folder: Path) -> Path:
    return folder.with_name(f".{folder.name}.lock")


def _staging_prefix(folder: Path) -> str:
    return f".{folder.name}.staging-"


def _holder_info() -> dict[str, Any]:
    argv = sys.argv[1:] if Path(sys.argv[0]).name in ("mnv4-deploy", "__main__.py") else sys.argv
    return {"pid": os.getpid(), "host": platform.node(),
            "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "command": " ".join(["mnv4-deploy", *argv])[:300]}


def _describe_holder(raw: bytes) -> str:
    try:
        h = json.loads(raw.decode())
        return (f"pid {int(h['pid'])} on {h['host']}, started {h['started']}: {str(h['command'])[:160]}")
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        return "another process (it has not written its name yet)"


@dataclass
class TargetLock:
    """The lock on one `OUT/<target>/`; `release` removes the lock file (while still holding it)."""

    folder: Path
    fd: Optional[int]

    def release(self) -> None:
        if self.fd is None:
            return
        if fcntl is None:  # Windows cannot remove an open file
            os.close(self.fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lock_path(self.folder))  # while still holding it: see lock_target
        if fcntl is not None:
            os.close(self.fd)
        self.fd = None


def _busy(folder: Path, raw: bytes) -> UserError:
    return UserError(f"'{folder}' is being written by another run ({_describe_holder(raw)}): wait for it to finish, "
                     "or give this run another --out")


def lock_target(folder: Path) -> TargetLock:
    """Take the folder's lock without waiting (a UserError naming the holder when it is taken), then clean up
    what killed runs left."""
    folder = Path(folder)
    path = lock_path(folder)
    info = json.dumps(_holder_info()).encode()
    while True:
        try:
            if fcntl is None:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            else:
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except FileExistsError:
            raise _busy(folder, path.read_bytes()) from None
        except OSError as exc:
            raise UserError(f"cannot write to '{folder.parent}': {exc.strerror}; choose a writable folder") from None
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raw = os.pread(fd, 4096, 0)
                os.close(fd)
                raise _busy(folder, raw) from None
            # A releasing holder unlinks the file while it still holds it: lock the file that is at the path now.
            try:
                same = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
        os.ftruncate(fd, 0)
        os.pwrite(fd, info, 0)
        lock = TargetLock(folder, fd)
        _clean_stale(folder)
        return lock


def _clean_stale(folder: Path) -> None:
    """Remove staging folders of killed runs (the lock is ours, so no live run owns them); put back a folder the
    portable swap had moved aside when the kill came between its two renames."""
    parent = folder.parent
    if not parent.is_dir():
        return
    aside = sorted(p for p in parent.iterdir() if p.name.startswith(f".{folder.name}.old-"))
    if aside and not os.path.lexists(folder):
        os.rename(aside.pop(), folder)
        logger.info(f"note: restored '{folder}', which an interrupted run had moved aside")
    for p in aside + [p for p in parent.iterdir() if p.name.startswith(_staging_prefix(folder))]:
        remove_tree(p)


@dataclass
class TargetLocks:
    """The locks of one run (one per target folder), released together."""

    locks: list[TargetLock] = field(default_factory=list)

    def release(self) -> None:
        for lock in self.locks:
            lock.release()


def lock_targets(out: Path, names: Sequence[str]) -> TargetLocks:
    """Lock `OUT/<name>/` for every target of a run, all or none."""
    held = TargetLocks()
    try:
        for name in dict.fromkeys(names):
            held.locks.append(lock_target(Path(out) / name))
    except BaseException:
        held.release()
        raise
    return held


@dataclass
class Staging:
    """A target folder being written: files go to `path`; `commit` swaps it in, `refuse` keeps the old one."""

    folder: Path  # OUT/<target>
    path: Path  # OUT/.<target>.staging-XXXX
    artifact_name: str
    committed: bool = False

    @property
    def artifact(self) -> Path:
        return self.path / self.artifact_name

    def write_json(self, name: str, data: Any) -> Path:
        write_json(self.path / name, data)
        return self.folder / name

    def commit(self) -> None:
        """Swap the staged folder in; the old folder (now at the staging path) is removed on exit."""
        if not self.artifact.exists():
            raise RuntimeError(f"writer produced nothing at {self.artifact}")
        swap_in(self.path, self.folder)
        self.committed = True

    def refuse(self, name: str, data: Any) -> Path:
        """Leave the folder's current artifact as it is, with `name` (what was measured) beside it."""
        self.folder.mkdir(parents=True, exist_ok=True)
        write_json(self.folder / name, data)
        return self.folder / name


@contextlib.contextmanager
def staged(folder: Path, artifact_name: str) -> Iterator[Staging]:
    """A fresh staging folder beside `folder`; whatever is left at its path (the old folder after a commit, or
    an uncommitted attempt) is removed when the block ends, also on an exception or an interrupt."""
    folder = Path(folder)
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        path = _new_dir(folder.parent, _staging_prefix(folder))
    except OSError as exc:
        raise UserError(f"cannot write to '{folder.parent}': {exc.strerror}; choose a writable folder") from None
    try:
        yield Staging(folder, path, artifact_name)
    finally:
        remove_tree(path)


def _new_dir(parent: Path, prefix: str) -> Path:
    """A new folder with the umask's permissions (mkdtemp's 0700 would become OUT/<target>'s mode)."""
    while True:
        path = parent / f"{prefix}{secrets.token_hex(4)}"
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue


# ---------------------------------------------------------------- reading a folder consistently
def check_artifact(folder: Path, manifest_name: str, read: Callable[[Path], dict[str, Any]],
                   attempts: int = 5) -> dict[str, Any]:
    """The folder's manifest (read with `read`, which validates it), once its artifact's sha256 is checked
    against it; a missing or different artifact is one UserError line.

    Read optimistically: the manifest file is read again after hashing, and a folder swapped in meanwhile (a
    commit between the two reads) is read again rather than reported as a mismatch.
    """
    folder = Path(folder)
    manifest_path = folder / manifest_name
    for _ in range(attempts):
        before = manifest_path.read_bytes()
        manifest = read(manifest_path)
        artifact = folder / manifest["artifact"]["file"]
        try:
            actual = sha256_of(artifact) if artifact.exists() else None
            stable = manifest_path.read_bytes() == before
        except FileNotFoundError:  # removed while being read: the folder was swapped
            stable = False
        except OSError as exc:
            raise UserError(f"cannot read '{artifact}', the artifact its {manifest_name} names: {exc.strerror}; "
                            "rebuild it with `mnv4-deploy convert`") from None
        if stable:
            break
    if actual is None:
        raise UserError(f"'{folder}' has no '{artifact.name}', the artifact its {manifest_name} describes: the "
                        "folder was changed after mnv4-deploy wrote it; rebuild it with `mnv4-deploy convert`")
    expected = manifest["artifact"]["sha256"]
    if actual != expected:
        raise UserError(f"'{artifact}' does not match its {manifest_name} (sha256 {actual[:12]}... on disk, "
                        f"{expected[:12]}... in the manifest): the folder was changed after mnv4-deploy wrote it; "
                        "rebuild it with `mnv4-deploy convert`")
    return manifest
