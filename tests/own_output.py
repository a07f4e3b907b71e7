"""Runs `mnv4-deploy ARGS` recording every line the program itself writes (through `console.stdout()` and
`console.stderr()`), into the file named by $OWN_OUTPUT; tests/test_output.py compares that with what the
process printed in all, which must hold nothing else."""
from __future__ import annotations

import io
import json
import os
import sys
from typing import TextIO

from mnv4_deploy.infra import console

recorded: list[str] = []


class _Tee(io.TextIOBase):
    def __init__(self, stream: TextIO) -> None:
        self.stream = stream

    def write(self, text: str) -> int:
        recorded.append(text)
        return self.stream.write(text)

    def flush(self) -> None:
        self.stream.flush()

    def isatty(self) -> bool:
        return self.stream.isatty()

    def fileno(self) -> int:
        return self.stream.fileno()

    def close(self) -> None:
        self.stream.close()


_duplicate = console._duplicate
console._duplicate = lambda fd, like: _Tee(_duplicate(fd, like))  # type: ignore[assignment]

if __name__ == "__main__":
    from mnv4_deploy.cli import main

    code = main(sys.argv[1:])
    with open(os.environ["OWN_OUTPUT"], "w") as fh:
        json.dump("".join(recorded), fh)
    sys.exit(code)
