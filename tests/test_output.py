"""The default output of every command holds only this program's lines; other libraries' output goes to -v.

coremltools, litert, absl, oneDNN and torch print warnings and notices from Python and from C++ when they are
imported or convert; a user reads them as errors. The end-to-end tests run real conversions (every target's
converter) in a subprocess and compare what the process printed with what the program itself wrote.
"""
from __future__ import annotations

import ctypes
import json
import logging
import os
import subprocess
import sys
import warnings
from collections import Counter
from pathlib import Path

import pytest

from mnv4_deploy.errors import UserError
from mnv4_deploy.infra import console

REPO = Path(__file__).resolve().parent.parent
TINY = ["--model", "mobilenetv4_conv_small_035", "--weights", "random", "--input-size", "32"]


def _run(args: list[str], tmp_path: Path) -> tuple[subprocess.CompletedProcess, str]:
    own = tmp_path / "own.json"
    env = {**os.environ, "OWN_OUTPUT": str(own), "HF_HUB_OFFLINE": "1"}
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)  # as a user's shell has it: the CLI sets what it needs itself
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "own_output.py"), *args], capture_output=True,
                          text=True, env=env, cwd=tmp_path)
    return proc, json.loads(own.read_text()) if own.exists() else ""


def _foreign_lines(proc: subprocess.CompletedProcess, own: str) -> list[str]:
    """Lines the process printed that the program did not write itself."""
    printed = Counter(l for l in (proc.stdout + proc.stderr).splitlines() if l.strip())
    written = Counter(l for l in own.splitlines() if l.strip())
    return sorted((printed - written).elements())


def _installed_targets() -> list[str]:
    from mnv4_deploy.targets import get_target, target_names

    names = []
    for name in target_names():
        try:
            get_target(name).check_installed()
            names.append(name)
        except UserError:
            pass
    return names


@pytest.mark.parametrize("command", ["convert", "report",
                                     pytest.param("convert-every-target", marks=pytest.mark.slow)])
def test_default_output_is_only_this_programs_lines(tmp_path: Path, command: str) -> None:
    """The README's commands' converters (coreml, onnx) by default; under -m slow every installed converter
    (their import-time and conversion-time chatter included)."""
    every = [t for t in _installed_targets() if t != "qnn"]  # qnn: its emulator takes minutes
    targets = ",".join(every if command == "convert-every-target" else [t for t in every if t in ("onnx", "coreml")])
    command = command.split("-")[0]
    if command == "convert":
        args = ["convert", *TINY, "--to", targets, "--int8", "--latency-runs", "2", "--out", str(tmp_path / "o")]
    else:
        args = ["report", *TINY, "--targets", "onnx", "--precisions", "int8", "--latency-runs", "2",
                "--no-sensitivity", "--out", str(tmp_path / "r")]
    proc, own = _run(args, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert own.strip(), "the program wrote nothing of its own"
    assert _foreign_lines(proc, own) == []


@pytest.mark.slow  # default-suite budget (12 min on 2 cores)
def test_verbose_shows_other_libraries_output(tmp_path: Path) -> None:
    pytest.importorskip("coremltools")
    args = ["-v", "convert", *TINY, "--to", "coreml", "--latency-runs", "2", "--out", str(tmp_path / "o")]
    proc, own = _run(args, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # coremltools on Linux says it cannot load its native runtime when imported; -v shows it, as it printed it
    assert any("coremltools" in line for line in _foreign_lines(proc, own)), proc.stderr[-3000:]
    assert "time per stage:" in proc.stderr and "export" in proc.stderr


def test_capture_catches_every_channel(capfd: pytest.CaptureFixture[str]) -> None:
    """Python prints, warnings, other loggers, native writes to both descriptors: all captured; the program's
    own lines still reach the terminal."""
    libc = ctypes.CDLL(None)
    with console.foreign_output_captured():
        print("noise: print")
        sys.stderr.write("noise: sys.stderr\n")
        warnings.warn("noise: warning")
        logging.getLogger("some.library").warning("noise: logging")
        os.write(1, b"noise: fd 1\n")
        os.write(2, b"noise: fd 2\n")
        libc.puts(b"noise: C stdio")
        libc.fflush(None)
        console.echo("own: result")
        print("own: log line", file=console.stderr())
    out, err = capfd.readouterr()
    assert "noise" not in out + err
    assert out == "own: result\n" and err == "own: log line\n"


def test_unexpected_error_replays_what_libraries_printed(capfd: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(RuntimeError), console.foreign_output_captured():
        os.write(2, b"converter: the reason it broke\n")
        raise RuntimeError("bug")
    err = capfd.readouterr().err
    assert "other libraries printed this before the error" in err and "the reason it broke" in err


def test_user_error_does_not_replay(capfd: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(UserError), console.foreign_output_captured():
        os.write(2, b"converter: noise\n")
        raise UserError("a user mistake")
    assert "noise" not in capfd.readouterr().err


def test_an_interrupted_converter_is_not_reported_as_failed() -> None:
    """Ctrl-C or SIGTERM inside a converter: its captured output goes to -v (DEBUG), with no 'failed' error line;
    a real failure still logs it as an error."""
    from mnv4_deploy.infra.converter_output import captured

    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    log = logging.getLogger("mnv4_deploy.infra.converter_output")
    handler, level = Keep(logging.DEBUG), log.level
    log.addHandler(handler)
    log.setLevel(logging.DEBUG)
    try:
        with pytest.raises(KeyboardInterrupt), captured("torch.onnx.export"):
            print("[torch.onnx] Run decompositions...")
            raise KeyboardInterrupt
        assert [(r.levelno, "interrupted; its output was" in r.getMessage()) for r in records] == [(logging.DEBUG, True)]
        records.clear()
        with pytest.raises(RuntimeError), captured("torch.onnx.export"):
            print("[torch.onnx] Run decompositions...")
            raise RuntimeError("boom")
        assert [(r.levelno, "failed; its output was" in r.getMessage()) for r in records] == [(logging.ERROR, True)]
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
