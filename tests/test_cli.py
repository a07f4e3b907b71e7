"""The CLI: one-line errors with exit code 2 for user mistakes, --help that teaches."""
import subprocess
import sys
from pathlib import Path


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
