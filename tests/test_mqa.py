"""MobileMQA is timm's MultiQueryAttention2d, same function and same weights, in an export-friendly form."""
from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from mnv4_deploy.preparation.mqa import MobileMQA, swap_attention
from mnv4_deploy.preparation.prepare import prepare

from .conftest import HYBRID_REFERENCE, TIN

HYBRIDS = ["mobilenetv4_hybrid_medium", "mobilenetv4_hybrid_medium_075",
           "mobilenetv4_hybrid_large", "mobilenetv4_hybrid_large_075"]
SIZE = 64
ATOL = 1e-5


def _timm_mqa() -> type:
    from timm.layers.attention2d import MultiQueryAttention2d

    return MultiQueryAttention2d


def _reasonable(model: nn.Module) -> nn.Module:
    """Random init with meaningful activations: layer scales at 1 (timm's 1e-5 hides the attention) and
    BatchNorm statistics estimated on data (random init gives ~1e-22 hybrid logits otherwise)."""
    torch.manual_seed(0)
    for m in model.modules():
        if type(m).__name__ == "LayerScale2d":
            nn.init.ones_(m.gamma)
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the estimation batches
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(8, 3, SIZE, SIZE))
    return model.eval()


@pytest.fixture(scope="module", params=HYBRIDS)
def hybrid(request: pytest.FixtureRequest) -> tuple[str, nn.Module]:
    import timm

    timm.layers.set_fused_attn(False)
    torch.manual_seed(0)
    return request.param, _reasonable(timm.create_model(request.param, num_classes=10))


def _attention_inputs(model: nn.Module, x: torch.Tensor) -> list[tuple[nn.Module, torch.Tensor]]:
    """(timm attention module, the input it sees) for every MQA in the model."""
    seen: list[tuple[nn.Module, torch.Tensor]] = []
    hooks = [m.register_forward_pre_hook(lambda mod, args: seen.append((mod, args[0].detach().clone())))
             for m in model.modules() if type(m) is _timm_mqa()]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return seen


def test_swap_keeps_state_dict_and_replaces_every_mqa(hybrid: tuple[str, nn.Module]) -> None:
    name, model = hybrid
    ours = copy.deepcopy(model)
    expected = sum(type(m) is _timm_mqa() for m in model.modules())
    assert expected == 8, f"{name}: timm config changed, {expected} MQA blocks"
    assert swap_attention(ours) == expected
    assert not any(type(m) is _timm_mqa() for m in ours.modules())
    assert sum(isinstance(m, MobileMQA) for m in ours.modules()) == expected
    ref_sd, sd = model.state_dict(), ours.state_dict()
    assert list(sd) == list(ref_sd)
    for key, value in ref_sd.items():
        assert sd[key].shape == value.shape and torch.equal(sd[key], value), key
    # And timm's state_dict loads into the swapped model unchanged (strict).
    ours.load_state_dict(ref_sd, strict=True)


def test_attention_blocks_match_timm(hybrid: tuple[str, nn.Module]) -> None:
    """Every block, on the activations it really sees in the model and on random inputs; exact in float64."""
    name, model = hybrid
    torch.manual_seed(1)
    worst = worst64 = 0.0
    for mod, inp in _attention_inputs(model, torch.randn(2, 3, SIZE, SIZE)):
        ours = MobileMQA.from_timm(mod).eval()
        for x in (inp, torch.randn_like(inp)):
            with torch.no_grad():
                ref, got = mod(x), ours(x)
                assert got.shape == ref.shape
                worst = max(worst, (got - ref).abs().max().item())
                ref64, got64 = copy.deepcopy(mod).double()(x.double()), copy.deepcopy(ours).double()(x.double())
                worst64 = max(worst64, (got64 - ref64).abs().max().item())
    assert worst <= ATOL, f"{name}: attention block max abs diff {worst:.2e}"
    assert worst64 <= 1e-12, f"{name}: not the same function, float64 diff {worst64:.2e}"


def test_whole_model_matches_timm(hybrid: tuple[str, nn.Module]) -> None:
    """Float32 logits within 1e-5 relative to the logit scale.

    Absolute 1e-5 on logits of size ~20 is below float32's own noise for these networks (timm's model
    differs from itself by ~1e-4 when the batch size changes); the trained-checkpoint test below checks the
    absolute 1e-5 on real logits, and the block test checks exact equality in float64.
    """
    name, model = hybrid
    ours = copy.deepcopy(model)
    swap_attention(ours)
    torch.manual_seed(2)
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        ref, got = model(x), ours(x)
    scale = max(1.0, ref.abs().max().item())
    assert (got - ref).abs().max().item() <= ATOL * scale, name


def test_trained_hybrid_matches_timm_on_real_images() -> None:
    """The lightly trained hybrid reference on Tiny ImageNet images: absolute 1e-5 on the logits."""
    import timm
    from PIL import Image

    if not HYBRID_REFERENCE.is_file() or not (TIN / "val").is_dir():
        pytest.skip("hybrid reference checkpoint or Tiny ImageNet not found (../shared is absent outside CI)")
    timm.layers.set_fused_attn(False)
    model = timm.create_model("mobilenetv4_hybrid_medium", num_classes=202)
    model.load_state_dict(torch.load(HYBRID_REFERENCE, map_location="cpu", weights_only=True))
    model.eval()
    files = sorted(Path(TIN / "val").rglob("*.JPEG"))[:8]
    x = torch.stack([torch.from_numpy(np.asarray(Image.open(f).convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1)
                     for f in files])
    x = (x - torch.tensor([0.485, 0.456, 0.406])[:, None, None]) / torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    ours = prepare(copy.deepcopy(model))
    with torch.no_grad():
        ref, got = model(x), ours(x)
    assert (got - ref).abs().max().item() <= ATOL


@pytest.mark.parametrize("query_strides,kv_stride,padding", [
    (1, 1, ""), (1, 2, ""), (2, 2, ""), ((2, 1), 2, ""), (2, 2, "same"),
])
def test_strides_heads_and_mask(query_strides: object, kv_stride: int, padding: str) -> None:
    """Query strides (avg-pool + norm + upsample), K/V downsampling and masks, beyond MNv4's configs."""
    torch.manual_seed(0)
    ref = _timm_mqa()(64, 96, num_heads=4, key_dim=48, value_dim=32, query_strides=query_strides,
                      kv_stride=kv_stride, padding=padding).eval()
    ref.fused_attn = False
    for m in ref.modules():
        if isinstance(m, nn.BatchNorm2d):  # non-trivial norms so the strided paths are really checked
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.normal_()
            m.bias.data.normal_()
    ours = MobileMQA.from_timm(ref).eval()
    x = torch.randn(2, 64, 8, 8)
    qs = (query_strides, query_strides) if isinstance(query_strides, int) else query_strides
    mask = torch.randn(1, 4, (8 // qs[0]) * (8 // qs[1]), (8 // kv_stride) ** 2)
    with torch.no_grad():
        assert (ours(x) - ref(x)).abs().max().item() <= ATOL
        assert (ours(x, mask) - ref(x, mask)).abs().max().item() <= ATOL


def test_rejects_non_1x1_projection() -> None:
    ref = _timm_mqa()(32, num_heads=2, key_dim=16, value_dim=16)
    ref.query.proj = nn.Conv2d(32, 32, 3, padding=1, bias=False)
    with pytest.raises(ValueError, match="1x1"):
        MobileMQA.from_timm(ref)


def test_export_has_only_4d_matmuls_no_sdpa_no_einsum() -> None:
    import timm

    model = prepare(timm.create_model("mobilenetv4_hybrid_medium", num_classes=10))
    assert prepare(model) is model  # idempotent: nothing left to swap
    assert not any(type(m) is _timm_mqa() for m in model.modules())
    program = torch.export.export(model, (torch.zeros(1, 3, SIZE, SIZE),))
    for graph in (program.graph, program.run_decompositions().graph):
        targets = {str(n.target) for n in graph.nodes if n.op == "call_function"}
        banned = [t for t in targets if "scaled_dot_product" in t or "einsum" in t or "_flash" in t or "_efficient" in t]
        assert not banned, banned
    # Every activation inside MobileMQA is 4-D (only the constant weight permutation uses other ranks).
    user_inputs = set(program.graph_signature.user_inputs)
    dynamic: set[str] = set()
    checked = 0
    for n in program.graph.nodes:
        if n.op == "placeholder":
            if n.name in user_inputs:
                dynamic.add(n.name)
            continue
        if not any(a.name in dynamic for a in n.all_input_nodes):
            continue
        dynamic.add(n.name)
        stack = (n.meta.get("nn_module_stack") or {}).values()
        val = n.meta.get("val")
        if n.op == "call_function" and any("MobileMQA" in str(v) for v in stack) and isinstance(val, torch.Tensor):
            assert val.dim() == 4, (n.name, n.target, tuple(val.shape))
            checked += 1
    assert checked > 8 * 10
