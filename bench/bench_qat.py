"""QAT schedules on the reference checkpoints, each against the PTQ model it starts from, on the same val images.

What makes QAT help on MNv4? Each run is `mnv4_deploy.qat.train` exactly as `mnv4-deploy qat` runs it (PTQ start
from the pinned calibration set `reference-tin202`, the same held-back train images excluded from training and
used to choose the shipped epoch), with one schedule choice changed from BASE. Every run is scored on the same
Tiny ImageNet val images (all 5,050 by default), never seen by calibration or training:

  agree        top-1 agreement with the float model, with its 95% Wilson interval
  vs PTQ       agreement minus the PTQ model's on the same images, paired 95% interval (Newcombe)
  top-1        top-1 on the val labels (and its paired change vs PTQ)
  sel          agreement on the 1,000 held-back train images that choose the shipped epoch
  ships        the epoch `mnv4-deploy qat` would ship (the last unless an earlier one is better beyond noise)

Epoch 0 is the PTQ model itself: the bench checks that the student's val logits at epoch 0 equal the PTQ
simulation's (`max |diff|` in the JSON, 0 when the start is exact). Scores are the fake-quantized PyTorch model
(the simulation every target's runtime is verified against); `mnv4-deploy qat --to onnx,tflite` gives the
runtime numbers of the shipped schedule.

Runs take about 0.6 s (conv_small) / 2.4 s (hybrid_medium) per step of 64 images on one idle CPU thread (2-4x
that on a shared machine); an epoch is 296 steps. The PTQ start is built once per process and copied for each run.
Screening runs use `--epochs 1` (the cosine schedule then spans one epoch); on the hybrid, `--train-limit 4096`
fits the whole schedule in 64 steps. Results accumulate by run name in bench/results/qat_<model>.json.

  OMP_NUM_THREADS=1 python bench/bench_qat.py --model conv_small --epochs 1 --runs base lr3e-6 lr3e-5 lr1e-4 mse
  OMP_NUM_THREADS=1 python bench/bench_qat.py --model hybrid --epochs 1 --train-limit 4096 --val-limit 2020 --tag screen4k \\
       --runs base range_rel1e-3 lr1e-4
  OMP_NUM_THREADS=1 python bench/bench_qat.py --model hybrid --epochs 1 --runs shipped
  python bench/bench_qat.py --model conv_small --table          # print the accumulated table only
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

SHARED = REPO.parent / "shared"
DATA = SHARED / "data" / "tiny-imagenet-202"
MODELS = {
    "conv_small": ("mobilenetv4_conv_small", SHARED / "models" / "mnv4_conv_small_tin202.pth"),
    "hybrid": ("mobilenetv4_hybrid_medium", SHARED / "models" / "mnv4_hybrid_medium_tin202_e1.pth"),
}

# Every run is BASE with its own changes (qat: keys; `distillation` nested). BASE is not the shipped recipe: it is
# the fixed reference point the single-choice changes are measured from.
BASE: dict[str, Any] = {
    "optimizer": "adamw", "lr": 1e-5, "lr_schedule": "cosine", "warmup_steps": 0, "weight_decay": 0.0,
    "range_learning": True, "range_lr": 1e-4, "range_lr_relative": False, "freeze_observers_after": 0,
    "distillation": {"loss": "kl", "temperature": 1.0, "alpha": 1.0},
    "batch_size": 64, "augment": "flip", "eval_images": 1000, "workers": 0, "seed": 0,
    "checkpoint_every": 1_000_000,  # the epoch-end checkpoints only
}
RUNS: dict[str, dict[str, Any]] = {
    "base": {},
    # learning rate and optimizer
    "lr3e-6": {"lr": 3e-6},
    "lr3e-5": {"lr": 3e-5},
    "lr1e-4": {"lr": 1e-4},
    "sgd_lr1e-3": {"optimizer": "sgd", "lr": 1e-3},
    "sgd_lr1e-2": {"optimizer": "sgd", "lr": 1e-2},
    # schedule shape
    "constant": {"lr_schedule": "constant"},
    "warmup50": {"warmup_steps": 50},
    # activation ranges
    "no_range_learning": {"range_learning": False},
    "range_lr1e-3": {"range_lr": 1e-3},
    "range_lr1e-5": {"range_lr": 1e-5},
    "range_rel1e-3": {"range_lr_relative": True, "range_lr": 1e-3},
    "range_rel1e-2": {"range_lr_relative": True, "range_lr": 1e-2},
    "observers100": {"freeze_observers_after": 100},
    # distillation
    "kl_t2": {"distillation": {"temperature": 2.0}},
    "kl_t4": {"distillation": {"temperature": 4.0}},
    "mse": {"distillation": {"loss": "mse"}},
    "alpha0.5": {"distillation": {"alpha": 0.5}},
}
# Combinations tried after the single-choice screen (filled in from its results).
RUNS |= {
    "shipped": {"__recipe__": "qat-int8-kd"},  # the shipped recipe's qat: section as it is
}

logger = logging.getLogger("bench_qat")


def _merge(base: dict[str, Any], change: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in change.items():
        out[k] = _merge(out.get(k, {}), v) if isinstance(v, dict) else v
    return out


def _recipe(run: str, epochs: int) -> Any:
    from mnv4_deploy.config.recipes import Distillation, Qat, load_recipe

    recipe = load_recipe("qat-int8-kd")
    change = RUNS[run]
    if "__recipe__" in change:
        return dataclasses.replace(recipe, qat=dataclasses.replace(recipe.qat, epochs=epochs, workers=0,
                                                                    checkpoint_every=1_000_000))
    settings = _merge(BASE, change)
    kd = Distillation(**settings.pop("distillation"))
    return dataclasses.replace(recipe, qat=Qat(**settings, distillation=kd, epochs=epochs))


def _val_scores(logits: np.ndarray, float_logits: np.ndarray, labels: np.ndarray,
                ptq_logits: Optional[np.ndarray]) -> dict[str, Any]:
    from mnv4_deploy.verify.significance import paired_counts, paired_difference_interval, wilson_interval

    n = len(logits)
    pred, ref = logits.argmax(1), float_logits.argmax(1)
    agree, correct = pred == ref, pred == labels
    out: dict[str, Any] = {
        "images": n, "agreement": float(agree.mean()), "agreement_ci95": list(wilson_interval(int(agree.sum()), n)),
        "top1": float(correct.mean()), "top1_ci95": list(wilson_interval(int(correct.sum()), n)),
    }
    if ptq_logits is not None:
        p_pred = ptq_logits.argmax(1)
        for key, new, old in (("agreement", agree, p_pred == ref), ("top1", correct, p_pred == labels)):
            both, new_only, old_only, neither = paired_counts(new, old)
            out[f"{key}_vs_ptq"] = (new_only - old_only) / n
            out[f"{key}_vs_ptq_ci95"] = list(paired_difference_interval(both, new_only, old_only, neither))
    return out


def _setup(model_key: str, val_limit: Optional[int], train_limit: Optional[int] = None) -> dict[str, Any]:
    """Model, calibration set, held-back/selection/train split (as `mnv4-deploy qat` makes it), val, PTQ."""
    from mnv4_deploy.quantization import qat
    from mnv4_deploy.load.calibration_sets import load_calibration
    from mnv4_deploy.load.images import load_images, scan_folder
    from mnv4_deploy.load.models import load_model
    from mnv4_deploy.preparation.prepare import prepare
    from mnv4_deploy.quantization.pt2e import quantize
    from mnv4_deploy.config.recipes import load_recipe
    from mnv4_deploy.verify.fidelity import torch_logits

    name, weights = MODELS[model_key]
    loaded = load_model(name, str(weights), 202, {"input_size": [64], "crop_pct": 1.0})
    prepare(loaded.model)
    recipe = load_recipe("qat-int8-kd")
    data = load_calibration("reference-tin202", DATA / "train", recipe, loaded.preprocessing)
    train, selection = qat.split_train(scan_folder(DATA / "train"), data.held_back.files, data.calibration.files,
                                       recipe.qat, loaded)
    if train_limit:  # screening: a seeded subset, so that a whole schedule (warm-up, decay) fits a short run
        train = train.sample(train_limit, seed=0)
    val_set = scan_folder(DATA / "val")
    if val_limit:
        val_set = val_set.sample(val_limit, seed=0)
    val = load_images(val_set, loaded.preprocessing)
    float_logits = torch_logits(loaded.model, val.x)
    start = time.perf_counter()
    ptq = quantize(loaded.model, data.calibration, load_recipe("ptq-int8"))
    ptq_seconds = time.perf_counter() - start
    ptq_logits = ptq.simulate(val.x)
    return {"loaded": loaded, "data": data, "train": train, "selection": selection, "val": val,
            "float_logits": float_logits, "ptq_logits": ptq_logits, "ptq_seconds": ptq_seconds}


def run_one(setup: dict[str, Any], run: str, epochs: int, max_steps: Optional[int], tmp: Path) -> dict[str, Any]:
    """One QAT run; val scores at epoch 0 and after every epoch (the student's logits: the simulation's)."""
    from mnv4_deploy.quantization import qat

    recipe = _recipe(run, epochs)
    val, float_logits, ptq_logits = setup["val"], setup["float_logits"], setup["ptq_logits"]
    per_epoch: list[dict[str, Any]] = []
    originals = qat._score_start, qat._end_epoch, qat._ptq_start

    def on_val(r: Any, epoch: Any) -> None:
        logits = qat.student_logits(r.student, val.x, next(r.student.parameters()).device)
        scores = _val_scores(logits, float_logits, val.labels, ptq_logits) | {"epoch": epoch}
        if epoch == 0:
            # vs the ptq-int8 model built in _setup (a second quantize() run), and vs the start's own simulation
            scores["max_abs_diff_vs_ptq_simulation"] = float(np.abs(logits - ptq_logits).max())
            scores["max_abs_diff_vs_start_simulation"] = float(np.abs(logits - setup["start"].simulate(val.x)).max())
        per_epoch.append(scores)
        logger.info(f"  {run} epoch {epoch}: val agreement {100 * scores['agreement']:.2f}% "
                    f"({100 * scores['agreement_vs_ptq']:+.2f} pt vs PTQ), top-1 {100 * scores['top1']:.2f}%")

    def score_start(r: Any, selection: Any, dist: Any) -> None:
        originals[0](r, selection, dist)
        on_val(r, 0)

    def end_epoch(r: Any, *args: Any) -> None:
        originals[1](r, *args)
        on_val(r, r.state.history[-1]["epoch"])

    def ptq_start(*args: Any) -> Any:
        # Every run's quantization section is the recipe's: build the PTQ start once per process (minutes on the
        # hybrid), each run trains a copy of it.
        if "start" not in setup:
            setup["start"] = originals[2](*args)
        return copy.deepcopy(setup["start"])

    qat._score_start, qat._end_epoch, qat._ptq_start = score_start, end_epoch, ptq_start
    start = time.perf_counter()
    try:
        loaded = setup["loaded"]
        options = qat.QatOptions(checkpoint_dir=tmp / run, max_steps=max_steps, progress=False, keep_last=True)
        q = qat.train(loaded.model, loaded.name, setup["train"], loaded.preprocessing, setup["data"].calibration,
                      recipe, options, setup["selection"])
    finally:
        qat._score_start, qat._end_epoch, qat._ptq_start = originals
    info = q.calibration["qat"]
    shipped = info["shipped"]
    would_ship = shipped.get("best_epoch", shipped["epoch"]) if "--keep-last" in shipped["reason"] else shipped["epoch"]
    return {
        "run": run, "changes": RUNS[run], "qat": dataclasses.asdict(recipe.qat), "epochs": epochs,
        "train_images": len(setup["train"]), "val_images": len(val.x),
        "steps": info["steps"], "seconds": round(time.perf_counter() - start, 1),
        # training and the selection scoring, not the PTQ start
        "seconds_per_step": round((info["history"][-1]["seconds"] - info["history"][0]["seconds"])
                                  / max(info["steps"], 1), 3),
        "val": per_epoch, "selection": [{"epoch": h["epoch"], **h.get("eval", {})} for h in info["history"]],
        "ships_epoch": would_ship, "ship_reason": shipped["reason"],
    }


def _pct(v: float) -> str:
    return f"{100 * v:.2f}"


def _ci(v: list[float], signed: bool = False) -> str:
    f = "{:+.2f}" if signed else "{:.1f}"
    return f"[{f.format(100 * v[0])}, {f.format(100 * v[1])}]"


def table(results: dict[str, Any]) -> str:
    ptq = results.get("ptq", {})
    lines = [f"PTQ (ptq-int8, {ptq.get('images')} val images): agreement {_pct(ptq.get('agreement', 0))}% "
             f"{_ci(ptq.get('agreement_ci95', [0, 0]))}, top-1 {_pct(ptq.get('top1', 0))}% "
             f"{_ci(ptq.get('top1_ci95', [0, 0]))} (float {_pct(ptq.get('float_top1', 0))}%), "
             f"{ptq.get('seconds', 0):.0f} s", "",
             "| run | changes from base | epochs (steps) | time | val agreement | vs PTQ (paired 95%) | val top-1 | "
             "top-1 vs PTQ | sel. agreement | ships |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for key, r in results.get("runs", {}).items():
        v = r["val"][-1]
        sel = r["selection"][-1] if r["selection"] else {}
        lines.append(
            f"| {r['run']} | {json.dumps(r['changes']) if r['changes'] else '-'} | {r['epochs']} ({r['steps']}) | "
            f"{r['seconds'] / 60:.1f} min | {_pct(v['agreement'])}% {_ci(v['agreement_ci95'])} | "
            f"{100 * v['agreement_vs_ptq']:+.2f} {_ci(v['agreement_vs_ptq_ci95'], True)} | {_pct(v['top1'])}% | "
            f"{100 * v['top1_vs_ptq']:+.2f} {_ci(v['top1_vs_ptq_ci95'], True)} | "
            f"{_pct(sel.get('top1_agreement', 0))}% | {r['ships_epoch']} |")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=sorted(MODELS), default="conv_small")
    ap.add_argument("--runs", nargs="*", default=["base"], choices=sorted(RUNS))
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--max-steps", type=int, help="cut every run short (the schedule still spans --epochs)")
    ap.add_argument("--val-limit", type=int, help="a seeded subset of the 5,050 val images (screening)")
    ap.add_argument("--train-limit", type=int, help="train on a seeded subset of the train images (screening: the "
                                                    "whole schedule in fewer steps)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (2 cores shared: 1 by default)")
    ap.add_argument("--tag", default="", help="suffix of the result key (e.g. e2 for 2-epoch confirmations)")
    ap.add_argument("--table", action="store_true", help="print the accumulated table and exit")
    ap.add_argument("--out", type=Path, help="default: bench/results/qat_<model>.json")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = args.out or REPO / "bench" / "results" / f"qat_{args.model}.json"
    results = json.loads(out.read_text()) if out.is_file() else {"model": args.model, "runs": {}}
    if args.table:
        print(table(results))
        return 0
    import tempfile

    import torch

    torch.set_num_threads(args.threads)
    setup = _setup(args.model, args.val_limit, args.train_limit)
    val_ptq = _val_scores(setup["ptq_logits"], setup["float_logits"], setup["val"].labels, None)
    results["ptq"] = val_ptq | {"seconds": round(setup["ptq_seconds"], 1),
                                "float_top1": float((setup["float_logits"].argmax(1) == setup["val"].labels).mean())}
    results["train_images"] = len(setup["train"])
    results["selection"] = setup["selection"].source
    for run in args.runs:
        with tempfile.TemporaryDirectory() as tmp:
            r = run_one(setup, run, args.epochs, args.max_steps, Path(tmp))
        key = f"{run}{'@' + args.tag if args.tag else ''}" if args.tag else f"{run}@e{args.epochs}"
        results["runs"][key] = r
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=1))
        logger.info(table({"ptq": results["ptq"], "runs": {key: r}}).splitlines()[-1])
    print(table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
