"""A training run's set-up: the resume state, data, processes, model, optimizer and loader (``start_run``).

``Run`` holds everything an epoch needs. Everything held is released by the caller's ``cleanup`` stack.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as torch_distributed

from model import AlexNet, Preprocessing, file_identity
from model.compiling import compile_towers
from model.files import remove_stale_temporaries
from model.network import BIAS_ONE_LAYERS
from model.progress import AtMostEvery

from .augment import DeviceFeed, TrainAugmentation
from .data import PreparedDataset, ShardedBatches, derive_seed
from .devices import (
    Distributed,
    autocast_for,
    backend_settings,
    check_compiler,
    init_distributed,
    resolve_devices,
    select_device,
)
from .directory_lock import DirectoryLock
from .errors import TrainingError
from .hyperparameters import Hyperparameters, check, resolve
from .initialise import initial_bias, initialise_
from .loader import BatchLoader
from .schedule import PlateauSchedule
from .state import read_state, restore_state
from .update_rule import make_optimizer


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


# curves.png and filters.png are redrawn after an epoch only this long after the last drawing (and always after
# the last epoch): on a tiny run, drawing them after every epoch took as long as the epoch itself.
PICTURES_EVERY_SECONDS = 10.0


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
    feed: DeviceFeed  # draws each batch's augmentation and applies it on the towers' devices
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


def start_run(given: dict, options: Options, hooks: Hooks, cleanup: contextlib.ExitStack) -> Run:
    """Set a run up, or resume it from DIR's state."""
    dist = Distributed.from_environment()
    out = Path(options.out)
    state_on_disk = file_identity(out / "state.safetensors")  # to notice another job writing DIR meanwhile
    saved_info, saved_tensors = _saved_state(out, options.resume)
    hp = resolve(given, saved_info["hyperparameters"] if saved_info else None)
    check(hp)
    devices = resolve_devices(options.devices, dist)
    data, batches, loader = _open_data(hp, options, dist, devices, saved_info, cleanup)
    if options.compile:
        check_compiler(devices[0])
    cleanup.enter_context(
        backend_settings(
            tf32=options.tf32, cudnn_benchmark=options.cudnn_benchmark, deterministic=options.deterministic
        )
    )
    init_distributed(dist, devices, options.dist_timeout)
    if dist.world > 1:
        cleanup.callback(torch_distributed.destroy_process_group)
    run = _new_run(hp, options, hooks, dist, devices, out, data, batches, loader)
    if saved_info:
        _continue_from(run, saved_info, saved_tensors)
    del saved_tensors
    if options.compile:
        compile_towers(run.model)
    if dist.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        # device_ids stays unset: the module spans two devices (one per tower).
        run.train_model = DistributedDataParallel(run.model)
    if run.is_writer:
        _take_directory(run, state_on_disk, cleanup)
    return run


def _open_data(hp: Hyperparameters, options: Options, dist: Distributed, devices, saved_info, cleanup):
    """The dataset, its batches for this rank, and the loader (its worker processes forked here)."""
    data = PreparedDataset(options.data)
    train_split = data.split("train")
    if saved_info and saved_info["dataset_fingerprint"] != data.fingerprint:
        raise TrainingError(
            f"--resume: {options.data} is not the dataset this run was trained on ({saved_info['dataset']})"
        )
    batches = ShardedBatches(len(train_split), hp.batch_size, hp.seed, dist.rank, dist.world)
    select_device(devices)  # before anything opens a CUDA context
    # The workers are forked before the process group, the model and the compiler exist.
    # (The loader forks them before it pins its buffers.)
    workers = default_workers(train_split, dist) if options.workers is None else options.workers
    pin_memory = devices[0].type == "cuda"
    loader = cleanup.enter_context(BatchLoader(train_split, workers, batches.local_batch, pin_memory=pin_memory))
    return data, batches, loader


def _new_run(hp: Hyperparameters, options, hooks, dist, devices, out: Path, data, batches, loader) -> Run:
    """The model at its initial weights, its optimizer and schedule, and the input path to the devices."""
    torch.manual_seed(derive_seed(hp.seed, "init"))
    classes = len(data.classes)
    model = AlexNet(classes, width=hp.width, dropout=hp.dropout, conv1_padding=hp.conv1_padding, devices=devices)
    initialise_(model, hp.init)
    if hp.channels_last:
        model.to(memory_format=torch.channels_last)
    schedule = PlateauSchedule(
        hp.lr, hp.patience, hp.max_lr_drops, hp.lr_drop_factor, hp.min_improvement, hp.plateau_start, classes
    )
    crop = model.config.input_size
    augmentation = TrainAugmentation(data.stats, crop=crop, alpha_std=hp.lighting_std)
    store = getattr(data.split("train"), "store", "raw")
    return Run(
        hp=hp,
        options=options,
        hooks=hooks,
        dist=dist,
        devices=devices,
        out=out,
        data=data,
        batches=batches,
        model=model,
        train_model=model,
        optimizer=make_optimizer(model, hp),
        scaler=torch.amp.GradScaler(devices[0].type) if hp.amp == "fp16" else None,
        schedule=schedule,
        autocast=autocast_for(hp.amp, devices[0]),
        loader=loader,
        feed=DeviceFeed(augmentation, devices, channels_last=hp.channels_last),
        preprocessing=Preprocessing(mean="image", crop=crop),
        record=_training_record(hp, options, dist, devices, batches, store),
    )


def _continue_from(run: Run, saved_info: dict, saved_tensors: dict) -> None:
    """Put the saved weights, momentum, schedule and position back."""
    restore_state(saved_info, saved_tensors, run.model, run.optimizer, run.scaler)
    run.schedule.load_state_dict(saved_info["schedule"])
    run.start_epoch, run.start_step = saved_info["epoch"], saved_info["step"]
    run.history, run.best, run.running = saved_info["metrics"], saved_info["best"], saved_info.get("running")
    run.log(f"resuming {run.out} at epoch {run.start_epoch + 1}, step {run.start_step} (lr {run.schedule.lr:g})")


def _take_directory(run: Run, state_on_disk, cleanup: contextlib.ExitStack) -> None:
    """Rank 0 locks DIR for the run's length, clears interrupted writes and says what it trains."""
    out, hp, data = run.out, run.hp, run.data
    lock = DirectoryLock(out, "training run")  # creates DIR; held until the end
    cleanup.callback(lock.release)
    if file_identity(run.state_path) != state_on_disk:
        raise TrainingError(f"{run.state_path} changed while this run was starting: is another run using {out}?")
    for leftover in remove_stale_temporaries(out):
        run.log(f"removed {leftover.name}, left by an interrupted write")
    train_images, val_images = len(data.split("train")), len(data.split("val"))
    run.log(
        f"training AlexNet(width={hp.width:g}, {len(data.classes)} classes) on {data.name}: "
        f"{train_images:,} train / {val_images:,} val images ({run.record['store']} store, {run.loader.workers} "
        f"loader workers), towers on {run.devices[0]} + {run.devices[1]}, {run.dist.world} process(es), "
        f"batch {hp.batch_size}, lr {run.schedule.lr:g}, epochs {run.start_epoch + 1}..{hp.epochs}"
    )


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


def default_workers(split, dist: Distributed) -> int:
    """Loader workers when --workers is not given: 4 copy threads for the raw store (each batch is a copy
    out of the mapped file); for the JPEG store, decoding processes for every core this process can have
    (the machine's cores shared among the processes on this node), less one for the training loop."""
    if getattr(split, "store", "raw") == "raw":
        return 4
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // dist.local_world - 1)
