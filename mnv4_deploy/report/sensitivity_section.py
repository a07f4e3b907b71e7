"""Which quantizers hurt most: the recipe's own int8 model, one quantizer at a time (`mnv4_deploy.quantization.sensitivity`).

`inspect --sensitivity` prints the whole table (and, with a budget, the fallback that reaches it); `report`
keeps a per-site section. Both calibrate exactly as `convert` would with the same recipe, so the numbers
describe the model that ships rather than a generic min-max quantization.
"""
from __future__ import annotations

from typing import Any, Optional

from ..config.recipes import load_recipe
from ..load.models import load_model
from ..pipeline import ConvertSettings, load_data
from ..preparation.prepare import prepare
from ..quantization.pt2e import quantize
from ..quantization.sensitivity import analyse, choose_fallback
from ..targets import check_recipe_targets
from ..verify.fidelity import torch_logits

METHOD = ("the recipe's PT2E int8 model with one quantizer enabled at a time (all others float), in PyTorch; "
          "logits SQNR and top-1 agreement vs float on held-back images")


def recipe_sensitivity(settings: ConvertSettings, images: int = 128, budget: Optional[float] = None) -> dict[str, Any]:
    """Calibrate with the recipe, then measure each quantizer's effect on held-back images.

    With `budget` (a top-1 agreement), also which activations a fallback would take out of int8 to reach it
    on the same images: what to put in a recipe's `quantization.fallback`.
    """
    recipe = check_recipe_targets(load_recipe(settings.recipe))
    loaded = load_model(settings.model, settings.weights, settings.num_classes, settings.preprocessing)
    prepare(loaded.model)
    cal, cal_src, ver, ver_src = load_data(settings, loaded, recipe)
    quantized = quantize(loaded.model, cal, recipe, cal_src)
    x = ver.x[:images]
    float_logits = torch_logits(loaded.model, x)
    result = analyse(quantized.prepared, x, float_logits)
    if budget is not None:
        sites = sum(1 for r in result["sites"] if r["kind"] == "activation")
        chosen = choose_fallback(quantized.prepared, x, float_logits, budget, max_sites=sites)
        result["fallback"] = {"budget_agreement": budget, "activation_sites": sites,
                              "reached": chosen["agreement_history"][-1] >= budget} | chosen
    return {"model": loaded.describe(), "recipe": recipe.name, "calibration": quantized.calibration,
            "evaluated_on": ver_src} | result


def report_section(result: dict[str, Any]) -> dict[str, Any]:
    """The report's `sensitivity` section: one entry per quantizer, most sensitive first."""
    layers = [{"name": r["layer"], "kind": r["kind"], "op": r["op"], "sqnr_db": r["only_this_sqnr_db"],
               "top1_agreement": r["only_this_agreement"]} for r in result["sites"]]
    return {"method": METHOD, "recipe": result["recipe"], "images": result["images"],
            "units": {"sqnr_db": "dB (logits vs float)", "top1_agreement": "fraction"}, "layers": layers}
