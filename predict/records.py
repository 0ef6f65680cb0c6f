"""The output files: OUT (JSON lines or CSV, one record a file), the features array and the counts."""

from __future__ import annotations

import csv
import io
import json
import os
import struct
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from model.files import atomic_write

from .errors import PredictError

FORMATS = ("jsonl", "csv")

SUMMARY_SUFFIX = ".summary.json"

FILES_SUFFIX = ".files.txt"

NPY_HEADER_BYTES = 128  # reserved at the start of the features file, filled in once the row count is known


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
    file; any other line that is not a record is a PredictError."""
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
                    raise PredictError(f"{path}, line {number}: not a prediction record; use another --output")
                records.append(record)
            good_end = offset
        if good_end < len(data):
            _drop_tail(path, good_end)
        return records
    text = data.decode("utf-8", errors="replace")
    rows = list(csv.reader(io.StringIO(text, newline="")))
    if not rows or rows[0] != header:
        raise PredictError(
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
            raise PredictError(f"{path}, line {number}: {len(row)} columns, expected {len(header)}")
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
                row["truth"] = record["truth"]
                row["top1_correct"] = int(record.get("top1_correct", False))
                row["top5_correct"] = int(record.get("top5_correct", False))
            for p in record.get("predictions", ()):
                rank = p["rank"]
                row.update({f"wnid_{rank}": p["wnid"], f"label_{rank}": p["label"], f"score_{rank}": p["score"]})
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
