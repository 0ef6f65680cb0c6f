"""GPU acceptance run: one command, a table, exit status 1 on any failure.

    python bench/gpu_check.py                       # on the GPU(s): ≤ 8 minutes on one H100/H200
    python bench/gpu_check.py --device cpu          # the dry run (tiny net, seconds; part of `make test`)

What it checks, in order (two GPUs are used where present, one otherwise):
 1. logits   the towers on the device (both on one GPU, and one per GPU where there are two) and the
             grouped net compute the CPU's fp32 logits (TF32 off for this check)
 2. steps    a few training steps on a fixed batch in fp32, bf16 and fp16 (with gradient scaling):
             finite loss, LRN never zeroes a non-zero input, the two towers' fc6 dropout masks differ,
             and the eval-mode loss on that batch goes down
 3. ddp      two processes over NCCL (`torchrun … -m training train`, one GPU each), when ≥ 2 GPUs
 4. train    img/s of the real training loop (``training.train.train``: the loader, the host→device
             feed, augmentation, the step) at batch 128 from a synthetic prepared store of each kind (the
             ten real photos, copied), fp32 / bf16 / bf16 + channels-last, with and without --compile,
             and the projected time of the paper's 90 epochs over ImageNet's 1,281,167 images
 5. serve    the service's model-only img/s at its max batch on the device, and its HTTP throughput at
             16 clients (`python -m service --device …`, bench/serve_load.py's load generator)

Times are wall-clock after a warm-up; the training rate is measured between two device synchronisations
over the steps after the first ``--warmup-steps``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from model import AlexNet, AlexNetConfig, Checkpoint, GroupedAlexNet  # noqa: E402
from training.data import PreparedDataset  # noqa: E402
from training.devices import autocast_for, backend_settings, seed_dropout  # noqa: E402
from training.feed import DeviceFeed  # noqa: E402
from training.loader import LoadedBatch  # noqa: E402
from training.prepare import prepare  # noqa: E402
from training.train import Hooks, Hyperparameters, Options, make_optimizer, train  # noqa: E402

IMAGENET_TRAIN = 1_281_167
PHOTOS = [REPO.parent / "shared" / "data" / "images", REPO / "tests" / "fixtures" / "images"]


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu (the dry run)")
    p.add_argument("--width", type=float, help="net width (default 1 on cuda, 1/16 on cpu)")
    p.add_argument("--batch", type=int, help="training batch (default 128 on cuda, 16 on cpu)")
    p.add_argument("--store-images", type=int, help="images in each synthetic store (default 100 batches; cpu 4)")
    p.add_argument("--warmup-steps", type=int, help="training steps not timed (default 15 on cuda, 1 on cpu)")
    p.add_argument("--no-compile", action="store_true", help="skip the --compile configurations")
    p.add_argument("--http-seconds", type=float, help="HTTP load duration (default 15 on cuda, 2 on cpu)")
    p.add_argument("--clients", type=int, default=16, help="HTTP clients (default 16)")
    return p.parse_args()


class Table:
    """Rows of (section, check, ok, figure); printed at the end, and as they come."""

    def __init__(self):
        self.rows: list[tuple[str, str, bool | None, str]] = []

    def add(self, section: str, check: str, ok: bool | None, figure: str = "") -> None:
        self.rows.append((section, check, ok, figure))
        mark = {True: "ok", False: "FAIL", None: "-"}[ok]
        print(f"[{section}] {check}: {mark} {figure}", flush=True)

    def section(self, name: str, fn) -> None:
        """Run one section; an exception in it is a failed row, and the next section still runs."""
        started = time.perf_counter()
        try:
            fn()
        except Exception as e:
            traceback.print_exc()
            self.add(name, "raised", False, f"{type(e).__name__}: {str(e)[:200]}")
        print(f"[{name}] {time.perf_counter() - started:.1f} s", flush=True)

    def print(self) -> bool:
        width = max(len(r[1]) for r in self.rows)
        print(f"\n| section | check{' ' * (width - 5)} | result | figures |\n|---|---|---|---|")
        for section, check, ok, figure in self.rows:
            print(f"| {section} | {check.ljust(width)} | {({True: 'ok', False: 'FAIL', None: '-'}[ok])} | {figure} |")
        failed = [r for r in self.rows if r[2] is False]
        passed = [r for r in self.rows if r[2] is True]
        print(f"\n{len(passed)} passed, {len(failed)} failed, {len(self.rows) - len(passed) - len(failed)} skipped")
        return not failed


def tower_devices(args) -> list[tuple[torch.device, torch.device]]:
    """The placements to check: both towers on one device; one tower per GPU when there are two."""
    if args.device == "cpu":
        return [(torch.device("cpu"),) * 2]
    placements = [(torch.device("cuda:0"),) * 2]
    if torch.cuda.device_count() >= 2:
        placements.append((torch.device("cuda:0"), torch.device("cuda:1")))
    return placements


# 1. Logits.


@torch.no_grad()
def check_logits(args, table: Table) -> None:
    torch.manual_seed(0)
    net = AlexNet(1000, width=args.width).eval()
    x = torch.randn(8, 3, 224, 224) * 60  # the scale of mean-subtracted 0–255 pixels
    expected = net(x)
    scale = expected.abs().max().item()
    with backend_settings(tf32=False, cudnn_benchmark=False, deterministic=False):
        forms = [(f"towers on {a}+{b}", copy.deepcopy(net).place((a, b))) for a, b in tower_devices(args)]
        forms.append((f"grouped on {args.device}", net.to_grouped().to(args.device).eval()))
        for name, form in forms:
            got = form(x.to(args.device)).cpu()
            error = (got - expected).abs().max().item()
            table.add("logits", name, error <= 1e-4 * scale + 1e-6, f"max |Δ| {error:.2e} (logits up to {scale:.2e})")


# 2. Training steps.


class Probe:
    """Forward hooks on each tower's LRN and fc6 dropout: what went in and what came out."""

    def __init__(self, net: AlexNet):
        self.lrn_zeroed = 0
        self.masks: list[torch.Tensor | None] = [None, None]
        self.handles = []
        for i, tower in enumerate(net.towers):
            self.handles.append(tower.lrn.register_forward_hook(self._lrn))
            self.handles.append(tower.dropout.register_forward_hook(lambda m, inp, out, i=i: self._dropout(i, inp, out)))

    def _lrn(self, module, inputs, output):
        self.lrn_zeroed += int(((output == 0) & (inputs[0] != 0)).sum())

    def _dropout(self, tower: int, inputs, output):
        if self.masks[tower] is None:  # the first call of a step is fc6's
            self.masks[tower] = ((output == 0) & (inputs[0] != 0)).cpu(), (inputs[0] != 0).cpu()

    def mask_agreement(self) -> float:
        """Of the units both towers had non-zero, the fraction both dropped or both kept (½ if independent)."""
        (drop0, live0), (drop1, live1) = self.masks
        both = live0 & live1
        return ((drop0 == drop1) & both).sum().item() / max(both.sum().item(), 1)

    def close(self):
        for h in self.handles:
            h.remove()


def check_steps(args, table: Table) -> None:
    devices = tower_devices(args)[-1]
    batch = min(args.batch, 32)
    stats = synthetic_stats()
    for amp in ("off", "bf16", "fp16"):
        torch.manual_seed(1)
        net = AlexNet(1000, width=args.width, devices=devices)
        hp = Hyperparameters(lr=0.01, amp=amp)
        optimizer = make_optimizer(net, hp)
        scaler = torch.amp.GradScaler(devices[0].type) if amp == "fp16" else None
        autocast = autocast_for(amp, devices[0])
        feed = DeviceFeed(stats, 224, 0.1, devices)
        generator = torch.Generator().manual_seed(2)
        images = torch.randint(0, 256, (batch, 3, 256, 256), dtype=torch.uint8, generator=generator)
        labels = torch.randint(0, 1000, (batch,), generator=generator)
        params = feed.augment[feed.devices[0]].draw(batch, 0, 0, 0)  # the same crops every step: a fixed batch
        pin = devices[0].type == "cuda"
        x, y = feed(LoadedBatch(0, images.pin_memory() if pin else images, labels.pin_memory() if pin else labels), params)
        x = [t.clone() for t in x] if isinstance(x, list) else x.clone()
        feed.close()

        def eval_loss() -> float:
            net.eval()
            with torch.no_grad(), autocast():
                value = F.cross_entropy(net(x).float(), y).item()
            net.train()
            return value

        before = eval_loss()
        probe = Probe(net)
        losses, agreement = [], None
        for step in range(args.steps):
            probe.masks = [None, None]
            seed_dropout(0, 0, 0, step, devices)
            with autocast():
                loss = F.cross_entropy(net(x).float(), y)
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            else:
                loss.backward()
                optimizer.step()
            losses.append(loss.item())
            agreement = probe.mask_agreement() if step == 0 else agreement
        probe.close()
        after = eval_loss()
        finite = all(map(torch.isfinite, map(torch.tensor, losses)))
        table.add("steps", f"{amp}: loss finite over {args.steps} steps", finite, f"{losses[0]:.4f} → {losses[-1]:.4f}")
        table.add("steps", f"{amp}: LRN zeroes no non-zero input", probe.lrn_zeroed == 0, f"{probe.lrn_zeroed} zeroed")
        table.add("steps", f"{amp}: towers' dropout masks differ", agreement < 0.9, f"agreement {agreement:.2f} (½: independent)")
        table.add("steps", f"{amp}: eval loss on the batch goes down", after < before, f"{before:.4f} → {after:.4f}")


def synthetic_stats():
    from training.data import ColorStats

    return ColorStats(
        mean_image=torch.full((3, 256, 256), 120.0),
        covariance=torch.eye(3) * 0.05,
        eigenvalues=torch.tensor([0.2175, 0.0188, 0.0045]),
        eigenvectors=torch.eye(3),
        images=1,
    )


# 3–4. The real training loop on synthetic stores.


def make_stores(root: Path, args) -> dict[str, Path]:
    """The ten real photos, shorter side 256 (quick to prepare), copied into ImageNet's layout; prepared
    once as a raw store and once as a JPEG store."""
    photos_dir = next(d for d in PHOTOS if d.is_dir())
    photos = sorted(photos_dir.glob("*.JPEG"))
    copies = max(1, args.store_images // len(photos))
    for photo in photos:
        image = Image.open(photo).convert("RGB")
        scale = 256 / min(image.size)
        image = image.resize((max(256, round(image.width * scale)), max(256, round(image.height * scale))))
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=90)
        wnid = photo.name.split("_")[0]
        for split, count in (("train", copies), ("val", 1)):
            folder = root / "src" / split / wnid
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                (folder / f"{i}.JPEG").write_bytes(buffer.getvalue())
    stores = {}
    for kind in ("raw", "jpeg"):
        stores[kind] = root / f"prepared-{kind}"
        with contextlib.redirect_stderr(io.StringIO()):
            prepare(root / "src", stores[kind], store=kind, show_progress=False)
    return stores


class StepClock:
    """A training hook: synchronise and start the clock after the warm-up steps, stop it at the last."""

    def __init__(self, warmup: int, last: int, cuda: bool):
        self.warmup, self.last, self.cuda = warmup, last, cuda
        self.started = self.stopped = None

    def __call__(self, steps: int) -> None:
        if steps in (self.warmup, self.last):
            if self.cuda:
                torch.cuda.synchronize()
            if steps == self.warmup:
                self.started = time.perf_counter()
            else:
                self.stopped = time.perf_counter()

    def rate(self, batch: int) -> float:
        return (self.last - self.warmup) * batch / (self.stopped - self.started)


def check_training_rate(args, table: Table, stores: dict[str, Path], root: Path) -> None:
    devices = ",".join(sorted({str(d) for d in tower_devices(args)[-1]}))
    configs = [("fp32", "off", False, False), ("bf16", "bf16", False, False), ("bf16 channels-last", "bf16", True, False)]
    if not args.no_compile and args.device != "cpu":  # (compiling on a CPU takes minutes: not in the dry run)
        configs.append(("bf16 channels-last compile", "bf16", True, True))
    runs = [("raw", c) for c in configs] + [("jpeg", configs[-1])]
    if len(configs) == 4:
        runs.insert(len(configs) + 1, ("jpeg", configs[2]))
    for i, (kind, (name, amp, channels_last, compiled)) in enumerate(runs):
        steps = PreparedDataset(stores[kind]).split("train").__len__() // args.batch
        clock = StepClock(min(args.warmup_steps, steps - 1), steps, args.device != "cpu")
        given = {"epochs": 1, "batch_size": args.batch, "width": args.width, "amp": amp, "channels_last": channels_last}
        options = Options(
            data=str(stores[kind]), out=str(root / f"run-{i}"), devices=devices, show_progress=False, compile=compiled
        )
        log = io.StringIO()
        try:
            with contextlib.redirect_stderr(log):
                train(given, options, Hooks(after_step=clock))
        except BaseException:
            print(log.getvalue()[-3000:], file=sys.stderr)
            raise
        rate = clock.rate(args.batch)
        hours = 90 * IMAGENET_TRAIN / rate / 3600
        table.add(
            "train",
            f"{kind} store, {name}, batch {args.batch}, towers on {devices}",
            rate > 0,
            f"{rate:,.0f} img/s → 90 epochs in {hours:,.1f} h",
        )


def check_ddp(args, table: Table, stores: dict[str, Path], root: Path) -> None:
    if args.device == "cpu" or torch.cuda.device_count() < 2:
        table.add("ddp", "2 processes over NCCL", None, "skipped: needs 2 GPUs (gloo on CPU: tests/test_training_ddp.py)")
        return
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "training",
               "train", str(stores["jpeg"]), "--out", str(root / "ddp"), "--devices", "cuda:0", "--epochs", "1",
               "--batch-size", str(args.batch), "--width", str(args.width), "--amp", "bf16", "--no-progress"]  # fmt: skip
    started = time.perf_counter()
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
    ok = result.returncode == 0 and "2 process(es)" in result.stderr
    if not ok:
        print(result.stderr[-3000:], file=sys.stderr)
    table.add("ddp", "2 processes over NCCL, one GPU each", ok, f"exit {result.returncode}, {time.perf_counter() - started:.0f} s")


# 5. The service.


def check_service(args, table: Table, root: Path) -> None:
    from serve_load import load, multipart
    from service import engine
    from service.settings import Settings
    from service_process import start_service

    checkpoint = root / "fresh.safetensors"
    net = GroupedAlexNet(AlexNetConfig(width=args.width))
    Checkpoint.from_model(net, provenance={"trained": False, "source": "gpu_check"}).save(checkpoint)
    device = torch.device("cuda:0" if args.device != "cpu" else "cpu")
    max_batch = Settings().max_batch
    loaded = engine.load(checkpoint, (device,))
    photos_dir = next(d for d in PHOTOS if d.is_dir())
    paths = sorted(photos_dir.glob("*.JPEG"))
    inputs = torch.cat([loaded.preprocessor.from_bytes(p.read_bytes()) for p in paths])
    batch = inputs.repeat(max_batch // len(paths) + 1, 1, 1, 1)[:max_batch].to(device)
    with torch.inference_mode():
        loaded.net(batch)
        if device.type == "cuda":
            torch.cuda.synchronize()
        runs, started = 0, time.perf_counter()
        while time.perf_counter() - started < min(5.0, args.http_seconds):
            loaded.net(batch)
            runs += 1
        if device.type == "cuda":
            torch.cuda.synchronize()
        model_rate = runs * max_batch / (time.perf_counter() - started)
    table.add("serve", f"model only, batch {max_batch}, {device}", model_rate > 0, f"{model_rate:,.0f} img/s")
    del loaded

    process, url = start_service(checkpoint, ["--device", str(device)], root / "service.log")
    try:
        bodies = [multipart(p.name, p.read_bytes()) for p in paths]
        run = load(url, process.pid, bodies, args.clients, 2.0, args.http_seconds, 2)
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(60)
    ok = run["errors"] == 0 and run["throughput_img_s"] > 0
    table.add(
        "serve",
        f"HTTP, {args.clients} clients, {device}",
        ok,
        f"{run['throughput_img_s']:,.0f} img/s ({run['throughput_img_s'] / model_rate:.0%} of model only), p50 "
        f"{run['p50_ms']:.1f} ms, p99 {run['p99_ms']:.1f} ms, statuses {run['statuses']}",
    )


def main() -> int:
    args = parse_args()
    cpu = args.device == "cpu"
    if not cpu and not torch.cuda.is_available():
        print("no CUDA device: run with --device cpu for the dry run", file=sys.stderr)
        return 1
    args.width = args.width or (0.0625 if cpu else 1.0)
    args.batch = args.batch or (16 if cpu else 128)
    args.store_images = args.store_images or (4 if cpu else 100) * args.batch
    args.warmup_steps = args.warmup_steps or (1 if cpu else 15)
    args.http_seconds = args.http_seconds or (2.0 if cpu else 15.0)
    args.steps = 3 if cpu else 6
    name = "CPU dry run" if cpu else ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
    print(f"gpu_check on {name}: torch {torch.__version__}, {os.cpu_count()} CPUs, width {args.width:g}", flush=True)

    table = Table()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        table.section("logits", lambda: check_logits(args, table))
        table.section("steps", lambda: check_steps(args, table))
        stores = {}
        table.section("stores", lambda: stores.update(make_stores(root, args)))
        if stores:
            table.section("ddp", lambda: check_ddp(args, table, stores, root))
            table.section("train", lambda: check_training_rate(args, table, stores, root))
        table.section("serve", lambda: check_service(args, table, root))
    ok = table.print()
    print(f"total {time.perf_counter() - started:.0f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
