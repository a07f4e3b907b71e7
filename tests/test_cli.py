"""The CLI: one-line errors with exit code 2 for user mistakes, --help that teaches."""
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from mnv4_deploy.cli import main


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mnv4_deploy", *args], capture_output=True, text=True,
                          env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})


def _one_line_error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stderr
    errors = [l for l in proc.stderr.splitlines() if "error:" in l]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return errors[0]


def test_unknown_model_one_line(tmp_path: Path):
    line = _one_line_error(run_cli("convert", "--model", "mobilenetv5", "--weights", "random", "--out", str(tmp_path)))
    assert "unknown model" in line and "mobilenetv4_conv_small" in line


def test_pretrained_offline_one_line(tmp_path: Path):
    line = _one_line_error(run_cli("convert", "--model", "mobilenetv4_conv_small", "--out", str(tmp_path)))
    assert "--weights PATH" in line and "--weights random" in line


def test_unknown_option_exits_2():
    proc = run_cli("convert", "--model", "x", "--bogus")
    assert proc.returncode == 2 and "unrecognized arguments: --bogus" in proc.stderr


def test_empty_calib_folder(tmp_path: Path):
    (tmp_path / "calib").mkdir()
    line = _one_line_error(run_cli("convert", "--model", "mobilenetv4_conv_small_035", "--weights", "random",
                                   "--calib", str(tmp_path / "calib"), "--int8", "--out", str(tmp_path / "o")))
    assert "no images found" in line
    assert not (tmp_path / "o" / "onnx").exists()


def test_unknown_target_and_conflicting_flags(tmp_path: Path, capsys):
    assert main(["convert", "--model", "mobilenetv4_conv_small", "--weights", "random", "--to", "onxx"]) == 2
    assert "did you mean: onnx" in capsys.readouterr().err
    assert main(["convert", "--model", "mobilenetv4_conv_small", "--int8", "--precision", "fp32"]) == 2


def test_help_teaches():
    proc = run_cli("convert", "--help")
    assert proc.returncode == 0 and "examples:" in proc.stdout and "--calib" in proc.stdout


def test_inspect_lists_models_targets_recipes(capsys):
    assert main(["inspect", "--list"]) == 0
    out = capsys.readouterr().out
    assert "mobilenetv4_hybrid_medium" in out and "onnx" in out and "ptq-int8" in out


def test_target_flag_for_another_target_is_refused(capsys):
    rc = main(["convert", "--model", "mobilenetv4_conv_small_035", "--weights", "random", "--to", "onnx",
               "--io-dtype", "int8"])
    assert rc == 2 and "--io-dtype does not apply to onnx; it is an option of: tflite" in capsys.readouterr().err


def test_package_description_and_help_name_every_target():
    import tomllib

    from mnv4_deploy.cli import description
    from mnv4_deploy.targets import get_target, target_names

    pyproject = tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text())
    assert pyproject["project"]["description"] == description()
    assert all(get_target(n).title in description() for n in target_names())
    proc = run_cli("--help")
    assert " ".join(proc.stdout.split()).count(description().split(",")[0]) == 1


def test_verbosity_flags_after_the_command(tmp_path: Path):
    """`mnv4-deploy convert ... -v` works as `mnv4-deploy -v convert ...` does."""
    from mnv4_deploy.cli import build_parser

    args = build_parser().parse_args(["convert", "--model", "m", "-v"])
    assert args.verbose is True and args.quiet is False
    args = build_parser().parse_args(["-q", "convert", "--model", "m"])
    assert args.quiet is True and args.verbose is False


def _silent_server() -> tuple[Any, str]:
    """A local endpoint that accepts connections and never answers (a firewall that drops, a hung proxy)."""
    import socket
    import threading

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    server.settimeout(0.2)
    held: list = []

    def accept() -> None:  # until the test closes the server: no thread outlives it (the export worker forks
        while server.fileno() != -1:  # only from a single-thread process)
            try:
                held.append(server.accept())
            except OSError:
                pass

    threading.Thread(target=accept, daemon=True).start()
    return server, f"http://127.0.0.1:{server.getsockname()[1]}"


@pytest.mark.parametrize("endpoint", ["refused", "silent"])
def test_unreachable_hub_is_one_line_at_once(tmp_path: Path, endpoint: str):
    """Offline the first command says so in one line, without huggingface_hub's minute of retries, and names the
    cache where the weights would be kept (a probe of 3 s at most, whether the hub refuses or never answers)."""
    import os
    import time

    server = None
    if endpoint == "silent":
        server, url = _silent_server()
    else:
        url = "http://127.0.0.1:9"  # the discard port: nothing listens, the connection is refused
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    env |= {"HF_ENDPOINT": url, "HF_HUB_CACHE": str(tmp_path / "cache")}
    start = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-m", "mnv4_deploy", "convert", "--model", "mobilenetv4_conv_small",
                               "--to", "onnx", "--out", str(tmp_path / "o")], capture_output=True, text=True,
                              env=env)
    finally:
        if server is not None:
            server.close()
    seconds = time.perf_counter() - start
    line = _one_line_error(proc)
    assert "cannot reach the Hugging Face hub" in line and str(tmp_path / "cache") in line, line
    assert "Retrying" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert seconds < 30, seconds  # startup plus a 3 s probe; the retries took 54 s


def test_cached_weights_are_found_without_the_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from huggingface_hub import constants

    from mnv4_deploy.load import hub

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    assert not hub.cached("mobilenetv4_conv_small")
    (tmp_path / "models--timm--mobilenetv4_conv_small.e2400_r224_in1k").mkdir()
    assert hub.cached("mobilenetv4_conv_small") and hub.cached("mobilenetv4_conv_small.e2400_r224_in1k")
    assert not hub.cached("mobilenetv4_conv_small.e1200_r224_in1k") and not hub.cached("mobilenetv4_conv_medium")
