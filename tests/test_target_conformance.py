"""One conformance suite for every registered target (and a plugin target registered here in one line).

Each test is written once and runs on every target, as NNCF's template tests do: float parity with PyTorch
(one tolerance per precision), int8 against the PyTorch simulation of the same quantization (logits and
tensor by tensor), the manifest's schema, the verification gate on a broken artifact, atomic writes when an
export fails half-way, and the CLI flags that a target's Options declare. Built artifacts come from the
reference checkpoint on real Tiny ImageNet images; one convert run per precision serves every target.
The last tests check what they can of the checklist in mnv4_deploy/targets/README.md: each registered target's
pyproject extra and tox env, and that its package imports with its toolchain hidden.
"""
from __future__ import annotations

import argparse
import configparser
import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pytest

from mnv4_deploy.cli import build_parser
from mnv4_deploy.cli.common import target_option_values
from mnv4_deploy.config.options import flag_fields
from mnv4_deploy.config.recipes import parse_recipe
from mnv4_deploy.errors import UserError, VerificationError
from mnv4_deploy.infra.fileio import sha256_of
from mnv4_deploy.pipeline import FAILED_MANIFEST, ArtifactResult, ConvertSettings, apply_overrides, convert
from mnv4_deploy.targets import (Runner, check_recipe_targets, get_target, register_target, target_names,
                                 unregister_target)

PLUGIN = ("torchexport", "tests.torchexport_target:TorchExportTarget")
TARGETS = [*target_names(), PLUGIN[0]]
# Float artifacts must reproduce the float model: (min cosine, min top-1 agreement) per precision.
PARITY = {"fp32": (0.9999, 0.99), "fp16": (0.999, 0.95)}
RECIPE = """\
name: conformance
quantization:
  calibration: {images: 64, batch_size: 32}
verification: {images: 48, batch_size: 48}
"""


@pytest.fixture(scope="module", autouse=True)
def plugin_target() -> Iterator[None]:
    register_target(*PLUGIN)
    yield
    unregister_target(PLUGIN[0])


def _installed(name: str) -> Any:
    target = get_target(name)
    try:
        target.check_installed()
    except UserError as exc:
        pytest.skip(str(exc))
    return target


def _toolchain_present(name: str) -> bool:
    """A target whose extra is not installed is skipped by each test (`_installed` says why), never an error."""
    try:
        get_target(name).check_installed()
        return True
    except UserError:
        return False


@pytest.fixture(scope="module")
def recipe_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("recipe") / "conformance.yaml"
    path.write_text(RECIPE)
    return path


@pytest.fixture(scope="module")
def base_settings(tmp_path_factory: pytest.TempPathFactory, reference_checkpoint: Path, tiny_imagenet: Path,
                  recipe_file: Path) -> ConvertSettings:
    """The reference checkpoint on real Tiny ImageNet images, with the conformance recipe."""
    return ConvertSettings(
        model="mobilenetv4_conv_small", weights=str(reference_checkpoint), num_classes=202,
        preprocessing={"input_size": [64], "crop_pct": 1.0}, out=tmp_path_factory.mktemp("built"),
        calib=tiny_imagenet / "train", recipe=str(recipe_file), latency_runs=2, progress=False)


class _Built(dict):
    """(target, precision) -> ArtifactResult; a precision's convert (every target that supports it, one
    quantization for all) runs when a test first asks for it, so a precision whose tests are deselected
    (fp16 is `slow`) costs nothing."""

    def __init__(self, settings: ConvertSettings) -> None:
        super().__init__()
        self.settings, self.done = settings, set()

    def __missing__(self, key: tuple[str, str]) -> ArtifactResult:
        precision = key[1]
        if precision in self.done:
            raise KeyError(key)
        self.done.add(precision)
        names = [n for n in TARGETS if precision in get_target(n).precisions and _toolchain_present(n)]
        settings = dataclasses.replace(self.settings, out=Path(self.settings.out) / precision,
                                       targets=",".join(names), precision=precision)
        self.update({(r.target, precision): r for r in convert(settings)})
        return self[key]


@pytest.fixture(scope="module")
def built(base_settings: ConvertSettings) -> dict[tuple[str, str], ArtifactResult]:
    """Every target at every precision it supports, built per precision on first use."""
    return _Built(base_settings)


def _result(built: dict[tuple[str, str], ArtifactResult], name: str, precision: str) -> ArtifactResult:
    target = _installed(name)
    if precision not in target.precisions:
        pytest.skip(f"{name} does not support {precision}")
    return built[(name, precision)]


@pytest.mark.parametrize("precision", ["fp32", pytest.param("fp16", marks=pytest.mark.slow)])
@pytest.mark.parametrize("name", TARGETS)
def test_float_artifact_matches_pytorch(built, name: str, precision: str) -> None:
    r = _result(built, name, precision)
    v = r.manifest["verification"]
    if v["numbers"] == "simulated":
        pytest.skip(f"{name}: numbers are a PyTorch simulation here, not the artifact")
    min_cosine, min_agreement = PARITY[precision]
    fid = v["held_back"]["vs_float"]
    assert fid["cosine"] >= min_cosine and fid["top1_agreement"] >= min_agreement, fid


@pytest.mark.parametrize("name", TARGETS)
def test_int8_artifact_matches_its_simulation(built, name: str) -> None:
    r = _result(built, name, "int8")
    v = r.manifest["verification"]
    if v["numbers"] == "simulated":
        pytest.skip(f"{name}: numbers are a PyTorch simulation here, not the artifact")
    sim = v["held_back"]["vs_pytorch_simulation"]
    # Rounding differs between runtimes (a tie here, a requantization there); a dropped or rescaled quantizer
    # costs far more (tests/test_tensorwise.py builds such defects).
    assert sim["top1_agreement"] >= 0.9 and sim["cosine"] >= 0.995, sim
    assert v["simulation"]["semantics"] and v["simulation"]["description"], v["simulation"]
    tw = v["tensorwise"]
    if tw["status"] == "compared":
        assert tw["flagged"] == 0 and not tw["unmatched_pytorch"], tw
        if v["simulation"]["semantics"] != "exact":
            # a target that models its runtime's own arithmetic must reproduce it all but bit for bit (the
            # exact simulation is off by 0.015 LSB per element on average against QNN's HTP)
            table = json.loads((r.manifest_path.parent / "tensorwise.json").read_text())["tensors"]
            mean = float(np.mean([row["local"]["mean_lsb"] for row in table]))
            assert mean < 0.002, (v["simulation"], mean)


@pytest.mark.parametrize("name", TARGETS)
def test_int8_artifact_runs_every_conv_in_int8(built, name: str) -> None:
    """From the graph the runtime executes (where the target can read it): no convolution or matmul left float."""
    r = _result(built, name, "int8")
    compute = r.manifest["structure"].get("int8_compute")
    if compute is None:
        pytest.skip(f"{name} cannot say what its runtime executes here")
    assert compute["total"] >= 40 and compute["int8"] == compute["total"] and not compute["float"], compute


@pytest.mark.parametrize("name", TARGETS)
def test_manifest_schema(built, name: str) -> None:
    for precision in ("fp32", "fp16", "int8"):
        if precision not in get_target(name).precisions or (precision == "fp16" and "fp16" not in built.done):
            continue  # fp16 artifacts are built when the slow fp16 parity tests run
        r = _result(built, name, precision)
        m = json.loads(r.manifest_path.read_text())
        assert m == json.loads(json.dumps(r.manifest))  # what was written is what was returned
        assert {"schema_version", "created", "model", "target", "precision", "recipe", "quantization", "export",
                "artifact", "input", "output", "structure", "verification", "tool_versions"} <= set(m)
        assert m["target"] == name and m["precision"] == precision and m["model"]["weights_sha256"]
        assert m["artifact"]["file"] == r.path.name == get_target(name).artifact_name
        assert m["artifact"]["sha256"] == sha256_of(r.path)
        assert m["input"]["shape"][0] == 1 and sorted(m["input"]["shape"][1:]) == [3, 64, 64]
        assert m["output"]["shape"] == [1, 202] and m["export"]["method"]
        v = m["verification"]
        assert v["gate"]["passed"] and v["gate"]["enforced"] and not v["gate"]["failures"]
        assert v["held_back"]["vs_float"]["images"] == 48
        # only the real runtime is timed; anything else says why it has no latency
        assert (v["latency"]["median_ms"] > 0) if v["numbers"] == "measured" else v["latency"]["not_measured"]
        assert (m["quantization"] is not None) == (precision == "int8")
        assert ("vs_pytorch_simulation" in v["held_back"]) == (
            precision == "int8" and v["numbers"] != "simulated"
            and get_target(name).deploys_simulated_model(_request_like(m)))
        assert not (r.path.parent / FAILED_MANIFEST).exists()
        # only a target that allows it is exported in the export worker (infra/worker.py)
        if "export_wait" in m["timings"]["target"]:
            assert get_target(name).exports_in_worker


def _request_like(manifest: dict[str, Any]) -> Any:
    """Enough of an ExportRequest for `deploys_simulated_model` on the default options."""
    target = get_target(manifest["target"])
    return argparse.Namespace(precision=manifest["precision"], quantized=object(), options=target.Options())


def _copy_built(built: dict[tuple[str, str], ArtifactResult], name: str) -> Callable[..., dict[str, Any]]:
    """An export that writes the already built and verified fp32 artifact (a file or a folder)."""
    source = built[(name, "fp32")]

    def export(self: Any, request: Any, path: Path) -> dict[str, Any]:
        if source.path.is_dir():
            shutil.copytree(source.path, path)
        else:
            shutil.copyfile(source.path, path)
        return dict(source.manifest["export"])

    return export


class _NanRunner(Runner):
    """Wraps a runner: the artifact 'computes' NaN, as a broken export would."""

    def __init__(self, runner: Runner) -> None:
        self.runner, self.threads = runner, runner.threads

    @property
    def max_batch(self) -> Any:
        return self.runner.max_batch

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return np.full_like(self.runner(x), np.nan)


@pytest.mark.parametrize("name", TARGETS)
def test_gate_refuses_a_broken_artifact(built, base_settings, name: str, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    target = _installed(name)
    _result(built, name, "fp32")
    load = type(target).load
    monkeypatch.setattr(type(target), "export", _copy_built(built, name))
    monkeypatch.setattr(type(target), "load", lambda self, path, request: _NanRunner(load(self, path, request)))
    with pytest.raises(VerificationError, match=rf"\[{name}\] fp32: finite outputs 0.00% < 100.00%"):
        convert(dataclasses.replace(base_settings, out=tmp_path, targets=name, latency_runs=1))
    folder = tmp_path / name
    assert not (folder / target.artifact_name).exists() and not (folder / "manifest.json").exists()
    failed = json.loads((folder / FAILED_MANIFEST).read_text())
    assert not failed["verification"]["gate"]["passed"] and failed["verification"]["gate"]["enforced"]
    assert [p.name for p in folder.iterdir()] == [FAILED_MANIFEST]  # no temporary files left behind


@pytest.mark.parametrize("name", TARGETS)
def test_export_failing_half_way_leaves_nothing(built, base_settings, name: str, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    target = _installed(name)
    _result(built, name, "fp32")
    export = _copy_built(built, name)

    def half_way(self: Any, request: Any, path: Path) -> dict[str, Any]:
        export(self, request, path)  # the artifact is on disk (at the temporary path) ...
        raise RuntimeError("disk full")  # ... and then the export fails

    monkeypatch.setattr(type(target), "export", half_way)
    with pytest.raises(RuntimeError, match="disk full"):
        convert(dataclasses.replace(base_settings, out=tmp_path, targets=name, latency_runs=1))
    folder = tmp_path / name
    assert not folder.exists() or not any(folder.iterdir()), list(folder.iterdir())


def _flag_value(f: dataclasses.Field, typ: type) -> tuple[list[str], Any]:
    flag = "--" + f.name.replace("_", "-")
    if typ is bool:
        return [flag], True
    choices = [c for c in f.metadata.get("choices", ()) if c != f.default]
    value = choices[0] if choices else ("macOS14" if typ is str else typ(3))
    return [flag, str(value)], value


@pytest.mark.parametrize("name", TARGETS)
def test_cli_flags_map_to_options(name: str) -> None:
    """Every field an Options class declares with `flag=` is a CLI flag that sets exactly that field."""
    import typing

    options_cls = get_target(name).Options
    hints = typing.get_type_hints(options_cls)
    fields = list(flag_fields(options_cls))
    if name == PLUGIN[0]:
        assert [f.name for f in fields] == ["strict_export"]  # the plugin's own flag reached the CLI
    for f in fields:
        argv, value = _flag_value(f, hints[f.name])
        args = build_parser().parse_args(["convert", "--model", "m", *argv])
        options = apply_overrides(options_cls(), target_option_values(args))
        assert getattr(options, f.name) == value and getattr(options, f.name) != f.default
        others = {g.name for g in dataclasses.fields(options_cls) if g.name != f.name}
        assert all(getattr(options, g) == getattr(options_cls(), g) for g in others)


@pytest.mark.parametrize("name", TARGETS)
def test_recipe_section_and_defaults(name: str) -> None:
    """A recipe may name every target, and a target's defaults are valid options."""
    recipe = check_recipe_targets(parse_recipe(f"targets:\n  {name}:\n"))
    assert recipe.targets[name] == get_target(name).Options()
    target = get_target(name)
    assert target.name == name and target.precisions and target.artifact_name and target.extra


@pytest.mark.slow  # default-suite budget (12 min on 2 cores)
def test_a_target_can_bring_its_own_quantizer(tmp_path: Path, image_folder: Path, recipe_file: Path) -> None:
    """`Target.build_quantizer`: a target with its own quantizer gets its own calibrated model; the others share."""
    from tests.torchexport_target import OwnQuantizerTarget

    register_target("torchexport_own", "tests.torchexport_target:OwnQuantizerTarget")
    try:
        OwnQuantizerTarget.quantizers_built = 0
        results = convert(ConvertSettings(
            model="mobilenetv4_conv_small_035", weights="random", preprocessing={"input_size": [64], "crop_pct": 1.0},
            out=tmp_path, targets="onnx,torchexport,torchexport_own", precision="int8", calib=image_folder,
            recipe=str(recipe_file), latency_runs=1, progress=False, verify_gate=False))
    finally:
        unregister_target("torchexport_own")
    assert OwnQuantizerTarget.quantizers_built == 1
    assert get_target("onnx").quantizer_key() == get_target("torchexport").quantizer_key() == "shared"
    assert [r.target for r in results] == ["onnx", "torchexport", "torchexport_own"]


# ----------------------------------------------------------------------------- the checklist (targets/README.md)
REPO = Path(__file__).resolve().parent.parent
BUILTIN = [n for n in target_names() if n != PLUGIN[0]]


def _tox() -> configparser.ConfigParser:
    tox = configparser.ConfigParser()
    tox.read(REPO / "tox.ini")
    return tox


@pytest.mark.parametrize("name", BUILTIN)
def test_target_has_its_extra_and_tox_env(name: str) -> None:
    """Adding a target means a pyproject extra that installs its toolchain and a tox env that tests it alone."""
    tomllib = pytest.importorskip("tomllib", reason="Python 3.11+")
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    extra = get_target(name).extra
    assert extra in project["project"]["optional-dependencies"], f"pyproject has no [{extra}] extra for {name}"
    tox = _tox()
    assert name in [e.strip() for e in tox["tox"]["envlist"].split(",")], f"tox envlist lacks {name}"
    lines = [line.strip() for line in tox["testenv"]["extras"].splitlines()]
    assert f"{name}: {extra}" in lines, f"tox [testenv] extras lacks '{name}: {extra}'"
    assert any(line.strip().startswith(f"{name}:") for line in tox["testenv"]["commands"].splitlines())
    packages = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    assert f"mnv4_deploy.targets.{name}" in packages


# Runs in a fresh interpreter: every toolchain module of every registered target is hidden by a meta-path finder
# (as on a machine without the extras), then each target package and all its modules are imported, the targets
# are instantiated as the CLI does to build its flags, and check_installed must name the missing extra.
_WITHOUT_TOOLCHAINS = r"""
import importlib, importlib.abc, json, pkgutil, sys
hidden = set(sys.argv[1].split(","))

class Hidden(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in hidden:
            raise ModuleNotFoundError(f"No module named {name!r} (hidden by the test)", name=name)
        return None

sys.meta_path.insert(0, Hidden())
from mnv4_deploy.errors import MissingDependencyError
from mnv4_deploy.targets import get_target, target_names
out = {}
for name in sys.argv[2].split(","):
    try:
        package = importlib.import_module(f"mnv4_deploy.targets.{name}")
        modules = [m.name for m in pkgutil.walk_packages(package.__path__, package.__name__ + ".")]
        for module in modules:
            importlib.import_module(module)
        target = get_target(name)
        target.Options()
        try:
            target.check_installed()
            out[name] = "check_installed passed with the toolchain hidden"
        except MissingDependencyError as exc:
            out[name] = "ok" if f"mnv4-deploy[{target.extra}]" in str(exc) else f"check_installed said: {exc}"
    except Exception as exc:
        out[name] = f"{type(exc).__name__}: {exc}"
try:
    from mnv4_deploy.cli import build_parser

    build_parser()  # every registered target instantiated for its flags
    cli = "ok"
except Exception as exc:
    cli = f"{type(exc).__name__}: {exc}"
print(json.dumps({"targets": out, "cli": cli}))
"""


@pytest.fixture(scope="module")
def without_toolchains() -> dict[str, Any]:
    hidden = sorted({m.split(".")[0] for n in BUILTIN for m in get_target(n).requires} - {"torch", "numpy"})
    proc = subprocess.run([sys.executable, "-c", _WITHOUT_TOOLCHAINS, ",".join(hidden), ",".join(BUILTIN)],
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", BUILTIN)
def test_target_imports_without_its_toolchain(without_toolchains: dict[str, Any], name: str) -> None:
    """A target module imports, and its Target() and Options() build, with no toolchain installed: the CLI
    instantiates every registered target to build its flags (targets/README.md)."""
    assert without_toolchains["targets"][name] == "ok", without_toolchains["targets"][name]


def test_cli_builds_without_any_toolchain(without_toolchains: dict[str, Any]) -> None:
    assert without_toolchains["cli"] == "ok", without_toolchains["cli"]
