"""preparation/layer_scale.py: every LayerScale2d of an MNv4 hybrid folds into the layer before it (same function,
no per-channel multiply left), only in a copy; and the int8 graph then has no float multiply for it."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from mnv4_deploy.preparation.layer_scale import fold_layer_scales
from mnv4_deploy.preparation.prepare import prepare

SIZE = 64


def _hybrid() -> nn.Module:
    """hybrid_medium with random, non-trivial layer scales and BatchNorm statistics (a few train-mode batches)."""
    import timm

    torch.manual_seed(0)
    model = prepare(timm.create_model("mobilenetv4_hybrid_medium", num_classes=10))
    for m in model.modules():
        if type(m).__name__ == "LayerScale2d":
            m.gamma.data.uniform_(-2.0, 2.0)
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.weight.data.uniform_(0.5, 1.5)
            m.reset_running_stats()
            m.momentum = None
    model.train()
    with torch.no_grad():
        model(torch.randn(8, 3, SIZE, SIZE))
    return model.eval()


def _layer_scales(model: nn.Module) -> int:
    return sum(type(m).__name__ == "LayerScale2d" for m in model.modules())


@pytest.fixture(scope="module")
def hybrid() -> nn.Module:
    return _hybrid()


def test_every_layer_scale_folds_and_the_function_is_unchanged(hybrid: nn.Module) -> None:
    before = _layer_scales(hybrid)
    original = {k: v.clone() for k, v in hybrid.state_dict().items()}
    folded, count = fold_layer_scales(hybrid)
    assert before > 0 and count == before and _layer_scales(folded) == 0
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        ref, out = hybrid(x), folded(x)
    assert torch.allclose(out, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
    # the model itself is untouched: its exports and state_dict keep timm's parameters
    assert _layer_scales(hybrid) == before
    assert all(torch.equal(v, original[k]) for k, v in hybrid.state_dict().items())


def test_a_model_without_layer_scales_is_returned_as_is() -> None:
    import timm

    model = timm.create_model("mobilenetv4_conv_small", num_classes=10).eval()
    folded, count = fold_layer_scales(model)
    assert folded is model and count == 0


def test_an_unknown_block_keeps_its_layer_scale() -> None:
    from timm.layers import LayerScale2d

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 3, padding=1)
            self.act = nn.ReLU()
            self.layer_scale = LayerScale2d(3, 0.5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.layer_scale(self.act(self.conv(x)))

    folded, count = fold_layer_scales(nn.Sequential(Block()))
    assert count == 0 and _layer_scales(folded) == 1
