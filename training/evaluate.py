"""Validation: loss, top-1 and top-5 error with the centre crop and with the paper's 10 patches.

The network input is made by the checkpoint's own ``Preprocessor.from_uint8`` from the prepared uint8
256×256 images: the very function the service runs on uploaded images, so evaluation measures what
serving will do. ``python -m training evaluate CHECKPOINT DATA`` runs it on a saved checkpoint; training
calls ``evaluate`` after every epoch.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from model import CheckpointError, Preprocessor, load_checkpoint
from model.files import atomic_write
from model.progress import Progress
from model.ten_crop import flatten_crops, mean_over_crops, run_in_chunks

from .data import IMAGE_SIZE, JpegSplit, PreparedDataset, PreparedSplit
from .errors import TrainingError
from .loader import BatchLoader

CROPS = ("center", "ten")


@torch.no_grad()
def evaluate(
    net: torch.nn.Module,
    preprocessor: Preprocessor,
    split: PreparedSplit | JpegSplit,
    *,
    crops=("center",),
    device="cpu",
    batch_size: int = 128,
    label_map: torch.Tensor | None = None,
    rank: int = 0,
    world: int = 1,
    workers: int = 2,
    autocast=contextlib.nullcontext,
    show_progress: bool = True,
) -> dict[str, dict]:
    """{crops: {"loss", "top1_error", "top5_error", "images"}} over the split (this rank's share, summed
    over all ranks when ``world`` > 1). ``label_map`` maps the split's class indices to the net's.
    ``workers``: the BatchLoader's threads (raw store) or decoding processes (jpeg store)."""
    device = torch.device(device)
    was_training = net.training
    net.eval()
    indices = torch.arange(rank, len(split), world)  # every image exactly once over all ranks
    batches = list(indices.split(batch_size))
    # loss, top-1 wrong, top-5 wrong, n: summed on the device, read once at the end (no wait per batch)
    sums = {crop: torch.zeros(4, dtype=torch.float64, device=device) for crop in crops}
    bar = Progress(len(indices), "evaluate", enabled=show_progress and rank == 0)

    with BatchLoader(split, workers, batch_size, pin_memory=device.type == "cuda") as loader:
        hand_back = HandBack(device)
        for batch in loader.batches(enumerate(batches)):
            images = batch.images.to(device, non_blocking=True)
            labels = batch.labels if label_map is None else label_map[batch.labels]
            labels = labels.to(device, non_blocking=True)
            hand_back.copy_queued(batch)
            for crop in crops:
                x = preprocessor.from_uint8(images, crop)  # THE shared preprocessing
                log_probs = _log_probs(net, x, batch_size, autocast)
                sums[crop] += _score(log_probs, labels)
            if device.type != "cuda":
                batch.release()  # (on the CPU, ``images`` was the slot itself: released after use)
            bar.update(len(labels))
        hand_back.finish()
    bar.close()

    if world > 1:
        import torch.distributed as dist

        for crop in crops:
            dist.all_reduce(sums[crop])
    sums = {crop: total.cpu() for crop, total in sums.items()}
    net.train(was_training)
    results = {}
    for crop, (loss, wrong1, wrong5, n) in ((c, s.tolist()) for c, s in sums.items()):
        results[crop] = {"loss": loss / n, "top1_error": wrong1 / n, "top5_error": wrong5 / n, "images": int(n)}
    return results


class HandBack:
    """Hands each loaded batch back to the loader once its copy to a GPU has completed (the batch before
    is handed back when the next one's copy is queued). The copy runs on ``device``'s current stream, so
    the event marking its end is recorded there: on the current device's stream (another GPU's, when
    ``device`` is not the current device) it would mark nothing, and the loader could refill the pinned
    slot while the copy still reads it. On the CPU there is no copy: the caller releases after use."""

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.previous = None  # (event, batch)

    def copy_queued(self, batch) -> None:
        if self.device.type != "cuda":
            return
        self.finish()
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        self.previous = (event, batch)

    def finish(self) -> None:
        if self.previous is not None:
            event, batch = self.previous
            event.synchronize()
            batch.release()
            self.previous = None


def _log_probs(net, x: torch.Tensor, max_rows: int, autocast) -> torch.Tensor:
    """Centre crop [n, 3, h, w] → log-softmax [n, classes]; ten crops [n, 10, 3, h, w] → the log of the
    softmax averaged over the 10 patches (the paper's test-time rule)."""
    if x.dim() == 4:
        with autocast():
            return F.log_softmax(net(x).float(), dim=1)
    with autocast():
        logits = run_in_chunks(net, flatten_crops(x), max_rows)
    probs = mean_over_crops(logits.softmax(dim=1), "ten")
    return probs.clamp_min(1e-30).log()


def _score(log_probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[summed loss, top-1 wrong, top-5 wrong, count] (top-5 = top-k with k = min(5, classes))."""
    loss = F.nll_loss(log_probs, labels, reduction="sum")
    top = log_probs.topk(min(5, log_probs.shape[1]), dim=1).indices
    hits = top == labels[:, None]
    wrong1 = (~hits[:, 0]).sum()
    wrong5 = (~hits.any(dim=1)).sum()
    count = torch.full((), len(labels), dtype=torch.float64, device=loss.device)  # (a fill: no host copy)
    return torch.stack([loss.double(), wrong1.double(), wrong5.double(), count])


def label_map_for(dataset_classes, checkpoint_classes, what: str) -> torch.Tensor | None:
    """Map the dataset's class indices to the checkpoint's, by wnid. None when they are identical."""
    dataset_wnids = [c.wnid for c in dataset_classes]
    checkpoint_index = {c.wnid: i for i, c in enumerate(checkpoint_classes)}
    if dataset_wnids == list(checkpoint_index):
        return None
    unknown = [w for w in dataset_wnids if w not in checkpoint_index]
    if unknown:
        raise TrainingError(
            f"{len(unknown)} classes of the data are not among the checkpoint's {len(checkpoint_classes)} "
            f"classes ({what}), e.g. {unknown[:3]}"
        )
    return torch.tensor([checkpoint_index[w] for w in dataset_wnids])


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def run_evaluate(
    checkpoint_path: str | Path,
    data: str | Path,
    *,
    split: str = "val",
    crops=CROPS,
    batch_size: int = 128,
    device: str | None = None,
    output: str | Path | None = None,
    workers: int = 2,
    show_progress: bool = True,
) -> dict:
    """Evaluate a checkpoint file on a prepared split; print the result and write it as JSON."""
    started = time.perf_counter()
    try:
        checkpoint = load_checkpoint(checkpoint_path)
    except CheckpointError as e:
        raise TrainingError(str(e)) from None
    dataset = PreparedDataset(data)
    images = dataset.split(split)
    label_map = label_map_for(dataset.classes, checkpoint.classes, str(checkpoint_path))
    preprocessor, net, device = _on_device(checkpoint, checkpoint_path, device)
    results = evaluate(
        net,
        preprocessor,
        images,
        crops=crops,
        device=device,
        batch_size=batch_size,
        label_map=label_map,
        workers=workers,
        show_progress=show_progress,
    )
    report = {
        "checkpoint": str(checkpoint_path),
        "checkpoint_sha256": checkpoint.sha256,
        "data": str(data),
        "dataset": dataset.name,
        "split": split,
        "images": len(images),
        "classes": len(dataset.classes),
        "checkpoint_classes": len(checkpoint.classes),
        "results": results,
        "seconds": round(time.perf_counter() - started, 3),
    }
    if output is None:
        path = Path(checkpoint_path)
        output = path.with_name(f"{path.stem}.eval-{split}.json")
    atomic_write(output, (json.dumps(report, indent=1) + "\n").encode())
    print(format_results(results, f"{checkpoint_path} on {dataset.name}/{split} ({len(images):,} images)"))
    print(dataset.provenance(), file=sys.stderr)
    print(f"written to {output}", file=sys.stderr)
    return report


def _on_device(checkpoint, checkpoint_path, device: str | None):
    """The checkpoint's preprocessing and its net on ``device``, or a TrainingError saying why not."""
    preprocessor = checkpoint.preprocessor()
    if preprocessor.config.resize != IMAGE_SIZE:
        raise TrainingError(
            f"{checkpoint_path} expects images resized to {preprocessor.config.resize} px; "
            f"the prepared data is {IMAGE_SIZE} px"
        )
    try:
        device = torch.device(device or default_device())
        net = checkpoint.build_grouped(device)
    except (RuntimeError, ValueError) as e:
        raise TrainingError(f"cannot use device {device}: {e}") from None
    return preprocessor, net, device


def format_results(results: dict[str, dict], title: str) -> str:
    names = {"center": "centre crop", "ten": "10 patches"}
    lines = [title, f"  {'':<12} {'top-1 error':>11} {'top-5 error':>11} {'loss':>8}"]
    for crop, r in results.items():
        loss = f"{r['loss']:.4f}" if math.isfinite(r["loss"]) else str(r["loss"])
        lines.append(f"  {names.get(crop, crop):<12} {r['top1_error']:>11.2%} {r['top5_error']:>11.2%} {loss:>8}")
    return "\n".join(lines)
