"""Training input pipeline and training step throughput, in one run.

    python bench/train_throughput.py [--seconds 5] [--batch 128] [--step-batch 32] [--step-seconds 20]

(a) prepared   the training loop's own input path on one core: a random batch copied out of the
               memory-mapped prepared file (``PreparedSplit.batch``) + the batched augmentation
               (random 224 crops, flips, mean image, PCA lighting; ``TrainAugmentation``)
(b) naive      a per-image Pillow pipeline on one core, as data loaders commonly do it: decode the
               original JPEG, shorter side → 256, centre 256², random 224 crop, random flip, to float,
               minus the mean image, PCA lighting (per-image torch ops; numpy is not a dependency
               here, and for 3×224×224 arrays it would cost the same)
(b')           the same with Pillow's JPEG draft mode (libjpeg decodes at 1/2–1/8 scale): the fastest
               per-image variant, so that the ratio is not flattered by a slow baseline
(c) step       a full training step of the paper's full-size net (two towers on the CPU, fp32, SGD with
               momentum) on all of this machine's threads, for scale: what the input pipeline must keep up with
(d) GPU        when CUDA is available: training img/s with both towers on cuda:0, fp32 and bf16 autocast
               (and with the towers on cuda:0 + cuda:1 when there are two)

Images: the ten real ImageNet photos (../shared/data/images, else tests/fixtures/images), each copied
--copies times into a temporary ImageNet-layout folder and prepared with ``python -m training prepare``.
The prepared file then sits in the page cache, so (a) measures CPU cost, not the disk; on ImageNet
(252 GB prepared) random reads of 196 KB from an NVMe drive add roughly 0.1 ms per image.
Target: (a) ≥ 10 × (b), per core.
"""

from __future__ import annotations

import argparse
import io
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
from training.data import PreparedDataset, epoch_order
from training.prepare import prepare

PHOTOS = [REPO.parent / "shared" / "data" / "images", REPO / "tests" / "fixtures" / "images"]


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=5.0, help="time for each of (a) and (b)")
    p.add_argument("--batch", type=int, default=128, help="batch size of (a) (the paper's 128)")
    p.add_argument("--copies", type=int, default=32, help="copies of each photo in the prepared set")
    p.add_argument("--step-batch", type=int, default=32, help="batch size of the CPU training step (c)")
    p.add_argument("--step-seconds", type=float, default=20.0, help="time for (c); 0 skips it")
    p.add_argument("--gpu-seconds", type=float, default=10.0, help="time for each GPU configuration (d)")
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


def bench_prepared(dataset: PreparedDataset, batch: int, seconds: float) -> float:
    split = dataset.split("train")
    augment = TrainAugmentation(dataset.stats)
    buffer = torch.empty(batch, 3, 224, 224)
    state = {"step": 0}

    def one_batch() -> int:
        step = state["step"]
        order = epoch_order(len(split), seed=0, epoch=step)  # a fresh random batch every time
        images, _ = split.batch(order[:batch])
        augment(images, augment.draw(batch, 0, 0, step), out=buffer)
        state["step"] += 1
        return batch

    return timed(one_batch, seconds)[0]


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
        prepare(tmp / "src", tmp / "prepared", workers=os.cpu_count(), show_progress=False)
        dataset = PreparedDataset(tmp / "prepared")
        jpegs = [p.read_bytes() for p in photos]

        torch.set_num_threads(1)  # (a) and (b): per core
        prepared_rate = bench_prepared(dataset, args.batch, args.seconds)
        naive_rate = bench_naive(jpegs, dataset.stats.mean_image, dataset.stats, args.seconds)
        draft_rate = bench_naive(jpegs, dataset.stats.mean_image, dataset.stats, args.seconds, draft=True)
        torch.set_num_threads(threads)

    print(f"\n(a) prepared + batched augmentation, 1 core, batch {args.batch}: {prepared_rate:10,.0f} img/s")
    print(f"(b) naive per-image Pillow pipeline, 1 core:             {naive_rate:10,.0f} img/s")
    print(f"(b') the same with Pillow's JPEG draft mode, 1 core:       {draft_rate:10,.0f} img/s")
    print(
        f"    (a) / (b) = {prepared_rate / naive_rate:.1f}×  (target ≥ 10×);  "
        f"(a) / (b') = {prepared_rate / draft_rate:.1f}×"
    )

    if args.step_seconds > 0:
        step_rate = bench_step(("cpu", "cpu"), args.step_batch, args.step_seconds)
        print(
            f"(c) training step, full net, towers on cpu+cpu, fp32, batch {args.step_batch}, {threads} threads: "
            f"{step_rate:,.1f} img/s"
        )
        print(f"    one core of (a) feeds {prepared_rate / step_rate:,.0f}× what the CPU step consumes")

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
