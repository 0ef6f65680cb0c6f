"""The prepared stores at ImageNet's size and the loader: a full-size raw store mapped read-only and shared
(bounded memory, a read-only volume), the JPEG store (prepare, resume, damage, flags, the loader with and
without worker processes, training on it), and directories of format version 1."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from support.training import WNIDS, digest, expect_error, make_source, prepare_quietly, train_cli, tree_digest

from model import load_image
from model.files import atomic_write
from training.data import IMAGE_BYTES, PreparedDataset
from training.errors import TrainingError
from training.loader import BatchLoader, LoaderError

REPO = Path(__file__).resolve().parents[1]
PHOTOS = REPO / "tests" / "fixtures" / "images"
IMAGENET_TRAIN = 1_281_167
MB = 2**20


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """The same small source (3 classes; one undecodable train file) prepared raw and as JPEG (quality 90)."""
    root = tmp_path_factory.mktemp("stores")
    src = make_source(root / "src", train=4, val=2)
    (src / "train" / WNIDS[0] / "broken.JPEG").write_bytes(b"\xff\xd8\xff\xe0 not really a JPEG")
    prepare_quietly(src, root / "raw", chunk=3)
    prepare_quietly(src, root / "jpeg", chunk=3, store="jpeg")
    return root


def read_all(split, workers, batch_size=5, slots=None, order=None):
    """Every image of the split through BatchLoader, in a random order and uneven batches (the last short)."""
    order = torch.randperm(len(split), generator=torch.Generator().manual_seed(1)) if order is None else order
    images, labels, keys = [], [], []
    with BatchLoader(split, workers, batch_size, slots=slots) as loader:
        for batch in loader.batches(enumerate(order.split(batch_size))):
            keys.append(batch.key)
            images.append(batch.images.clone())
            labels.append(batch.labels.clone())
            batch.release()
    assert keys == list(range(len(keys)))
    inverse = torch.argsort(order)
    return torch.cat(images)[inverse], torch.cat(labels)[inverse]


def memory_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def mapping_of(path: Path) -> list[str]:
    """The permission fields of this process's mappings of ``path`` (e.g. "r--s": read-only, shared)."""
    target = str(path.resolve())
    return [line.split()[1] for line in Path("/proc/self/maps").read_text().splitlines() if line.endswith(target)]


def full_size_store(small: Path, dest: Path, count: int = IMAGENET_TRAIN) -> Path:
    """A raw store of ImageNet's train size (a sparse 252 GB train.u8; real index, stats and val from ``small``)."""
    shutil.copytree(small, dest)
    meta = json.loads((dest / "dataset.json").read_text())
    meta["splits"]["train"] = {"images": count, "skipped": 0}
    index = json.loads((dest / "train.json").read_text())
    index.update(files=[f"train/{WNIDS[i % 3]}/{i}.JPEG" for i in range(count)], labels=[i % 3 for i in range(count)])
    index["skipped"] = []
    atomic_write(dest / "train.json", json.dumps(index).encode())
    atomic_write(dest / "dataset.json", json.dumps(meta).encode())
    os.truncate(dest / "train.u8", count * IMAGE_BYTES)  # a hole: reads as zeros, takes no disk
    return dest


# The raw store at ImageNet's size.


@pytest.mark.slow
def test_a_full_size_raw_store_is_mapped_read_only_and_reads_in_bounded_memory(stores, tmp_path):
    """A private writable mapping of 252 GB is refused on a machine with less RAM + swap (overcommit mode
    0); a shared read-only one costs only the pages read."""
    data = full_size_store(stores / "raw", tmp_path / "imagenet")
    split = PreparedDataset(data).split("train")
    assert len(split) == IMAGENET_TRAIN and split.images.shape == (IMAGENET_TRAIN, 3, 256, 256)
    assert mapping_of(data / "train.u8") == ["r--s"]

    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak RSS (VmHWM) to the current RSS
        field = "VmHWM"
    except OSError:
        field = "VmRSS"
    before = memory_kb(field)
    generator = torch.Generator().manual_seed(0)
    for workers in (0, 2):  # (faults on the file's hole are slow on some disks: few images)
        steps = [(step, torch.randint(0, IMAGENET_TRAIN, (32,), generator=generator)) for step in range(3)]
        with BatchLoader(split, workers, 32) as loader:
            for batch in loader.batches(steps):
                assert batch.images.shape == (32, 3, 256, 256) and int(batch.images.max()) == 0
                assert torch.equal(batch.labels, steps[batch.key][1] % 3)
                batch.release()
    grown = (memory_kb(field) - before) / 1024
    assert grown < 200, f"{field} grew by {grown:.0f} MB reading 6 batches of 32 images (6 MB each)"


def read_only_mount(source: Path, target: Path):
    """Bind-mount ``source`` read-only at ``target`` (root only; skips when mounting is not allowed)."""
    target.mkdir()
    done = subprocess.run(["mount", "--bind", str(source), str(target)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot bind-mount here: {done.stderr.decode().strip()}")
    remount = subprocess.run(["mount", "-o", "remount,ro,bind", str(target)], capture_output=True)
    if remount.returncode != 0:
        subprocess.run(["umount", str(target)])
        pytest.skip(f"cannot remount read-only: {remount.stderr.decode().strip()}")


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("mount"), reason="needs root to bind-mount")
def test_both_stores_read_from_a_read_only_volume(stores, tmp_path):
    """docker-compose mounts the prepared data read-only (root ignores file permissions: a real ro mount)."""
    read_only_mount(stores, tmp_path / "ro")
    try:
        with pytest.raises(OSError):
            (tmp_path / "ro" / "raw" / "probe").write_text("")
        for kind in ("raw", "jpeg"):
            split = PreparedDataset(tmp_path / "ro" / kind).split("train")
            images, labels = read_all(split, workers=2)
            expected = read_all(PreparedDataset(stores / kind).split("train"), workers=0)
            assert torch.equal(images, expected[0]) and torch.equal(labels, expected[1])
            name = "train.u8" if kind == "raw" else "train.jpg"
            assert mapping_of(tmp_path / "ro" / kind / name) == ["r--s"]
            del split
    finally:
        import gc

        gc.collect()  # drop the mappings before unmounting
        subprocess.run(["umount", "-l", str(tmp_path / "ro")])


# The JPEG store.


def test_jpeg_store_holds_the_shared_preprocessing_within_jpeg_error(stores):
    meta = json.loads((stores / "jpeg" / "dataset.json").read_text())
    assert (meta["format_version"], meta["store"], meta["quality"]) == (2, "jpeg", 90)
    assert meta["chroma_subsampling"] == "4:4:4"
    raw_meta = json.loads((stores / "raw" / "dataset.json").read_text())
    assert (raw_meta["format_version"], raw_meta["store"], raw_meta["quality"]) == (1, "raw", None)
    assert meta["splits"] == raw_meta["splits"]
    assert meta["splits"] == {"train": {"images": 12, "skipped": 1}, "val": {"images": 6, "skipped": 0}}
    for name in ("stats.safetensors", "skipped.txt"):  # statistics of the pixels before compression
        assert digest(stores / "jpeg" / name) == digest(stores / "raw" / name), name

    for split_name in ("train", "val"):
        jpeg = PreparedDataset(stores / "jpeg").split(split_name)
        raw = PreparedDataset(stores / "raw").split(split_name)
        assert (jpeg.files, jpeg.skipped, jpeg.name) == (raw.files, raw.skipped, raw.name)
        assert torch.equal(jpeg.labels, raw.labels)
        inline, inline_labels = read_all(jpeg, workers=0)
        forked, forked_labels = read_all(jpeg, workers=2, slots=3)
        assert torch.equal(inline, forked) and torch.equal(inline_labels, forked_labels)  # processes = inline
        assert torch.equal(inline_labels, raw.labels)
        assert torch.equal(jpeg.batch(torch.arange(len(jpeg)))[0], inline)
        error = inline.float() - raw.images.float()
        # measured on these synthetic images at quality 90: RMSE 0.69, max 10 levels
        assert error.pow(2).mean().sqrt() < 1.0 and error.abs().max() <= 16


@pytest.mark.slow
def test_jpeg_store_of_real_photos_is_close_to_the_raw_pixels(tmp_path):
    """The ten real photos, through the shared preprocessing, then the store's JPEG at quality 90."""
    src = tmp_path / "src"
    for photo in sorted(PHOTOS.glob("*.JPEG")):
        for split in ("train", "val"):
            (src / split / photo.name.split("_")[0]).mkdir(parents=True, exist_ok=True)
            shutil.copy(photo, src / split / photo.name.split("_")[0] / photo.name)
    prepare_quietly(src, tmp_path / "jpeg", store="jpeg")
    split = PreparedDataset(tmp_path / "jpeg").split("val")
    images, _ = read_all(split, workers=0, batch_size=4)
    exact = torch.stack([load_image((src / file).read_bytes()) for file in split.files])
    error = images.float() - exact.float()
    # measured: RMSE 2.89, max 40 levels (BENCHMARKS.md, "Training")
    assert error.pow(2).mean().sqrt() < 3.2 and error.abs().max() <= 48


@pytest.mark.slow
def test_a_jpeg_store_trains_an_epoch(stores, tmp_path):
    assert train_cli(stores / "jpeg", tmp_path / "run", "--epochs", "1") == 0
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 1 and metrics[0]["epoch"] == 1
    assert (tmp_path / "run" / "best.safetensors").exists()


def test_jpeg_prepare_resumes_where_it_was_interrupted(stores, tmp_path, monkeypatch):
    import training.prepare_split as prep

    decode, calls = prep._decode, []

    def interrupted(task):
        calls.append(task[0])
        if len(calls) == 8:
            raise KeyboardInterrupt  # as Ctrl-C (or a kill) would, mid-split
        return decode(task)

    src, dest = stores / "src", tmp_path / "prepared"
    monkeypatch.setattr(prep, "_decode", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare_quietly(src, dest, chunk=3, store="jpeg")
    assert not (dest / "dataset.json").exists() and not (dest / "train.jpg").exists()
    with pytest.raises(TrainingError, match="did not finish; rerun `prepare`"):
        PreparedDataset(dest)
    # bytes written after the last record (a crash mid-chunk), in every partial file: cut off on resume
    for name in (".train.jpg.partial", ".train.offsets.partial", ".train.crc32.partial"):
        assert (dest / name).exists(), name
        with open(dest / name, "ab") as f:
            f.write(b"\x01" * 1000)

    expect_error_store = "unfinished jpeg (quality 90) preparation"
    with pytest.raises(TrainingError, match=expect_error_store.replace("(", r"\(").replace(")", r"\)")):
        prepare_quietly(src, dest, chunk=3)  # continuing it as a raw store is refused

    calls.clear()
    monkeypatch.setattr(prep, "_decode", lambda task: calls.append(task[0]) or decode(task))
    prepare_quietly(src, dest, chunk=3, store="jpeg")
    assert len(calls) == 13 - 6 + 6  # train resumed after the 6 recorded images (2 chunks of 3), then val
    names = ("train.jpg", "train.offsets", "train.crc32", "val.jpg", "val.offsets", "val.crc32")
    for name in (*names, "train.json", "val.json", "stats.safetensors", "skipped.txt"):
        assert digest(dest / name) == digest(stores / "jpeg" / name), name  # identical to an uninterrupted run
    assert [p.name for p in dest.glob(".*")] == []  # no partial or progress files left, and no .lock

    calls.clear()
    before = tree_digest(dest)
    prepare_quietly(src, dest, store="jpeg")  # already done: nothing is decoded or rewritten
    assert calls == [] and tree_digest(dest) == before


def test_a_damaged_jpeg_record_stops_training_naming_it(stores, tmp_path, capsys):
    data = tmp_path / "damaged"
    shutil.copytree(stores / "jpeg", data)
    split = PreparedDataset(data).split("train")
    record = 7
    start, end = split.offsets[record].item(), split.offsets[record + 1].item()
    del split
    with open(data / "train.jpg", "r+b") as f:  # overwrite bytes in the middle of record 7
        f.seek((start + end) // 2)
        f.write(b"\x55" * 16)

    split = PreparedDataset(data).split("train")
    fragments = ("train.jpg: record 7 of the train split", f"({split.files[record]})", "prepare` again")
    for workers in (0, 2):
        with pytest.raises(TrainingError) as caught:
            read_all(split, workers, order=torch.arange(len(split)))
        assert all(f in str(caught.value) for f in fragments), caught.value
    intact = PreparedDataset(stores / "jpeg").split("train")
    assert torch.equal(split.batch(torch.tensor([6]))[0], intact.batch(torch.tensor([6]))[0])  # the others read

    argv = ["train", str(data), "--out", str(tmp_path / "run"), "--epochs", "1", "--width", "0.0625"]
    expect_error(capsys, [*argv, "--batch-size", "4", "--no-progress"], *fragments)


def test_bad_store_flags_are_refused(stores, tmp_path, capsys):
    src = str(stores / "src")
    dest = tmp_path / "dest"
    expect_error(capsys, ["prepare", src, str(dest), "--store", "zip"], "--store must be one of raw, jpeg")
    for quality in ("0", "101", "-5"):
        expect_error(
            capsys,
            ["prepare", src, str(dest), "--store", "jpeg", "--quality", quality],
            "--quality must be an integer from 1 to 100",
        )
    expect_error(capsys, ["prepare", src, str(dest), "--quality", "90"], "--quality applies only to --store jpeg")
    with pytest.raises(SystemExit) as exit_:
        from training.__main__ import main

        main(["prepare", src, str(dest), "--store", "jpeg", "--quality", "high"])
    assert exit_.value.code == 2
    assert not dest.exists()
    before = tree_digest(stores / "raw")
    argv = ["prepare", src, str(stores / "raw"), "--store", "jpeg"]
    expect_error(capsys, argv, "already holds this dataset as a raw store")
    assert tree_digest(stores / "raw") == before


def test_a_version_1_directory_reads_as_raw_and_nothing_is_misread(stores, tmp_path):
    old = tmp_path / "v1"
    shutil.copytree(stores / "raw", old)
    meta = json.loads((old / "dataset.json").read_text())
    del meta["store"], meta["quality"]  # exactly what the code before version 2 wrote
    assert meta["format_version"] == 1
    (old / "dataset.json").write_text(json.dumps(meta))
    dataset = PreparedDataset(old)
    assert dataset.store == "raw"
    for name in ("train", "val"):
        images, labels = read_all(dataset.split(name), workers=0)
        expected = PreparedDataset(stores / "raw").split(name)
        assert torch.equal(images, expected.images) and torch.equal(labels, expected.labels)

    for bad in ({**meta, "store": "jpeg"}, {**meta, "format_version": 2, "store": "zip"}):
        (old / "dataset.json").write_text(json.dumps(bad))
        with pytest.raises(TrainingError, match="prepare the dataset again"):
            PreparedDataset(old)
    # and a JPEG store is version 2: the code before it refuses it instead of misreading its files
    assert json.loads((stores / "jpeg" / "dataset.json").read_text())["format_version"] == 2


# The loader's processes.


def test_a_killed_worker_raises_instead_of_hanging(stores):
    split = PreparedDataset(stores / "jpeg").split("train")
    loader = BatchLoader(split, 2, 4)
    batches = loader.batches((step, torch.arange(4)) for step in range(10**6))
    next(batches).release()
    os.kill(loader._workers[0].pid, signal.SIGKILL)
    started = time.monotonic()
    with pytest.raises(LoaderError, match="killed by signal 9"):
        for batch in batches:
            batch.release()
    assert time.monotonic() - started < 10
    assert not any(p.is_alive() for p in loader._workers)  # the others were ended too


@pytest.mark.slow
def test_batches_held_too_long_are_an_error_not_a_hang(stores):
    split = PreparedDataset(stores / "jpeg").split("train")
    with BatchLoader(split, 1, 4, slots=2, release_timeout=0.5) as loader:
        with pytest.raises(LoaderError, match="not released"):
            for _ in loader.batches((step, torch.arange(4)) for step in range(5)):
                pass  # never released


CONSUMER = """
import signal, sys, time, torch
# Ctrl-C raises KeyboardInterrupt even when this test runs in the background, where the shell hands its
# children SIGINT ignored (and Python then installs no handler).
signal.signal(signal.SIGINT, signal.default_int_handler)
sys.path.insert(0, {repo!r})
from training.data import PreparedDataset
from training.loader import BatchLoader
loader = BatchLoader(PreparedDataset({data!r}).split("train"), 2, 4)
print(" ".join(str(p.pid) for p in loader._workers), flush=True)
try:
    for batch in loader.batches((step, torch.arange(4)) for step in range(10**9)):
        batch.release()
        time.sleep(0.01)
except KeyboardInterrupt:
    loader.close()
    sys.exit(130)
"""


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")  # a zombie has exited (nobody may reap it in a container)


@pytest.mark.slow
@pytest.mark.parametrize("how", [signal.SIGINT, signal.SIGKILL])
def test_no_worker_outlives_its_consumer(stores, how):
    """Ctrl-C ends the workers through close(); a consumer killed outright leaves them to notice (≤ 1 s)."""
    script = CONSUMER.format(repo=str(REPO), data=str(stores / "jpeg"))
    consumer = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    pids = [int(p) for p in consumer.stdout.readline().split()]
    assert len(pids) == 2 and all(alive(p) for p in pids)
    time.sleep(0.5)
    consumer.send_signal(how)
    assert consumer.wait(30) == (130 if how == signal.SIGINT else -signal.SIGKILL)
    deadline = time.monotonic() + 10
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(alive(p) for p in pids)
