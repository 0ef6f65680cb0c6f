"""``python -m training train DATA --out DIR``: the paper's recipe (§5), resumable, on 1–2 devices per
process and any number of processes (torchrun + DistributedDataParallel).

Read top to bottom: hyper-parameters → devices and processes → data → model and optimizer → (resume) →
the epoch loop (train, evaluate, adjust the learning rate, write) → the final 10-patch evaluation.

Determinism. Every random draw is a function of (seed, epoch, step[, rank]): the data order of
(seed, epoch), the augmentation of a global batch of (seed, epoch, step), dropout of
(seed, rank, epoch, step). So the position in the run *is* the random state: resuming from a state file
continues exactly, and one process with batch B trains on the same images, crops and flips as N
processes with B/N each (dropout masks differ between the two, being per process).

Files in DIR (only rank 0 writes, each file atomically):
    state.safetensors  everything needed to continue: weights, momentum, schedule, position, metrics
    last.safetensors   servable checkpoint (model package format) after every epoch
    best.safetensors   the same, for the epoch with the lowest centre-crop validation top-1 error
    metrics.jsonl      one JSON line per epoch
    curves.png         its plot (losses, errors, learning-rate drops), when matplotlib is installed
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import safetensors
import safetensors.torch
import torch
import torch.distributed as torch_distributed
import torch.nn.functional as F

from model import AlexNet, Checkpoint, Preprocessing, Preprocessor, atomic_path, atomic_write, load_checkpoint
from model.atomic import remove_stale_temporaries
from model.checkpoint import save_safetensors

from .augment import ALPHA_STD, TrainAugmentation
from .data import DirectoryLock, PreparedDataset, ShardedBatches, TrainingError, derive_seed, epoch_order, prefetch
from .evaluate import evaluate, format_results
from .plot import write_curves
from .progress import Progress, format_duration

STATE_FORMAT = "alexnet-train-state"
STATE_VERSION = 1


# 1. Hyper-parameters: the paper's values are the defaults.


@dataclass
class Hyperparameters:
    epochs: int = 90
    batch_size: int = 128  # global: split over the processes of a multi-process run
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    patience: int = 5  # epochs without a lower val top-1 error before the lr is divided (not in the paper)
    max_lr_drops: int = 3  # the paper divided the lr 3 times
    lr_drop_factor: float = 0.1
    width: float = 1.0  # 1 = the paper's net; smaller for tests and experiments
    dropout: float = 0.5
    conv1_padding: str = "overhang"
    lighting_std: float = ALPHA_STD
    init: str = "width-scaled"  # or "paper"; the same net at width 1 (see scale_init_to_width_)
    seed: int = 0
    amp: str = "off"  # "bf16" or "fp16": autocast; fp16 adds gradient scaling
    channels_last: bool = False


# Changing these in the middle of a run would make it a different run; --resume refuses.
FIXED_ON_RESUME = (
    "batch_size",
    "lr",
    "momentum",
    "weight_decay",
    "lr_drop_factor",
    "width",
    "dropout",
    "conv1_padding",
    "lighting_std",
    "seed",
    "amp",
    "init",
)


@dataclass
class Options:
    """How to run (may change between a run and its resumption)."""

    data: str
    out: str
    devices: str | None = None
    workers: int = 4
    ten_crop: bool = False
    resume: bool = False
    save_every: int = 0  # also save the resume state every N steps within an epoch
    eval_batch_size: int = 128
    show_progress: bool = True


class PlateauSchedule:
    """lr ÷ 10 when the validation error has not improved for ``patience`` epochs, at most ``max_drops``."""

    def __init__(self, lr: float, patience: int, max_drops: int, factor: float):
        self.lr, self.patience, self.max_drops, self.factor = lr, patience, max_drops, factor
        self.best = math.inf
        self.epochs_without_improvement = 0
        self.drops = 0

    def step(self, error: float) -> bool:
        """Record an epoch's validation error; True when the learning rate was just lowered."""
        if error < self.best:
            self.best, self.epochs_without_improvement = error, 0
            return False
        self.epochs_without_improvement += 1
        if self.epochs_without_improvement >= self.patience and self.drops < self.max_drops:
            self.lr *= self.factor
            self.drops += 1
            self.epochs_without_improvement = 0
            return True
        return False

    def state_dict(self) -> dict:
        return {
            "lr": self.lr,
            "best": self.best,
            "epochs_without_improvement": self.epochs_without_improvement,
            "drops": self.drops,
        }

    def load_state_dict(self, state: dict) -> None:
        self.lr, self.best = float(state["lr"]), float(state["best"])
        self.epochs_without_improvement, self.drops = int(state["epochs_without_improvement"]), int(state["drops"])


# 2. Devices and processes.


@dataclass(frozen=True)
class Distributed:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1

    @classmethod
    def from_environment(cls) -> Distributed:
        """torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE; a plain run is rank 0 of 1."""
        env = os.environ
        return cls(
            rank=int(env.get("RANK", 0)),
            world=int(env.get("WORLD_SIZE", 1)),
            local_rank=int(env.get("LOCAL_RANK", 0)),
            local_world=int(env.get("LOCAL_WORLD_SIZE", 1)),
        )


def resolve_devices(spec: str | None, dist: Distributed) -> tuple[torch.device, torch.device]:
    """Where the two towers go. Default: two GPUs per process when there are enough, one GPU for both
    towers when there is one per process, the CPU otherwise."""
    gpus = torch.cuda.device_count()
    if spec is None:
        r = dist.local_rank
        if gpus >= 2 * dist.local_world:
            return torch.device(f"cuda:{2 * r}"), torch.device(f"cuda:{2 * r + 1}")
        if gpus >= dist.local_world:
            return (torch.device(f"cuda:{r}"),) * 2
        return torch.device("cpu"), torch.device("cpu")
    parts = [p.strip() for p in spec.split(",") if p.strip()]
    if len(parts) not in (1, 2):
        raise TrainingError(f"--devices takes one or two devices (one per tower), got {spec!r}")
    try:
        devices = [torch.device(p) for p in parts]
    except RuntimeError as e:
        raise TrainingError(f"--devices {spec!r}: {e}") from None
    for d in devices:
        if d.type == "cuda" and (d.index or 0) >= gpus:
            raise TrainingError(f"--devices {spec!r}: this machine has {gpus} GPU(s)")
        if d.type not in ("cpu", "cuda"):
            raise TrainingError(f"--devices {spec!r}: only cpu and cuda devices are supported")
    if len({d.type for d in devices}) > 1:
        raise TrainingError(f"--devices {spec!r}: put both towers on GPUs or both on the CPU")
    return (devices[0], devices[-1])


def init_distributed(dist: Distributed, devices) -> None:
    if dist.world == 1:
        return
    backend = "nccl" if devices[0].type == "cuda" else "gloo"
    if devices[0].type == "cuda":
        torch.cuda.set_device(devices[0])
    torch_distributed.init_process_group(backend)


def autocast_for(amp: str, device: torch.device):
    if amp == "off":
        return contextlib.nullcontext
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]
    return lambda: torch.autocast(device.type, dtype=dtype)


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


# 3. The resume state: one safetensors file (tensors) with a JSON header (everything else). No pickle.


def save_state(path: Path, model, optimizer, scaler, info: dict) -> None:
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    opt = optimizer.state_dict()
    scalars = {}
    for index, entries in opt["state"].items():
        for key, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"optimizer.{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{index}.{key}"] = value
    info = {**info, "optimizer": {"param_groups": opt["param_groups"], "scalars": scalars}}
    if scaler is not None:
        info["grad_scaler"] = scaler.state_dict()
    meta = {"format": STATE_FORMAT, "format_version": str(STATE_VERSION), "state": json.dumps(info)}
    with atomic_path(path) as tmp:
        save_safetensors(tensors, tmp, meta, destination=path)


def read_state(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    try:
        with safetensors.safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise TrainingError(f"{path}: cannot read the resume state ({e})") from None
    if meta.get("format") != STATE_FORMAT:
        raise TrainingError(f"{path}: not a training state file")
    if meta.get("format_version") != str(STATE_VERSION):
        raise TrainingError(
            f"{path}: state format version {meta.get('format_version')}; this code reads {STATE_VERSION}"
        )
    return json.loads(meta["state"]), tensors


def restore_state(info: dict, tensors: dict, model, optimizer, scaler) -> None:
    model.load_state_dict({k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")})
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        if name.startswith("optimizer."):
            _, index, key = name.split(".", 2)
            state.setdefault(int(index), {})[key] = value
    for name, value in info["optimizer"]["scalars"].items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": info["optimizer"]["param_groups"]})
    if scaler is not None and info.get("grad_scaler"):
        scaler.load_state_dict(info["grad_scaler"])


def resolve_hyperparameters(given: dict, saved: dict | None) -> Hyperparameters:
    """Defaults ← the saved run's values (when resuming) ← flags given on this command line."""
    names = {f.name for f in dataclasses.fields(Hyperparameters)}
    values = dict(saved or {})
    if saved is not None:
        changed = [k for k in FIXED_ON_RESUME if k in given and given[k] != saved.get(k)]
        if changed:
            detail = ", ".join(f"--{k.replace('_', '-')} {given[k]} (run: {saved.get(k)})" for k in changed)
            raise TrainingError(f"--resume: cannot change {detail}; start a new run in another --out directory")
    values.update({k: v for k, v in given.items() if k in names})
    return Hyperparameters(**{k: v for k, v in values.items() if k in names})


def check_hyperparameters(hp: Hyperparameters) -> None:
    problems = []
    if hp.epochs < 1:
        problems.append("--epochs must be at least 1")
    if hp.batch_size < 1:
        problems.append("--batch-size must be at least 1")
    if not hp.lr > 0:
        problems.append("--lr must be positive")
    if not 0 <= hp.momentum < 1:
        problems.append("--momentum must be in [0, 1)")
    if hp.weight_decay < 0:
        problems.append("--weight-decay must be at least 0")
    if hp.patience < 1:
        problems.append("--patience must be at least 1")
    if hp.max_lr_drops < 0:
        problems.append("--max-lr-drops must be at least 0")
    if not hp.width > 0:
        problems.append("--width must be positive")
    if not 0 <= hp.dropout < 1:
        problems.append("--dropout must be in [0, 1)")
    if hp.init not in ("paper", "width-scaled"):
        problems.append("--init must be paper or width-scaled")
    if hp.amp not in ("off", "bf16", "fp16"):
        problems.append("--amp must be off, bf16 or fp16")
    if problems:
        raise TrainingError("; ".join(problems))


# 4. The run.


def train(given: dict, options: Options) -> dict:
    """Train (or continue) a run; return the final summary. ``given``: hyper-parameters from the command line."""
    dist = Distributed.from_environment()
    is_writer = dist.rank == 0
    out = Path(options.out)
    state_path = out / "state.safetensors"

    def log(message: str) -> None:
        if is_writer:
            print(message, file=sys.stderr, flush=True)

    # Resume state (read by every process; on several machines DIR must be on a shared filesystem).
    state_on_disk = _file_identity(state_path)  # to notice another job writing DIR meanwhile
    saved_info, saved_tensors = None, None
    if options.resume:
        if not state_path.exists():
            raise TrainingError(f"--resume: {out} holds no resume state ({state_path.name}); nothing to continue")
        saved_info, saved_tensors = read_state(state_path)
    elif state_path.exists():
        raise TrainingError(
            f"{out} already holds a run ({state_path.name}); pass --resume to continue it, or use another --out"
        )
    hp = resolve_hyperparameters(given, saved_info["hyperparameters"] if saved_info else None)
    check_hyperparameters(hp)

    devices = resolve_devices(options.devices, dist)

    # Data.
    data = PreparedDataset(options.data)
    train_split, val_split = data.split("train"), data.split("val")
    if saved_info and saved_info["dataset_fingerprint"] != data.fingerprint:
        raise TrainingError(
            f"--resume: {options.data} is not the dataset this run was trained on ({saved_info['dataset']})"
        )
    batches = ShardedBatches(len(train_split), hp.batch_size, hp.seed, dist.rank, dist.world)

    # Processes, model, optimizer.
    init_distributed(dist, devices)
    torch.manual_seed(derive_seed(hp.seed, "init"))
    model = AlexNet(
        len(data.classes), width=hp.width, dropout=hp.dropout, conv1_padding=hp.conv1_padding, devices=devices
    )
    if hp.init == "width-scaled":
        scale_init_to_width_(model)
    if hp.channels_last:
        model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay)
    schedule = PlateauSchedule(hp.lr, hp.patience, hp.max_lr_drops, hp.lr_drop_factor)
    scaler = torch.amp.GradScaler(devices[0].type) if hp.amp == "fp16" else None
    autocast = autocast_for(hp.amp, devices[0])

    start_epoch, start_step, history, best, running = 0, 0, [], {"epoch": None, "val_top1_error": math.inf}, None
    if saved_info:
        restore_state(saved_info, saved_tensors, model, optimizer, scaler)
        schedule.load_state_dict(saved_info["schedule"])
        schedule.patience, schedule.max_drops = hp.patience, hp.max_lr_drops  # these may change on resume
        start_epoch, start_step = saved_info["epoch"], saved_info["step"]
        history, best = saved_info["metrics"], saved_info["best"]
        running = saved_info.get("running")
        log(f"resuming {out} at epoch {start_epoch + 1}, step {start_step} (lr {schedule.lr:g})")
    del saved_tensors

    train_model = model
    if dist.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        # device_ids stays unset: the module spans two devices (one per tower).
        train_model = DistributedDataParallel(model)

    stats = data.stats
    augment = TrainAugmentation(stats, crop=model.config.input_size, alpha_std=hp.lighting_std, device=devices[0])
    preprocessing = Preprocessing(mean="image", crop=model.config.input_size)
    preprocessor = Preprocessor(preprocessing, stats.mean_image)
    record = {
        **dataclasses.asdict(hp),
        "devices": [str(d) for d in devices],
        "processes": dist.world,
        "steps_per_epoch": batches.steps_per_epoch,
        "optimizer": "SGD",
        "lighting": "paper PCA, λ for [0,1] pixels",
    }

    def checkpoint(epoch: int, val: dict) -> Checkpoint:
        return Checkpoint.from_model(
            model,
            classes=data.classes,
            preprocessing=preprocessing,
            mean_image=stats.mean_image,
            pca=stats.pca(hp.lighting_std),
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
                "dataset_size": len(train_split),
                "dataset_fingerprint": data.fingerprint,
                "source": "python -m training train",
            },
            training={**record, "lr_now": schedule.lr, "lr_drops": schedule.drops},
        )

    def state_info(epoch: int, step: int, running_totals: dict | None) -> dict:
        return {
            "epoch": epoch,  # epochs completed
            "step": step,  # steps completed within the next epoch
            "running": running_totals,  # the unfinished epoch's sums, when step > 0
            "hyperparameters": dataclasses.asdict(hp),
            "schedule": schedule.state_dict(),
            "metrics": history,
            "best": best,
            "dataset": data.name,
            "dataset_fingerprint": data.fingerprint,
            "classes": [c.wnid for c in data.classes],
            "processes": dist.world,
        }

    def write_metrics() -> None:
        atomic_write(out / "metrics.jsonl", "".join(json.dumps(m) + "\n" for m in history).encode())

    curves_notes: set[str] = set()

    def draw_curves() -> None:
        note = write_curves(out, history)  # never raises: a missing picture is no reason to stop training
        if note is not None and note not in curves_notes:
            curves_notes.add(note)  # said once per run, not every epoch
            log(note)

    lock = None
    if is_writer:
        lock = DirectoryLock(out, "training run")  # creates DIR; held until the end
        if _file_identity(state_path) != state_on_disk:
            lock.release()
            raise TrainingError(f"{state_path} changed while this run was starting: is another run using {out}?")
        for leftover in remove_stale_temporaries(out):
            log(f"removed {leftover.name}, left by an interrupted write")
        log(
            f"training AlexNet(width={hp.width:g}, {len(data.classes)} classes) on {data.name}: "
            f"{len(train_split):,} train / {len(val_split):,} val images, towers on {devices[0]} + {devices[1]}, "
            f"{dist.world} process(es), batch {hp.batch_size}, lr {schedule.lr:g}, "
            f"epochs {start_epoch + 1}..{hp.epochs}"
        )
    kill_at_step = int(os.environ.get("TRAINING_TEST_KILL_AT_STEP", "0"))  # testing only: simulates a crash
    steps_run = 0
    cpu_buffer = torch.empty(0)

    for epoch in range(start_epoch, hp.epochs):
        # --- train one epoch ---
        train_model.train()
        for group in optimizer.param_groups:
            group["lr"] = schedule.lr
        order = epoch_order(len(train_split), hp.seed, epoch)
        first_step = start_step if epoch == start_epoch else 0
        totals = torch.zeros(3, dtype=torch.float64, device=devices[0])  # loss sum, wrong, images (this rank)
        seconds_before = 0.0
        if first_step and running:
            if is_writer:  # the saved sums are over all ranks; counted once, on rank 0
                totals += torch.tensor(running["totals"], dtype=torch.float64, device=devices[0])
            seconds_before = running["seconds"]
        started = time.perf_counter()
        steps = range(first_step, batches.steps_per_epoch)
        bar = Progress(
            batches.steps_per_epoch * hp.batch_size,
            f"epoch {epoch + 1}/{hp.epochs}",
            enabled=is_writer and options.show_progress,
        )
        bar.done = first_step * hp.batch_size

        def load(step, order=order):
            images, labels = train_split.batch(batches.local_indices(order, step))
            if devices[0].type == "cuda":
                images, labels = images.pin_memory(), labels.pin_memory()
            return step, images, labels

        for step, images, labels in prefetch(load, steps, options.workers):
            images = images.to(devices[0], non_blocking=True)
            labels = labels.to(devices[0], non_blocking=True)
            params = augment.draw(hp.batch_size, hp.seed, epoch, step)[batches.local_slice()]
            if devices[0].type == "cpu":  # reuse one input buffer: fresh 77 MB allocations page-fault on CPU
                if cpu_buffer.shape != (len(labels), 3, augment.crop, augment.crop):
                    cpu_buffer = torch.empty(len(labels), 3, augment.crop, augment.crop)
                x = augment(images, params, out=cpu_buffer)
            else:
                x = augment(images, params)
            if hp.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)

            torch.manual_seed(derive_seed(hp.seed, "dropout", dist.rank, epoch, step))
            with autocast():
                logits = train_model(x)
            loss = F.cross_entropy(logits.float(), labels)
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            else:
                loss.backward()
                optimizer.step()

            with torch.no_grad():
                wrong = (logits.argmax(1) != labels).sum()
                totals[0] += loss.detach().double() * len(labels)
                totals[1] += wrong
                totals[2] += len(labels)
            bar.update(hp.batch_size)
            if step % 20 == 0:  # (reading the loss waits for the device: not every step)
                value = loss.item()
                check_finite(value, epoch, step)
                bar.figures.update(loss=f"{value:.4f}", lr=f"{schedule.lr:g}")
            steps_run += 1
            if kill_at_step and steps_run == kill_at_step:
                os.kill(os.getpid(), signal.SIGKILL)
            if options.save_every and (step + 1) % options.save_every == 0 and step + 1 < batches.steps_per_epoch:
                summed = _all_ranks_sum(totals.clone(), dist)  # collective: every rank takes part
                check_finite(summed[0].item(), epoch, step)
                if is_writer:
                    seconds = seconds_before + time.perf_counter() - started
                    info = state_info(epoch, step + 1, {"totals": summed.tolist(), "seconds": seconds})
                    save_state(state_path, model, optimizer, scaler, info)
        bar.close()
        totals = _all_ranks_sum(totals, dist)
        train_seconds = seconds_before + time.perf_counter() - started
        train_loss, train_wrong, train_images = totals.tolist()
        check_finite(train_loss, epoch, batches.steps_per_epoch)

        # --- evaluate, adjust the learning rate, write ---
        crops = ("center", "ten") if options.ten_crop else ("center",)
        val = evaluate(
            model,
            preprocessor,
            val_split,
            crops=crops,
            device=devices[0],
            batch_size=options.eval_batch_size,
            rank=dist.rank,
            world=dist.world,
            workers=min(options.workers, 2),
            autocast=autocast,
            show_progress=is_writer and options.show_progress,
        )
        lr_used = schedule.lr
        dropped = schedule.step(val["center"]["top1_error"])
        improved = val["center"]["top1_error"] < best["val_top1_error"]
        if improved:
            best = {"epoch": epoch + 1, "val_top1_error": val["center"]["top1_error"]}
        metrics = {
            "epoch": epoch + 1,
            "lr": lr_used,
            "train_loss": train_loss / train_images,
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
        history.append(metrics)
        if is_writer:
            artifact = checkpoint(epoch + 1, val)
            artifact.save(out / "last.safetensors")
            if improved:
                artifact.save(out / "best.safetensors")
            save_state(state_path, model, optimizer, scaler, state_info(epoch + 1, 0, None))
            write_metrics()
            draw_curves()
            log(
                f"epoch {epoch + 1}/{hp.epochs}: train loss {metrics['train_loss']:.4f}, "
                f"val loss {metrics['val_loss']:.4f}, top-1 {metrics['val_top1_error']:.2%}, "
                f"top-5 {metrics['val_top5_error']:.2%}, lr {lr_used:g}, {metrics['images_per_second']:,.1f} img/s"
                + (f" — lr now {schedule.lr:g}" if dropped else "")
                + (" (best so far)" if improved else "")
            )

    # --- the end: the paper's 10-patch evaluation of the best weights ---
    summary = _final_evaluation(out, history, best, hp, options, dist, devices, val_split, autocast, log)
    if dist.world > 1:
        torch_distributed.destroy_process_group()
    if lock is not None:
        lock.release()  # (on an error, the lock goes with this frame or the process)
    return summary


def _file_identity(path: Path):
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


def check_finite(loss: float, epoch: int, step: int) -> None:
    """Stop a diverged run before it writes NaN weights over the last good checkpoint and state."""
    if not math.isfinite(loss):
        raise TrainingError(
            f"training diverged: the loss is {loss} in epoch {epoch + 1} (step {step}); the files in --out still "
            "hold the last good epoch. Start again with a lower --lr."
        )


def _all_ranks_sum(t: torch.Tensor, dist: Distributed) -> torch.Tensor:
    if dist.world > 1:
        torch_distributed.all_reduce(t)
    return t


def _final_evaluation(out, history, best, hp, options, dist, devices, val_split, autocast, log) -> dict:
    """Evaluate best.safetensors with the centre crop and 10 patches, record it in the file, print a summary."""
    summary_path = out / "summary.json"
    if dist.world > 1:
        torch_distributed.barrier()  # rank 0 has written best.safetensors
    summary = None
    if summary_path.exists():
        summary = json.loads(summary_path.read_text())
        if summary.get("epochs") != len(history) or summary.get("best_epoch") != best["epoch"]:
            summary = None  # the run went on since
    if summary is None:
        best_checkpoint = load_checkpoint(out / "best.safetensors")
        net = best_checkpoint.build(devices)
        val = evaluate(
            net,
            best_checkpoint.preprocessor(),
            val_split,
            crops=("center", "ten"),
            device=devices[0],
            batch_size=options.eval_batch_size,
            rank=dist.rank,
            world=dist.world,
            workers=min(options.workers, 2),
            autocast=autocast,
            show_progress=dist.rank == 0 and options.show_progress,
        )
        summary = {
            "epochs": len(history),
            "best_epoch": best["epoch"],
            "best_checkpoint": str(out / "best.safetensors"),
            "last_checkpoint": str(out / "last.safetensors"),
            "val": val,
            "lr_drops": sum(1 for m in history if m["lr_dropped_after"]),
            "train_seconds": sum(m["seconds"] for m in history),
            "hyperparameters": dataclasses.asdict(hp),
        }
        if dist.rank == 0:
            best_checkpoint.provenance.update(
                val_ten_crop_top1_error=val["ten"]["top1_error"], val_ten_crop_top5_error=val["ten"]["top5_error"]
            )
            best_checkpoint.save(out / "best.safetensors")
            atomic_write(summary_path, (json.dumps(summary, indent=1) + "\n").encode())
    log(
        format_results(
            summary["val"], f"best epoch {summary['best_epoch']} of {summary['epochs']} ({out / 'best.safetensors'}):"
        )
    )
    log(
        f"trained {summary['epochs']} epochs in {format_duration(summary['train_seconds'])}, "
        f"{summary['lr_drops']} lr drops"
    )
    return summary
