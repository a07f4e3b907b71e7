from pathlib import Path

import pytest

from mnv4_deploy import UserError
from mnv4_deploy.recipes import load_recipe, parse_recipe, shipped_recipes


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
    r = parse_recipe("targets:\n  onnx:\n    opset: 17\n", "r.yaml")
    assert r.targets["onnx"].opset == 17
    with pytest.raises(UserError, match=r"r.yaml:3: unknown key 'targets.onnx.opst'.*did you mean: opset"):
        parse_recipe("targets:\n  onnx:\n    opst: 17\n", "r.yaml")
    with pytest.raises(UserError, match="unknown target 'targets.onxx'"):
        parse_recipe("targets:\n  onxx: {}\n", "r.yaml")


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
