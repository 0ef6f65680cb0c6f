"""Faults: hostile checkpoints swapped in while serving, training killed in the middle of writing a file,
a disk that fills up during prepare and train.

(Covered elsewhere, not repeated here: a truncated checkpoint swapped in while serving and a clean hot
reload, tests/test_service_reload.py; SIGTERM letting requests in flight finish with exit status 0,
tests/test_service_startup.py; resuming after SIGKILL between steps equals uninterrupted training,
tests/test_training_resume.py.)
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import resource
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch
from support.service import REPO, metric_value, write_checkpoint
from support.training import make_source, prepare_quietly, train_cli, tree_digest

from model import load_checkpoint
from model.files import atomic_write
from training.state import read_state

# Hostile checkpoints while serving ---------------------------------------------------------------------


class Exploit:
    """Unpickling this runs a shell command: what a pickle-based checkpoint can do to whoever loads it."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def split_safetensors(data: bytes) -> tuple[dict, bytes]:
    (length,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + length]), data[8 + length :]


def join_safetensors(header: dict, payload: bytes) -> bytes:
    encoded = json.dumps(header).encode()
    return struct.pack("<Q", len(encoded)) + encoded + payload


def hostile_checkpoints(good: bytes, marker: Path, directory: Path) -> dict[str, tuple[bytes, str]]:
    """name → (file contents, a fragment of the rejection message)."""
    header, payload = split_safetensors(good)
    tensors = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])
    first, second = tensors[0], tensors[1]

    def lie(**changes) -> bytes:
        """The good file with some tensor entries of its header changed."""
        edited = json.loads(json.dumps(header))
        for name, fields in changes.items():
            edited[name].update(fields)
        return join_safetensors(edited, payload)

    torch_zip = directory / "exploit.pt"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "extra": Exploit(marker)}, torch_zip)  # PyTorch's own format
    pickled = pickle.dumps(Exploit(marker))
    assert b"system" in pickled and b"system" in torch_zip.read_bytes()  # live payloads: they would run the command
    nan = load_checkpoint_bytes(good, directory)
    nan.state_dict["fc8.bias"][0] = float("nan")
    nan_path = directory / "nan.safetensors"
    nan.save(nan_path)
    return {
        "empty": (b"", "too short"),
        "pickle renamed to .safetensors": (pickled, "not a safetensors file"),
        "torch.save zip renamed to .safetensors": (torch_zip.read_bytes(), "not a safetensors file"),
        "header length of 2**63": (struct.pack("<Q", 2**63) + good[8:], "not a safetensors file, or truncated"),
        "offsets past the end of the file": (
            lie(**{first: {"data_offsets": [0, 10**12]}}),
            "truncated",
        ),
        "shape larger than its bytes": (
            lie(**{first: {"shape": [4096, 9216]}}),
            "corrupt tensor data",
        ),
        "shape whose size overflows": (
            lie(**{first: {"shape": [2**40, 2**40, 2**40]}}),
            "corrupt tensor data",
        ),
        "two tensors on the same bytes": (
            lie(**{second: {"data_offsets": header[first]["data_offsets"], "shape": header[first]["shape"]}}),
            "corrupt tensor data",
        ),
        "a tensor entry without offsets": (lie(**{first: {"data_offsets": None}}), "without valid data_offsets"),
        "data after what the header describes": (good + bytes(1_000_000), "more than its header describes"),
        "NaN weights": (nan_path.read_bytes(), "NaN"),
        "truncated in the middle of a tensor": (good[: len(good) // 2], "truncated"),
    }


def load_checkpoint_bytes(data: bytes, directory: Path):
    path = directory / "copy.safetensors"
    path.write_bytes(data)
    return load_checkpoint(path)


def test_hostile_checkpoints_are_rejected_while_the_old_model_serves_every_request(tmp_path, photos, live_service):
    path = tmp_path / "serving" / "best.safetensors"
    path.parent.mkdir()
    good = write_checkpoint(tmp_path / "good.safetensors", seed=31, width=0.0625, epoch=1)
    newer = write_checkpoint(tmp_path / "newer.safetensors", seed=32, width=0.0625, epoch=2)
    atomic_write(path, good.read_bytes())
    sha_good, sha_newer = (hashlib.sha256(p.read_bytes()).hexdigest() for p in (good, newer))
    marker = tmp_path / "code-was-executed"
    hostile = hostile_checkpoints(good.read_bytes(), marker, tmp_path)

    server = live_service("--threads", "1", "--decode-workers", "1", "--reload-interval-s", "0.1", checkpoint=path)
    stop, answers, failures = threading.Event(), [], []
    data = photos[2].read_bytes()

    def traffic():
        with httpx.Client(base_url=server.url, timeout=60) as client:
            while not stop.is_set():
                try:
                    response = client.post("/classify", files={"file": ("photo.jpg", data)})
                except httpx.HTTPError as e:
                    failures.append(repr(e))
                    continue
                if response.status_code == 200:
                    answers.append(response.json()["model"]["sha256"])
                else:
                    failures.append(f"{response.status_code}: {response.text}")

    worker = threading.Thread(target=traffic)
    try:
        worker.start()
        with httpx.Client(base_url=server.url, timeout=60) as client:

            def failed_reloads() -> float:
                return metric_value(client.get("/metrics").text, "alexnet_model_reloads_total", result="failed")

            for count, (name, (contents, message)) in enumerate(hostile.items(), 1):
                atomic_write(path, contents)
                deadline = time.monotonic() + 30
                while failed_reloads() < count:
                    assert time.monotonic() < deadline, f"{name}: no rejection logged\n{server.log()[-2000:]}"
                    time.sleep(0.05)
                rejection = [line for line in server.log().splitlines() if "rejected the new checkpoint" in line][-1]
                assert message in rejection, (name, rejection)
                assert client.get("/model").json()["model"]["sha256"] == sha_good, name
                assert client.get("/readyz").status_code == 200, name

            atomic_write(path, newer.read_bytes())  # a good file after all that: served
            deadline = time.monotonic() + 30
            while client.get("/model").json()["model"]["sha256"] != sha_newer:
                assert time.monotonic() < deadline, server.log()[-2000:]
                time.sleep(0.05)
            time.sleep(0.3)
    finally:
        stop.set()
        if worker.is_alive():
            worker.join()
        code = server.stop()
    assert code == 0, server.log()[-3000:]
    assert not failures, failures[:5]
    assert answers and set(answers) <= {sha_good, sha_newer} and answers[-1] == sha_newer
    assert not marker.exists(), "loading a checkpoint executed code"
    assert "unhandled error" not in server.log()


def read_response(connection: socket.socket) -> bytes:
    """One HTTP response (head and Content-Length body) from a raw socket."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += connection.recv(4096) or b"\r\n\r\n"
    head = data.split(b"\r\n\r\n", 1)[0].lower()
    length = int(head.split(b"content-length:", 1)[1].split(b"\r\n", 1)[0]) if b"content-length:" in head else 0
    while len(data) < len(head) + 4 + length:
        chunk = connection.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


def test_a_stalled_upload_gives_its_queue_place_back(tmp_path, photos, live_service):
    """Clients that send headers and a few bytes of body, then nothing (slowloris), are answered 408 after
    the body timeout: they cannot hold the queue's places for ever."""
    checkpoint = write_checkpoint(tmp_path / "small.safetensors", seed=33, width=0.0625)
    server = live_service(
        "--threads", "1",
        "--queue-size", "2",
        "--body-timeout-s", "3",  # long enough to see the places taken on a busy machine
        "--reload-interval-s", "0",
        checkpoint=checkpoint,
    )  # fmt: skip
    stalled = []
    try:
        head = b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\nContent-Length: 100000\r\n\r\n"
        for _ in range(2):
            connection = socket.create_connection(("127.0.0.1", server.port))
            connection.sendall(head + photos[0].read_bytes()[:100])
            stalled.append(connection)
        data = photos[1].read_bytes()
        post = lambda: httpx.post(server.url + "/classify", content=data, headers={"Content-Type": "image/jpeg"})  # noqa: E731
        deadline = time.monotonic() + 10
        while metric_value(httpx.get(server.url + "/metrics").text, "alexnet_queue_depth", kind="admitted") < 2:
            assert time.monotonic() < deadline, "the stalled uploads were never admitted"
            time.sleep(0.02)
        assert post().status_code == 503  # both places taken by the stalled uploads
        for connection in stalled:
            connection.settimeout(10)
            answer = read_response(connection)
            assert answer.startswith(b"HTTP/1.1 408 "), answer
            assert b"urn:alexnet:problem:body-timeout" in answer
        response = post()
        assert response.status_code == 200, response.text
    finally:
        for connection in stalled:
            connection.close()
        assert server.stop() == 0, server.log()[-2000:]


# Training killed while writing a file --------------------------------------------------------------------

# Runs `python -m training …` with one write sabotaged: SIGKILL halfway through writing TARGET's temporary
# file (the rest never reached the disk), or SIGKILL after the temporary file is complete and synced but
# before it is renamed over TARGET.
KILLER = """
import os, signal, sys
from pathlib import Path

import safetensors.torch

target, moment, argv = sys.argv[1], sys.argv[2], sys.argv[3:]
if moment == "mid-write":
    real_save = safetensors.torch.save_file

    def save_file(tensors, filename, metadata=None):
        real_save(tensors, filename, metadata=metadata)
        if Path(filename).name.startswith("." + target + "."):
            os.truncate(filename, os.path.getsize(filename) // 2)
            os.kill(os.getpid(), signal.SIGKILL)

    safetensors.torch.save_file = save_file
else:
    real_replace = os.replace

    def replace(source, destination, **kwargs):
        if Path(destination).name == target:
            os.kill(os.getpid(), signal.SIGKILL)
        return real_replace(source, destination, **kwargs)

    os.replace = replace

from training.__main__ import main

sys.exit(main(argv))
"""

TRAIN_ARGS = ("--width", "0.0625", "--batch-size", "4", "--workers", "1", "--lr", "0.003", "--no-progress")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults-data")
    prepare_quietly(make_source(root / "src", classes=3, train=4, val=2), root / "prepared")
    return root / "prepared"


def temporaries(run: Path) -> list[str]:
    return sorted(p.name for p in run.iterdir() if p.name.endswith(".tmp"))


@pytest.mark.slow
@pytest.mark.parametrize(
    "target, moment",
    [("last.safetensors", "mid-write"), ("state.safetensors", "before-rename")],  # epoch 2's first and third write
)
def test_sigkill_while_writing_leaves_the_previous_files_and_resume_continues(prepared, tmp_path, target, moment):
    run = tmp_path / "run"
    assert train_cli(prepared, run, "--epochs", "1") == 0
    before = tree_digest(run)
    killer = tmp_path / "killer.py"
    killer.write_text(KILLER)
    command = [sys.executable, str(killer), target, moment, "train", str(prepared), "--out", str(run), *TRAIN_ARGS]
    result = subprocess.run(
        [*command, "--epochs", "2", "--resume"],
        cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == -signal.SIGKILL, result.stderr
    assert temporaries(run), "the killed write should have left its temporary file"

    # The file being written is still the one epoch 1 wrote, whole; so is every file after it in epoch 2's
    # order of writes (last, best if better, state, metrics). Every file loads.
    after = tree_digest(run)
    assert after[target] == before[target]
    if target == "last.safetensors":
        assert {k: v for k, v in after.items() if not k.endswith(".tmp") and k != ".lock"} == before  # killed: .lock stays
    assert load_checkpoint(run / "best.safetensors").provenance["epoch"] == 1
    assert load_checkpoint(run / "last.safetensors").provenance["epoch"] in (1, 2)
    assert read_state(run / "state.safetensors")[0]["epoch"] == 1  # so --resume redoes epoch 2

    assert train_cli(prepared, run, "--epochs", "2", "--resume") == 0
    assert temporaries(run) == [], "the resumed run should have removed what the killed one left"
    assert load_checkpoint(run / "last.safetensors").provenance["epoch"] == 2
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [1, 2]


# A disk that fills up -------------------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path):
    """A tmpfs (root only; CI runs as root) and a function that resizes it."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root; test_file_size_limit covers the same error path")
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mount_point)], capture_output=True, text=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.strip()}); test_file_size_limit covers the error path")

    def resize(size: int) -> None:
        size = (size + 4095) // 4096 * 4096
        subprocess.run(["mount", "-o", f"remount,size={size}", str(mount_point)], check=True, capture_output=True)

    try:
        yield mount_point, resize
    finally:
        subprocess.run(["umount", "--lazy", str(mount_point)], check=False)


def run_cli(capsys, argv) -> tuple[int, str]:
    from training.__main__ import main

    code = main(argv)
    return code, capsys.readouterr().err


def assert_out_of_space(code: int, err: str, reason: str = "no space left on device") -> None:
    last = err.strip().splitlines()[-1]
    assert code == 2 and "Traceback" not in err, err
    assert last.startswith(f"error: {reason}") and "intact" in last and "rerun" in last, err


@pytest.mark.slow
def test_disk_full_during_train_keeps_the_last_epoch_and_resume_continues(prepared, small_disk, capsys):
    disk, resize = small_disk
    run = disk / "run"
    assert train_cli(prepared, run, "--epochs", "1") == 0
    before = tree_digest(run)
    resize(shutil.disk_usage(disk).used + 64 * 1024)  # no room for epoch 2's checkpoint

    code, err = run_cli(capsys, ["train", str(prepared), "--out", str(run), *TRAIN_ARGS, "--epochs", "2", "--resume"])
    assert_out_of_space(code, err)
    assert "--resume" in err
    assert tree_digest(run) == before  # epoch 1's files whole, no temporary left behind

    resize(64 * 1024 * 1024)  # space freed
    assert train_cli(prepared, run, "--epochs", "2", "--resume") == 0
    assert load_checkpoint(run / "last.safetensors").provenance["epoch"] == 2


@pytest.mark.slow
def test_disk_full_during_prepare_leaves_no_dataset_and_a_rerun_finishes(small_disk, tmp_path, capsys, monkeypatch):
    disk, resize = small_disk
    src = make_source(tmp_path / "src", classes=3, train=6, val=2)  # 24 images: 4.7 MB prepared
    reference = tmp_path / "reference"
    prepare_quietly(src, reference)

    # prepare checks the free space before it starts; here the disk fills up after that check (another
    # job writing to it), so the writes themselves fail.
    resize(2 * 1024 * 1024)
    free = shutil._ntuple_diskusage(10**12, 0, 10**12)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: free)
    dest = disk / "prepared"
    code, err = run_cli(capsys, ["prepare", str(src), str(dest), "--workers", "0", "--chunk", "2", "--no-progress"])
    assert_out_of_space(code, err)
    assert not (dest / "dataset.json").exists()
    code, err = run_cli(capsys, ["train", str(dest), "--out", str(tmp_path / "run"), "--no-progress"])
    assert code == 2 and "dataset.json" in err.strip().splitlines()[-1], err  # not taken for a dataset

    monkeypatch.undo()
    resize(64 * 1024 * 1024)
    code, err = run_cli(capsys, ["prepare", str(src), str(dest), "--workers", "0", "--chunk", "2", "--no-progress"])
    assert code == 0, err
    expected, got = tree_digest(reference), tree_digest(dest)
    for name in ("train.u8", "val.u8", "train.json", "val.json", "stats.safetensors", "skipped.txt"):
        assert got[name] == expected[name], name
    assert not temporaries(dest)


@pytest.mark.slow
def test_file_size_limit_is_a_clear_error_too(prepared, tmp_path):
    """No root needed: ``ulimit -f`` (RLIMIT_FSIZE) makes large writes fail with EFBIG, as a quota would."""
    run = tmp_path / "run"

    def limit_file_size():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of killing us
        resource.setrlimit(resource.RLIMIT_FSIZE, (512 * 1024, 512 * 1024))

    result = subprocess.run(
        [sys.executable, "-m", "training", "train", str(prepared), "--out", str(run), *TRAIN_ARGS, "--epochs", "1"],
        cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        preexec_fn=limit_file_size,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert_out_of_space(result.returncode, result.stderr, "file too large")
    assert sorted(p.name for p in run.iterdir()) == []  # nothing half-written (and the lock removed)
