"""Converter output, captured: kept off the CLI's own output, replayed when the conversion fails.

litert-torch, coremltools, NNCF, the OpenVINO FX decoder and torch.onnx print progress bars, log through the
root logger and warn on every call. Inside `captured()` all of that goes to one buffer: on success it is
logged at DEBUG (`mnv4-deploy -v` shows it), and when the block raises it is logged as an ERROR before the
exception propagates, so a failed conversion shows what the converter said. Warnings are collected and logged
once each. Nothing is filtered process-wide.
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings
from typing import Iterator, Mapping, Optional

logger = logging.getLogger(__name__)


class _BufferHandler(logging.Handler):
    def __init__(self, buffer: io.StringIO) -> None:
        super().__init__(logging.DEBUG)
        self.buffer = buffer
        self.setFormatter(logging.Formatter("%(name)s %(levelname)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        self.buffer.write(self.format(record) + "\n")


@contextlib.contextmanager
def _environment(env: Mapping[str, str]) -> Iterator[None]:
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def captured(what: str, env: Optional[Mapping[str, str]] = None) -> Iterator[io.StringIO]:
    """Run a conversion step (`what`, e.g. 'litert_torch.convert') with its output captured."""
    buffer = io.StringIO()
    root = logging.getLogger()
    handler = _BufferHandler(buffer)
    # Only the handlers change: the libraries' own levels decide what they log (turning the root level up would
    # make torch's tracing loggers do heavy work).
    saved_handlers = root.handlers[:]
    root.handlers = [handler]
    try:
        with contextlib.ExitStack() as stack:
            stack.enter_context(_environment(env or {}))
            stack.enter_context(contextlib.redirect_stdout(buffer))
            stack.enter_context(contextlib.redirect_stderr(buffer))
            caught = stack.enter_context(warnings.catch_warnings(record=True))
            warnings.simplefilter("default")  # once per location, as Python shows them
            try:
                yield buffer
            finally:
                for w in caught:
                    buffer.write(f"{w.category.__name__}: {w.message}\n")
    except BaseException as exc:
        root.handlers = saved_handlers
        text = buffer.getvalue().strip()
        if text:
            # Ctrl-C or SIGTERM (a KeyboardInterrupt here) is not a converter failure: its output goes to -v only.
            interrupted = isinstance(exc, KeyboardInterrupt)
            logger.log(logging.DEBUG if interrupted else logging.ERROR, "%s %s; its output was:\n%s", what,
                       "interrupted" if interrupted else "failed", text)
        raise
    root.handlers = saved_handlers
    text = buffer.getvalue().strip()
    if text:
        logger.debug("%s output:\n%s", what, text)
