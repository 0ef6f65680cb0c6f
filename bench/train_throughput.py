"""Training input pipeline and training step throughput, in one run.

    python bench/train_throughput.py [--seconds 5] [--batch 128] [--cores 13] [--gpu-rate 16000]
                                     [--step-batch 32] [--step-seconds 20] [--quality-table]

The ten real photos are prepared twice, as the raw store and as the JPEG store (``prepare --store``),
and read back through the training loop's own loader (``training.loader.BatchLoader``), batches of
--batch uint8 images delivered into its buffer slots and released at once:

(a) raw        raw store; inline (workers=0: one core) and with 1 copying thread
(a') jpeg      JPEG store (default quality); inline (one core: the per-core decoding rate), and with 1 and 2
               worker processes (what the loader delivers; per core = rate / processes)
(a'') + aug    the same inline, with the batched CPU augmentation (random 224 crops, flips, mean image, PCA
               lighting: ``TrainAugmentation``) on top, on the same core; and the augmentation alone
(b) naive      a per-image Pillow pipeline on one core, as data loaders commonly do it: decode the
               original JPEG, shorter side → 256, centre 256², random 224 crop, random flip, to float,
               minus the mean image, PCA lighting (per-image torch ops; numpy is not a dependency
               here, and for 3×224×224 arrays it would cost the same)
(b')           the same with Pillow's JPEG draft mode (libjpeg decodes at 1/2–1/8 scale): the fastest
               per-image variant, so that the ratio is not flattered by a slow baseline
(p) projection 90 epochs of ImageNet (1,281,167 images) on a machine with --cores cores decoding and GPUs
               that train --gpu-rate img/s: 90 × 1,281,167 / min(per-core rate × cores, GPU rate)
(q) quality    with --quality-table: per JPEG quality (4:4:4, and 4:2:0 at 90 for comparison) the bytes per
               image, the pixel error against the raw store (RMSE, max |error| in 0–255 levels, over the
               ten photos after the shared preprocessing) and the inline decoding rate
(c) step       a full training step of the paper's full-size net (two towers on the CPU, fp32, SGD with
               momentum) on all of this machine's threads, for scale: what the input pipeline must keep up with
(d) GPU        when CUDA is available: training img/s with both towers on cuda:0, fp32 and bf16 autocast
               (and with the towers on cuda:0 + cuda:1 when there are two)

Images: the ten real ImageNet photos (../shared/data/images, else tests/fixtures/images), each copied
--copies times into a temporary ImageNet-layout folder. The prepared files sit in the page cache, so (a)
measures CPU cost, not the disk; on ImageNet the raw store (252 GB) is read from disk (random 196 KB
reads from an NVMe drive add roughly 0.1 ms per image), the JPEG store (31 GB at quality 90) fits in the
page cache of a 64 GB machine. Targets: (a) ≥ 10 × (b) per core; JPEG store ≥ 1,200 img/s per core.
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from model import AlexNet
from training.augment import TrainAugmentation
from training.data import PreparedDataset
from training.loader import BatchLoader
from training.prepare import prepare
from training.store import DEFAULT_QUALITY, JPEG_SUBSAMPLING

IMAGENET_TRAIN = 1_281_167

PHOTOS = [REPO.parent / "shared" / "data" / "images", REPO / "tests" / "fixtures" / "images"]


def parse_args():
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    p.add_argument("--seconds", type=float, default=5.0, help="time for each of (a) and (b)")
    p.add_argument("--batch", type=int, default=128, help="batch size of (a) (the paper's 128)")
    p.add_argument("--copies", type=int, default=32, help="copies of each photo in the prepared set")
    p.add_argument("--step-batch", type=int, default=32, help="batch size of the CPU training step (c)")
    p.add_argument("--step-seconds", type=float, default=20.0, help="time for (c); 0 skips it")
    p.add_argument("--gpu-seconds", type=float, default=10.0, help="time for each GPU configuration (d)")
    p.add_argument("--quality", type=int, default=DEFAULT_QUALITY, help="JPEG store quality of (a')")
    p.add_argument("--cores", type=int, default=13, help="decoding cores of the projected machine (p)")
    p.add_argument(
        "--gpu-rate", type=float, default=16_000, help="img/s the projected machine's GPUs train (p; default 16,000)"
    )
    p.add_argument("--quality-table", action="store_true", help="also measure (q)")
    return p.parse_args()


def timed(run_one, seconds: float) -> tuple[float, int]:
    """Call run_one() (returns images done) until ``seconds`` have passed; return (img/s, images)."""
    run_one()  # warm-up
    images, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds or images == 0:
        images += run_one()
    return images / elapsed, images


def make_source(root: Path, photos: list[Path], copies: int) -> None:
    for photo in photos:
        wnid = photo.name.split("_")[0]
        folder = root / "train" / wnid
        folder.mkdir(parents=True, exist_ok=True)
        data = photo.read_bytes()
        for i in range(copies):
            (folder / f"{i}_{photo.name}").write_bytes(data)
        (root / "val" / wnid).mkdir(parents=True, exist_ok=True)
        (root / "val" / wnid / photo.name).write_bytes(data)


def bench_loader(split, workers: int, batch: int, seconds: float, augment: TrainAugmentation | None = None) -> float:
    """img/s of random batches delivered by BatchLoader (released at once; augmented first when given)."""
    buffer = torch.empty(batch, 3, 224, 224)

    def steps():
        generator = torch.Generator().manual_seed(0)
        for step in itertools.count():  # a fresh random batch every time
            yield step, torch.randint(0, len(split), (batch,), generator=generator)

    with BatchLoader(split, workers, batch) as loader:
        batches = loader.batches(steps())
        for _ in range(max(2, 2 * workers)):  # warm-up: the workers started, every slot touched once
            next(batches).release()
        images, start = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - start) < seconds or images == 0:
            loaded = next(batches)
            if augment is not None:
                augment(loaded.images, augment.draw(len(loaded.labels), 0, 0, loaded.key), out=buffer)
            loaded.release()
            images += len(loaded.labels)
        batches.close()
    return images / elapsed


def bench_augment(dataset: PreparedDataset, batch: int, seconds: float) -> float:
    split, augment = dataset.split("train"), TrainAugmentation(dataset.stats)
    images, _ = split.batch(torch.arange(batch) % len(split))
    buffer = torch.empty(batch, 3, 224, 224)
    state = {"step": 0}

    def one_batch() -> int:
        augment(images, augment.draw(batch, 0, 0, state["step"]), out=buffer)
        state["step"] += 1
        return batch

    return timed(one_batch, seconds)[0]


def quality_table(photos: list[Path], root: Path, seconds: float) -> list[dict]:
    """Per quality: bytes per image, RMSE and max |error| against the raw pixels, inline decoding img/s."""
    src = root / "q-src"
    make_source(src, photos, 1)
    prepare(src, root / "q-raw", workers=os.cpu_count(), show_progress=False)
    exact = PreparedDataset(root / "q-raw").split("val").images
    rows = []
    import training.prepare as prep

    for quality, subsampling in [(75, "4:4:4"), (85, "4:4:4"), (90, "4:4:4"), (95, "4:4:4"), (90, "4:2:0")]:
        prep.JPEG_SUBSAMPLING = subsampling  # (the store's is fixed at 4:4:4; 4:2:0 for comparison only)
        dest = root / f"q-{quality}-{subsampling.replace(':', '')}"
        prepare(src, dest, workers=os.cpu_count(), show_progress=False, store="jpeg", quality=quality)
        split = PreparedDataset(dest).split("val")
        images, _ = split.batch(torch.arange(len(split)))
        error = images.float() - exact.float()
        indices = torch.arange(len(split))
        out = torch.empty(len(split), 3, 256, 256, dtype=torch.uint8)
        rate = timed(lambda: split.read_into(indices, out) or len(indices), seconds)[0]
        rows.append(
            {
                "quality": quality,
                "subsampling": subsampling,
                "bytes": split.offsets[-1].item() / len(split),
                "rmse": error.pow(2).mean().sqrt().item(),
                "max": error.abs().max().item(),
                "rate": rate,
            }
        )
    prep.JPEG_SUBSAMPLING = JPEG_SUBSAMPLING
    return rows


def bench_naive(jpegs: list[bytes], mean_image: torch.Tensor, stats, seconds: float, draft: bool = False) -> float:
    rng = random.Random(0)
    eigenvectors, eigenvalues = stats.eigenvectors, stats.eigenvalues

    def one_image() -> int:
        data = jpegs[rng.randrange(len(jpegs))]
        image = Image.open(io.BytesIO(data))
        if draft:  # let libjpeg decode at 1/2, 1/4 or 1/8 scale while the shorter side stays ≥ 256
            image.draft("RGB", (256 * image.width // min(image.size), 256 * image.height // min(image.size)))
        image = image.convert("RGB")
        width, height = image.size
        scale = 256 / min(width, height)
        image = image.resize((max(256, round(width * scale)), max(256, round(height * scale))), Image.BILINEAR)
        left, top = (image.width - 256) // 2, (image.height - 256) // 2
        image = image.crop((left, top, left + 256, top + 256))
        x, y = rng.randint(0, 32), rng.randint(0, 32)
        patch = image.crop((x, y, x + 224, y + 224))
        mean = mean_image[:, y : y + 224, x : x + 224]
        if rng.random() < 0.5:
            patch = patch.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            mean = mean.flip(-1)
        pixels = torch.frombuffer(bytearray(patch.tobytes()), dtype=torch.uint8).view(224, 224, 3)
        tensor = pixels.permute(2, 0, 1).float() - mean
        alpha = torch.tensor([rng.gauss(0, 0.1) for _ in range(3)])
        tensor += (eigenvectors @ (alpha * eigenvalues) * 255).view(3, 1, 1)
        return 1

    return timed(one_image, seconds)[0]


def bench_step(devices, batch: int, seconds: float, amp: str = "off") -> float:
    net = AlexNet(1000, devices=devices)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    x = torch.randn(batch, 3, 224, 224, device=devices[0])
    labels = torch.randint(0, 1000, (batch,), device=devices[0])
    device_type = torch.device(devices[0]).type
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)

    def one_step() -> int:
        with torch.autocast(device_type, dtype=dtype, enabled=dtype is not None):
            loss = F.cross_entropy(net(x).float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if device_type == "cuda":
            torch.cuda.synchronize()
        return batch

    one_step()
    return timed(one_step, seconds)[0]


def main() -> None:
    args = parse_args()
    photos_dir = next((d for d in PHOTOS if d.is_dir()), None)
    photos = sorted(photos_dir.glob("*.JPEG")) if photos_dir else []
    if not photos:
        sys.exit(f"no photos found in {PHOTOS}")
    threads = torch.get_num_threads()
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, {threads} threads")
    print(f"photos: {len(photos)} from {photos_dir}, ×{args.copies} copies")

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_source(tmp / "src", photos, args.copies)
        prepare(tmp / "src", tmp / "raw", workers=os.cpu_count(), show_progress=False)
        quiet = {"workers": os.cpu_count(), "show_progress": False}
        prepare(tmp / "src", tmp / "jpeg", store="jpeg", quality=args.quality, **quiet)
        raw, jpeg = PreparedDataset(tmp / "raw"), PreparedDataset(tmp / "jpeg")
        jpeg_bytes = jpeg.split("train").offsets[-1].item() / len(jpeg.split("train"))
        jpegs = [p.read_bytes() for p in photos]

        torch.set_num_threads(1)  # per core
        rates = {}
        b, s = args.batch, args.seconds
        rates["raw, inline (1 core)"] = bench_loader(raw.split("train"), 0, b, s)
        rates["raw, 1 thread"] = bench_loader(raw.split("train"), 1, b, s)
        rates["jpeg, inline (1 core)"] = bench_loader(jpeg.split("train"), 0, b, s)
        rates["jpeg, 1 process"] = bench_loader(jpeg.split("train"), 1, b, s)
        rates["jpeg, 2 processes"] = bench_loader(jpeg.split("train"), 2, b, s)
        aug_raw = bench_loader(raw.split("train"), 0, b, s, TrainAugmentation(raw.stats))
        aug_jpeg = bench_loader(jpeg.split("train"), 0, b, s, TrainAugmentation(jpeg.stats))
        augment_rate = bench_augment(raw, b, s)
        naive_rate = bench_naive(jpegs, raw.stats.mean_image, raw.stats, s)
        draft_rate = bench_naive(jpegs, raw.stats.mean_image, raw.stats, s, draft=True)
        table = quality_table(photos, tmp, min(s, 2.0)) if args.quality_table else []
        torch.set_num_threads(threads)

    def line(name: str, rate: float, per_core: float | None = None) -> None:
        per_core = rate if per_core is None else per_core
        print(f"  {name:<44} {rate:9,.0f} img/s   per core {per_core:7,.0f}   {per_core / naive_rate:6.1f}× (b)")

    print(f"\nBatchLoader, batch {b}, uint8 [n, 3, 256, 256] delivered (JPEG store: quality {args.quality}, "
          f"{JPEG_SUBSAMPLING}, {jpeg_bytes:,.0f} B/image = 1/{196608 / jpeg_bytes:.1f} of raw):")
    for name, rate in rates.items():
        processes = 2 if "2 processes" in name else 1
        line(name, rate, rate / processes)
    print("with the batched CPU augmentation (224 crops, flips, mean, PCA lighting) on the same core:")
    line("raw + augmentation, inline", aug_raw)
    line("jpeg + augmentation, inline", aug_jpeg)
    line("augmentation alone (uint8 batch → float 224²)", augment_rate)
    print("per-image Pillow pipelines (baseline):")
    line("(b) naive per-image Pillow pipeline", naive_rate)
    line("(b') the same with JPEG draft mode", draft_rate)
    per_core_jpeg = rates["jpeg, inline (1 core)"]
    target = "met" if per_core_jpeg >= 1200 else "NOT met"
    print(f"  JPEG store per core: {per_core_jpeg:,.0f} img/s (target ≥ 1,200: {target}); "
          f"raw / (b) = {rates['raw, inline (1 core)'] / naive_rate:.1f}× (target ≥ 10×)")

    print(
        f"\n(p) 90 epochs of {IMAGENET_TRAIN:,} images, {args.cores} decoding cores, "
        f"GPUs at {args.gpu_rate:,.0f} img/s:"
    )
    for name, per_core in [
        ("raw store (page cache; ImageNet's 252 GB is read from disk)", rates["raw, inline (1 core)"]),
        ("jpeg store", per_core_jpeg),
        ("jpeg store + CPU augmentation", aug_jpeg),
        ("per-image Pillow pipeline (b)", naive_rate),
    ]:
        feed = per_core * args.cores
        rate = min(feed, args.gpu_rate)
        hours = 90 * IMAGENET_TRAIN / rate / 3600
        bound = "GPU-bound" if feed >= args.gpu_rate else "input-bound"
        print(f"  {name:<60} {feed:9,.0f} img/s fed → {hours:6.1f} h ({bound})")

    if table:
        print("\n(q) JPEG store quality (ten photos, 256² after the shared preprocessing; error in 0–255 levels):")
        header = ("quality", "chroma", "bytes/img", "of raw", "RMSE", "max", "decode img/s")
        print("  {:>7} {:>6} {:>9} {:>7} {:>5} {:>4} {:>12}".format(*header))
        for r in table:
            print(
                f"  {r['quality']:>7} {r['subsampling']:>6} {r['bytes']:>9,.0f} 1/{196608 / r['bytes']:<5.1f} "
                f"{r['rmse']:>5.2f} {r['max']:>4.0f} {r['rate']:>12,.0f}"
            )
        print("  json:", json.dumps(table))

    if args.step_seconds > 0:
        step_rate = bench_step(("cpu", "cpu"), args.step_batch, args.step_seconds)
        print(
            f"(c) training step, full net, towers on cpu+cpu, fp32, batch {args.step_batch}, {threads} threads: "
            f"{step_rate:,.1f} img/s"
        )
        print(f"    one core of the JPEG store feeds {per_core_jpeg / step_rate:,.0f}× what the CPU step consumes")

    if torch.cuda.is_available():
        name = torch.cuda.get_device_name(0)
        configs = [(("cuda:0", "cuda:0"), "off"), (("cuda:0", "cuda:0"), "bf16")]
        if torch.cuda.device_count() >= 2:
            configs += [(("cuda:0", "cuda:1"), "off"), (("cuda:0", "cuda:1"), "bf16")]
        for devices, amp in configs:
            rate = bench_step(devices, args.batch, args.gpu_seconds, amp)
            print(
                f"(d) training step on {name}, towers on {'+'.join(devices)}, amp {amp}, batch {args.batch}: "
                f"{rate:,.0f} img/s"
            )
    else:
        print("(d) no CUDA device: GPU training throughput not measured")


if __name__ == "__main__":
    main()
