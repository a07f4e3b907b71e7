from pathlib import Path

import pytest

from mnv4_deploy import UserError
from mnv4_deploy.config.recipes import TargetSection, load_recipe, parse_recipe, shipped_recipes
from mnv4_deploy.targets import check_recipe_targets


def test_shipped_recipes_parse():
    assert "ptq-int8" in shipped_recipes()
    for name in shipped_recipes():
        assert load_recipe(name).name == name


def test_default_recipe_is_per_channel_int8():
    r = load_recipe(None)
    assert r.quantization.weights.granularity == "per_channel" and r.quantization.activations.bits == 8


def test_unknown_key_names_file_line_and_nearest_key():
    text = "name: x\nquantization:\n  activations:\n    obsrver: minmax\n"
    with pytest.raises(UserError) as err:
        parse_recipe(text, "my.yaml")
    msg = str(err.value)
    assert msg.startswith("my.yaml:4:") and "quantization.activations.obsrver" in msg and "did you mean: observer" in msg


def test_bad_value_lists_choices():
    with pytest.raises(UserError, match=r"must be one of .*percentile.*got 'hist'"):
        parse_recipe("quantization:\n  activations:\n    observer: hist\n", "r.yaml")


def test_wrong_type_is_reported():
    with pytest.raises(UserError, match="r.yaml:3: 'quantization.calibration.images' must be int"):
        parse_recipe("quantization:\n  calibration:\n    images: many\n", "r.yaml")


def test_target_section_is_validated_by_the_target():
    """config reads a `targets:` section as written; the registry checks it against the target's Options."""
    read = parse_recipe("targets:\n  onnx:\n    opset: 17\n", "r.yaml")
    assert isinstance(read.targets["onnx"], TargetSection) and read.to_dict()["targets"] == {"onnx": {"opset": 17}}
    r = check_recipe_targets(read)
    assert r.targets["onnx"].opset == 17 and r.to_dict()["targets"]["onnx"]["method"] == "pt2e"
    with pytest.raises(UserError, match=r"r.yaml:3: unknown key 'targets.onnx.opst'.*did you mean: opset"):
        check_recipe_targets(parse_recipe("targets:\n  onnx:\n    opst: 17\n", "r.yaml"))
    with pytest.raises(UserError, match="r.yaml:2: unknown target 'targets.onxx'.*did you mean: onnx"):
        check_recipe_targets(parse_recipe("targets:\n  onxx: {}\n", "r.yaml"))
    with pytest.raises(UserError, match="r.yaml:1: 'targets' must map target names to options"):
        parse_recipe("targets: [onnx]\n", "r.yaml")


def test_unknown_recipe_name_and_bad_yaml(tmp_path: Path):
    with pytest.raises(UserError, match="did you mean: ptq-int8"):
        load_recipe("ptq-int9")
    bad = tmp_path / "bad.yaml"
    bad.write_text("quantization: [unclosed\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_recipe(str(bad))


def test_yaml_tags_are_not_executed():
    with pytest.raises(UserError):
        parse_recipe("name: !!python/object/apply:os.system ['echo pwned']\n", "evil.yaml")


def test_recipe_may_name_its_calibration_set():
    r = parse_recipe("quantization:\n  calibration:\n    set: reference-tin202\n", "r.yaml")
    assert r.quantization.calibration.set == "reference-tin202"
    assert load_recipe(None).quantization.calibration.set == ""


def test_user_folder_recipe_overrides_and_adds(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("MNV4_DEPLOY_HOME", str(tmp_path))
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "ptq-int8.yaml").write_text("name: ptq-int8\ndescription: my own\n")
    (tmp_path / "recipes" / "team-int8.yaml").write_text("name: team-int8\n")
    assert load_recipe("ptq-int8").description == "my own"
    assert {"team-int8", "ort-baseline"} <= set(shipped_recipes())
    assert load_recipe("team-int8").source == str(tmp_path / "recipes" / "team-int8.yaml")


def test_wheel_ships_every_package_and_the_data_folders():
    """pyproject lists packages explicitly (the data packages are mapped from top-level folders): a new
    sub-package missing there would be absent from the wheel. The wheel itself is built and installed into a
    fresh venv by .ci/run (too slow for pytest)."""
    tomllib = pytest.importorskip("tomllib", reason="Python 3.11+")
    repo = Path(__file__).resolve().parent.parent
    setup = tomllib.loads((repo / "pyproject.toml").read_text())["tool"]["setuptools"]
    on_disk = {".".join(p.parent.relative_to(repo).parts) for p in (repo / "mnv4_deploy").rglob("__init__.py")}
    assert on_disk <= set(setup["packages"])
    for kind in ("recipes", "calibration"):
        package = f"mnv4_deploy.shipped_{kind}"
        assert package in setup["packages"] and setup["package-dir"][package] == kind
        assert setup["package-data"][package] == ["*.yaml"] and list((repo / kind).glob("*.yaml"))
