"""Where this program's own lines go, and where every other library's output goes instead.

Converters and runtimes (coremltools, litert, absl, oneDNN, torch, NNCF) write to the process's stdout and
stderr, from Python and from C++: a user reads those lines as errors. The CLI points file descriptors 1 and 2
at a capture file for the whole command (`foreign_output_captured`), the only way to catch what native code
prints, and writes its own lines (results, log lines, progress bars) to duplicates of the original
descriptors, `stdout()` and `stderr()`. `-v` captures nothing. When a command ends in an unexpected error,
the captured output is replayed before the traceback, so nothing that explains a crash is lost.
"""
from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from typing import IO, Iterator, Optional, TextIO

# While other libraries' output is captured: this program's own stdout and stderr (duplicates of the original
# descriptors). Otherwise None, and this program writes to whatever sys.stdout / sys.stderr are at the time.
_out: Optional[TextIO] = None
_err: Optional[TextIO] = None


def stdout() -> TextIO:
    """Where this program's results (tables, JSON) go."""
    return _out or sys.stdout


def stderr() -> TextIO:
    """Where this program's log lines and progress bars go."""
    return _err or sys.stderr

REPLAY_LINES = 200  # of captured output, shown before an unexpected error's traceback


def echo(text: str = "") -> None:
    """Print one of this program's result lines on its standard output."""
    print(text, file=stdout(), flush=True)


def _duplicate(fd: int, like: TextIO) -> TextIO:
    return os.fdopen(os.dup(fd), "w", buffering=1, encoding=getattr(like, "encoding", None) or "utf-8",
                     errors="replace")


@contextlib.contextmanager
def foreign_output_captured() -> Iterator[Optional[IO[bytes]]]:
    """Send everything written to descriptors 1 and 2 (by Python or native code) to a temporary file for the
    duration; this program writes through `stdout()` and `stderr()`. On an unexpected exception (not a user error or
    an interrupt, which the CLI reports in one line), the captured output's tail is written to stderr."""
    global _out, _err
    try:
        sys.stdout.flush()
        sys.stderr.flush()
        stdout_fd, stderr_fd = sys.stdout.fileno(), sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # no real descriptors (an embedding host): nothing to capture
        yield None
        return
    saved_out, saved_err = _duplicate(stdout_fd, sys.stdout), _duplicate(stderr_fd, sys.stderr)
    # Native code writes to descriptors 1 and 2 whatever Python's streams are (a host may have moved those).
    descriptors = sorted({1, 2, stdout_fd, stderr_fd})
    originals = {fd: os.dup(fd) for fd in descriptors}
    capture = tempfile.TemporaryFile()
    for fd in descriptors:
        os.dup2(capture.fileno(), fd)
    _out, _err = saved_out, saved_err
    failed: Optional[BaseException] = None
    try:
        yield capture
    except BaseException as exc:
        failed = exc
        raise
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError, ValueError):
                stream.flush()
        for fd, original in originals.items():
            os.dup2(original, fd)
            os.close(original)
        _out, _err = None, None
        saved_out.close()
        saved_err.close()
        if failed is not None and _unexpected(failed):
            _replay(capture)
        capture.close()


def _unexpected(exc: BaseException) -> bool:
    from ..errors import UserError, VerificationError

    return not isinstance(exc, (UserError, VerificationError, KeyboardInterrupt, SystemExit))


def _replay(capture: IO[bytes]) -> None:
    capture.seek(0)
    lines = capture.read().decode("utf-8", "replace").splitlines()
    if lines:
        shown = lines[-REPLAY_LINES:]
        sys.stderr.write(f"mnv4-deploy: other libraries printed this before the error "
                         f"({len(shown)} of {len(lines)} lines):\n" + "\n".join(shown) + "\n")
        sys.stderr.flush()
