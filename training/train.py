"""``python -m training train DATA --out DIR``: the paper's recipe (§5), resumable, on 1–2 devices per
process and any number of processes (torchrun + DistributedDataParallel).

Read top to bottom: hyper-parameters and options → ``train`` (set up a ``Run``, then per epoch
``train_one_epoch`` and ``end_of_epoch``, then the final 10-patch evaluation) → the set-up in detail.
Beside this file: the resume state (state.py), the learning-rate schedule (schedule.py), processes and
devices (devices.py), the host→GPU path (feed.py), the loader (loader.py), augmentation (augment.py).

Determinism. Every random draw is a function of (seed, epoch, step[, rank, device]): the data order of
(seed, epoch), the augmentation of a global batch of (seed, epoch, step), dropout of
(seed, rank, epoch, step, device). So the position in the run *is* the random state: resuming from a
state file continues exactly on the CPU (on GPUs, cuDNN's backward is not deterministic unless
``--deterministic``), and one process with batch B trains on the same images, crops and flips as N
processes with B/N each (dropout masks differ between the two, being per process).

Files in DIR (only rank 0 writes, each file atomically):
    state.safetensors  everything needed to continue: weights, momentum, schedule, position, metrics
    last.safetensors   servable checkpoint (model package format) after every epoch
    best.safetensors   the same, for the epoch with the lowest centre-crop validation top-1 error
    metrics.jsonl      one JSON line per epoch
    curves.png         its plot (losses, errors, learning-rate drops), when matplotlib is installed
    filters.png        conv1's kernels after the epoch, tower 0 above tower 1 (the paper's Fig. 3)
    summary.json       at the end: best.safetensors evaluated with the centre crop and 10 patches
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import sys
import time
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as torch_distributed
import torch.nn.functional as F

from model import AlexNet, Checkpoint, Preprocessing, Preprocessor, file_identity, load_checkpoint
from model.files import atomic_write, remove_stale_temporaries
from model.network import BIAS_ONE_LAYERS

from .augment import TrainAugmentation
from .data import PreparedDataset, ShardedBatches, derive_seed, epoch_order
from .devices import (
    Distributed,
    autocast_for,
    backend_settings,
    check_compiler,
    init_distributed,
    resolve_devices,
    seed_dropout,
    select_device,
)
from .directory_lock import DirectoryLock
from .errors import TrainingError
from .evaluate import evaluate, format_results
from .feed import DeviceFeed
from .hyperparameters import Hyperparameters, check, resolve
from .loader import BatchLoader
from .plot import write_curves, write_filters
from .progress import AtMostEvery, Progress, format_duration
from .schedule import CHANCE_MARGIN, PlateauSchedule
from .state import read_state, restore_state, save_state
from .update_rule import PaperSGD

# 1. Options (how to run; the hyperparameters, what the run is, are in hyperparameters.py).


@dataclass
class Options:
    """How to run (may change between a run and its resumption)."""

    data: str
    out: str
    devices: str | None = None
    workers: int | None = None  # loader threads (raw store) or processes (JPEG store); None: see default_workers
    ten_crop: bool = False
    resume: bool = False
    save_every: int = 0  # also save the resume state every N steps within an epoch
    eval_batch_size: int = 128
    show_progress: bool = True
    log_every: int = 20  # steps between reads of the loss (each waits for the device) and divergence checks
    tf32: bool = True  # CUDA only (devices.backend_settings)
    cudnn_benchmark: bool = True  # CUDA only
    deterministic: bool = False
    compile: bool = False  # torch.compile each tower's segments
    dist_timeout: float = 1800.0  # seconds a collective waits for the slowest rank


@dataclass
class Hooks:
    """Test instrumentation, kept out of the loop's logic: ``loss(loss, epoch, step)`` may replace a
    step's loss (e.g. with NaN on one rank); ``after_step(steps_run)`` runs after every step (e.g. to
    SIGKILL the process)."""

    loss: Callable[[torch.Tensor, int, int], torch.Tensor] | None = None
    after_step: Callable[[int], None] | None = None


class RunDiverged(TrainingError):
    """A non-finite loss on some rank; every rank raises it at the same step, rank 0 says so."""

    rank_zero_only = True


# 2. The run, top to bottom.


def train(given: dict, options: Options, hooks: Hooks | None = None) -> dict:
    """Train (or continue) a run; return the final summary. ``given``: hyper-parameters from the command line."""
    with contextlib.ExitStack() as cleanup:  # the lock, the loader, the process group: released on any exit
        run = start_run(given, options, hooks or Hooks(), cleanup)
        for epoch in range(run.start_epoch, run.hp.epochs):
            totals, seconds = train_one_epoch(run, epoch)
            end_of_epoch(run, epoch, totals, seconds)
        return final_evaluation(run)


@dataclass
class Run:
    """Everything an epoch needs, built once by ``start_run``."""

    hp: Hyperparameters
    options: Options
    hooks: Hooks
    dist: Distributed
    devices: tuple[torch.device, torch.device]
    out: Path
    data: PreparedDataset
    batches: ShardedBatches
    model: AlexNet
    train_model: torch.nn.Module  # the model, or its DDP wrapper
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None
    schedule: PlateauSchedule
    autocast: Callable
    loader: BatchLoader
    feed: DeviceFeed
    draws: TrainAugmentation  # draws each global batch's augmentation parameters (on the CPU)
    preprocessing: Preprocessing
    record: dict  # the training settings written into every checkpoint
    start_epoch: int = 0
    start_step: int = 0
    running: dict | None = None  # the sums of an epoch interrupted after start_step steps
    history: list = field(default_factory=list)
    best: dict = field(default_factory=lambda: {"epoch": None, "val_top1_error": math.inf})
    steps_run: int = 0
    curves_notes: set = field(default_factory=set)
    pictures: AtMostEvery = field(default_factory=lambda: AtMostEvery(PICTURES_EVERY_SECONDS))

    @property
    def is_writer(self) -> bool:
        return self.dist.rank == 0

    @property
    def state_path(self) -> Path:
        return self.out / "state.safetensors"

    def log(self, message: str) -> None:
        if self.is_writer:
            print(message, file=sys.stderr, flush=True)


def train_one_epoch(run: Run, epoch: int) -> tuple[list[float], float]:
    """One pass over the training split; returns the sums over all ranks (loss, wrong, images, non-finite
    steps) and the seconds it took."""
    hp, batches, options = run.hp, run.batches, run.options
    run.train_model.train()
    for group in run.optimizer.param_groups:
        group["lr"] = run.schedule.lr
    order = epoch_order(batches.dataset_size, hp.seed, epoch)
    first_step = run.start_step if epoch == run.start_epoch else 0
    totals, seconds_before = _epoch_totals(run, first_step)  # kept on the device: no wait per step
    started = time.perf_counter()
    bar = Progress(batches.steps_per_epoch * hp.batch_size, f"epoch {epoch + 1}/{hp.epochs}",
                   enabled=run.is_writer and options.show_progress)
    bar.done = first_step * hp.batch_size
    steps = ((step, batches.local_indices(order, step)) for step in range(first_step, batches.steps_per_epoch))

    for batch in run.loader.batches(steps):
        step = batch.key
        params = run.draws.draw(hp.batch_size, hp.seed, epoch, step)[batches.local_slice()]
        x, labels = run.feed(batch, params)

        loss, logits = train_step(run, x, labels, epoch, step)
        with torch.no_grad():
            totals[0] += loss.detach().double() * len(labels)
            totals[1] += (logits.argmax(1) != labels).sum()
            totals[2] += len(labels)
            totals[3] += ~torch.isfinite(loss.detach())
        bar.update(hp.batch_size)
        run.steps_run += 1
        if run.hooks.after_step is not None:
            run.hooks.after_step(run.steps_run)
        done = step + 1
        if done % options.log_every == 0:  # the only waits for the devices, every log_every steps
            summed = _checked_sums(run, totals, epoch, step)
            bar.figures.update(loss=f"{summed[0] / summed[2]:.4f}", lr=f"{run.schedule.lr:g}")
        if options.save_every and done % options.save_every == 0 and done < batches.steps_per_epoch:
            summed = _checked_sums(run, totals, epoch, step)
            if run.is_writer:
                seconds = seconds_before + time.perf_counter() - started
                save_state(run.state_path, run.model, run.optimizer, run.scaler,
                           state_info(run, epoch, done, {"totals": summed, "seconds": seconds}))
    run.feed.close()
    bar.close()
    summed = _checked_sums(run, totals, epoch, batches.steps_per_epoch)
    return summed, seconds_before + time.perf_counter() - started


def train_step(run: Run, x, labels: torch.Tensor, epoch: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward, backward, SGD update; returns the loss and the logits (nothing here waits for a device,
    except fp16's gradient scaler, which reads whether the gradients overflowed)."""
    seed_dropout(run.hp.seed, run.dist.rank, epoch, step, run.devices)
    with run.autocast():
        logits = run.train_model(x)
    loss = F.cross_entropy(logits.float(), labels)
    if run.hooks.loss is not None:
        loss = run.hooks.loss(loss, epoch, step)
    run.optimizer.zero_grad(set_to_none=True)
    if run.scaler is not None:
        run.scaler.scale(loss).backward()
        run.scaler.step(run.optimizer)
        run.scaler.update()
    else:
        loss.backward()
        run.optimizer.step()
    return loss, logits


# curves.png and filters.png are redrawn after an epoch only this long after the last drawing (and always after
# the last epoch): on a tiny run, drawing them after every epoch took as long as the epoch itself.
PICTURES_EVERY_SECONDS = 10.0


def end_of_epoch(run: Run, epoch: int, totals: list[float], train_seconds: float) -> None:
    """Evaluate, adjust the learning rate, write the checkpoints, the pictures, the state and the metrics."""
    trained = time.perf_counter()
    loss_sum, train_wrong, train_images, _ = totals
    train_loss = loss_sum / train_images
    val = _evaluate(run, run.model, Preprocessor(run.preprocessing, run.data.stats.mean_image),
                    ("center", "ten") if run.options.ten_crop else ("center",))
    lr_used = run.schedule.lr
    dropped = run.schedule.step(val["center"]["top1_error"], epoch + 1, train_loss)
    improved = val["center"]["top1_error"] < run.best["val_top1_error"]
    if improved:
        run.best = {"epoch": epoch + 1, "val_top1_error": val["center"]["top1_error"]}
    metrics = {
        "epoch": epoch + 1,
        "lr": lr_used,
        "train_loss": train_loss,
        "train_top1_error": train_wrong / train_images,
        "val_loss": val["center"]["loss"],
        "val_top1_error": val["center"]["top1_error"],
        "val_top5_error": val["center"]["top5_error"],
        **(
            {f"val_ten_crop_{k}": val["ten"][k] for k in ("loss", "top1_error", "top5_error")}
            if "ten" in val
            else {}
        ),
        "images_per_second": train_images / train_seconds if train_seconds > 0 else None,
        "seconds": train_seconds,
        "best": improved,
        "lr_dropped_after": dropped,
    }
    run.history.append(metrics)
    if run.is_writer:
        artifact = checkpoint_of(run, epoch + 1, val)
        artifact.save(run.out / "last.safetensors")
        if improved:
            artifact.save(run.out / "best.safetensors")
        if run.pictures.due(force=epoch + 1 == run.hp.epochs):
            for note in (write_curves(run.out, run.history), write_filters(run.out, artifact)):
                if note is not None and note not in run.curves_notes:  # never raised: pictures never stop training
                    run.curves_notes.add(note)  # said once per run, not every epoch
                    run.log(note)
    # The epoch's whole length: training, evaluation, checkpoints and pictures (the state and metrics are
    # written after it, being where it is recorded).
    metrics["wall_seconds"] = train_seconds + time.perf_counter() - trained
    if not run.is_writer:
        return
    save_state(run.state_path, run.model, run.optimizer, run.scaler, state_info(run, epoch + 1, 0, None))
    atomic_write(run.out / "metrics.jsonl", "".join(json.dumps(m) + "\n" for m in run.history).encode())
    run.log(
        f"epoch {epoch + 1}/{run.hp.epochs}: train loss {metrics['train_loss']:.4f}, "
        f"val loss {metrics['val_loss']:.4f}, val top-1 error {metrics['val_top1_error']:.2%}, "
        f"top-5 error {metrics['val_top5_error']:.2%}, lr {lr_used:g}, {metrics['images_per_second']:,.1f} img/s"
        + (f" — lr now {run.schedule.lr:g}" if dropped else "")
        + (" (best so far)" if improved else "")
        + ("" if run.schedule.left_chance else flat_start_note(len(run.data.classes), run.hp.init, train_loss))
    )


def flat_start_note(classes: int, init: str, train_loss: float) -> str:
    """What the per-epoch line adds while the training loss has not yet left chance (schedule.at_chance),
    so that no one stops a healthy run during the paper's flat start."""
    where = "still at" if train_loss < math.log(classes) * (1 + CHANCE_MARGIN) else "not yet below"
    whose = "Caffe's init (biases 0.1) can start" if init == "caffe" else "the paper's init (biases 1) starts"
    return (
        f" — loss {where} chance (ln {classes} = {math.log(classes):.2f}): {whose} flat, usually for a few "
        "hundred steps (~370 on Imagenette at --width 0.5); let the run go on"
    )


def final_evaluation(run: Run) -> dict:
    """Evaluate best.safetensors with the centre crop and 10 patches, record it in the file, print a summary."""
    out, history, best = run.out, run.history, run.best
    summary_path = out / "summary.json"
    if run.dist.world > 1:
        torch_distributed.barrier()  # rank 0 has written best.safetensors
    summary = None
    if summary_path.exists():
        summary = json.loads(summary_path.read_text())
        if summary.get("epochs") != len(history) or summary.get("best_epoch") != best["epoch"]:
            summary = None  # the run went on since
    if summary is None:
        best_checkpoint = load_checkpoint(out / "best.safetensors")
        net = best_checkpoint.build(run.devices)
        val = _evaluate(run, net, best_checkpoint.preprocessor(), ("center", "ten"))
        summary = {
            "epochs": len(history),
            "best_epoch": best["epoch"],
            "best_checkpoint": str(out / "best.safetensors"),
            "last_checkpoint": str(out / "last.safetensors"),
            "val": val,
            "lr_drops": sum(1 for m in history if m["lr_dropped_after"]),
            "train_seconds": sum(m["seconds"] for m in history),
            "wall_seconds": sum(m.get("wall_seconds", m["seconds"]) for m in history),
            "hyperparameters": dataclasses.asdict(run.hp),
        }
        if run.is_writer:
            best_checkpoint.provenance.update(
                val_ten_crop_top1_error=val["ten"]["top1_error"], val_ten_crop_top5_error=val["ten"]["top5_error"]
            )
            best_checkpoint.save(out / "best.safetensors")
            atomic_write(summary_path, (json.dumps(summary, indent=1) + "\n").encode())
    run.log(format_results(summary["val"], f"best epoch {summary['best_epoch']} of {summary['epochs']} "
                                          f"({out / 'best.safetensors'}):"))
    run.log(summary_line(summary))
    return summary


def summary_line(summary: dict) -> str:
    """The run's last line: its true length, with the training steps' share (on a tiny run, evaluating and
    writing files take most of it)."""
    wall = summary.get("wall_seconds", summary["train_seconds"])  # (a summary.json from before wall_seconds)
    epochs = summary["epochs"]
    return (
        f"trained {epochs} epoch{'s' if epochs != 1 else ''} in {format_duration(wall)} (training steps "
        f"{format_duration(summary['train_seconds'])}; the rest evaluation, checkpoints and pictures), "
        f"{summary['lr_drops']} lr drop{'s' if summary['lr_drops'] != 1 else ''}"
    )


# 3. Set-up: resume state, data, processes, model, optimizer, loader; everything held is released by `cleanup`.


def start_run(given: dict, options: Options, hooks: Hooks, cleanup: contextlib.ExitStack) -> Run:
    dist = Distributed.from_environment()
    out = Path(options.out)
    state_path = out / "state.safetensors"
    state_on_disk = file_identity(state_path)  # to notice another job writing DIR meanwhile
    saved_info, saved_tensors = _saved_state(out, options.resume)
    hp = resolve(given, saved_info["hyperparameters"] if saved_info else None)
    check(hp)
    devices = resolve_devices(options.devices, dist)

    # Data.
    data = PreparedDataset(options.data)
    train_split, val_split = data.split("train"), data.split("val")
    if saved_info and saved_info["dataset_fingerprint"] != data.fingerprint:
        raise TrainingError(
            f"--resume: {options.data} is not the dataset this run was trained on ({saved_info['dataset']})"
        )
    batches = ShardedBatches(len(train_split), hp.batch_size, hp.seed, dist.rank, dist.world)
    select_device(devices)  # before anything opens a CUDA context
    # The loader's worker processes are forked here, before the process group, the model and the compiler
    # exist (the loader forks them before it pins its buffers).
    workers = default_workers(train_split, dist) if options.workers is None else options.workers
    loader = cleanup.enter_context(
        BatchLoader(train_split, workers, batches.local_batch, pin_memory=devices[0].type == "cuda")
    )
    if options.compile:
        check_compiler(devices[0])

    # Numerics and processes.
    cleanup.enter_context(
        backend_settings(tf32=options.tf32, cudnn_benchmark=options.cudnn_benchmark, deterministic=options.deterministic)
    )
    init_distributed(dist, devices, options.dist_timeout)
    if dist.world > 1:
        cleanup.callback(torch_distributed.destroy_process_group)

    # Model and optimizer.
    torch.manual_seed(derive_seed(hp.seed, "init"))
    model = AlexNet(
        len(data.classes), width=hp.width, dropout=hp.dropout, conv1_padding=hp.conv1_padding, devices=devices
    )
    initialise_(model, hp.init)
    if hp.channels_last:
        model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(model, hp)
    schedule = PlateauSchedule(hp.lr, hp.patience, hp.max_lr_drops, hp.lr_drop_factor,
                               hp.min_improvement, hp.plateau_start, classes=len(data.classes))
    scaler = torch.amp.GradScaler(devices[0].type) if hp.amp == "fp16" else None

    stats = data.stats
    crop = model.config.input_size
    record = _training_record(hp, options, dist, devices, batches, getattr(train_split, "store", "raw"))
    run = Run(
        hp=hp, options=options, hooks=hooks, dist=dist, devices=devices, out=out, data=data, batches=batches,
        model=model, train_model=model, optimizer=optimizer, scaler=scaler, schedule=schedule,
        autocast=autocast_for(hp.amp, devices[0]), loader=loader,
        feed=DeviceFeed(stats, crop, hp.lighting_std, devices, channels_last=hp.channels_last),
        draws=TrainAugmentation(stats, crop=crop, alpha_std=hp.lighting_std),
        preprocessing=Preprocessing(mean="image", crop=crop), record=record,
    )
    if saved_info:
        restore_state(saved_info, saved_tensors, model, optimizer, scaler)
        schedule.load_state_dict(saved_info["schedule"])
        run.start_epoch, run.start_step = saved_info["epoch"], saved_info["step"]
        run.history, run.best, run.running = saved_info["metrics"], saved_info["best"], saved_info.get("running")
        run.log(f"resuming {out} at epoch {run.start_epoch + 1}, step {run.start_step} (lr {schedule.lr:g})")
    del saved_tensors

    if options.compile:
        compile_towers(model)
    if dist.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        # device_ids stays unset: the module spans two devices (one per tower).
        run.train_model = DistributedDataParallel(model)

    if run.is_writer:
        lock = DirectoryLock(out, "training run")  # creates DIR; held until the end
        cleanup.callback(lock.release)
        if file_identity(state_path) != state_on_disk:
            raise TrainingError(f"{state_path} changed while this run was starting: is another run using {out}?")
        for leftover in remove_stale_temporaries(out):
            run.log(f"removed {leftover.name}, left by an interrupted write")
        run.log(
            f"training AlexNet(width={hp.width:g}, {len(data.classes)} classes) on {data.name}: "
            f"{len(train_split):,} train / {len(val_split):,} val images ({record['store']} store, {workers} "
            f"loader workers), towers on {devices[0]} + {devices[1]}, {dist.world} process(es), "
            f"batch {hp.batch_size}, lr {schedule.lr:g}, epochs {run.start_epoch + 1}..{hp.epochs}"
        )
    return run


def _training_record(hp: Hyperparameters, options: Options, dist, devices, batches, store: str) -> dict:
    """The training settings every checkpoint carries."""
    return {
        **dataclasses.asdict(hp),
        "devices": [str(d) for d in devices],
        "processes": dist.world,
        "steps_per_epoch": batches.steps_per_epoch,
        "optimizer": "SGD",
        "update_rule_formula": UPDATE_RULE_RECORD[hp.update_rule],
        "initial_biases": f"{initial_bias(hp.init):g} in {', '.join(BIAS_ONE_LAYERS)}; 0 elsewhere"
        + (" (Caffe's bvlc_alexnet; the paper's is 1)" if hp.init == "caffe" else " (paper §5)"),
        "weight_decay_on": "weights and biases" if hp.decay_biases else "weights (biases undecayed)",
        "lighting": "paper PCA, λ for [0,1] pixels",
        "store": store,
        **({"tf32": options.tf32, "compile": options.compile} if devices[0].type == "cuda" else {}),
        "deterministic": options.deterministic,
    }


UPDATE_RULE_RECORD = {
    "paper": "paper §5: v ← momentum·v − weight_decay·lr·w − lr·∇L, w ← w + v",
    "pytorch": "torch.optim.SGD: b ← momentum·b + weight_decay·w + ∇L, w ← w − lr·b",
}


def _saved_state(out: Path, resume: bool) -> tuple[dict | None, dict | None]:
    """The resume state when resuming (read by every process: on several machines DIR must be on a
    shared filesystem); a refusal when DIR already holds a run and this is not a resume."""
    state_path = out / "state.safetensors"
    if resume:
        if not state_path.exists():
            raise TrainingError(f"--resume: {out} holds no resume state ({state_path.name}); nothing to continue")
        return read_state(state_path)
    if state_path.exists():
        raise TrainingError(
            f"{out} already holds a run ({state_path.name}); pass --resume to continue it, or use another --out"
        )
    return None, None


def make_optimizer(model: torch.nn.Module, hp: Hyperparameters) -> torch.optim.Optimizer:
    """SGD by ``hp.update_rule`` (update_rule.py: the paper's, or torch.optim.SGD) with two parameter
    groups: weights decayed by ``weight_decay``; biases too only with ``decay_biases`` (the paper's update
    rule decays w; cuda-convnet's ``wc`` and Caffe's ``decay_mult: 0`` leave biases undecayed, and so do
    we by default)."""
    weights = [p for name, p in model.named_parameters() if not name.endswith("bias")]
    biases = [p for name, p in model.named_parameters() if name.endswith("bias")]
    groups = [
        {"params": weights, "weight_decay": hp.weight_decay},
        {"params": biases, "weight_decay": hp.weight_decay if hp.decay_biases else 0.0},
    ]
    if hp.update_rule == "pytorch":
        return torch.optim.SGD(groups, lr=hp.lr, momentum=hp.momentum)
    return PaperSGD(groups, lr=hp.lr, momentum=hp.momentum)


CAFFE_BIAS = 0.1  # Caffe's bvlc_alexnet: "initializing non-zero biases to 0.1 instead of 1 ... 1 gave flat loss"


def initial_bias(init: str) -> float:
    """The starting bias of conv2, conv4, conv5, fc6 and fc7 under ``init``."""
    return CAFFE_BIAS if init == "caffe" else 1.0


def initialise_(model: AlexNet, init: str) -> None:
    """Turn the paper's initialisation (AlexNet's own) into ``init``'s."""
    if init in ("width-scaled", "caffe"):
        scale_init_to_width_(model)
    if init == "caffe":
        start_biases_at_caffe_value_(model)


@torch.no_grad()
def start_biases_at_caffe_value_(model: AlexNet) -> None:
    """The biases the paper starts at 1 (conv2, conv4, conv5, fc6, fc7) start at 0.1, as Caffe's
    bvlc_alexnet did: with 1, the loss sits at chance for a while before anything is learned."""
    for tower in model.towers:
        for name, layer in tower.layers().items():
            if name in BIAS_ONE_LAYERS:
                layer.bias.fill_(CAFFE_BIAS)


@torch.no_grad()
def scale_init_to_width_(model: AlexNet) -> None:
    """Multiply the initial weights of conv2 … fc8 by 1/√width (conv1 reads the image: its fan-in is fixed).

    The paper's N(0, 0.01²) was chosen for the full-width net. A layer's fan-in shrinks with ``--width``,
    and with it the image-dependent part of every activation, while the biases of 1 stay: at width 1/8
    the logits vary across images by ~1e-5 (~1e-2 at full width) and SGD finds nothing to follow. This
    scaling gives each unit the paper net's activation scale. At width 1 it changes nothing.
    """
    factor = 1.0 / math.sqrt(model.config.width)
    for tower in model.towers:
        for name, layer in tower.layers().items():
            if name != "conv1":
                layer.weight.mul_(factor)


def compile_towers(model: AlexNet) -> None:
    """torch.compile each tower's stretches between exchanges (``Tower.run``: each runs on one device, so
    each graph does): it fuses LRN's ~20 elementwise passes, memory-bound on a GPU, into a few kernels.

    Every (tower, stretch) is compiled from a code object of its own. Dynamo keeps its graphs per code
    object, at most ``recompile_limit`` (8) of them: through one shared ``run``, 2 towers × 4 stretches ×
    (training, evaluation) overflowed it, and every call past the 8th graph ran uncompiled. Alone, a
    stretch needs a graph per mode and per batch size, a handful at most.
    """
    for number, tower in enumerate(model.towers):
        tower.run = _CompiledStretches(tower, number)


class _CompiledStretches:
    """A tower's ``run``, compiled separately for each stretch of steps it is called with."""

    def __init__(self, tower, number: int):
        self.tower, self.number = tower, number
        self.compiled: dict[tuple, Callable] = {}

    def __call__(self, steps, x: torch.Tensor) -> torch.Tensor:
        compiled = self.compiled.get(steps)
        if compiled is None:
            name = f"tower{self.number}_{steps[0][0].name}_to_{steps[-1][0].name}" if steps else f"tower{self.number}"
            compiled = self.compiled[steps] = torch.compile(_own_code(type(self.tower).run, name).__get__(self.tower))
        return compiled(steps, x)


def _own_code(function, name: str):
    """``function`` with a code object of its own (named ``name``), so that dynamo caches its graphs apart."""
    code = function.__code__.replace(co_name=name, co_qualname=name)
    return types.FunctionType(code, function.__globals__, name, function.__defaults__, function.__closure__)


def default_workers(split, dist: Distributed) -> int:
    """Loader workers when --workers is not given: 4 copy threads for the raw store (each batch is a copy
    out of the mapped file); for the JPEG store, decoding processes for every core this process can have
    (the machine's cores shared among the processes on this node), less one for the training loop."""
    if getattr(split, "store", "raw") == "raw":
        return 4
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // dist.local_world - 1)


def checkpoint_of(run: Run, epoch: int, val: dict) -> Checkpoint:
    data, stats = run.data, run.data.stats
    return Checkpoint.from_model(
        run.model,
        classes=data.classes,
        preprocessing=run.preprocessing,
        mean_image=stats.mean_image,
        pca=stats.pca(run.hp.lighting_std),
        provenance={
            "trained": True,
            "epoch": epoch,
            "val_top1_error": val["center"]["top1_error"],
            "val_top5_error": val["center"]["top5_error"],
            "val_loss": val["center"]["loss"],
            **(
                {
                    "val_ten_crop_top1_error": val["ten"]["top1_error"],
                    "val_ten_crop_top5_error": val["ten"]["top5_error"],
                }
                if "ten" in val
                else {}
            ),
            "dataset": data.name,
            "dataset_size": run.batches.dataset_size,
            "dataset_fingerprint": data.fingerprint,
            "source": "python -m training train",
        },
        training={**run.record, "lr_now": run.schedule.lr, "lr_drops": run.schedule.drops},
    )


def state_info(run: Run, epoch: int, step: int, running_totals: dict | None) -> dict:
    return {
        "epoch": epoch,  # epochs completed
        "step": step,  # steps completed within the next epoch
        "running": running_totals,  # the unfinished epoch's sums, when step > 0
        "hyperparameters": dataclasses.asdict(run.hp),
        "schedule": run.schedule.state_dict(),
        "metrics": run.history,
        "best": run.best,
        "dataset": run.data.name,
        "dataset_fingerprint": run.data.fingerprint,
        "classes": [c.wnid for c in run.data.classes],
        "processes": run.dist.world,
    }


def _evaluate(run: Run, net, preprocessor: Preprocessor, crops) -> dict:
    return evaluate(
        net,
        preprocessor,
        run.data.split("val"),
        crops=crops,
        device=run.devices[0],
        batch_size=run.options.eval_batch_size,
        rank=run.dist.rank,
        world=run.dist.world,
        workers=_eval_workers(run),
        autocast=run.autocast,
        show_progress=run.is_writer and run.options.show_progress,
    )


def _eval_workers(run: Run) -> int:
    """As many as training's for a JPEG store (decoding is the work); 2 copy threads suffice for raw."""
    val = run.data.split("val")
    workers = default_workers(val, run.dist) if run.options.workers is None else run.options.workers
    return workers if getattr(val, "store", "raw") != "raw" else min(workers, 2)


def _epoch_totals(run: Run, first_step: int) -> tuple[torch.Tensor, float]:
    """This rank's running sums (loss, wrong, images, non-finite steps) on its device, and the seconds
    already spent, for an epoch that starts at ``first_step``."""
    totals = torch.zeros(4, dtype=torch.float64, device=run.devices[0])
    if first_step and run.running:
        if run.is_writer:  # the saved sums are over all ranks; counted once, on rank 0
            totals += torch.tensor(run.running["totals"], dtype=torch.float64, device=run.devices[0])
        return totals, run.running["seconds"]
    return totals, 0.0


def _checked_sums(run: Run, totals: torch.Tensor, epoch: int, step: int) -> list[float]:
    """The sums over all ranks (one all-reduce); stops every rank alike when any rank saw a non-finite
    loss, so that none is left waiting in a collective for one that stopped."""
    summed = totals.clone()
    if run.dist.world > 1:
        torch_distributed.all_reduce(summed)
    values = summed.tolist()
    if values[3] > 0 or not math.isfinite(values[0]):
        raise RunDiverged(
            f"training diverged: the loss was not finite in {values[3]:.0f} step(s) of epoch {epoch + 1} up to step "
            f"{step}; the files in --out still hold the last good epoch. Start again with a lower --lr."
        )
    return values


