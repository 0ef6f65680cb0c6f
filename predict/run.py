"""One predict run: check the options, find what is left to do, classify it batch by batch, summarise."""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from model import FEATURE_LAYERS, load_checkpoint
from model.files import atomic_write
from model.preprocessing import DEFAULT_MAX_PIXELS
from model.progress import Progress

from .classifier import Classifier, _device
from .decoding import CHUNK, decoded
from .errors import PredictError
from .files import apply_ground_truth, find_files, label_folders, read_ground_truth
from .records import (
    FILES_SUFFIX,
    FORMATS,
    SUMMARY_SUFFIX,
    Counts,
    FeatureWriter,
    Writer,
    csv_header,
    format_summary,
    output_format,
    read_existing,
)

DEFAULT_TOP_K = 5

DEFAULT_BATCH_SIZE = 128


@dataclass
class Options:
    output: str
    files_from: str | None = None
    top_k: int = DEFAULT_TOP_K
    batch_size: int = DEFAULT_BATCH_SIZE
    workers: int | None = None  # default: default_workers()
    device: str = "cpu"
    crops: str = "center"
    ground_truth: str | None = None
    features: str | None = None
    layer: str = "fc7"
    normalize: bool = False
    max_pixels: int = DEFAULT_MAX_PIXELS
    format: str | None = None
    show_progress: bool = True


def check_options(o: Options) -> None:
    if o.top_k < 1 or o.batch_size < 1 or (o.workers is not None and o.workers < 0) or o.max_pixels < 1:
        raise PredictError("--top-k, --batch-size and --max-pixels must be at least 1, --workers at least 0")
    if o.crops not in ("center", "ten"):
        raise PredictError(f"--crops must be center or ten, got {o.crops!r}")
    if o.format is not None and o.format not in FORMATS:
        raise PredictError(f"--format must be one of {', '.join(FORMATS)}")
    if o.layer not in FEATURE_LAYERS:
        raise PredictError(f"--layer must be one of {', '.join(FEATURE_LAYERS)}")
    if o.features is None and (o.normalize or o.layer != "fc7"):
        raise PredictError("--layer and --normalize apply only with --features OUT.npy")
    if o.features is not None and os.path.abspath(o.features) == os.path.abspath(o.output):
        raise PredictError("--features must be another file than --output")


def default_workers() -> int:
    """The CPU cores less one (at least 1): the main process's forward pass uses every core too, and a
    decoder per core preempts it (2 cores: 78 img/s with 1 worker, 66 with 2; BENCHMARKS.md)."""
    return max(1, len(os.sched_getaffinity(0)) - 1)


def run_predict(checkpoint_path: str, sources: list[str], options: Options) -> dict:
    """Classify the files; append their records to OUT; return (and write) the summary."""
    o = options
    check_options(o)
    fmt = output_format(o.output, o.format)
    out = Path(o.output)
    if out.is_dir():
        raise PredictError(f"--output {o.output}: is a folder")
    device = _device(o.device)
    items, folders = find_files(sources, o.files_from)
    checkpoint = load_checkpoint(checkpoint_path)  # a CheckpointError: exit status 1 (training.__main__)
    labels = _label(items, folders, checkpoint.classes, o.ground_truth)
    top_k = min(o.top_k, len(checkpoint.classes))
    settings = dict(checkpoint_sha256=checkpoint.sha256, crops=o.crops, top_k=top_k, format=fmt, labels=labels)
    header = csv_header(top_k, labels is not None)
    summary_path = Path(str(out) + SUMMARY_SUFFIX)
    fresh, counts, todo = _what_is_left(o, items, fmt, header, settings, summary_path)
    given = dict(sources=list(sources), files_from=o.files_from, ground_truth=o.ground_truth, complete=False)
    summary = {"checkpoint": str(checkpoint_path), "output": o.output, **settings, **given}
    atomic_write(summary_path, (json.dumps(summary, indent=1) + "\n").encode())

    classifier = Classifier(checkpoint, device, o.crops, o.layer if o.features else None, o.normalize)
    batches = _Batches(
        classifier=classifier,
        classes=checkpoint.classes,
        top_k=top_k,
        max_rows=o.batch_size,
        labels_of={item.path: item.label for item in todo},
        writer=Writer(out, fmt, header, fresh),
        features=FeatureWriter(Path(o.features), classifier.feature_width) if o.features else None,
        counts=counts,
        bar=Progress(len(todo), "predict", enabled=o.show_progress),
    )
    del checkpoint
    started = time.perf_counter()
    new = _classify_all(todo, batches, o)
    seconds = time.perf_counter() - started
    summary.update(complete=True, **_figures(counts, new, seconds, batches.features, o))
    atomic_write(summary_path, (json.dumps(summary, indent=1) + "\n").encode())
    print(format_summary(summary))
    print(f"written to {o.output} (summary: {summary_path})", file=sys.stderr)
    return summary


def _label(items: list, folders: dict, classes, ground_truth: str | None) -> str | None:
    """Give the items their labels, from --ground-truth or from ImageNet-layout folders; say from where."""
    wnids = {c.wnid: i for i, c in enumerate(classes)}
    if ground_truth is not None:
        apply_ground_truth(items, read_ground_truth(ground_truth, wnids, len(classes)), ground_truth)
        return f"ground-truth {os.path.abspath(ground_truth)}"
    return "folders" if label_folders(folders, wnids) else None


@dataclass
class _Batches:
    """Where a batch goes through, and where its records go."""

    classifier: Classifier
    classes: tuple
    top_k: int
    max_rows: int  # network inputs in one forward pass
    labels_of: dict[str, int | None]
    writer: Writer
    features: FeatureWriter | None
    counts: Counts
    bar: Progress


def _classify_all(todo: list, batches: _Batches, o: Options) -> int:
    """Decode and classify every file still to do, a batch of readable ones at a time; the number done."""
    workers = default_workers() if o.workers is None else o.workers
    preprocessor = batches.classifier.preprocessor
    window = 2 * o.batch_size + 2 * workers * CHUNK
    entries = decoded([item.path for item in todo], workers, window, preprocessor, o.max_pixels)
    new, batch, readable = 0, [], 0
    try:
        for entry in entries:
            batch.append(entry)
            readable += entry[1] is not None
            if readable == o.batch_size:
                new += _classify(batch, batches)
                batch, readable = [], 0
        if batch:
            new += _classify(batch, batches)
    except BaseException:
        if batches.features is not None:
            batches.features.abandon()
        raise
    finally:
        entries.close()  # stops the worker pool now, not when the generator is collected
        batches.writer.close()
        batches.bar.close()
    if batches.features is not None:
        batches.features.finish()
    return new


def _figures(counts: Counts, new: int, seconds: float, features: FeatureWriter | None, o: Options) -> dict:
    """The summary's counts, errors, speed and features."""
    rate = round(new / seconds, 2) if seconds > 0 else None
    written = None
    if features is not None:
        written = dict(path=o.features, layer=o.layer, normalized=o.normalize, rows=features.rows)
        written["files"] = o.features + FILES_SUFFIX
    return dict(
        files=counts.files,
        classified=counts.classified,
        unreadable=counts.unreadable,
        labelled=counts.labelled,
        labelled_unreadable=counts.labelled_unreadable,
        **counts.errors(),
        this_run={"files": new, "seconds": round(seconds, 3), "images_per_second": rate},
        features=written,
    )


def _what_is_left(o: Options, items: list, fmt: str, header, settings: dict, summary_path: Path):
    """(whether OUT starts afresh, the counts of the records already in it, the items still to do)."""
    out = Path(o.output)
    fresh = o.features is not None or not out.exists()
    existing: list[dict] = []
    if not fresh:
        _check_settings(summary_path, settings, o.output)
        existing = read_existing(out, fmt, header)
    elif out.exists() and out.stat().st_size:
        replaced = "replaced — a run with --features starts afresh (features are not resumable)"
        print(f"{o.output}: {replaced}", file=sys.stderr)
    counts = Counts()
    done = set()
    for record in existing:
        counts.add(record)
        done.add(record["path"])
    todo = [item for item in items if item.path not in done]
    if existing:
        print(f"{o.output}: {len(existing):,} files already done, {len(todo):,} to go", file=sys.stderr)
    return fresh, counts, todo


def _check_settings(summary_path: Path, settings: dict, output: str) -> None:
    try:
        previous = json.loads(summary_path.read_text())
    except (OSError, ValueError):
        return  # no record of the earlier run's settings: the records' own columns are checked instead
    differ = [k for k, v in settings.items() if k in previous and previous[k] != v]
    if differ:
        described = "; ".join(f"{k}: {previous[k]!r} then, {settings[k]!r} now" for k in differ)
        raise PredictError(
            f"{output} holds the predictions of another run ({described}); rerun with the same checkpoint "
            "and options to continue it, or write to another --output"
        )


def _classify(batch: list, to: _Batches) -> int:
    """Run one batch through the net; write its records in file order. Returns the number of files."""
    good = [i for i, (_, pixels, _) in enumerate(batch) if pixels is not None]
    activations, indices, scores = None, [], []
    if good:
        size = to.classifier.preprocessor.config.resize
        array = np.empty((len(good), 3, size, size), dtype=np.uint8)
        for row, i in enumerate(good):
            array[row] = np.frombuffer(batch[i][1], dtype=np.uint8).reshape(3, size, size)
        probabilities, activations = to.classifier(torch.from_numpy(array), to.max_rows)
        top_scores, top_indices = probabilities.topk(max(to.top_k, min(5, probabilities.shape[1])), dim=1)
        scores, indices = top_scores.tolist(), top_indices.tolist()
    rows = dict(zip(good, range(len(good))))
    for i, (path, _, error) in enumerate(batch):
        r = rows.get(i)
        record = _record(path, error, to, None if r is None else indices[r], None if r is None else scores[r])
        to.writer.write(record)
        to.counts.add(record)
    if to.features is not None and good:
        to.features.write([batch[i][0] for i in good], activations)
    to.bar.update(len(batch))
    return len(batch)


def _record(path: str, error: str | None, to: _Batches, indices: list | None, scores: list | None) -> dict:
    """One file's record: its top-k classes, or its error; with the truth when it is known."""
    record: dict = {"path": path}
    classes = to.classes
    if error is not None:
        record["error"] = error
    else:
        ranked = zip(indices[: to.top_k], scores[: to.top_k])
        record["predictions"] = [
            {"rank": rank, "index": i, "wnid": classes[i].wnid, "label": classes[i].label, "score": score}
            for rank, (i, score) in enumerate(ranked, 1)
        ]
    label = to.labels_of.get(path)
    if label is not None:
        record["truth"] = classes[label].wnid
        if error is None:
            record["top1_correct"] = indices[0] == label
            record["top5_correct"] = label in indices[:5]
    return record
