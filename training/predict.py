"""``python -m training predict CHECKPOINT SOURCE... --output OUT``: classify a folder or a list of files.

    SOURCE       a folder (searched recursively for IMAGE_EXTENSIONS, hidden names skipped) or an image file;
                 --files-from LIST adds one path per line ("-": standard input)
    OUT.jsonl    one JSON object a line: {"path", "predictions": [{rank, index, wnid, label, score}, ...]}
                 or {"path", "error"}; OUT.csv: the same as columns (chosen by the extension, or --format)

Each file goes through the checkpoint's own preprocessing (``Preprocessor.load``: the decode, limits and
resize the service uses; ``from_uint8``: the crops and normalisation), decoded in a pool of forked worker
processes that send back the uint8 256×256 image (a third of the bytes of the float crop, a tenth of the
ten crops'). The main process batches them through the net on ``--device``; on the CPU it is the form
the service builds, ``CPUInferenceNet``. A file that cannot be read or decoded gets an ``error`` record,
the message of its ImageError; the run goes on.

Resumable: OUT is appended to, one flushed line per file, and a rerun skips the files OUT already holds
(an unfinished last line, from a kill, is dropped first). OUT + ".summary.json" records the checkpoint
and options at the start, and the counts, speed and errors at the end; a rerun with another checkpoint,
--crops, --top-k, format or ground truth is refused rather than mixing them in one file.

Ground truth: from --ground-truth FILE (lines "<file> <class index>", as Caffe's val.txt, or "<file> <wnid>";
<file> matches a file's path, its path inside its SOURCE folder, or its name), or from an ImageNet-layout
SOURCE folder (every image under a first-level folder named by a wnid of the checkpoint's classes). Then
each record also holds "truth", "top1_correct" and "top5_correct", and top-1/top-5 error over the labelled
readable files is printed and written to the summary; labelled files that are unreadable are counted
apart, not as errors of the net.

Features (--features OUT.npy, --layer fc6|fc7, --normalize): the hidden layer's activations of every
readable file, float32 [n, 4096 × width], in the order of OUT.npy + ".files.txt" (one path a line). With
--crops ten they are the mean over the ten patches. Features are not resumable: a run with --features
always starts afresh, replacing an existing OUT (it says so), so that OUT, the array and the file list
describe the same files.
"""

from __future__ import annotations

import csv
import io
import json
import multiprocessing
import os
import signal
import struct
import sys
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from model import FEATURE_LAYERS, CPUInferenceNet, ImageError, keep_freed_memory, load_checkpoint
from model.files import atomic_write
from model.preprocessing import DEFAULT_MAX_PIXELS

from .errors import TrainingError
from .prepare import IMAGE_EXTENSIONS
from .progress import Progress

DEFAULT_TOP_K = 5
DEFAULT_BATCH_SIZE = 128
FORMATS = ("jsonl", "csv")
SUMMARY_SUFFIX = ".summary.json"
FILES_SUFFIX = ".files.txt"
CHUNK = 4  # files per task sent to a worker
NPY_HEADER_BYTES = 128  # reserved at the start of the features file, filled in once the row count is known


@dataclass
class Item:
    path: str  # as written to OUT: the SOURCE folder joined with the path inside it, or the file as given
    inside: str | None = None  # the path inside its SOURCE folder (for ground-truth matching)
    label: int | None = None  # the checkpoint's class index, when the ground truth is known


@dataclass
class Counts:
    files: int = 0
    classified: int = 0
    unreadable: int = 0
    labelled: int = 0  # labelled and classified
    labelled_unreadable: int = 0
    top1_wrong: int = 0
    top5_wrong: int = 0

    def add(self, record: dict) -> None:
        self.files += 1
        error = bool(record.get("error"))
        self.unreadable += error
        self.classified += not error
        if record.get("truth") not in (None, ""):
            if error:
                self.labelled_unreadable += 1
            else:
                self.labelled += 1
                self.top1_wrong += not _true(record["top1_correct"])
                self.top5_wrong += not _true(record["top5_correct"])

    def errors(self) -> dict:
        if not self.labelled:
            return {"top1_error": None, "top5_error": None}
        return {"top1_error": self.top1_wrong / self.labelled, "top5_error": self.top5_wrong / self.labelled}


def _true(value) -> bool:
    return value is True or value in ("1", "true", "True")


# 1. Which files.


def _walk(folder: Path) -> list[str]:
    """Image files under ``folder``, recursively, in sorted order, as paths relative to it."""
    found = []
    for top, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS):
                found.append(os.path.relpath(os.path.join(top, name), folder))
    return found


def find_files(sources: list[str], files_from: str | None = None) -> tuple[list[Item], dict[str, list[Item]]]:
    """Every file to classify, each once (first occurrence wins), and the items found in each folder.

    A SOURCE that does not exist, a folder without images and an empty list are TrainingErrors; a line of
    --files-from that names a missing file becomes that file's error record (a list is data)."""
    items: list[Item] = []
    folders: dict[str, list[Item]] = {}
    seen: set[str] = set()

    def add(item: Item) -> None:
        if item.path not in seen:
            seen.add(item.path)
            items.append(item)

    for source in sources:
        path = Path(source)
        if path.is_dir():
            found = [Item(os.path.join(source, inside), inside) for inside in _walk(path)]
            if not found:
                raise TrainingError(f"{source}: no images in this folder (looked for {', '.join(IMAGE_EXTENSIONS)})")
            folders[source] = found
            for item in found:
                add(item)
        elif path.is_file():
            add(Item(source))
        elif path.exists():
            raise TrainingError(f"{source}: not a file or a folder")
        else:
            raise TrainingError(f"{source}: no such file or folder")
    if files_from is not None:
        try:
            text = sys.stdin.read() if files_from == "-" else Path(files_from).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            why = getattr(e, "strerror", None) or e
            raise TrainingError(f"--files-from {files_from}: cannot read: {why}") from None
        listed = [line.strip() for line in text.splitlines() if line.strip()]
        if not listed:
            raise TrainingError(f"--files-from {files_from}: no paths in it (one path a line)")
        for line in listed:
            add(Item(line))
    if not items:
        raise TrainingError("nothing to classify: give a folder, image files or --files-from LIST")
    return items, folders


def label_folders(folders: dict[str, list[Item]], wnids: dict[str, int]) -> bool:
    """Label the items of every ImageNet-layout folder (all its images under <wnid>/… with a wnid of the
    checkpoint); True when any was."""
    any_labelled = False
    for found in folders.values():
        tops = [Path(item.inside).parts[0] if len(Path(item.inside).parts) > 1 else None for item in found]
        if all(top in wnids for top in tops):
            for item, top in zip(found, tops):
                item.label = wnids[top]
            any_labelled = True
    return any_labelled


def read_ground_truth(path: str, wnids: dict[str, int], num_classes: int) -> dict[str, int]:
    """Lines "<file> <class index>" or "<file> <wnid>" → {normalised file: the checkpoint's class index}."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise TrainingError(f"--ground-truth {path}: cannot read: {getattr(e, 'strerror', None) or e}") from None
    truth = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.rsplit(None, 1)
        if len(parts) != 2:
            raise TrainingError(f"--ground-truth {path}, line {number}: expected '<file> <class index or wnid>'")
        name, value = parts
        if value in wnids:
            label = wnids[value]
        elif value.isdigit() and int(value) < num_classes:
            label = int(value)
        else:
            raise TrainingError(
                f"--ground-truth {path}, line {number}: {value!r} is neither a class index 0…{num_classes - 1} "
                "nor a wnid of the checkpoint's classes"
            )
        truth[os.path.normpath(name)] = label
    if not truth:
        raise TrainingError(f"--ground-truth {path}: no lines '<file> <class index or wnid>' in it")
    return truth


def apply_ground_truth(items: list[Item], truth: dict[str, int], path: str) -> None:
    labelled = 0
    for item in items:
        for key in (item.path, item.inside, os.path.basename(item.path)):
            if key is not None and (label := truth.get(os.path.normpath(key))) is not None:
                item.label = label
                labelled += 1
                break
    if not labelled:
        raise TrainingError(f"--ground-truth {path}: none of the {len(items):,} files is in it")


# 2. Decoding, in worker processes.

_preprocessor = None
_max_pixels = DEFAULT_MAX_PIXELS


def _init_worker(preprocessor, max_pixels: int, in_pool: bool = True) -> None:
    global _preprocessor, _max_pixels
    _preprocessor, _max_pixels = preprocessor, max_pixels
    if in_pool:
        torch.set_num_threads(1)  # one image at a time per process
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle: it stops the pool


def _decode(path: str) -> tuple[bytes | None, str | None]:
    """A file → (its uint8 [3, S, S] pixels as bytes, None) or (None, why it cannot be classified). Never raises."""
    try:
        with open(path, "rb") as f:
            data = f.read()
        image = _preprocessor.load(data, max_pixels=_max_pixels)
    except ImageError as e:
        return None, f"{type(e).__name__}: {e}"
    except OSError as e:
        return None, f"cannot read: {e.strerror or e}"
    except Exception as e:  # a decoder bug must not stop a long run; the file gets an error record
        return None, f"{type(e).__name__}: {e}"
    return image.numpy().tobytes(), None


def _decode_many(paths: list[str]) -> list[tuple[bytes | None, str | None]]:
    return [_decode(p) for p in paths]


def decoded(paths: list[str], workers: int, window: int):
    """(path, pixels or None, error or None) for each path, in order. With workers, chunks of files are
    decoded ahead in a forked Pool, at most ``window`` files at a time (unbounded read-ahead would hold
    every decoded image in memory whenever the net is slower than the decoders)."""
    if not paths:
        return
    if workers <= 0:
        for path in paths:
            yield (path, *_decode(path))
        return
    context = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
    pool = context.Pool(workers, initializer=_init_worker, initargs=(_preprocessor, _max_pixels))
    try:
        chunks = [paths[i : i + CHUNK] for i in range(0, len(paths), CHUNK)]
        pending: deque = deque()
        ahead = max(1, window // CHUNK)
        for chunk in chunks:
            pending.append((chunk, pool.apply_async(_decode_many, (chunk,))))
            while len(pending) > ahead:
                yield from _results(*pending.popleft())
        while pending:
            yield from _results(*pending.popleft())
    finally:
        pool.terminate()
        pool.join()


def _results(chunk, result):
    for path, (pixels, error) in zip(chunk, result.get()):
        yield path, pixels, error


# 3. Output files.


def output_format(output: str, given: str | None) -> str:
    if given is not None:
        return given
    return "csv" if output.lower().endswith(".csv") else "jsonl"


def csv_header(top_k: int, labelled: bool) -> list[str]:
    columns = ["path", "error"] + (["truth", "top1_correct", "top5_correct"] if labelled else [])
    for rank in range(1, top_k + 1):
        columns += [f"wnid_{rank}", f"label_{rank}", f"score_{rank}"]
    return columns


def read_existing(path: Path, fmt: str, header: list[str]) -> list[dict]:
    """The records already in OUT. An unfinished last line (a run killed mid-write) is dropped from the
    file; any other line that is not a record is a TrainingError."""
    data = path.read_bytes()
    if not data:
        return []
    if fmt == "jsonl":
        lines = data[: data.rfind(b"\n") + 1].split(b"\n")[:-1]  # (bytes after the last newline: unfinished)
        records, offset, good_end = [], 0, 0
        for number, line in enumerate(lines, 1):
            offset += len(line) + 1
            if line.strip():
                try:
                    record = json.loads(line)
                    if not isinstance(record, dict) or not isinstance(record.get("path"), str):
                        raise ValueError("not a record")
                except ValueError:
                    if number == len(lines):
                        break  # the last line, cut short: dropped with what follows
                    raise TrainingError(f"{path}, line {number}: not a prediction record; use another --output")
                records.append(record)
            good_end = offset
        if good_end < len(data):
            _drop_tail(path, good_end)
        return records
    text = data.decode("utf-8", errors="replace")
    rows = list(csv.reader(io.StringIO(text, newline="")))
    if not rows or rows[0] != header:
        raise TrainingError(
            f"{path}: its columns are not those of this run ({', '.join(header[:5])}, …): it was written with "
            "another --top-k or ground truth, or is not a predict CSV; use another --output"
        )
    records = []
    complete = rows[1:]
    if complete and (len(complete[-1]) != len(header) or not text.endswith("\n")):
        complete = complete[:-1]
        repaired = io.StringIO(newline="")
        csv.writer(repaired, lineterminator="\n").writerows([header, *complete])
        atomic_write(path, repaired.getvalue().encode())
        print(f"{path}: dropped an unfinished last line (an interrupted run)", file=sys.stderr)
    for number, row in enumerate(complete, 2):
        if len(row) != len(header):
            raise TrainingError(f"{path}, line {number}: {len(row)} columns, expected {len(header)}")
        records.append(dict(zip(header, row)))
    return records


def _drop_tail(path: Path, size: int) -> None:
    with open(path, "r+b") as f:
        f.truncate(size)
    print(f"{path}: dropped an unfinished last line (an interrupted run)", file=sys.stderr)


class Writer:
    """Appends one record a line to OUT, flushed, so that a kill loses at most the line being written."""

    def __init__(self, path: Path, fmt: str, header: list[str], fresh: bool):
        self.fmt, self.header = fmt, header
        self.file = open(path, "w" if fresh else "a", encoding="utf-8", newline="")
        if fmt == "csv":
            self.csv = csv.writer(self.file, lineterminator="\n")
            if self.file.tell() == 0:
                self.csv.writerow(header)
                self.file.flush()

    def write(self, record: dict) -> None:
        if self.fmt == "jsonl":
            self.file.write(json.dumps(record, ensure_ascii=False) + "\n")
        else:
            row = {"path": record["path"], "error": record.get("error", "")}
            if "truth" in record:
                row.update(truth=record["truth"], top1_correct=int(record.get("top1_correct", False)),
                           top5_correct=int(record.get("top5_correct", False)))  # fmt: skip
            for p in record.get("predictions", ()):
                row.update({f"wnid_{p['rank']}": p["wnid"], f"label_{p['rank']}": p["label"],
                            f"score_{p['rank']}": p["score"]})  # fmt: skip
            self.csv.writerow([row.get(c, "") for c in self.header])
        self.file.flush()

    def close(self) -> None:
        self.file.close()


class FeatureWriter:
    """float32 rows streamed into a .npy whose header (with the row count) is filled in at the end; the
    array appears at its path, with its file list beside it, only when complete."""

    def __init__(self, path: Path, columns: int):
        self.path, self.columns, self.rows, self.files = path, columns, 0, []
        self.partial = path.with_name(path.name + ".partial")
        self.file = open(self.partial, "wb")
        self.file.write(npy_header(0, columns))

    def write(self, paths: list[str], rows: torch.Tensor) -> None:
        self.file.write(rows.to("cpu", torch.float32).contiguous().numpy().tobytes())
        self.files += paths
        self.rows += len(paths)

    def finish(self) -> None:
        self.file.seek(0)
        self.file.write(npy_header(self.rows, self.columns))
        self.file.close()
        os.replace(self.partial, self.path)
        atomic_write(str(self.path) + FILES_SUFFIX, "".join(f"{p}\n" for p in self.files).encode())

    def abandon(self) -> None:
        if not self.file.closed:
            self.file.close()


def npy_header(rows: int, columns: int) -> bytes:
    """A .npy version 1.0 header for float32 [rows, columns], always NPY_HEADER_BYTES long."""
    body = "{'descr': '<f4', 'fortran_order': False, 'shape': (%d, %d), }" % (rows, columns)
    size = NPY_HEADER_BYTES - 10
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", size) + (body.ljust(size - 1) + "\n").encode("latin1")


# 4. The run.


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
        raise TrainingError("--top-k, --batch-size and --max-pixels must be at least 1, --workers at least 0")
    if o.crops not in ("center", "ten"):
        raise TrainingError(f"--crops must be center or ten, got {o.crops!r}")
    if o.format is not None and o.format not in FORMATS:
        raise TrainingError(f"--format must be one of {', '.join(FORMATS)}")
    if o.layer not in FEATURE_LAYERS:
        raise TrainingError(f"--layer must be one of {', '.join(FEATURE_LAYERS)}")
    if o.features is None and (o.normalize or o.layer != "fc7"):
        raise TrainingError("--layer and --normalize apply only with --features OUT.npy")
    if o.features is not None and os.path.abspath(o.features) == os.path.abspath(o.output):
        raise TrainingError("--features must be another file than --output")


def default_workers() -> int:
    """The CPU cores less one (at least 1): the main process's forward pass uses every core too, and a
    decoder per core preempts it (2 cores: 78 img/s with 1 worker, 66 with 2; BENCHMARKS.md)."""
    return max(1, len(os.sched_getaffinity(0)) - 1)


def _device(spec: str) -> torch.device:
    try:
        device = torch.device(spec)
    except (RuntimeError, ValueError) as e:
        raise TrainingError(f"--device {spec}: {e}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise TrainingError(f"--device {spec}: torch {torch.__version__} sees no CUDA GPU")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise TrainingError(f"--device {spec}: {torch.cuda.device_count()} CUDA GPU(s) visible")
    return device


class Classifier:
    """The checkpoint's net on a device, from uint8 batches to probabilities (and hidden activations)."""

    def __init__(self, checkpoint, device: torch.device, crops: str, layer: str | None, normalize: bool):
        self.preprocessor = checkpoint.preprocessor()
        self.device, self.crops, self.layer, self.normalize = device, crops, layer, normalize
        if device.type == "cpu":
            keep_freed_memory()  # reuse the pages each forward pass frees (model/malloc.py), as the service does
            self.net = CPUInferenceNet(checkpoint.build_grouped("cpu"))  # the service's CPU form
        else:
            self.net = checkpoint.build_grouped(device).eval()
        state = checkpoint.state_dict
        self.feature_width = state["fc7.weight"].shape[1 if layer == "fc6" else 0]
        # fc7 and fc8 as plain linear layers: logits from the features, without a second forward pass
        names = ("fc7.weight", "fc7.bias", "fc8.weight", "fc8.bias")
        self.head = {k: state[k].to(device) for k in names} if layer is not None else {}

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor, max_rows: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """uint8 [n, 3, S, S] → (softmax probabilities [n, classes], features [n, d] or None), on the CPU."""
        x = self.preprocessor.from_uint8(images.to(self.device), self.crops)  # THE shared preprocessing
        n = len(x)
        if self.crops == "ten":
            x = x.flatten(0, 1)
        if self.layer is None:
            logits, features = torch.cat([self.net(part).float() for part in x.split(max_rows)]), None
        else:
            features = torch.cat([self.net.features(part, self.layer).float() for part in x.split(max_rows)])
            logits = self._logits(features)
        probabilities = logits.softmax(dim=1)
        if self.crops == "ten":  # the paper's 10-patch prediction: the softmax averaged over the patches
            probabilities = probabilities.view(n, 10, -1).mean(dim=1)
            features = None if features is None else features.view(n, 10, -1).mean(dim=1)
        if features is not None and self.normalize:
            features = F.normalize(features, dim=1)
        return probabilities.cpu(), None if features is None else features.cpu()

    def _logits(self, features: torch.Tensor) -> torch.Tensor:
        h = self.head
        x = features
        if self.layer == "fc6":
            x = F.relu(F.linear(x, h["fc7.weight"], h["fc7.bias"]))
        return F.linear(x, h["fc8.weight"], h["fc8.bias"])


def run_predict(checkpoint_path: str, sources: list[str], options: Options) -> dict:
    """Classify the files; append their records to OUT; return (and write) the summary."""
    o = options
    check_options(o)
    fmt = output_format(o.output, o.format)
    out = Path(o.output)
    if out.is_dir():
        raise TrainingError(f"--output {o.output}: is a folder")
    device = _device(o.device)
    items, folders = find_files(sources, o.files_from)
    checkpoint = load_checkpoint(checkpoint_path)  # a CheckpointError: exit status 1 (training.__main__)
    classes = checkpoint.classes
    wnids = {c.wnid: i for i, c in enumerate(classes)}
    if o.ground_truth is not None:
        apply_ground_truth(items, read_ground_truth(o.ground_truth, wnids, len(classes)), o.ground_truth)
        labels = f"ground-truth {os.path.abspath(o.ground_truth)}"
    else:
        labels = "folders" if label_folders(folders, wnids) else None
    labelled = labels is not None
    top_k = min(o.top_k, len(classes))
    settings = {"checkpoint_sha256": checkpoint.sha256, "crops": o.crops, "top_k": top_k, "format": fmt,
                "labels": labels}  # fmt: skip
    header = csv_header(top_k, labelled)

    summary_path = Path(str(out) + SUMMARY_SUFFIX)
    fresh, counts, todo = _what_is_left(o, items, fmt, header, settings, summary_path)

    summary = {
        "checkpoint": str(checkpoint_path), "output": o.output, **settings, "sources": list(sources),
        "files_from": o.files_from, "ground_truth": o.ground_truth, "complete": False,
    }  # fmt: skip
    atomic_write(summary_path, (json.dumps(summary, indent=1) + "\n").encode())

    classifier = Classifier(checkpoint, device, o.crops, o.layer if o.features else None, o.normalize)
    del checkpoint
    _init_worker(classifier.preprocessor, o.max_pixels, in_pool=False)
    workers = default_workers() if o.workers is None else o.workers
    size = classifier.preprocessor.config.resize
    writer = Writer(out, fmt, header, fresh)
    features = None
    if o.features:
        features = FeatureWriter(Path(o.features), classifier.feature_width)
    bar = Progress(len(todo), "predict", enabled=o.show_progress)
    started = time.perf_counter()
    new = 0
    entries = None
    try:
        labels_of = {item.path: item.label for item in todo}
        batch: list[tuple[str, bytes | None, str | None]] = []
        readable = 0
        entries = decoded([item.path for item in todo], workers, window=2 * o.batch_size + 2 * workers * CHUNK)
        for entry in entries:
            batch.append(entry)
            readable += entry[1] is not None
            if readable == o.batch_size:
                new += _classify(batch, labels_of, classifier, classes, top_k, o.batch_size, size, writer,
                                 features, counts, bar)  # fmt: skip
                batch, readable = [], 0
        if batch:
            new += _classify(batch, labels_of, classifier, classes, top_k, o.batch_size, size, writer, features,
                             counts, bar)  # fmt: skip
    except BaseException:
        if features is not None:
            features.abandon()
        raise
    finally:
        if entries is not None:
            entries.close()  # stops the worker pool now, not when the generator is collected
        writer.close()
        bar.close()
    seconds = time.perf_counter() - started
    if features is not None:
        features.finish()

    summary.update(
        complete=True,
        files=counts.files,
        classified=counts.classified,
        unreadable=counts.unreadable,
        labelled=counts.labelled,
        labelled_unreadable=counts.labelled_unreadable,
        **counts.errors(),
        this_run={"files": new, "seconds": round(seconds, 3), "images_per_second": round(new / seconds, 2)
                  if seconds > 0 else None},  # fmt: skip
        features=None if features is None else {"path": o.features, "layer": o.layer, "normalized": o.normalize,
                                                 "rows": features.rows, "files": o.features + FILES_SUFFIX},
    )  # fmt: skip
    atomic_write(summary_path, (json.dumps(summary, indent=1) + "\n").encode())
    print(format_summary(summary))
    print(f"written to {o.output} (summary: {summary_path})", file=sys.stderr)
    return summary


def _what_is_left(o: Options, items: list, fmt: str, header, settings: dict, summary_path: Path):
    """(whether OUT starts afresh, the counts of the records already in it, the items still to do)."""
    out = Path(o.output)
    fresh = o.features is not None or not out.exists()
    existing: list[dict] = []
    if not fresh:
        _check_settings(summary_path, settings, o.output)
        existing = read_existing(out, fmt, header)
    elif out.exists() and out.stat().st_size:
        print(f"{o.output}: replaced — a run with --features starts afresh (features are not resumable)",
              file=sys.stderr)  # fmt: skip
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
        raise TrainingError(
            f"{output} holds the predictions of another run ({described}); rerun with the same checkpoint "
            "and options to continue it, or write to another --output"
        )


def _classify(batch, labels_of, classifier, classes, top_k, max_rows, size, writer, features, counts, bar) -> int:
    """Run one batch through the net; write its records in file order. Returns the number of files."""
    good = [i for i, (_, pixels, _) in enumerate(batch) if pixels is not None]
    probabilities = activations = None
    if good:
        array = np.empty((len(good), 3, size, size), dtype=np.uint8)
        for row, i in enumerate(good):
            array[row] = np.frombuffer(batch[i][1], dtype=np.uint8).reshape(3, size, size)
        probabilities, activations = classifier(torch.from_numpy(array), max_rows)
        scores, indices = probabilities.topk(max(top_k, min(5, probabilities.shape[1])), dim=1)
        scores, indices = scores.tolist(), indices.tolist()
    rows = dict(zip(good, range(len(good))))
    for i, (path, _, error) in enumerate(batch):
        record: dict = {"path": path}
        if error is not None:
            record["error"] = error
        else:
            r = rows[i]
            record["predictions"] = [
                {"rank": rank, "index": index, "wnid": classes[index].wnid, "label": classes[index].label,
                 "score": score}
                for rank, (index, score) in enumerate(zip(indices[r][:top_k], scores[r][:top_k]), 1)
            ]  # fmt: skip
        label = labels_of.get(path)
        if label is not None:
            record["truth"] = classes[label].wnid
            if error is None:
                record["top1_correct"] = indices[rows[i]][0] == label
                record["top5_correct"] = label in indices[rows[i]][:5]
        writer.write(record)
        counts.add(record)
    if features is not None and good:
        features.write([batch[i][0] for i in good], activations)
    bar.update(len(batch))
    return len(batch)


def format_summary(s: dict) -> str:
    lines = [f"{s['files']:,} files: {s['classified']:,} classified, {s['unreadable']:,} unreadable"]
    if s.get("labels"):
        if s["labelled"]:
            lines.append(
                f"  top-1 error {s['top1_error']:.2%}  top-5 error {s['top5_error']:.2%}  over {s['labelled']:,}"
                f" labelled images ({s['crops']}; {s['labelled_unreadable']:,} labelled files unreadable, not counted)"
            )
        else:
            lines.append(f"  no labelled file could be read ({s['labelled_unreadable']:,} unreadable)")
    run = s["this_run"]
    if run["files"]:
        lines.append(f"  this run: {run['files']:,} files in {run['seconds']:.1f} s, {run['images_per_second']} img/s")
    return "\n".join(lines)
