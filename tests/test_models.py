from pathlib import Path

import pytest
import torch

from mnv4_deploy import UserError, list_variants, load_model


def test_every_mnv4_variant_is_listed():
    names = list_variants()
    for expected in ("mobilenetv4_conv_small", "mobilenetv4_conv_medium", "mobilenetv4_hybrid_medium",
                     "mobilenetv4_hybrid_large", "mobilenetv4_conv_aa_large"):
        assert expected in names


def test_unknown_model_lists_valid_names():
    with pytest.raises(UserError) as err:
        load_model("mobilenetv4_conv_smal", weights="random")
    msg = str(err.value)
    assert "did you mean: mobilenetv4_conv_small" in msg and "mobilenetv4_hybrid_large" in msg


def test_pretrained_offline_names_the_alternatives(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError) as err:
        load_model("mobilenetv4_conv_small", weights="pretrained")
    assert "--weights PATH" in str(err.value) and "--weights random" in str(err.value)
    assert "\n" not in str(err.value)


def test_mismatched_checkpoint_suggests_num_classes(tmp_path: Path):
    model = load_model("mobilenetv4_conv_small_035", weights="random", num_classes=10).model
    path = tmp_path / "ten.pth"
    torch.save(model.state_dict(), path)
    with pytest.raises(UserError) as err:
        load_model("mobilenetv4_conv_small_035", weights=str(path))
    assert "classifier.weight" in str(err.value) and "--num-classes 10" in str(err.value)
    assert load_model("mobilenetv4_conv_small_035", weights=str(path), num_classes=10).num_classes == 10


def test_wrong_architecture_names_keys(tmp_path: Path):
    torch.save({"foo.weight": torch.zeros(2)}, tmp_path / "x.pt")
    with pytest.raises(UserError, match="unexpected keys"):
        load_model("mobilenetv4_conv_small_035", weights=str(tmp_path / "x.pt"))


def test_safetensors_and_wrapped_checkpoints_load(tmp_path: Path):
    from safetensors.torch import save_file

    model = load_model("mobilenetv4_conv_small_035", weights="random", num_classes=5).model
    state = model.state_dict()
    save_file(state, str(tmp_path / "m.safetensors"))
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 3}, tmp_path / "wrapped.pth")
    for name in ("m.safetensors", "wrapped.pth"):
        loaded = load_model("mobilenetv4_conv_small_035", weights=str(tmp_path / name), num_classes=5)
        assert loaded.weights_sha256 and len(loaded.weights_sha256) == 64
        assert torch.equal(loaded.model.state_dict()["conv_stem.weight"], state["conv_stem.weight"])


def test_pickled_code_is_refused(tmp_path: Path):
    import pickle

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.pth"
    with open(path, "wb") as fh:
        pickle.dump({"w": Evil()}, fh)
    with pytest.raises(UserError, match="cannot read checkpoint"):
        load_model("mobilenetv4_conv_small_035", weights=str(path))


def test_missing_checkpoint_file():
    with pytest.raises(UserError, match="not found"):
        load_model("mobilenetv4_conv_small", weights="/nonexistent/model.pth")


def test_preprocessing_comes_from_pretrained_cfg_and_overrides():
    loaded = load_model("mobilenetv4_conv_small", weights="random")
    pre = loaded.preprocessing
    assert pre.input_size == (224, 224) and pre.interpolation == "bicubic" and pre.crop_pct == 0.875
    inception = load_model("mobilenetv4_conv_small.e3600_r256_in1k", weights="random")  # a 0.5/0.5 tag
    assert inception.preprocessing.mean == (0.5, 0.5, 0.5) and inception.preprocessing.input_size == (256, 256)
    small = load_model("mobilenetv4_conv_small", weights="random",
                       preprocessing_overrides={"input_size": [64], "crop_pct": 1.0, "mean": [0.5] * 3})
    assert small.preprocessing.input_size == (64, 64) and small.preprocessing.mean == (0.5, 0.5, 0.5)
