"""img/s of ``python -m training predict`` over a folder, against ``/classify`` under load, in one command.

    python bench/predict_throughput.py                       # 30 copies of the 10 photos, 16 clients for 10 s
    python bench/predict_throughput.py --copies 60 --duration 20 --workers 0,2

1. Transfer: what a decoding worker should send back. The folder's first files are decoded in a Pool of
   --transfer-workers processes that return either the uint8 256×256 image (what predict sends) or the
   normalised float centre crop; img/s and bytes per image of each, main process included (it turns
   each into the net's input batch).
2. predict: the real command in a subprocess on the ten photos copied --copies times (full-size net, a
   freshly initialised checkpoint: speed does not depend on the weights), once per --workers value;
   img/s of its classification loop (from its summary, start-up excluded) and of the whole command.
3. /classify: ``python -m service`` on the same checkpoint, --clients clients posting the photos
   (bench/serve_load.py's ``load``), after --warmup s, for --duration s.
Prints the figures and the ratio predict ÷ service. The load generator runs on the same cores as the
service (its CPU per image is printed), predict has the machine to itself: the ratio says what a folder
job gains over sending the same files to the service from the same machine.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from serve_load import load, multipart  # noqa: E402  (sets OMP_WAIT_POLICY=PASSIVE, as the service does)
from service_process import start_service  # noqa: E402

import torch  # noqa: E402

from model import AlexNetConfig, Checkpoint, GroupedAlexNet, load_checkpoint  # noqa: E402

PHOTOS = sorted((REPO / "tests" / "fixtures" / "images").glob("*.JPEG"))
_preprocessor = None


def parse_args():
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    p.add_argument("--copies", type=int, default=30, help="copies of the 10 photos to classify (default 30)")
    p.add_argument("--workers", default="default", help="comma-separated predict --workers values (default: its own)")
    p.add_argument("--batch-size", type=int, default=128, help="predict --batch-size (default 128)")
    p.add_argument("--clients", type=int, default=16, help="concurrent /classify clients (default 16)")
    p.add_argument("--duration", type=float, default=10.0, help="seconds of measured service load (default 10)")
    p.add_argument("--warmup", type=float, default=3.0, help="seconds of unmeasured load first (default 3)")
    p.add_argument("--transfer-images", type=int, default=120, help="files for the transfer comparison")
    p.add_argument("--transfer-workers", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--json", type=Path, help="also write the results here")
    return p.parse_args()


def _init(preprocessor):
    global _preprocessor
    _preprocessor = preprocessor
    torch.set_num_threads(1)


def _as_uint8(path: str) -> bytes:
    return _preprocessor.load(Path(path).read_bytes()).numpy().tobytes()


def _as_float(path: str) -> bytes:
    image = _preprocessor.load(Path(path).read_bytes())
    return _preprocessor.from_uint8(image.unsqueeze(0), "center").numpy().tobytes()


def transfer(checkpoint: Path, paths: list[str], workers: int) -> dict:
    """Decode in a Pool, returning uint8 images or float crops; the main process builds the input batch."""
    import numpy as np

    preprocessor = load_checkpoint(checkpoint).preprocessor()
    size, crop = preprocessor.config.resize, preprocessor.config.crop
    results = {}
    context = multiprocessing.get_context("fork")
    for name, fn in (("uint8 256x256", _as_uint8), ("float 224x224 crop", _as_float)):
        times = []
        for _ in range(2):  # the second pass counts (the first warms the page cache and Pillow)
            with context.Pool(workers, initializer=_init, initargs=(preprocessor,)) as pool:
                started = time.perf_counter()
                chunks = list(pool.imap(fn, paths, chunksize=4))
                if fn is _as_uint8:
                    batch = np.stack([np.frombuffer(c, np.uint8).reshape(3, size, size) for c in chunks])
                    x = preprocessor.from_uint8(torch.from_numpy(batch), "center")
                else:
                    crops = [np.frombuffer(c, np.float32).reshape(3, crop, crop) for c in chunks]
                    x = torch.from_numpy(np.stack(crops))
                times.append(time.perf_counter() - started)
        assert x.shape == (len(paths), 3, crop, crop)
        results[name] = {"img_s": len(paths) / times[-1], "bytes_per_image": len(chunks[0])}
    return results


def run_predict(checkpoint: Path, folder: Path, out: Path, workers: str, batch_size: int) -> dict:
    command = [sys.executable, "-m", "training", "predict", str(checkpoint), str(folder), "--output", str(out),
               "--batch-size", str(batch_size), "--no-progress"]  # fmt: skip
    if workers != "default":
        command += ["--workers", workers]
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}  # as a user's shell has it
    started = time.perf_counter()
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if result.returncode != 0:
        sys.exit(f"predict exited with {result.returncode}:\n{result.stderr}")
    summary = json.loads(Path(f"{out}.summary.json").read_text())
    files = summary["this_run"]["files"]
    return {"workers": workers, "files": files, "loop_img_s": summary["this_run"]["images_per_second"],
            "command_img_s": files / wall, "command_seconds": wall}  # fmt: skip


def main():
    args = parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    cores = len(os.sched_getaffinity(0))
    print(f"machine: {os.cpu_count()} CPUs ({cores} usable), torch {torch.__version__}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        checkpoint = tmp / "fresh.safetensors"
        Checkpoint.from_model(GroupedAlexNet(AlexNetConfig()), provenance={"trained": False, "source": "bench"}).save(
            checkpoint
        )
        folder = tmp / "photos"
        folder.mkdir()
        for copy in range(args.copies):
            for photo in PHOTOS:
                shutil.copy(photo, folder / f"{copy:04d}_{photo.name}")
        paths = sorted(str(p) for p in folder.iterdir())

        print(f"1. transfer from {args.transfer_workers} decoding processes, {args.transfer_images} files", flush=True)
        moved = transfer(checkpoint, paths[: args.transfer_images], args.transfer_workers)
        for name, r in moved.items():
            print(f"  {name:<20} {r['img_s']:7.1f} img/s  {r['bytes_per_image']:>9,} bytes an image", flush=True)

        print(f"2. predict on {len(paths)} files (--batch-size {args.batch_size})", flush=True)
        runs = []
        for workers in args.workers.split(","):
            out = tmp / f"out-{workers}.jsonl"
            r = run_predict(checkpoint, folder, out, workers, args.batch_size)
            runs.append(r)
            print(f"  --workers {workers:<8} {r['loop_img_s']:6.1f} img/s classifying, {r['command_img_s']:6.1f} img/s"
                  f" for the whole command ({r['command_seconds']:.1f} s, start-up included)", flush=True)  # fmt: skip

        print(f"3. /classify, {args.clients} clients for {args.duration:.0f} s", flush=True)
        process, url = start_service(checkpoint, [], tmp / "service.log")
        try:
            bodies = [multipart(p.name, p.read_bytes()) for p in PHOTOS]
            service = load(url, process.pid, bodies, args.clients, args.warmup, args.duration, min(2, cores))
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(60)
        print(f"  {service['throughput_img_s']:.1f} img/s, p50 {service['p50_ms']:.0f} ms, errors {service['errors']},"
              f" mean batch {service['mean_batch']:.1f}, CPU per image: service {service['server_cpu_ms_per_img']:.1f}"
              f" ms, load generator {service['client_cpu_ms_per_img']:.1f} ms", flush=True)  # fmt: skip

    best = max(runs, key=lambda r: r["loop_img_s"])
    ratio = best["loop_img_s"] / service["throughput_img_s"]
    print(f"\npredict (--workers {best['workers']}) {best['loop_img_s']:.1f} img/s vs /classify"
          f" {service['throughput_img_s']:.1f} img/s at {args.clients} clients: {ratio:.2f}x")  # fmt: skip
    if args.json:
        results = {"transfer": moved, "predict": runs, "service": service, "ratio": ratio}
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
