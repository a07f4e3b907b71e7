"""Property-based tests of the bad-input contract, on documents a machine mutates (tests/fuzzing.py):

    exit 2 with exactly one `mnv4-deploy: error:` line (or the gate's 1, or 0 for a document that is still
    valid), never a traceback, and nothing written when it is refused.

Recipes, calibration set files, manifests and report.json documents (for --compare and --merge) start valid and
are mutated: types, ranges, missing and extra keys, NaN/inf, huge numbers, unicode, deep nesting. The default
suite runs a bounded profile; `-m slow` runs a longer one. One subprocess test per contract checks the same
through a real process (exit code, exactly one stderr line, no 'Traceback').
"""
from __future__ import annotations

import collections
import contextlib
import copy
import dataclasses
import hashlib
import io
import json
import math
import os
import subprocess
import sys
import tempfile
import typing
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mnv4_deploy.cli import main
from tests.fuzzing import damaged_text, mutated

REPO = Path(__file__).resolve().parent.parent
# Examples per fuzzer: the default suite's bounded profile, and the longer one under `-m slow`.
DEFAULT, LONG = 40, 1000
OUTCOMES: collections.Counter = collections.Counter()  # (fuzzer, exit code): cases run, printed at the end


def profile(examples: int) -> Any:
    return settings(max_examples=examples, deadline=None, derandomize=examples == DEFAULT,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.large_base_example])


@pytest.fixture(scope="module", autouse=True)
def print_outcomes() -> Iterator[None]:
    yield
    print("\nfuzz cases (fuzzer, exit code): " + ", ".join(f"{k[0]}/{k[1]}: {v}" for k, v in sorted(OUTCOMES.items())))


def run_cli(fuzzer: str, argv: list[str]) -> tuple[int, str, str]:
    """main(argv) in this process: (exit code, stdout, stderr), held to the contract."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)  # an exception escaping here is a failure the fuzzer found
    stderr = err.getvalue()
    OUTCOMES[(fuzzer, rc)] += 1
    ours = [line for line in stderr.splitlines() if line.startswith("mnv4-deploy:")]
    assert "Traceback" not in stderr, stderr
    if rc == 2:
        assert len(ours) == 1 and ours[0].startswith("mnv4-deploy: error: "), stderr
        assert len(stderr.splitlines()) == 1, stderr
    return rc, out.getvalue(), stderr


def dump_yaml(doc: Any) -> str:
    try:
        return yaml.safe_dump(doc, allow_unicode=True, sort_keys=False)
    except (yaml.YAMLError, RecursionError, UnicodeEncodeError):
        return json.dumps(doc)  # JSON is YAML too (for values the YAML emitter refuses)


# ---------------------------------------------------------------- recipes
def _valid_recipe() -> dict[str, Any]:
    from mnv4_deploy.recipes import Recipe

    d = Recipe().to_dict()
    d["targets"] = {"onnx": {"opset": 18, "threads": 2}, "openvino": {"method": "nncf", "smooth_quant_alpha": 0.5},
                    "tflite": {"threads": 2}}
    d["quantization"]["calibration"]["set"] = ""
    return d


VALID_RECIPE = _valid_recipe()


def _in_range(recipe: Any) -> None:
    """Everything a recipe accepted is finite and inside its field's declared range."""
    from mnv4_deploy.options import numeric_range

    for f in dataclasses.fields(recipe):
        value = getattr(recipe, f.name)
        if dataclasses.is_dataclass(value):
            _in_range(value)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            assert math.isfinite(value), (f.name, value)
            bounds = numeric_range(f)
            if bounds is not None:
                low, above, high = bounds
                assert (low is None or value >= low) and (above is None or value > above) and (
                    high is None or value <= high), (f.name, value)


def check_recipe(text: str) -> None:
    from mnv4_deploy.recipes import parse_recipe

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "fuzz.yaml"
        path.write_text(text, errors="surrogateescape")
        out = Path(d) / "out"
        # --to names no target: a recipe that loads ends in that one line, before anything is written
        rc, _, err = run_cli("recipe", ["convert", "--model", "mobilenetv4_conv_small_035", "--recipe", str(path),
                                        "--to", "no-such-target", "--out", str(out)])
        assert rc == 2 and not out.exists()
        if "unknown target 'no-such-target'" in err:
            recipe = parse_recipe(path.read_text(errors="surrogateescape"), str(path))
            _in_range(recipe.quantization)
            _in_range(recipe.verification)
            _in_range(recipe.qat)
            for options in recipe.targets.values():
                _in_range(options)
        else:
            assert str(path) in err, err  # a recipe mistake names the file (and its line)


@st.composite
def recipes(draw: st.DrawFn) -> str:
    return draw(damaged_text(dump_yaml(draw(mutated(VALID_RECIPE)))))


@profile(DEFAULT)
@given(recipes())
def test_fuzz_recipes(text: str) -> None:
    check_recipe(text)


@pytest.mark.slow
@profile(LONG)
@given(recipes())
def test_fuzz_recipes_long(text: str) -> None:
    check_recipe(text)


# ---------------------------------------------------------------- calibration set files
@pytest.fixture(scope="module")
def set_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A root with three images in two classes, and a link `sys -> /` that no set may reach through."""
    from PIL import Image

    root = tmp_path_factory.mktemp("calib-root")
    for i, name in enumerate(["a/1.png", "a/2.png", "b/3.png"]):
        (root / name).parent.mkdir(exist_ok=True)
        Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(root / name)
    os.symlink("/", root / "sys")
    return root


def _valid_set(root: Path) -> dict[str, Any]:
    from mnv4_deploy.fileio import sha256_of

    images = [{"path": p, "sha256": sha256_of(root / p), "label": p.split("/")[0]} for p in ("a/1.png", "a/2.png",
                                                                                               "b/3.png")]
    return {"name": "fuzz-set", "description": "three images", "selection": {"method": "per-class balanced",
                                                                            "seed": 0}, "images": images}


def _outside_hashes() -> list[str]:
    """sha256 prefixes of files outside the root that a set could name through `sys`."""
    found = []
    for p in ("/etc/hostname", "/etc/passwd", "/etc/hosts"):
        with contextlib.suppress(OSError):
            found.append(hashlib.sha256(Path(p).read_bytes()).hexdigest()[:12])
    return found


OUTSIDE = _outside_hashes()


def check_set(root: Path, text: str) -> None:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "fuzz-set.yaml"
        path.write_text(text, errors="surrogateescape")
        before = sorted(p.name for p in Path(d).iterdir())
        rc, out, err = run_cli("calib-set", ["calib", "check", str(path), "--root", str(root)])
        assert rc in (0, 1, 2)
        assert not any(h in out + err for h in OUTSIDE), "a set read a file outside its root"
        assert sorted(p.name for p in Path(d).iterdir()) == before  # check writes nothing


@st.composite
def set_files(draw: st.DrawFn, root: Path) -> str:
    doc = _valid_set(root)
    for im in doc["images"]:  # paths that try to leave the root
        if draw(st.integers(0, 6)) == 0:
            im["path"] = draw(st.sampled_from(["sys/etc/hostname", "sys/etc/passwd", "../a/1.png", "/etc/hostname",
                                               "a/../../x", "sys/proc/self/environ", "a/1.png\x00.png", "sys"]))
    doc = draw(mutated(doc))
    if isinstance(doc, dict) and draw(st.booleans()):
        from mnv4_deploy.calibration import parse_set

        with contextlib.suppress(Exception):  # a digest that matches the mutated list reaches deeper checks
            doc["digest"] = parse_set(yaml.safe_dump({k: v for k, v in doc.items() if k != "digest"})).digest
    return draw(damaged_text(dump_yaml(doc)))


@profile(DEFAULT)
@given(data=st.data())
def test_fuzz_calibration_sets(set_root: Path, data: st.DataObject) -> None:
    check_set(set_root, data.draw(set_files(set_root)))


@pytest.mark.slow
@profile(LONG)
@given(data=st.data())
def test_fuzz_calibration_sets_long(set_root: Path, data: st.DataObject) -> None:
    check_set(set_root, data.draw(set_files(set_root)))


# ---------------------------------------------------------------- manifests (inspect)
ARTIFACT = b"an artifact"


def _valid_manifest() -> dict[str, Any]:
    from tests.test_report import fake_manifest

    m = fake_manifest()
    m["artifact"] |= {"file": "model.onnx", "size_bytes": len(ARTIFACT), "sha256": hashlib.sha256(ARTIFACT).hexdigest()}
    return m


VALID_MANIFEST = _valid_manifest()


def check_manifest(doc: Any) -> None:
    with tempfile.TemporaryDirectory() as d:
        folder = Path(d) / "onnx"
        folder.mkdir()
        (folder / "model.onnx").write_bytes(ARTIFACT)
        (folder / "manifest.json").write_text(json.dumps(doc))
        rc, out, _ = run_cli("manifest", ["inspect", str(folder)])
        assert rc in (0, 2)
        if rc == 2:
            assert out == ""
        assert sorted(p.name for p in folder.iterdir()) == ["manifest.json", "model.onnx"]


@profile(DEFAULT)
@given(mutated(VALID_MANIFEST))
def test_fuzz_manifests(doc: Any) -> None:
    check_manifest(doc)


@pytest.mark.slow
@profile(LONG)
@given(mutated(VALID_MANIFEST))
def test_fuzz_manifests_long(doc: Any) -> None:
    check_manifest(doc)


# ---------------------------------------------------------------- report.json: --compare and --merge
def _valid_report() -> dict[str, Any]:
    from tests.test_report import fake_report

    return json.loads(json.dumps(fake_report()))


VALID_REPORT = _valid_report()
BASELINE = json.loads((REPO / "reports" / "baseline.json").read_text())


def check_compare(new: Any, baseline: Any) -> None:
    with tempfile.TemporaryDirectory() as d:
        paths = []
        for name, doc in (("new", new), ("baseline", baseline)):
            paths.append(Path(d) / f"{name}.json")
            paths[-1].write_text(json.dumps(doc))
        rc, _, _ = run_cli("compare", ["report", "--compare", str(paths[0]), "--baseline", str(paths[1])])
        assert rc in (0, 1, 2)


@st.composite
def report_pairs(draw: st.DrawFn) -> tuple[Any, Any]:
    base = draw(st.sampled_from([VALID_REPORT, BASELINE]))
    bad = draw(mutated(base))
    return (bad, base) if draw(st.booleans()) else (base, bad)


@profile(DEFAULT)
@given(report_pairs())
def test_fuzz_report_compare(pair: tuple[Any, Any]) -> None:
    check_compare(*pair)


@pytest.mark.slow
@profile(LONG)
@given(report_pairs())
def test_fuzz_report_compare_long(pair: tuple[Any, Any]) -> None:
    check_compare(*pair)


PLAN = ["mobilenetv4_conv_small/onnx/fp32", "mobilenetv4_conv_small/onnx/fp16", "mobilenetv4_conv_small/onnx/int8"]


def _shards() -> list[dict[str, Any]]:
    r = VALID_REPORT
    return [copy.deepcopy(r | {"cells": cells, "models": models, "shard": {"index": i, "count": 2, "plan": PLAN}})
            for i, (cells, models) in enumerate([(r["cells"][:2], r["models"]), (r["cells"][2:], [])], 1)]


SHARDS = _shards()


def check_merge(shards: list[Any]) -> None:
    from mnv4_deploy.report.schema import load_report

    with tempfile.TemporaryDirectory() as d:
        paths = []
        for i, doc in enumerate(shards):
            paths.append(Path(d) / f"shard{i}.json")
            paths[-1].write_text(json.dumps(doc))
        out = Path(d) / "merged"
        rc, _, _ = run_cli("merge", ["report", "--merge", *map(str, paths), "--out", str(out)])
        assert rc in (0, 1, 2)
        if rc == 2:
            assert not out.exists()
        else:
            load_report(out / "report.json")  # what merge writes, compare reads


@st.composite
def shard_pairs(draw: st.DrawFn) -> list[Any]:
    i = draw(st.integers(0, 1))
    shards = list(SHARDS)
    shards[i] = draw(mutated(shards[i]))
    return shards


@profile(DEFAULT // 2)
@given(shard_pairs())
def test_fuzz_report_merge(shards: list[Any]) -> None:
    check_merge(shards)


@pytest.mark.slow
@profile(LONG)
@given(shard_pairs())
def test_fuzz_report_merge_long(shards: list[Any]) -> None:
    check_merge(shards)


# ---------------------------------------------------------------- the contract through a real process
def _process(argv: list[str]) -> tuple[int, str]:
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", TF_CPP_MIN_LOG_LEVEL="3")
    p = subprocess.run([sys.executable, "-m", "mnv4_deploy", *argv], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=300)
    return p.returncode, p.stderr


def _contract_cases(tmp: Path) -> dict[str, list[str]]:
    recipe = tmp / "recipe.yaml"
    recipe.write_text("quantization:\n  activations:\n    percentile: .nan\n")
    cset = tmp / "set.yaml"
    cset.write_text("name: s\nselection: random\nimages: [a.png]\n")
    manifest_dir = tmp / "onnx"
    manifest_dir.mkdir()
    (manifest_dir / "manifest.json").write_text(json.dumps(VALID_MANIFEST | {"verification": [1, 2]}))
    report = tmp / "report.json"
    report.write_text(json.dumps(VALID_REPORT | {"cells": [dict(VALID_REPORT["cells"][0], metrics=[])]}))
    good = tmp / "good.json"
    good.write_text(json.dumps(VALID_REPORT))
    return {
        "recipe": ["convert", "--model", "mobilenetv4_conv_small_035", "--recipe", str(recipe), "--out", str(tmp / "o")],
        "calibration set": ["calib", "check", str(cset), "--root", str(tmp)],
        "manifest": ["inspect", str(manifest_dir)],
        "report": ["report", "--compare", str(report), "--baseline", str(good)],
    }


@pytest.mark.parametrize("contract", ["recipe", "calibration set", "manifest", "report"])
def test_the_contract_holds_in_a_real_process(tmp_path: Path, contract: str) -> None:
    rc, err = _process(_contract_cases(tmp_path)[contract])
    assert rc == 2 and "Traceback" not in err, err
    assert len(err.splitlines()) == 1 and err.startswith("mnv4-deploy: error: "), err
    assert not (tmp_path / "o").exists()
