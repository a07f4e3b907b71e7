"""Quantization-aware training (QAT) with knowledge distillation, on the PT2E graph every target exports.

QAT starts from the PTQ model itself: `quantize()` runs the recipe's quantization section exactly as
`convert --recipe ptq-int8` does (equalization, calibrated ranges, bias correction, fallback), and its
observers become fake-quantizers with the same qparams (`qat_start.student_from_ptq`), so epoch 0 *is* the PTQ
model. The student then learns to reproduce the float teacher's logits on the train images; weight grids follow
the weights, activation ranges are learned by gradient (LSQ) when `range_learning` is on.

Every epoch (and epoch 0) is scored on held-back train images (never trained on, disjoint from --val) by top-1
agreement with float. Training can make a model worse: the shipped model is the last epoch unless an earlier one
(epoch 0 included) agrees with float more often beyond the noise of those images (paired 95% interval of the
difference), in which case that one ships and a log line says so (`keep_last` ships the last anyway).
The result is a QuantizedModel, deployed by the same `pipeline.deploy` step as a PTQ model.

Runs on CPU, on a GPU when present, and data-parallel (DistributedDataParallel) when started by `torchrun`.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..config.recipes import Qat, Recipe
from ..errors import UserError
from ..infra import console
from ..infra.fileio import atomic_path
from ..load.images import DECODE_ERRORS, ImageSet, LoadedImages, decode_image, model_input
from ..load.models import TORCH_LOAD_ERRORS
from ..load.preprocessing import Preprocessing
from ..verify.fidelity import compare
from ..verify.significance import paired_counts, paired_difference_interval, wilson_interval
from .pt2e import QuantizedModel, quantize
from .qat_start import student_from_ptq
from .quantizer_sites import remove_sites, widen_sites
from .sensitivity import fallback_line

logger = logging.getLogger(__name__)

# /2: the student is the PTQ graph (BatchNorm folded, observers swapped for fake-quantizers); /1 checkpoints
# (a separately prepared QAT graph with BatchNorm) cannot be loaded into it.
CHECKPOINT_FORMAT = "mnv4-deploy-qat/2"


@dataclass
class QatOptions:
    """What `mnv4-deploy qat` adds to the recipe's `qat:` section (run-specific, not part of a recipe)."""

    checkpoint_dir: Path
    resume: Optional[Path] = None
    device: str = "auto"  # auto | cpu | cuda
    epochs: Optional[int] = None  # overrides the recipe
    max_steps: Optional[int] = None  # stop after this many steps (smoke runs, time budgets)
    progress: bool = True
    # Ship the last state even when an earlier one (epoch 0 = PTQ) agrees with float more often beyond noise.
    keep_last: bool = False


@dataclass
class Distributed:
    """This process's place in a torchrun job (a single process when not under torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str = "auto") -> Distributed:
    """Read torchrun's environment; start the process group (NCCL on GPUs, Gloo on CPUs) when world > 1."""
    if device not in ("auto", "cpu", "cuda"):
        raise UserError(f"--device must be auto, cpu or cuda, got '{device}'")
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked but torch sees no CUDA GPU: use --device cpu (or auto)")
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    dev = torch.device(f"cuda:{local}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if world > 1:
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("nccl" if use_cuda else "gloo")
    return Distributed(rank, world, local, dev)


class TrainImages(torch.utils.data.Dataset):
    """Train images decoded on the fly by data-loader workers, with the model's own preprocessing.

    Item `(i, flip)`: whether to flip is decided by the epoch plan (`_epoch_plan`), not drawn here, so the
    batches are a function of (seed, epoch) alone: the same in worker processes and after a resume. Plain
    data only, so worker processes started by forkserver/spawn can unpickle it.
    """

    def __init__(self, images: ImageSet, pre: Preprocessing) -> None:
        self.images, self.pre = images, pre

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, item: tuple[int, bool]) -> tuple[torch.Tensor, int, bool]:
        i, flip = item
        label = self.images.labels[i] if self.images.labels is not None else -1
        try:
            arr = decode_image(self.images.paths[i], self.pre)
        except DECODE_ERRORS:
            return torch.zeros(self.pre.input_shape[1:]), -1, False
        if flip:
            arr = arr[:, ::-1]
        return torch.from_numpy(self.pre.normalize(np.ascontiguousarray(arr))), label, True


class _EpochImages(torch.utils.data.Dataset):
    """This process's share of one epoch: (image index, flip) pairs, in training order."""

    def __init__(self, images: TrainImages, plan: list[tuple[int, bool]]) -> None:
        self.images, self.plan = images, plan

    def __len__(self) -> int:
        return len(self.plan)

    def __getitem__(self, k: int) -> tuple[torch.Tensor, int, bool]:
        return self.images[self.plan[k]]


@dataclass
class Selection:
    """Held-back images that choose the shipped epoch, with the float model's logits on them.

    Never trained on, and disjoint from --val, which then stays a clean final score (choosing on it would bias it).
    """

    x: np.ndarray
    float_logits: np.ndarray
    labels: Optional[np.ndarray] = None
    source: str = ""


def _fake_quant_modules(student: nn.Module) -> list[nn.Module]:
    """The activation fake-quantizers (a weight's grid always follows the weight: it has no observer phase)."""
    from torchao.quantization.pt2e.fake_quantize import FakeQuantizeBase

    from .qat_start import WeightFakeQuantize

    return [m for m in student.modules() if isinstance(m, FakeQuantizeBase) and not isinstance(m, WeightFakeQuantize)]


def set_observers(student: nn.Module, enabled: bool) -> None:
    """Observers on (ranges follow the data) or off (ranges frozen, or learned by gradient with LSQ).

    Flags only: whether LSQ ranges are trainable is fixed once (`make_ranges_trainable`), before any
    DistributedDataParallel wrapper registers which parameters it synchronises.
    """
    from torchao.quantization.pt2e.learnable_fake_quantize import LearnableFakeQuantize

    for fq in _fake_quant_modules(student):
        fq.observer_enabled[0] = int(enabled)
        if isinstance(fq, LearnableFakeQuantize):
            fq.learning_enabled[0] = int(not enabled)


def make_ranges_trainable(student: nn.Module, trainable: bool) -> None:
    from torchao.quantization.pt2e.learnable_fake_quantize import LearnableFakeQuantize

    for fq in _fake_quant_modules(student):
        if isinstance(fq, LearnableFakeQuantize) and fq.scale is not None:
            fq.scale.requires_grad_(trainable)
            affine = fq.qscheme not in (torch.per_tensor_symmetric, torch.per_channel_symmetric)
            fq.zero_point.requires_grad_(trainable and affine)


class _ObserversPaused:
    """Evaluate without letting observers see the evaluation images."""

    def __init__(self, student: nn.Module) -> None:
        self.fqs = _fake_quant_modules(student)

    def __enter__(self) -> None:
        self.saved = [int(fq.observer_enabled[0]) for fq in self.fqs]
        for fq in self.fqs:
            fq.observer_enabled[0] = 0

    def __exit__(self, *exc: Any) -> None:
        for fq, was in zip(self.fqs, self.saved):
            fq.observer_enabled[0] = was


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                      qat: Qat) -> torch.Tensor:
    kd = qat.distillation
    if kd.loss == "mse":
        loss = F.mse_loss(student_logits, teacher_logits)
    else:
        t = kd.temperature
        loss = F.kl_div(F.log_softmax(student_logits / t, 1), F.softmax(teacher_logits / t, 1),
                        reduction="batchmean") * t * t
    if kd.alpha < 1.0:
        loss = kd.alpha * loss + (1.0 - kd.alpha) * F.cross_entropy(student_logits, labels, ignore_index=-1)
    return loss


def learning_rate_factor(qat: Qat, step: int, total: int) -> float:
    """The schedule as a pure function of the step, so a resumed run continues it exactly: a linear warm-up over
    `warmup_steps` (step 0 already moves, at 1/warmup of the rate), then constant or cosine decay to 0 at `total`."""
    if step < qat.warmup_steps:
        return (step + 1) / qat.warmup_steps
    if qat.lr_schedule == "constant":
        return 1.0
    progress = (step - qat.warmup_steps) / max(total - qat.warmup_steps, 1)
    return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def _set_learning_rates(optimizer: torch.optim.Optimizer, qat: Qat, step: int, total: int) -> None:
    """Every group at its base rate (`base_lr`, set by `_optimizer`; else lr, then range_lr) times the schedule."""
    factor = learning_rate_factor(qat, step, total)
    for i, group in enumerate(optimizer.param_groups):
        group["lr"] = group.get("base_lr", qat.lr if i == 0 else qat.range_lr) * factor


def _optimizer(student: nn.Module, qat: Qat) -> torch.optim.Optimizer:
    """Weights at `lr`; activation ranges (LSQ scales, zero points) at `range_lr`, without weight decay.

    With `range_lr_relative` each scale gets its own group at range_lr x its PTQ value: Adam moves a parameter by
    about its learning rate a step whatever the gradient's size, so one absolute rate leaves a hybrid's residual
    ranges (scales near 100) where PTQ put them while it moves a 0.001 scale by 10% a step."""
    ranges = [(n, p) for n, p in student.named_parameters() if n.endswith((".scale", ".zero_point"))]
    ids = {id(p) for _, p in ranges}
    weights = [p for p in student.parameters() if id(p) not in ids]
    groups: list[dict[str, Any]] = [{"params": weights, "base_lr": qat.lr}]
    if qat.range_lr_relative:
        groups += [{"params": [p], "base_lr": qat.range_lr * float(p.detach().abs().max().clamp(min=1e-8))}
                   for n, p in ranges if n.endswith(".scale")]
        zero_points = [p for n, p in ranges if n.endswith(".zero_point")]
        if zero_points:
            groups.append({"params": zero_points, "base_lr": qat.range_lr})
    else:
        groups.append({"params": [p for _, p in ranges], "base_lr": qat.range_lr})
    for group in groups:
        group["lr"] = group["base_lr"]
        if group is not groups[0]:
            group["weight_decay"] = 0.0
    if qat.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=qat.lr, momentum=0.9, weight_decay=qat.weight_decay)
    return torch.optim.AdamW(groups, lr=qat.lr, weight_decay=qat.weight_decay)


def student_logits(student: nn.Module, x: np.ndarray, device: torch.device, batch_size: int = 64) -> np.ndarray:
    """The fake-quantized student's logits (observers paused: evaluation images never move a range). Batches of
    64 as `QuantizedModel.simulate`: a conv's float sums depend on the batch size, and one ulp can move an
    activation to the next int8 step, so epoch 0 equals the PTQ simulation bit for bit only in the same batches."""
    with torch.no_grad(), _ObserversPaused(student):
        return np.concatenate([student(model_input(x[i:i + batch_size]).to(device)).float().cpu().numpy()
                               for i in range(0, len(x), batch_size)])


def score(logits: np.ndarray, selection: Selection) -> tuple[dict[str, Any], np.ndarray]:
    """Top-1 agreement with float (and top-1 when labelled) with 95% Wilson intervals, and the per-image
    agreement the paired comparisons between epochs need. Plain floats: checkpoints load with weights_only."""
    agree = logits.argmax(1) == selection.float_logits.argmax(1)
    f = compare(logits, selection.float_logits, selection.labels)
    n = len(agree)
    out: dict[str, Any] = {"images": n, "top1_agreement": float(f.top1_agreement),
                           "top1_agreement_ci95": _rounded(wilson_interval(int(agree.sum()), n)),
                           "sqnr_db": float(f.sqnr_db)}
    if selection.labels is not None and f.top1 is not None:
        correct = int((logits.argmax(1) == selection.labels).sum())
        out |= {"top1": float(f.top1), "top1_ci95": _rounded(wilson_interval(correct, n)),
                "float_top1": float(f.reference_top1)}
    return out, agree


def paired_change(new: np.ndarray, old: np.ndarray) -> tuple[float, tuple[float, float]]:
    """Agreement of `new` minus that of `old` on the same images, and its paired 95% interval (Newcombe).

    This interval is "the noise" of every keep-or-not decision here: a difference whose interval holds 0 is noise."""
    both, new_only, old_only, neither = paired_counts(np.asarray(new, bool), np.asarray(old, bool))
    n = max(len(new), 1)
    return (new_only - old_only) / n, paired_difference_interval(both, new_only, old_only, neither)


def _rounded(interval: tuple[float, float]) -> list[float]:
    return [round(float(interval[0]), 5), round(float(interval[1]), 5)]


@dataclass
class _State:
    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    # Per-image agreement with float on the selection images: epoch 0's, the last scored state's, and the best
    # state so far (its weights too: it may be the one that ships).
    start_agree: Optional[torch.Tensor] = None
    last_agree: Optional[torch.Tensor] = None
    best: Optional[dict[str, Any]] = None  # {"epoch", "step", "agreement", "agree", "state"}


def save_checkpoint(path: Path, student: nn.Module, optimizer: torch.optim.Optimizer, state: _State,
                    model_name: str, recipe: Recipe, fallback: Optional[dict[str, Any]] = None) -> None:
    """Tensors and plain Python values only, so resuming can load it with weights_only=True.

    A recipe fallback's choice is saved too: a resumed run applies the same sites rather than choosing again.
    """
    payload = {
        "format": CHECKPOINT_FORMAT, "model": model_name, "recipe": recipe.name,
        "student": student.state_dict(), "optimizer": optimizer.state_dict(),
        "step": state.step, "epoch": state.epoch, "batch_in_epoch": state.batch_in_epoch, "history": state.history,
        "fallback": fallback,
        "selection": {"start_agree": state.start_agree, "last_agree": state.last_agree, "best": state.best},
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def load_checkpoint(path: Path, student: nn.Module, optimizer: torch.optim.Optimizer, model_name: str) -> _State:
    return restore_checkpoint(read_checkpoint(path, model_name), path, student, optimizer)


def read_checkpoint(path: Path, model_name: str) -> dict[str, Any]:
    """A checkpoint written by `save_checkpoint` for this model, or a one-line error saying what is wrong."""
    if not Path(path).is_file():
        raise UserError(f"--resume: checkpoint '{path}' not found")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except TORCH_LOAD_ERRORS as exc:  # torch's own text advises weights_only=False: never pass that on
        raise UserError(f"--resume: '{path}' is not a QAT checkpoint written by mnv4-deploy qat "
                        f"({type(exc).__name__}); give OUT/qat/last.pt of an earlier run") from None
    if isinstance(payload, dict) and payload.get("format") == "mnv4-deploy-qat/1":
        raise UserError(f"--resume: '{path}' was written by an older mnv4-deploy qat, whose student is not the "
                        f"PTQ model this one trains: start a new run")
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"--resume: '{path}' is not a QAT checkpoint written by mnv4-deploy qat")
    if payload["model"] != model_name:
        raise UserError(f"--resume: '{path}' was trained from {payload['model']}, not {model_name}: "
                        f"give the same --model/--weights as the run that wrote it")
    return payload



def restore_checkpoint(payload: dict[str, Any], path: Path, student: nn.Module,
                       optimizer: torch.optim.Optimizer) -> _State:
    try:
        student.load_state_dict(payload["student"])
        optimizer.load_state_dict(payload["optimizer"])
    except (RuntimeError, ValueError) as exc:
        raise UserError(f"--resume: '{path}' does not match this model/recipe "
                        f"({str(exc).splitlines()[0][:160]}): resume with the recipe that wrote it") from None
    sel = payload.get("selection") or {}
    return _State(payload["step"], payload["epoch"], payload["batch_in_epoch"], list(payload["history"]),
                  sel.get("start_agree"), sel.get("last_agree"), sel.get("best"))


@dataclass
class _TrainingRun:
    """What the training loop needs, built once by `train` (or rebuilt from a checkpoint)."""

    student: torch.fx.GraphModule
    model: nn.Module  # the student, or its DistributedDataParallel wrapper
    teacher: nn.Module
    optimizer: torch.optim.Optimizer
    state: _State
    ptq: QuantizedModel  # the start: the recipe's PTQ model (its quantizer, calibration record, fallback)
    dataset: TrainImages
    epochs: int
    steps_per_epoch: int
    total: int  # steps this invocation runs up to (--max-steps), <= epochs * steps_per_epoch
    started: float

    @property
    def fallback(self) -> Optional[dict[str, Any]]:
        return self.ptq.calibration.get("fallback")


def train(
    teacher: nn.Module,
    model_name: str,
    train_images: ImageSet,
    preprocessing: Preprocessing,
    calibration: LoadedImages,
    recipe: Recipe,
    options: QatOptions,
    selection: Optional[Selection] = None,
    dist: Optional[Distributed] = None,
) -> QuantizedModel:
    """Fine-tune the PTQ model against the float teacher; return the epoch that ships, ready to export.

    `selection`: held-back images scored at epoch 0 and after every epoch (on the main process); they choose the
    shipped epoch. Without them the last state ships.
    """
    dist = dist or Distributed()
    _check_recipe(train_images, recipe)
    torch.manual_seed(recipe.qat.seed)
    run = _start_run(teacher, model_name, train_images, preprocessing, calibration, recipe, options, dist)
    ckpt = Path(options.checkpoint_dir) / "last.pt"
    if selection is not None and dist.main and run.state.step == 0 and run.state.start_agree is None:
        _score_start(run, selection, dist)
    while run.state.step < run.total and run.state.epoch < run.epochs:
        running = _train_epoch(run, recipe, options, dist, ckpt, model_name)
        _end_epoch(run, running, selection, recipe, dist, ckpt, model_name)
    shipped = _ship(run, options, dist) if dist.main else {}
    student = _finish(run.student, dist)
    return QuantizedModel(student, recipe, _qat_info(run, train_images, calibration, recipe, dist, ckpt, shipped,
                                                     selection), run.ptq.quantizer)


def _check_recipe(train_images: ImageSet, recipe: Recipe) -> None:
    """Refuse, before any model is built, what this recipe cannot do with these images."""
    if recipe.qat.distillation.alpha < 1.0 and not train_images.labelled:
        raise UserError(f"recipe {recipe.name}: qat.distillation.alpha < 1 mixes in label cross-entropy, but "
                        f"{train_images.source} has no class sub-folders: set alpha: 1.0 or give an ImageFolder")
    if recipe.qat.freeze_bn_after > 0:
        raise UserError(f"recipe {recipe.name}: qat.freeze_bn_after > 0 asks to train BatchNorm statistics, but QAT "
                        f"starts from the PTQ model, whose BatchNorms are folded into the convs (as every target "
                        f"deploys them): set freeze_bn_after: 0")


def _start_run(teacher: nn.Module, model_name: str, train_images: ImageSet, preprocessing: Preprocessing,
               calibration: LoadedImages, recipe: Recipe, options: QatOptions, dist: Distributed) -> _TrainingRun:
    """The PTQ start as a trainable student, frozen teacher, optimizer, and the state to start or resume from."""
    started = time.perf_counter()
    device = dist.device
    saved = read_checkpoint(options.resume, model_name) if options.resume is not None else None  # fail fast
    ptq = _ptq_start(teacher, calibration, recipe, saved, dist)
    student = student_from_ptq(ptq.prepared, recipe.qat.range_learning).to(device)
    teacher = _frozen(teacher, device)
    make_ranges_trainable(student, recipe.qat.range_learning)
    optimizer = _optimizer(student, recipe.qat)
    state = _resume(saved, options, student, optimizer, dist)
    _apply_phase(student, recipe.qat, state.step)
    model: nn.Module = student
    if dist.enabled:
        model = nn.parallel.DistributedDataParallel(student, device_ids=[device.index] if device.type == "cuda" else None)
    dataset = TrainImages(train_images, preprocessing)
    epochs = options.epochs if options.epochs is not None else recipe.qat.epochs
    steps_per_epoch, total = _step_budget(len(dataset), recipe.qat, epochs, options, dist, train_images.source)
    return _TrainingRun(student, model, teacher, optimizer, state, ptq, dataset, epochs, steps_per_epoch, total, started)


def _ptq_start(teacher: nn.Module, calibration: LoadedImages, recipe: Recipe, saved: Optional[dict[str, Any]],
               dist: Distributed) -> QuantizedModel:
    """The PTQ model the recipe's quantization section makes, exactly as `convert` makes it.

    A resumed run applies the checkpoint's fallback sites rather than choosing them again (the choice is the last
    PTQ step, and the checkpoint's state_dict has exactly the quantizers it left)."""
    q = recipe.quantization
    fallback = saved.get("fallback") if saved else None
    if fallback is not None:
        recipe = dataclasses.replace(recipe, quantization=dataclasses.replace(
            q, fallback=dataclasses.replace(q.fallback, max_layers=0)))
    _log(dist, f"qat: starting from the PTQ model of recipe '{recipe.name}' ({_ptq_steps(recipe)})")
    ptq = quantize(teacher, calibration, recipe)
    if fallback is not None:
        apply = widen_sites if fallback.get("precision") == "int16" else remove_sites
        ptq.prepared = apply(ptq.prepared, fallback["sites"])
        ptq.calibration["fallback"] = fallback
    elif ptq.calibration.get("fallback"):
        _log(dist, fallback_line(ptq.calibration["fallback"]))
    return ptq


def _ptq_steps(recipe: Recipe) -> str:
    q = recipe.quantization
    steps = [f"{q.activations.observer} ranges"]
    if q.equalization.method != "none":
        steps.insert(0, f"{q.equalization.method} equalization")
    steps += [name for name, on in (("AdaRound", q.adaround.enabled), ("range learning", q.range_learning.steps > 0),
                                    ("bias correction", q.bias_correction.enabled),
                                    ("fallback", q.fallback.max_layers > 0)) if on]
    return ", ".join(steps)


def _frozen(teacher: nn.Module, device: torch.device) -> nn.Module:
    teacher = copy.deepcopy(teacher).eval().to(device)
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher



def _resume(saved: Optional[dict[str, Any]], options: QatOptions, student: nn.Module,
            optimizer: torch.optim.Optimizer, dist: Distributed) -> _State:
    if saved is None:
        return _State()
    state = restore_checkpoint(saved, options.resume, student, optimizer)
    _log(dist, f"resumed from {options.resume}: step {state.step} ({state.epoch} epochs done, "
               f"{state.batch_in_epoch} batches into the next)")
    return state


def _step_budget(images: int, qat: Qat, epochs: int, options: QatOptions, dist: Distributed,
                 source: str) -> tuple[int, int]:
    """(steps per epoch, steps to run): whole batches on every process; --max-steps cuts the run short."""
    steps_per_epoch = images // (qat.batch_size * dist.world_size)
    if steps_per_epoch == 0:
        raise UserError(f"{source}: {images} train images are fewer than one batch "
                        f"({qat.batch_size} x {dist.world_size} processes): lower qat.batch_size")
    total = epochs * steps_per_epoch if options.max_steps is None else min(options.max_steps, epochs * steps_per_epoch)
    _log(dist, f"qat: {images} train images, {epochs} epochs x {steps_per_epoch} steps "
               f"(batch {qat.batch_size} x {dist.world_size} process(es), {dist.device}), {total} steps to run")
    return steps_per_epoch, total



def _epoch_loader(dataset: TrainImages, state: _State, steps_per_epoch: int, qat: Qat,
                  dist: Distributed) -> torch.utils.data.DataLoader:
    """The rest of this epoch's batches for this process (from `batch_in_epoch` on, after a resume)."""
    plan = _epoch_plan(len(dataset), qat.seed, state.epoch, qat.augment == "flip")
    first, end = state.batch_in_epoch * qat.batch_size, steps_per_epoch * qat.batch_size
    mine = plan[dist.rank::dist.world_size][first:end]
    return torch.utils.data.DataLoader(_EpochImages(dataset, mine), batch_size=qat.batch_size, drop_last=True,
                                       num_workers=qat.workers, pin_memory=dist.device.type == "cuda",
                                       persistent_workers=False, multiprocessing_context=_worker_context(qat.workers))


def _worker_context(workers: int) -> Optional[Any]:
    """forkserver (spawn where there is none), never fork: a converter may have imported JAX or TensorFlow,
    whose threads make a forked child deadlock. None without workers (DataLoader refuses a context then)."""
    if workers <= 0:
        return None
    import multiprocessing

    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")



def _train_epoch(run: _TrainingRun, recipe: Recipe, options: QatOptions, dist: Distributed, ckpt: Path,
                 model_name: str) -> Optional[float]:
    """Train until the epoch ends or the step budget is spent; the smoothed loss (None if no step ran)."""
    qat, state = recipe.qat, run.state
    loader = _epoch_loader(run.dataset, state, run.steps_per_epoch, qat, dist)
    bar = _bar(loader, dist, options, f"qat epoch {state.epoch + 1}/{run.epochs}",
               run.steps_per_epoch, state.batch_in_epoch)
    running = None
    for x, labels, ok in bar:
        loss = _train_step(run, qat, x, labels, ok, dist.device)
        running = loss if running is None else 0.9 * running + 0.1 * loss
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(loss=f"{running:.4g}", step=state.step)
        if dist.main and qat.checkpoint_every and state.step % qat.checkpoint_every == 0:
            save_checkpoint(ckpt, run.student, run.optimizer, state, model_name, recipe, run.fallback)
        if state.step >= run.total:
            break
    return running


def _train_step(run: _TrainingRun, qat: Qat, x: torch.Tensor, labels: torch.Tensor, ok: torch.Tensor,
                device: torch.device) -> float:
    """One optimizer update; phase and learning rates follow from the step alone (so resumes continue exactly)."""
    state = run.state
    _apply_phase(run.student, qat, state.step)
    _set_learning_rates(run.optimizer, qat, state.step, run.epochs * run.steps_per_epoch)  # not --max-steps
    x, labels = x.to(device, non_blocking=True), labels.to(device, non_blocking=True)
    labels = torch.where(ok.to(device), labels, torch.full_like(labels, -1))
    x = x.contiguous(memory_format=torch.channels_last)  # as data.model_input: the fastest layout on CPU
    with torch.no_grad():
        target = run.teacher(x)
    loss = distillation_loss(run.model(x), target, labels, qat)
    if not torch.isfinite(loss):
        raise RuntimeError(f"QAT loss became {loss.item()} at step {state.step}: lower qat.lr")
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    run.optimizer.step()
    state.step += 1
    state.batch_in_epoch += 1
    return loss.item()


def _score_start(run: _TrainingRun, selection: Selection, dist: Distributed) -> None:
    """Epoch 0: the PTQ model itself, scored like every epoch after it; the first candidate to ship."""
    scores, agree = score(student_logits(run.student, selection.x, dist.device), selection)
    record = {"epoch": 0, "step": run.state.step, "seconds": round(time.perf_counter() - run.started, 1),
              "eval": scores}
    run.state.history.append(record)
    run.state.start_agree = run.state.last_agree = torch.from_numpy(agree)
    run.state.best = _candidate(run, 0, scores, agree)
    _log(dist, _epoch_line(record, run.epochs))


def _candidate(run: _TrainingRun, epoch: int, scores: dict[str, Any], agree: np.ndarray) -> dict[str, Any]:
    """A state that may ship: its scores, per-image agreement and a CPU copy of its weights and ranges."""
    return {"epoch": epoch, "step": run.state.step, "agreement": scores["top1_agreement"],
            "agree": torch.from_numpy(agree), "state": _cpu_state(run.student)}


def _cpu_state(student: nn.Module) -> dict[str, torch.Tensor]:
    """A CPU copy of the state_dict that keeps its `_metadata`: without the versions in it, torchao's observers
    take a loaded state for a version-1 one and reset their `eps` (the loaded model then rounds differently)."""
    from collections import OrderedDict

    state = student.state_dict()
    out = OrderedDict((k, v.detach().cpu().clone()) for k, v in state.items())
    out._metadata = copy.deepcopy(getattr(state, "_metadata", OrderedDict()))  # type: ignore[attr-defined]
    return out


def _end_epoch(run: _TrainingRun, running: Optional[float], selection: Optional[Selection], recipe: Recipe,
               dist: Distributed, ckpt: Path, model_name: str) -> None:
    """Record the epoch (or the part of it this run did), score it and checkpoint on the main process."""
    state = run.state
    epoch_done = state.batch_in_epoch >= run.steps_per_epoch
    record: dict[str, Any] = {"epoch": state.epoch + 1, "step": state.step, "loss": float(running or 0.0),
                              "seconds": round(time.perf_counter() - run.started, 1)}
    if not epoch_done:
        record["partial"] = True
    if dist.main and selection is not None:
        scores, agree = score(student_logits(run.student, selection.x, dist.device), selection)
        if state.start_agree is not None:
            change, ci = paired_change(agree, state.start_agree.numpy())
            scores["agreement_change_vs_epoch0"] = round(change, 5)
            scores["agreement_change_vs_epoch0_ci95"] = _rounded(ci)
        record["eval"] = scores
        state.last_agree = torch.from_numpy(agree)
        if state.best is None or scores["top1_agreement"] > state.best["agreement"]:  # a tie keeps the earlier one
            state.best = _candidate(run, record["epoch"], scores, agree)
    if epoch_done:
        state.epoch, state.batch_in_epoch = state.epoch + 1, 0
    state.history.append(record)
    if dist.main:
        save_checkpoint(ckpt, run.student, run.optimizer, state, model_name, recipe, run.fallback)
        _log(dist, _epoch_line(record, run.epochs))


def _ship(run: _TrainingRun, options: QatOptions, dist: Distributed) -> dict[str, Any]:
    """Which state ships: the last, unless an earlier one agrees with float more often on the selection images
    beyond the noise (the paired 95% interval of the difference excludes 0); then that one, unless `keep_last`.
    Loads the shipped state into the student and logs one line saying which and why."""
    state, best = run.state, run.state.best
    last_epoch = state.history[-1]["epoch"] if state.history else 0
    if best is None or state.last_agree is None:
        return {"epoch": last_epoch, "reason": "the last state (no held-back images to choose on)"}
    if best["step"] == state.step:
        shipped = {"epoch": last_epoch, "reason": "the last state, which is also the best on the held-back images"}
        _log(dist, f"shipping epoch {last_epoch}: {shipped['reason']}")
        return shipped
    change, ci = paired_change(best["agree"].numpy(), state.last_agree.numpy())
    last_agreement = float(state.last_agree.float().mean())
    compared = (f"epoch {best['epoch']} agrees with float on {100 * best['agreement']:.2f}% of "
                f"{len(best['agree'])} held-back images, the last (epoch {last_epoch}) on {100 * last_agreement:.2f}%: "
                f"{100 * change:+.2f} pt, 95% interval [{100 * ci[0]:+.2f}, {100 * ci[1]:+.2f}]")
    record = {"best_epoch": best["epoch"], "agreement_change": round(change, 5), "agreement_change_ci95": _rounded(ci)}
    if ci[0] <= 0:
        shipped = {"epoch": last_epoch, "reason": f"the last state: {compared}, within noise"} | record
        _log(dist, f"shipping epoch {last_epoch} (the last): {compared}, within noise")
        return shipped
    if options.keep_last:
        logger.warning(f"note: shipping the last epoch ({last_epoch}) as --keep-last asks, although {compared}")
        return {"epoch": last_epoch, "reason": f"--keep-last, although {compared}"} | record
    run.student.load_state_dict(best["state"])
    what = "the PTQ model (epoch 0)" if best["epoch"] == 0 else f"epoch {best['epoch']}"
    logger.warning(f"note: shipping {what}, not the last epoch: {compared} (--keep-last ships the last)")
    return {"epoch": best["epoch"], "reason": f"better than the last beyond noise: {compared}"} | record


def _finish(student: torch.fx.GraphModule, dist: Distributed) -> torch.fx.GraphModule:
    """The shipped student on the CPU, observers frozen, ready for convert_pt2e and every exporter."""
    if dist.enabled:
        import torch.distributed as tdist

        tdist.barrier()
    student = student.cpu()
    set_observers(student, False)
    return student


def _qat_info(run: _TrainingRun, train_images: ImageSet, calibration: LoadedImages, recipe: Recipe, dist: Distributed,
              ckpt: Path, shipped: dict[str, Any], selection: Optional[Selection]) -> dict[str, Any]:
    """The manifest's `quantization` section for a QAT model."""
    q = recipe.quantization
    ptq = run.ptq.calibration
    return {
        "method": "qat",
        "source": f"{train_images.source} ({len(run.dataset)} train images), started from the PTQ model "
                  f"calibrated on {len(calibration)} calibration images",
        "images": len(run.dataset),
        "weights": f"int{q.weights.bits} {q.weights.granularity} symmetric",
        "activations": f"int{q.activations.bits} per_tensor affine, {q.activations.observer} observer start"
                       + (", learned ranges (LSQ)" if recipe.qat.range_learning else ""),
        "start": {"method": "ptq", "seconds": ptq.get("seconds")},
        **({"algorithms": ptq["algorithms"]} if ptq.get("algorithms") else {}),
        **({"fallback": run.fallback} if run.fallback else {}),
        "qat": {"epochs": run.epochs, "steps": run.state.step, "processes": dist.world_size,
                "device": str(dist.device), "selection": selection.source if selection is not None else None,
                "history": run.state.history, "shipped": shipped, "checkpoint": str(ckpt)},
        "seconds": round(time.perf_counter() - run.started, 2),
    }


def _apply_phase(student: torch.fx.GraphModule, qat: Qat, step: int) -> None:
    """Switch observers off at the recipe's step boundary (also right after a resume)."""
    phase = step < qat.freeze_observers_after
    if getattr(student, "_mnv4_phase", None) == phase:
        return
    set_observers(student, phase)
    student._mnv4_phase = phase  # type: ignore[attr-defined]


def _epoch_plan(n: int, seed: int, epoch: int, flip: bool) -> list[tuple[int, bool]]:
    """The epoch's (image, flip) order: the same on every process and after a resume (a function of
    seed and epoch only, never of the global RNG, which model building and data loaders consume)."""
    g = torch.Generator()
    g.manual_seed(seed * 1000 + epoch)
    order = torch.randperm(n, generator=g).tolist()
    flips = (torch.rand(n, generator=g) < 0.5).tolist() if flip else [False] * n
    return list(zip(order, flips))



def _bar(loader: Any, dist: Distributed, options: QatOptions, desc: str, total: int, done: int) -> Any:
    if not (options.progress and dist.main):
        return loader
    from tqdm.auto import tqdm

    return tqdm(loader, desc=desc, total=total, initial=done, unit="step", file=console.stderr(), leave=False)



def _epoch_line(record: dict[str, Any], epochs: int) -> str:
    head = (f"epoch 0/{epochs} (the PTQ start)" if record["epoch"] == 0 else
            f"epoch {record['epoch']}/{epochs}{' (partial)' if record.get('partial') else ''}: step {record['step']}, "
            f"loss {record['loss']:.4g}")
    if "eval" in record:
        ev = record["eval"]
        lo, hi = ev["top1_agreement_ci95"]
        head += (f", held-back agreement with float {100 * ev['top1_agreement']:.2f}% [{100 * lo:.1f}, {100 * hi:.1f}]"
                 f" ({ev['images']} images")
        if "agreement_change_vs_epoch0" in ev:
            clo, chi = ev["agreement_change_vs_epoch0_ci95"]
            head += f"; {100 * ev['agreement_change_vs_epoch0']:+.2f} pt vs epoch 0 [{100 * clo:+.2f}, {100 * chi:+.2f}]"
        head += ")"
        if "top1" in ev:
            head += f", top-1 {100 * ev['top1']:.2f}% (float {100 * ev['float_top1']:.2f}%)"
    return head + f", {record['seconds']:.0f} s"


def _log(dist: Distributed, msg: str) -> None:
    """Progress from the main process only (every DDP rank runs the same code)."""
    if dist.main:
        logger.info(msg)


def without(images: ImageSet, held_back: ImageSet) -> ImageSet:
    """The train images minus the ones the pipeline holds back for verification."""
    held = set(held_back.paths)
    return images.subset([i for i, p in enumerate(images.paths) if p not in held])


def split_train(images: ImageSet, verification: Optional[ImageSet], calibration: Optional[ImageSet], qat: Qat,
                loaded: Any, workers: int = 0) -> tuple[ImageSet, Optional[Selection]]:
    """(the images to train on, the selection images held back from them, with float logits).

    Selection images are `qat.eval_images` train images (seeded) that are neither verification images nor
    calibration images (PTQ fitted its ranges and biases on those, so epoch 0 would look better there); at most a
    quarter of them, so that most images still train. The verification images are not trained on either."""
    from ..load.images import load_images
    from ..verify.fidelity import torch_logits

    held = set(verification.paths) if verification is not None else set()
    calibrated = set(calibration.paths) if calibration is not None else set()
    candidates = images.subset([i for i, p in enumerate(images.paths) if p not in held and p not in calibrated])
    n = min(qat.eval_images, len(candidates) // 4)
    if n < qat.eval_images:
        logger.info(f"note: {images.source}: {n} of qat.eval_images {qat.eval_images} held back to choose the "
                    f"shipped epoch (a quarter of {len(candidates)} images)")
    if n <= 0:
        return without(images, verification) if verification is not None else images, None
    chosen = candidates.sample(n, qat.seed)
    held |= set(chosen.paths)
    train = images.subset([i for i, p in enumerate(images.paths) if p not in held])
    loaded_images = load_images(chosen, loaded.preprocessing, workers, "selection images")
    selection = Selection(loaded_images.x, torch_logits(loaded.model, loaded_images.x), loaded_images.labels,
                          f"{images.source} ({len(loaded_images)} train images held back from training, "
                          f"not calibration or verification images)")
    return train, selection
