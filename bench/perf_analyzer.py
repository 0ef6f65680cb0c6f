"""Triton's perf_analyzer against the service's Open Inference Protocol, over HTTP and gRPC, with real JPEGs.

    python bench/perf_analyzer.py                          # concurrency 1, 4 and 16, HTTP then gRPC
    python bench/perf_analyzer.py --concurrency 1,16 --protocols grpc --window-ms 5000

perf_analyzer reads the model's metadata and configuration (GET /v2/models/alexnet[/config], or the gRPC
ModelMetadata and ModelConfig), then sends requests of one photo each (BYTES input ``image``, shape [1, 1])
from N concurrent synchronous workers, cycling through the ten real ImageNet photos. It is run unmodified.

The perf_analyzer used is the one in the ``tritonclient==2.48.0`` wheel (``pip install perf-analyzer`` gives
only a placeholder, and its newer wheels need glibc ≥ 2.38). The wheel is downloaded once into --tools (with
``pip download``), and with it ``nvidia-cuda-runtime-cu12``'s libcudart.so.12, which the binary links
against though it never touches a GPU here. It also needs libb64 (Debian: ``apt-get install libb64-0d``).

The baseline, measured in the same run as serve_load.py measures it (just before and just after the
perf_analyzer runs, averaged): the bare model's throughput at the service's max batch, in this process,
with the service's thread count. ``ratio`` = perf_analyzer's inferences per second ÷ that.

Without --checkpoint the net is the paper's full-size AlexNet, freshly initialised (speed does not depend on
what the weights have learned).
"""

from __future__ import annotations

import argparse
import base64
import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the service sets it (service/__main__.py)

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from serve_load import FALLBACK_IMAGES, ModelOnly, mean_of  # noqa: E402  (bench/ is on sys.path)
from service_process import free_port, fresh_checkpoint, start_service  # noqa: E402

from service.protocol_wire import pack_bytes  # noqa: E402
from service.settings import Settings  # noqa: E402

TRITONCLIENT = "tritonclient==2.48.0"
CUDA_RUNTIME = "nvidia-cuda-runtime-cu12"
DEFAULT_TOOLS = Path.home() / ".cache" / "alexnet-bench" / "perf_analyzer-2.48.0"


def parse_args():
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    p.add_argument("--checkpoint", type=Path, help="checkpoint to serve (default: a fresh full-size net)")
    p.add_argument("--images", type=Path, default=FALLBACK_IMAGES, help="folder of JPEGs (default: the ten photos)")
    p.add_argument("--concurrency", default="1,4,16", help="comma-separated concurrent request counts")
    p.add_argument("--protocols", default="http,grpc", help="http, grpc or both, in this order")
    p.add_argument("--window-ms", type=int, default=4000, help="perf_analyzer's measurement window")
    p.add_argument("--max-trials", type=int, default=6, help="windows perf_analyzer may take to find a stable one")
    p.add_argument(
        "--stability",
        type=int,
        default=100,
        help="perf_analyzer's --stability-percentage: how far 3 windows may differ (loose: a shared 2-core machine)",
    )
    p.add_argument("--model-seconds", type=float, default=5.0, help="seconds per model-only measurement")
    p.add_argument("--threads", type=int, default=0, help="torch threads, 0: one per core (ALEXNET_THREADS)")
    p.add_argument("--tools", type=Path, default=DEFAULT_TOOLS, help=f"where perf_analyzer is kept ({DEFAULT_TOOLS})")
    p.add_argument("--perf-analyzer", type=Path, help="a perf_analyzer binary to use instead of the 2.48.0 wheel's")
    return p.parse_args()


def perf_analyzer(tools: Path) -> tuple[Path, dict[str, str]]:
    """The 2.48.0 wheel's perf_analyzer (downloaded into ``tools`` once) and the environment it runs in."""
    binary = tools / "tritonclient-2.48.0.data" / "data" / "bin" / "perf_analyzer"
    cudart = tools / "cudart" / "nvidia" / "cuda_runtime" / "lib"
    pip = [sys.executable, "-m", "pip", "--quiet", "--disable-pip-version-check"]
    if not binary.exists():
        tools.mkdir(parents=True, exist_ok=True)
        print(f"downloading {TRITONCLIENT} (its perf_analyzer) into {tools} ...", flush=True)
        subprocess.run([*pip, "download", "--no-deps", "-d", str(tools), TRITONCLIENT], check=True)
        (wheel,) = tools.glob("tritonclient-2.48.0-*.whl")
        shutil.unpack_archive(wheel, tools, "zip")
        binary.chmod(0o755)
    if not cudart.exists():
        print(f"installing {CUDA_RUNTIME} (libcudart.so.12) into {tools / 'cudart'} ...", flush=True)
        subprocess.run([*pip, "install", "--no-deps", "--target", str(tools / "cudart"), CUDA_RUNTIME], check=True)
    env = {**os.environ, "LD_LIBRARY_PATH": f"{cudart}:{os.environ.get('LD_LIBRARY_PATH', '')}".rstrip(":")}
    return binary, env


def check_runs(binary: Path, env: dict[str, str]) -> None:
    missing = subprocess.run(["ldd", str(binary)], capture_output=True, text=True, env=env).stdout
    missing = [line.split()[0] for line in missing.splitlines() if "not found" in line]
    if missing:
        hint = " (Debian: apt-get install libb64-0d)" if any("libb64" in m for m in missing) else ""
        sys.exit(f"perf_analyzer cannot run: missing {', '.join(missing)}{hint}")


def input_data(photos: list[bytes], path: Path) -> None:
    """perf_analyzer's --input-data JSON: one step per photo, the ``image`` input as binary BYTES data (its
    4-byte length, then the JPEG) in base64, shape [1] behind the batch dimension."""
    steps = [
        {"image": {"content": {"b64": base64.b64encode(pack_bytes([photo])).decode()}, "shape": [1]}}
        for photo in photos
    ]
    path.write_text(json.dumps({"data": steps}))


def run(binary, env, protocol: str, address: str, concurrency: int, data: Path, args, out: Path) -> dict:
    command = [
        str(binary), "-m", "alexnet", "-i", protocol, "-u", address, "--input-data", str(data),
        "--concurrency-range", f"{concurrency}:{concurrency}", "--measurement-interval", str(args.window_ms),
        "--stability-percentage", str(args.stability), "--max-trials", str(args.max_trials), "-f", str(out),
    ]  # fmt: skip
    print("  $ " + " ".join(command[:1] + [Path(c).name if c.startswith("/") else c for c in command[1:]]), flush=True)
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0 or not out.exists():
        sys.exit(f"perf_analyzer failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    (row,) = csv.DictReader(out.open())
    us = 1000.0
    return {
        "protocol": protocol,
        "concurrency": concurrency,
        "infer_s": float(row["Inferences/Second"]),
        "p50_ms": float(row["p50 latency"]) / us,
        "p95_ms": float(row["p95 latency"]) / us,
        "p99_ms": float(row["p99 latency"]) / us,
    }


def main():
    args = parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # so that `finally` stops the service
    binary, env = (args.perf_analyzer, dict(os.environ)) if args.perf_analyzer else perf_analyzer(args.tools)
    check_runs(binary, env)
    paths = sorted(p for p in args.images.iterdir() if p.suffix.lower() in (".jpg", ".jpeg"))
    photos = [p.read_bytes() for p in paths]
    if not photos:
        sys.exit(f"no JPEGs in {args.images}")
    concurrency = [int(c) for c in args.concurrency.split(",")]
    protocols = args.protocols.split(",")
    threads = args.threads or len(os.sched_getaffinity(0))
    max_batch = Settings.model_fields["max_batch"].default

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        checkpoint = args.checkpoint or fresh_checkpoint(tmp / "fresh.safetensors")
        data = tmp / "photos.json"
        input_data(photos, data)
        print(f"machine: {os.cpu_count()} CPUs, torch {torch.__version__}, {threads} torch threads", flush=True)
        model = ModelOnly(checkpoint, photos, max_batch, threads)
        grpc_port = free_port()
        flags = ["--threads", str(args.threads), "--grpc-port", str(grpc_port)]
        process, url = start_service(checkpoint, flags, tmp / "service.log")
        addresses = {"http": url.removeprefix("http://"), "grpc": f"127.0.0.1:{grpc_port}"}
        runs = []
        try:
            before = model.measure(args.model_seconds)
            for protocol in protocols:
                for n in concurrency:
                    print(f"perf_analyzer -i {protocol}, concurrency {n} ...", flush=True)
                    runs.append(run(binary, env, protocol, addresses[protocol], n, data, args, tmp / "out.csv"))
            after = model.measure(args.model_seconds)
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(60)
    baseline = mean_of(before, after)["throughput_img_s"]

    print(f"\nbaseline: the bare model at batch {max_batch}, {baseline:.1f} img/s (before {before['throughput_img_s']:.1f},"
          f" after {after['throughput_img_s']:.1f})")  # fmt: skip
    print(f"{'protocol':>8} {'concurrency':>11} {'infer/s':>8} {'ratio':>6} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8}")
    for r in runs:
        print(
            f"{r['protocol']:>8} {r['concurrency']:>11} {r['infer_s']:>8.1f} {r['infer_s'] / baseline:>6.0%}"
            f" {r['p50_ms']:>8.1f} {r['p95_ms']:>8.1f} {r['p99_ms']:>8.1f}"
        )


if __name__ == "__main__":
    main()
