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


def test_pretrained_fetch_errors_are_one_line_others_propagate(monkeypatch):
    """A hub that answers the probe but fails the download (CI runs with HF_HUB_OFFLINE set: pin the probe)."""
    import timm

    from mnv4_deploy.load import hub

    monkeypatch.setattr(hub, "unreachable", lambda *args, **kwargs: None)
    def offline(*args, **kwargs):
        raise ConnectionError("Failed to connect to huggingface.co")

    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(UserError, match="could not fetch pretrained weights .*Failed to connect"):
        load_model("mobilenetv4_conv_small", weights="pretrained")

    def changed_api(*args, **kwargs):
        raise TypeError("create_model() got an unexpected keyword argument")

    monkeypatch.setattr(timm, "create_model", changed_api)
    with pytest.raises(TypeError):
        load_model("mobilenetv4_conv_small", weights="pretrained")


def test_no_pretrained_weights_or_unknown_tag_is_one_line():
    with pytest.raises(UserError, match="no pretrained weights for 'mobilenetv4_conv_small_035'") as err:
        load_model("mobilenetv4_conv_small_035", weights="pretrained")
    assert "--weights random" in str(err.value)
    with pytest.raises(UserError, match="unknown tag 'bogus'") as err:
        load_model("mobilenetv4_conv_small.bogus", weights="random")
    assert "mobilenetv4_conv_small.e1200_r224_in1k" in str(err.value) and "\n" not in str(err.value)


def test_mismatched_checkpoint_suggests_num_classes(tmp_path: Path):
    model = load_model("mobilenetv4_conv_small_035", weights="random", num_classes=10).model
    path = tmp_path / "ten.pth"
    torch.save(model.state_dict(), path)
    with pytest.raises(UserError) as err:
        load_model("mobilenetv4_conv_small_035", weights=str(path))
    assert "classifier.weight" in str(err.value) and "--num-classes 10" in str(err.value)
    assert "does not match mobilenetv4_conv_small_035:" in str(err.value) and "MobileNetV3" not in str(err.value)
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
    with pytest.raises(UserError, match="not a readable state_dict") as err:
        load_model("mobilenetv4_conv_small_035", weights=str(path))
    _assert_one_safe_line(str(err.value), path)


def _assert_one_safe_line(msg: str, path: Path) -> None:
    """One line naming the file, and never torch's advice to load an untrusted file with weights_only=False."""
    assert "\n" not in msg and str(path) in msg and "not a readable state_dict" in msg
    assert "weights_only=False" not in msg and "weights_only` set to `False" not in msg and "\x1b" not in msg


@pytest.fixture(scope="module")
def saved_state(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real (tiny) checkpoint written by torch.save, to corrupt."""
    model = load_model("mobilenetv4_conv_small_035", weights="random", num_classes=3).model
    path = tmp_path_factory.mktemp("ckpt") / "good.pth"
    torch.save(model.state_dict(), path)
    return path


def test_random_bytes_checkpoint_is_one_line(tmp_path: Path):
    path = tmp_path / "random.pth"
    path.write_bytes(bytes(__import__("random").Random(0).randrange(256) for _ in range(4096)))
    with pytest.raises(UserError) as err:
        load_model("mobilenetv4_conv_small_035", weights=str(path), num_classes=3)
    _assert_one_safe_line(str(err.value), path)
    assert "corrupt, truncated or not a PyTorch/safetensors checkpoint" in str(err.value)


@pytest.mark.parametrize("keep", [0, 100, 0.5])
def test_truncated_checkpoint_is_one_line(saved_state: Path, tmp_path: Path, keep: float):
    data = saved_state.read_bytes()
    path = tmp_path / "truncated.pth"
    path.write_bytes(data[:int(len(data) * keep) if isinstance(keep, float) else keep])
    with pytest.raises(UserError) as err:
        load_model("mobilenetv4_conv_small_035", weights=str(path), num_classes=3)
    _assert_one_safe_line(str(err.value), path)


def test_truncated_safetensors_is_one_line(saved_state: Path, tmp_path: Path):
    from safetensors.torch import save_file

    path = tmp_path / "m.safetensors"
    save_file(torch.load(saved_state, weights_only=True), str(path))
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(UserError) as err:
        load_model("mobilenetv4_conv_small_035", weights=str(path), num_classes=3)
    _assert_one_safe_line(str(err.value), path)


class NotATensor:
    """A custom class: loading a pickle of it would need to import (run) this module's code."""

    def __init__(self) -> None:
        self.value = 3


def test_pickle_of_custom_class_says_resave_as_state_dict(tmp_path: Path):
    import pickle

    saved, dumped, listed = tmp_path / "obj.pth", tmp_path / "dumped.pt", tmp_path / "list.pt"
    torch.save({"w": NotATensor()}, saved)
    with open(dumped, "wb") as fh:
        pickle.dump({"w": NotATensor()}, fh)
    torch.save([torch.zeros(2)], listed)
    for path in (saved, dumped, listed):
        with pytest.raises(UserError) as err:
            load_model("mobilenetv4_conv_small_035", weights=str(path))
        _assert_one_safe_line(str(err.value), path)
    with pytest.raises(UserError) as err:
        load_model("mobilenetv4_conv_small_035", weights=str(saved))
    assert "NotATensor" in str(err.value) and "re-save it as a plain state_dict" in str(err.value)
    assert "only weights_only/safetensors files" in str(err.value)


def test_unexpected_load_error_is_not_relabelled(saved_state: Path, monkeypatch):
    """An API change (a TypeError) must surface as a bug, not as 'corrupt checkpoint'."""
    def changed_api(*args, **kwargs):
        raise TypeError("load() got an unexpected keyword argument 'weights_only'")

    monkeypatch.setattr(torch, "load", changed_api)
    with pytest.raises(TypeError):
        load_model("mobilenetv4_conv_small_035", weights=str(saved_state), num_classes=3)


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


def test_random_weights_are_repeatable_and_leave_the_callers_rng_alone():
    """A random-weights convert or zoo shard builds the same model every time, without reseeding the caller."""
    torch.manual_seed(123)
    expected_next = torch.rand(4)
    torch.manual_seed(123)
    a = load_model("mobilenetv4_conv_small_035", "random", 10).model.state_dict()
    assert torch.equal(torch.rand(4), expected_next)  # global RNG stream untouched
    b = load_model("mobilenetv4_conv_small_035", "random", 10).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
