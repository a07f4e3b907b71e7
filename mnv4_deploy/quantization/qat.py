"""Quantization-aware training (QAT) with knowledge distillation, on the PT2E graph every target exports.

Start where PTQ ends: the recipe's calibration sets the initial activation ranges. Then the fake-quantized
student learns to reproduce the float teacher's logits on the train images. BatchNorm statistics freeze after
`freeze_bn_after` steps, observers after `freeze_observers_after`; from then on activation scales are learned
by gradient (LSQ) when `range_learning` is on. The result is a QuantizedModel, deployed by the same
`pipeline.deploy` step as a PTQ model, so every target gets the same fine-tuned int8 model.

Runs on CPU, on a GPU when present, and data-parallel (DistributedDataParallel) when started by `torchrun`.
"""
from __future__ import annotations

import copy
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..config.recipes import Qat, Quantization, Recipe
from ..errors import UserError
from ..infra import console
from ..infra.fileio import atomic_path
from ..load.images import DECODE_ERRORS, ImageSet, LoadedImages, decode_image, model_input
from ..load.models import TORCH_LOAD_ERRORS
from ..load.preprocessing import Preprocessing
from ..verify.fidelity import compare
from .passes.add_tagging import tag_adds
from .pt2e import QuantizedModel, build_quantizer, export_program
from .quantizer_sites import remove_sites
from .sensitivity import choose_fallback, fallback_line, fallback_record

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "mnv4-deploy-qat/1"


@dataclass
class QatOptions:
    """What `mnv4-deploy qat` adds to the recipe's `qat:` section (run-specific, not part of a recipe)."""

    checkpoint_dir: Path
    resume: Optional[Path] = None
    device: str = "auto"  # auto | cpu | cuda
    epochs: Optional[int] = None  # overrides the recipe
    max_steps: Optional[int] = None  # stop after this many steps (smoke runs, time budgets)
    progress: bool = True


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


def build_student(teacher: nn.Module, recipe: Recipe, example: torch.Tensor) -> torch.fx.GraphModule:
    """The fake-quantized copy of the float model (conv+BN kept apart so BN can still train)."""
    from torchao.quantization.pt2e.quantize_pt2e import prepare_qat_pt2e

    mode = "learned" if recipe.qat.range_learning else "fixed"
    graph = tag_adds(export_program(copy.deepcopy(teacher).train(), example).module())
    return prepare_qat_pt2e(graph, build_quantizer(recipe.quantization, mode))


def _fake_quant_modules(student: nn.Module) -> list[nn.Module]:
    from torchao.quantization.pt2e.fake_quantize import FakeQuantizeBase

    return [m for m in student.modules() if isinstance(m, FakeQuantizeBase)]


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


def set_batchnorm_training(student: torch.fx.GraphModule, training: bool) -> None:
    from torchao.quantization.pt2e import move_exported_model_to_eval, move_exported_model_to_train

    (move_exported_model_to_train if training else move_exported_model_to_eval)(student)


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


def calibrate(student: torch.fx.GraphModule, calibration: LoadedImages, batch_size: int, device: torch.device) -> None:
    """PTQ calibration of the student's observers: QAT starts from the ranges PTQ would ship."""
    set_batchnorm_training(student, False)
    with torch.no_grad():
        for batch in calibration.batches(batch_size):
            student(model_input(batch).to(device))


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


def _set_learning_rates(optimizer: torch.optim.Optimizer, qat: Qat, step: int, total: int) -> None:
    """The schedule as a pure function of the step, so a resumed run continues it exactly."""
    import math

    factor = 1.0 if qat.lr_schedule == "constant" else 0.5 * (1.0 + math.cos(math.pi * min(step, total) / max(total, 1)))
    for group, base in zip(optimizer.param_groups, (qat.lr, qat.range_lr)):
        group["lr"] = base * factor


def _optimizer(student: nn.Module, qat: Qat) -> torch.optim.Optimizer:
    ranges = [p for n, p in student.named_parameters() if n.endswith((".scale", ".zero_point"))]
    ids = {id(p) for p in ranges}
    weights = [p for p in student.parameters() if id(p) not in ids]
    groups = [{"params": weights}, {"params": ranges, "lr": qat.range_lr, "weight_decay": 0.0}]
    if qat.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=qat.lr, momentum=0.9, weight_decay=qat.weight_decay)
    return torch.optim.AdamW(groups, lr=qat.lr, weight_decay=qat.weight_decay)


def agreement(student: torch.fx.GraphModule, x: np.ndarray, reference: np.ndarray, labels: Optional[np.ndarray],
              device: torch.device, batch_size: int = 128) -> dict[str, float]:
    """Top-1 agreement of the fake-quantized student with float (and top-1 if labelled), BN frozen."""
    was_training = getattr(student, "_exported_training", False)  # torchao's flag for exported models
    set_batchnorm_training(student, False)
    with torch.no_grad(), _ObserversPaused(student):
        logits = np.concatenate([student(model_input(x[i:i + batch_size]).to(device)).float().cpu().numpy()
                                 for i in range(0, len(x), batch_size)])
    if was_training:
        set_batchnorm_training(student, True)
    f = compare(logits, reference, labels)
    out = {"images": int(f.images), "top1_agreement": float(f.top1_agreement), "sqnr_db": float(f.sqnr_db)}
    if f.top1 is not None:  # plain floats: checkpoints must load with weights_only=True
        out |= {"top1": float(f.top1), "float_top1": float(f.reference_top1)}
    return out


@dataclass
class _State:
    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)


def save_checkpoint(path: Path, student: nn.Module, optimizer: torch.optim.Optimizer, state: _State,
                    model_name: str, recipe: Recipe, fallback: Optional[dict[str, Any]] = None) -> None:
    """Tensors and plain Python values only, so resuming can load it with weights_only=True.

    A recipe fallback's choice is saved too: a resumed run removes the same quantizers rather than choosing again.
    """
    payload = {
        "format": CHECKPOINT_FORMAT, "model": model_name, "recipe": recipe.name,
        "student": student.state_dict(), "optimizer": optimizer.state_dict(),
        "step": state.step, "epoch": state.epoch, "batch_in_epoch": state.batch_in_epoch, "history": state.history,
        "fallback": fallback,
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
    return _State(payload["step"], payload["epoch"], payload["batch_in_epoch"], list(payload["history"]))


@dataclass
class _TrainingRun:
    """What the training loop needs, built once by `train` (or rebuilt from a checkpoint)."""

    student: torch.fx.GraphModule
    model: nn.Module  # the student, or its DistributedDataParallel wrapper
    teacher: nn.Module
    optimizer: torch.optim.Optimizer
    state: _State
    fallback: Optional[dict[str, Any]]
    algorithms: dict[str, Any]
    dataset: TrainImages
    epochs: int
    steps_per_epoch: int
    total: int  # steps this invocation runs up to (--max-steps), <= epochs * steps_per_epoch
    started: float


def train(
    teacher: nn.Module,
    model_name: str,
    train_images: ImageSet,
    preprocessing: Preprocessing,
    calibration: LoadedImages,
    recipe: Recipe,
    options: QatOptions,
    evaluation: Optional[tuple[np.ndarray, np.ndarray, Optional[np.ndarray]]] = None,
    dist: Optional[Distributed] = None,
) -> QuantizedModel:
    """Fine-tune the fake-quantized model against the float teacher; return it ready to export.

    `evaluation` = (images, float logits, labels) scored after every epoch (on the main process).
    """
    dist = dist or Distributed()
    _check_labels(train_images, recipe)
    torch.manual_seed(recipe.qat.seed)
    run = _start_run(teacher, model_name, train_images, preprocessing, calibration, recipe, options, dist)
    ckpt = Path(options.checkpoint_dir) / "last.pt"
    while run.state.step < run.total and run.state.epoch < run.epochs:
        running = _train_epoch(run, recipe, options, dist, ckpt, model_name)
        _end_epoch(run, running, evaluation, recipe, dist, ckpt, model_name)
    student = _finish(run.student, dist)
    return QuantizedModel(student, recipe, _qat_info(run, train_images, calibration, recipe, dist, ckpt),
                          build_quantizer(recipe.quantization, "fixed"))


def _check_labels(train_images: ImageSet, recipe: Recipe) -> None:
    """A label cross-entropy term needs labelled images: say so before any model is built."""
    if recipe.qat.distillation.alpha < 1.0 and not train_images.labelled:
        raise UserError(f"recipe {recipe.name}: qat.distillation.alpha < 1 mixes in label cross-entropy, but "
                        f"{train_images.source} has no class sub-folders: set alpha: 1.0 or give an ImageFolder")


def _start_run(teacher: nn.Module, model_name: str, train_images: ImageSet, preprocessing: Preprocessing,
               calibration: LoadedImages, recipe: Recipe, options: QatOptions, dist: Distributed) -> _TrainingRun:
    """Calibrated student (fallback applied), frozen teacher, optimizer, and the state to start or resume from."""
    started = time.perf_counter()
    device = dist.device
    saved = read_checkpoint(options.resume, model_name) if options.resume is not None else None  # fail fast
    start_model, algorithms = _start_model(teacher, calibration, recipe, dist)
    student = build_student(start_model, recipe, torch.from_numpy(calibration.x[:2])).to(device)
    teacher = _frozen(teacher, device)
    calibrate(student, calibration, recipe.quantization.calibration.batch_size, device)
    student, fallback = _recipe_fallback(student, start_model, calibration, recipe.quantization, saved, dist)
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
    return _TrainingRun(student, model, teacher, optimizer, state, fallback, algorithms, dataset, epochs, steps_per_epoch,
                total, started)


def _start_model(teacher: nn.Module, calibration: LoadedImages, recipe: Recipe,
                 dist: Distributed) -> tuple[nn.Module, dict[str, Any]]:
    """The float model QAT starts from: the recipe's equalization applies (a float-model rewrite); the other
    PTQ steps (AdaRound, bias correction, range learning) edit a calibrated graph that QAT trains anyway."""
    from .ptq import transform_float_model

    q = recipe.quantization
    start_model, algorithms = transform_float_model(teacher, calibration.x, q)
    skipped = [name for name, on in (("adaround", q.adaround.enabled), ("bias_correction", q.bias_correction.enabled),
                                     ("range_learning", q.range_learning.steps > 0)) if on]
    if skipped:
        _log(dist, f"note: qat ignores the recipe's PTQ-only steps: {', '.join(skipped)} (training replaces them)")
    return start_model, algorithms


def _frozen(teacher: nn.Module, device: torch.device) -> nn.Module:
    teacher = copy.deepcopy(teacher).eval().to(device)
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def _recipe_fallback(student: torch.fx.GraphModule, start_model: nn.Module, calibration: LoadedImages,
                     q: Quantization, saved: Optional[dict[str, Any]],
                     dist: Distributed) -> tuple[torch.fx.GraphModule, Optional[dict[str, Any]]]:
    """The recipe's fallback, chosen on the calibrated student; a resumed run removes the checkpoint's sites
    rather than choosing again (its state_dict has no quantizers there)."""
    if q.fallback.max_layers <= 0:
        return student, None
    fallback = saved.get("fallback") if saved else None
    if fallback is not None:
        return remove_sites(student, fallback["sites"]).to(dist.device), fallback
    student, fallback = _float_fallback(student, start_model, calibration, q)
    _log(dist, fallback_line(fallback))
    return student, fallback


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


def _end_epoch(run: _TrainingRun, running: Optional[float],
               evaluation: Optional[tuple[np.ndarray, np.ndarray, Optional[np.ndarray]]], recipe: Recipe,
               dist: Distributed, ckpt: Path, model_name: str) -> None:
    """Record the epoch (or the part of it this run did), evaluate and checkpoint on the main process."""
    state = run.state
    epoch_done = state.batch_in_epoch >= run.steps_per_epoch
    record: dict[str, Any] = {"epoch": state.epoch + 1, "step": state.step, "loss": float(running or 0.0),
                              "seconds": round(time.perf_counter() - run.started, 1)}
    if dist.main and evaluation is not None:
        x_eval, ref, labels_eval = evaluation
        record |= {"eval": agreement(run.student, x_eval, ref, labels_eval, dist.device)}
    if epoch_done:
        state.epoch, state.batch_in_epoch = state.epoch + 1, 0
    state.history.append(record)
    if dist.main:
        save_checkpoint(ckpt, run.student, run.optimizer, state, model_name, recipe, run.fallback)
        _log(dist, _epoch_line(record, run.epochs))


def _finish(student: torch.fx.GraphModule, dist: Distributed) -> torch.fx.GraphModule:
    """The trained student on the CPU, BN and observers frozen, ready for convert_pt2e and every exporter."""
    if dist.enabled:
        import torch.distributed as tdist

        tdist.barrier()
    student = student.cpu()
    set_batchnorm_training(student, False)
    set_observers(student, False)
    _drop_batchnorm_counters(student)
    return student


def _qat_info(run: _TrainingRun, train_images: ImageSet, calibration: LoadedImages, recipe: Recipe, dist: Distributed,
              ckpt: Path) -> dict[str, Any]:
    """The manifest's `quantization` section for a QAT model."""
    q = recipe.quantization
    return {
        "method": "qat",
        "source": f"{train_images.source} ({len(run.dataset)} train images), ranges initialised on "
                  f"{len(calibration)} calibration images",
        "images": len(run.dataset),
        "weights": f"int{q.weights.bits} {q.weights.granularity} symmetric",
        "activations": f"int{q.activations.bits} per_tensor affine, {q.activations.observer} observer init"
                       + (", learned ranges (LSQ)" if recipe.qat.range_learning else ""),
        **({"algorithms": run.algorithms} if run.algorithms else {}),
        **({"fallback": run.fallback} if run.fallback else {}),
        "qat": {"epochs": run.epochs, "steps": run.state.step, "processes": dist.world_size,
                "device": str(dist.device), "history": run.state.history, "checkpoint": str(ckpt)},
        "seconds": round(time.perf_counter() - run.started, 2),
    }


def _float_fallback(student: torch.fx.GraphModule, float_model: nn.Module, calibration: LoadedImages,
                    q: Quantization) -> tuple[torch.fx.GraphModule, dict[str, Any]]:
    """The recipe's fallback, chosen on the calibrated student exactly as PTQ chooses it; QAT keeps the sites
    float (an int16 fake-quantizer would need its own learned range), so `precision: int16` trains as float."""
    from ..verify.fidelity import torch_logits

    x = calibration.x[:q.fallback.images]
    device = next(student.parameters()).device
    chosen = choose_fallback(student, x, torch_logits(copy.deepcopy(float_model).cpu(), x),
                             q.fallback.target_agreement, q.fallback.max_layers)
    info = fallback_record(chosen, q.fallback.target_agreement, len(x), "float",
                           "float (QAT trains the fallback sites float)")
    return remove_sites(student, chosen["float_sites"]).to(device), info


def _drop_batchnorm_counters(student: torch.fx.GraphModule) -> None:
    """Remove the `num_batches_tracked += 1` updates a train-mode export leaves behind.

    Frozen BatchNorm never reads them, but a graph that mutates buffers is a stateful model to converters
    (coremltools then demands iOS18 `State` inputs).
    """
    for node in list(student.graph.nodes):
        if (node.op == "call_function" and node.target == torch.ops.aten.add_.Tensor and not node.users
                and getattr(node.args[0], "op", None) == "get_attr"
                and str(node.args[0].target).endswith("num_batches_tracked")):
            student.graph.erase_node(node)
    student.graph.eliminate_dead_code()
    student.recompile()


def _apply_phase(student: torch.fx.GraphModule, qat: Qat, step: int) -> None:
    """Switch BN and observers at the recipe's step boundaries (also right after a resume)."""
    phase = (step < qat.freeze_bn_after, step < qat.freeze_observers_after)
    if getattr(student, "_mnv4_phase", None) == phase:
        return
    set_batchnorm_training(student, phase[0])
    set_observers(student, phase[1])
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
    line = f"epoch {record['epoch']}/{epochs}: step {record['step']}, loss {record['loss']:.4g}"
    if "eval" in record:
        ev = record["eval"]
        line += f", val agreement with float {100 * ev['top1_agreement']:.2f}% ({ev['images']} images)"
        if "top1" in ev:
            line += f", top-1 {100 * ev['top1']:.2f}% (float {100 * ev['float_top1']:.2f}%)"
    return line + f", {record['seconds']:.0f} s"


def _log(dist: Distributed, msg: str) -> None:
    """Progress from the main process only (every DDP rank runs the same code)."""
    if dist.main:
        logger.info(msg)


def without(images: ImageSet, held_back: ImageSet) -> ImageSet:
    """The train images minus the ones the pipeline holds back for verification."""
    held = set(held_back.paths)
    return images.subset([i for i, p in enumerate(images.paths) if p not in held])
