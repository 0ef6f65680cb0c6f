"""What follows each epoch (evaluate, adjust the learning rate, write the files) and the last one."""

from __future__ import annotations

import dataclasses
import json
import math
import time

import torch.distributed as torch_distributed

from model import Checkpoint, Preprocessor, load_checkpoint
from model.files import atomic_write
from model.progress import format_duration

from .evaluate import evaluate, format_results
from .plot import write_curves, write_filters
from .run import Run, default_workers
from .schedule import CHANCE_MARGIN
from .state import save_state


def end_of_epoch(run: Run, epoch: int, totals: list[float], train_seconds: float) -> None:
    """Evaluate, adjust the learning rate, write the checkpoints, the pictures, the state and the metrics."""
    trained = time.perf_counter()
    loss_sum, train_wrong, train_images, _ = totals
    train_loss = loss_sum / train_images
    val = _evaluate(
        run,
        run.model,
        Preprocessor(run.preprocessing, run.data.stats.mean_image),
        ("center", "ten") if run.options.ten_crop else ("center",),
    )
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
        **({f"val_ten_crop_{k}": val["ten"][k] for k in ("loss", "top1_error", "top5_error")} if "ten" in val else {}),
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
    run.log(
        format_results(
            summary["val"], f"best epoch {summary['best_epoch']} of {summary['epochs']} ({out / 'best.safetensors'}):"
        )
    )
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
