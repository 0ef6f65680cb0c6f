"""Load test of the classification service against the bare model, in one run.

    python bench/serve_load.py                      # full-size net, 1 and 16 clients, 20 s each
    python bench/serve_load.py --duration 5 --clients 1,4,16 --checkpoint checkpoints/best.safetensors

1. Model only, in this process, with the service's thread count: the forward pass's throughput at the
   service's max batch, the batch-1 forward time, and the time to preprocess one photo (decode, resize,
   crop: ``Preprocessor.from_bytes``).
2. The service: ``python -m service`` in a subprocess; for each client count, that many httpx async
   clients post real JPEGs (multipart, one image each) back to back for a fixed time after a warm-up.
   The clients are spread over --load-processes processes (default 2): httpx spends ~4.5 ms of CPU per
   request, and one Python thread doing that for 16 clients would serialise them in a way 16 real
   clients on other machines do not. The load generator still shares this machine's cores with the
   service; its CPU time per image is printed.
   Prints throughput, p50/p95/p99 latency and the count of each status and of connection errors.
   Model-only figures are measured just before and after each load run and averaged. CPU time per image
   (service process vs. forward pass alone) is reported too: unlike wall time, it hardly depends on
   what else the machine is running.
3. The targets, as ratios to step 1: at 16 clients, service throughput ≥ 70% of model-only throughput
   with zero errors; at 1 client, p50 latency ≤ 1.3 × (batch-1 forward + preprocessing).

Without --checkpoint the net is the paper's full-size AlexNet, freshly initialised (speed does not
depend on what the weights have learned).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import signal
import statistics
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

# The service's OpenMP setting (service/__main__.py), so that model-only and service figures compare alike.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import httpx  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from model import AlexNetConfig, Checkpoint, GroupedAlexNet, keep_freed_memory  # noqa: E402
from service_process import start_service  # noqa: E402  (bench/ is on sys.path when run as a script)
from service import engine  # noqa: E402
from service.settings import Settings  # noqa: E402

DEFAULT_IMAGES = REPO.parent / "shared" / "data" / "images"
FALLBACK_IMAGES = REPO / "tests" / "fixtures" / "images"


def parse_args():
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    p.add_argument("--checkpoint", type=Path, help="checkpoint to serve (default: a fresh full-size net)")
    p.add_argument("--images", type=Path, help=f"folder of JPEGs to post (default {DEFAULT_IMAGES})")
    p.add_argument("--clients", default="1,16", help="comma-separated concurrent client counts")
    p.add_argument("--duration", type=float, default=20.0, help="seconds of measured load per client count")
    p.add_argument("--warmup", type=float, default=3.0, help="seconds of unmeasured load before each measurement")
    p.add_argument("--model-seconds", type=float, default=10.0, help="seconds per model-only measurement")
    defaults = Settings.model_fields
    p.add_argument(
        "--max-batch", type=int, default=defaults["max_batch"].default, help="the service's ALEXNET_MAX_BATCH"
    )
    p.add_argument(
        "--max-wait-ms", type=float, default=defaults["max_wait_ms"].default, help="the service's ALEXNET_MAX_WAIT_MS"
    )
    p.add_argument("--threads", type=int, default=0, help="torch threads, 0: one per core (ALEXNET_THREADS)")
    p.add_argument("--decode-workers", type=int, default=0, help="the service's ALEXNET_DECODE_WORKERS")
    p.add_argument(
        "--load-processes",
        type=int,
        default=min(2, os.cpu_count() or 1),
        help="processes the clients are spread over (default: 2, or 1 on a 1-CPU machine)",
    )
    p.add_argument("--json", type=Path, help="also write the results here")
    return p.parse_args()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def timed_loop(fn, seconds: float, min_runs: int = 3) -> list[float]:
    times, deadline = [], time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(times) < min_runs:
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return times


class ModelOnly:
    """The bare model in this process, with the service's thread count and max batch."""

    def __init__(self, checkpoint_path: Path, photos: list[bytes], max_batch: int, threads: int):
        torch.set_num_threads(threads)
        keep_freed_memory()  # as the service sets it at start-up (model/malloc.py)
        # The very form of the net the service builds for this device (on CPU: CPUInferenceNet).
        loaded = engine.load(checkpoint_path, (torch.device("cpu"),))
        self.net, self.preprocessor = loaded.net, loaded.preprocessor
        self.photos, self.max_batch, self.threads = photos, max_batch, threads
        inputs = torch.cat([self.preprocessor.from_bytes(d) for d in photos])
        self.batch = inputs.repeat(max_batch // len(photos) + 1, 1, 1, 1)[:max_batch].contiguous()

    @torch.inference_mode()
    def measure(self, seconds: float) -> dict:
        self.net(self.batch)  # warm-up
        cpu_started = time.process_time()
        batched = timed_loop(lambda: self.net(self.batch), seconds)
        cpu_seconds = time.process_time() - cpu_started
        single = timed_loop(lambda: self.net(self.batch[:1]), seconds / 2, min_runs=5)
        preprocess = [
            statistics.median(timed_loop(lambda d=d: self.preprocessor.from_bytes(d), 0.2)) for d in self.photos
        ]
        return {
            "throughput_img_s": self.max_batch * len(batched) / sum(batched),
            "cpu_ms_per_img": 1000 * cpu_seconds / (self.max_batch * len(batched)),
            "forward_batch1_ms": 1000 * statistics.median(single),
            "preprocess_ms": 1000 * statistics.median(preprocess),
        }


def mean_of(a: dict, b: dict) -> dict:
    return {k: (a[k] + b[k]) / 2 for k in a}


def multipart(name: str, data: bytes) -> tuple[bytes, str]:
    """One pre-encoded multipart body, so that the load generator spends its CPU on requests, not encoding."""
    boundary = "alexnet-bench-boundary"
    head = f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n'
    head += "Content-Type: image/jpeg\r\n\r\n"
    body = head.encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def batch_counters(metrics: str) -> dict[str, float]:
    """Network inputs, forward passes and forward seconds so far, from the service's /metrics."""
    wanted = ("alexnet_batch_size_sum", "alexnet_batch_size_count", "alexnet_forward_duration_seconds_sum")
    values = dict.fromkeys(wanted, 0.0)
    for line in metrics.splitlines():
        name, _, value = line.partition(" ")
        if name in values:
            values[name] = float(value)
    return values


def process_cpu_seconds(pid: int) -> float:
    """user + system CPU time of a process (Linux), to compare work per image independently of contention."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def drive(url: str, bodies: list[tuple[bytes, str]], clients: int, first: int, begin: float, end: float) -> dict:
    """``clients`` httpx async clients posting back to back; what happens between wall-clock ``begin`` and
    ``end`` (time.time()) is measured, the time before it is warm-up."""
    latencies: list[float] = []
    server_timing: dict[str, list[float]] = {"total_ms": [], "preprocess_ms": [], "inference_ms": []}
    statuses: Counter = Counter()
    errors: Counter = Counter()
    measuring = asyncio.Event()
    stop = asyncio.Event()

    async def client(number: int, http: httpx.AsyncClient):
        i = number
        while not stop.is_set():
            body, content_type = bodies[i % len(bodies)]
            i += 1
            started = time.perf_counter()
            try:
                response = await http.post("/classify", content=body, headers={"Content-Type": content_type})
                status = response.status_code
            except httpx.HTTPError as e:
                if measuring.is_set() and not stop.is_set():
                    errors[type(e).__name__] += 1
                continue
            if measuring.is_set() and not stop.is_set():
                latencies.append(time.perf_counter() - started)
                statuses[status] += 1
                if status == 200:
                    for key, value in response.json()["timing"].items():
                        server_timing[key].append(value)

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as http:
        tasks = [asyncio.create_task(client(first + n, http)) for n in range(clients)]
        await asyncio.sleep(max(0.0, begin - time.time()))
        measuring.set()
        cpu = time.process_time()
        await asyncio.sleep(max(0.0, end - time.time()))
        stop.set()
        cpu = time.process_time() - cpu
        await asyncio.gather(*tasks)
    return {"latencies": latencies, "server_timing": server_timing, "statuses": statuses, "errors": errors, "cpu": cpu}


def drive_in_process(*args) -> dict:
    return asyncio.run(drive(*args))


def load(
    url: str, server_pid: int, bodies: list[tuple[bytes, str]], clients: int, warmup: float, duration: float,
    processes: int,
) -> dict:
    """The clients, spread over ``processes`` load-generator processes (one Python thread sending 16
    clients' requests and parsing their answers is a bottleneck of its own, which 16 real clients on other
    machines are not); the service's CPU time and batch counters over the same window."""
    processes = max(1, min(processes, clients))
    shares = [clients // processes + (i < clients % processes) for i in range(processes)]
    begin = time.time() + warmup + 1.0  # + the processes' start-up
    end = begin + duration
    with ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("fork")) as pool:
        futures = [
            pool.submit(drive_in_process, url, bodies, share, sum(shares[:i]), begin, end)
            for i, share in enumerate(shares)
        ]
        time.sleep(max(0.0, begin - time.time()))
        server_cpu, counters = process_cpu_seconds(server_pid), batch_counters(httpx.get(url + "/metrics").text)
        time.sleep(max(0.0, end - time.time()))
        server_cpu = process_cpu_seconds(server_pid) - server_cpu
        after = batch_counters(httpx.get(url + "/metrics").text)
        parts = [f.result() for f in futures]
    inputs, passes, forward_seconds = (after[k] - counters[k] for k in counters)
    latencies = [x for part in parts for x in part["latencies"]]
    statuses = sum((part["statuses"] for part in parts), Counter())
    errors = sum((part["errors"] for part in parts), Counter())
    server_timing = {k: [x for part in parts for x in part["server_timing"][k]] for k in parts[0]["server_timing"]}
    ok = statuses.get(200, 0)
    return {
        "clients": clients,
        "load_processes": processes,
        "seconds": duration,
        "requests": sum(statuses.values()),
        "throughput_img_s": ok / duration,
        "p50_ms": 1000 * percentile(latencies, 50) if latencies else None,
        "p95_ms": 1000 * percentile(latencies, 95) if latencies else None,
        "p99_ms": 1000 * percentile(latencies, 99) if latencies else None,
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "connection_errors": dict(errors),
        "errors": sum(v for k, v in statuses.items() if k != 200) + sum(errors.values()),
        "server_p50_ms": {k: round(statistics.median(v), 1) for k, v in server_timing.items() if v},
        "mean_batch": inputs / max(passes, 1),
        "forward_img_s_in_service": inputs / forward_seconds if forward_seconds else None,
        "server_cpu_ms_per_img": 1000 * server_cpu / max(ok, 1),
        "client_cpu_ms_per_img": 1000 * sum(part["cpu"] for part in parts) / max(ok, 1),
    }


def main():
    args = parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # so that `finally` stops the service
    threads = args.threads or len(os.sched_getaffinity(0))
    images = args.images or (DEFAULT_IMAGES if DEFAULT_IMAGES.is_dir() else FALLBACK_IMAGES)
    paths = sorted(p for p in images.iterdir() if p.suffix.lower() in (".jpg", ".jpeg"))
    photos = [p.read_bytes() for p in paths]
    if not photos:
        sys.exit(f"no JPEGs in {images}")
    clients = [int(c) for c in args.clients.split(",")]

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = args.checkpoint
        if checkpoint is None:
            checkpoint = Path(tmp) / "fresh.safetensors"
            net = GroupedAlexNet(AlexNetConfig())
            Checkpoint.from_model(net, provenance={"trained": False, "source": "bench"}).save(checkpoint)
            del net

        print(f"machine: {os.cpu_count()} CPUs, torch {torch.__version__}, {threads} torch threads", flush=True)
        model = ModelOnly(checkpoint, photos, args.max_batch, threads)
        flags = ["--max-batch", str(args.max_batch), "--max-wait-ms", str(args.max_wait_ms),
                 "--threads", str(args.threads), "--decode-workers", str(args.decode_workers)]
        process, url = start_service(checkpoint, flags, Path(tmp) / "service.log")
        bodies = [multipart(p.name, d) for p, d in zip(paths, photos)]
        runs = []
        # Model-only figures are measured just before and just after each load run (the service idle) and
        # averaged, so that a machine whose load drifts (other jobs) skews both sides alike.
        try:
            before = model.measure(args.model_seconds)
            for n in clients:
                print(f"service, {n} client(s) for {args.duration:.0f} s, load from"
                      f" {max(1, min(args.load_processes, n))} process(es) ...", flush=True)
                run = load(url, process.pid, bodies, n, args.warmup, args.duration, args.load_processes)
                after = model.measure(args.model_seconds)
                run["model_only"] = mean_of(before, after)
                before = after
                runs.append(run)
                m = run["model_only"]
                print(
                    f"  {run['throughput_img_s']:.1f} img/s  p50 {run['p50_ms']:.1f} ms  p95 {run['p95_ms']:.1f} ms"
                    f"  p99 {run['p99_ms']:.1f} ms  statuses {run['statuses']}  connection errors"
                    f" {run['connection_errors'] or 0}\n"
                    f"  model only: batch {args.max_batch} {m['throughput_img_s']:.1f} img/s, batch-1 forward"
                    f" {m['forward_batch1_ms']:.1f} ms, preprocessing {m['preprocess_ms']:.1f} ms\n"
                    f"  CPU per image: model only {m['cpu_ms_per_img']:.1f} ms, service"
                    f" {run['server_cpu_ms_per_img']:.1f} ms, load generator {run['client_cpu_ms_per_img']:.1f} ms\n"
                    f"  inside the service (p50): {run['server_p50_ms']}; mean batch {run['mean_batch']:.1f},"
                    f" forward passes alone {run['forward_img_s_in_service'] or 0:.1f} img/s",
                    flush=True,
                )
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(60)

    print("\nresults (model-only figures measured around each run)")
    print(
        f"{'clients':>7} {'img/s':>7} {'model img/s':>11} {'ratio':>6} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8}"
        f" {'fwd1+pre ms':>11} {'errors':>6} {'CPU ms/img model':>16} {'service':>7}"
    )
    targets = {}
    for run in runs:
        m = run["model_only"]
        ratio = run["throughput_img_s"] / m["throughput_img_s"]
        single_image_ms = m["forward_batch1_ms"] + m["preprocess_ms"]
        print(
            f"{run['clients']:>7} {run['throughput_img_s']:>7.1f} {m['throughput_img_s']:>11.1f} {ratio:>6.0%}"
            f" {run['p50_ms']:>8.1f} {run['p95_ms']:>8.1f} {run['p99_ms']:>8.1f} {single_image_ms:>11.1f}"
            f" {run['errors']:>6} {m['cpu_ms_per_img']:>16.1f} {run['server_cpu_ms_per_img']:>7.1f}"
        )
        if run["clients"] == 16:
            targets["16_clients_throughput_ratio"] = ratio
            met = ratio >= 0.70 and run["errors"] == 0
            print(f"  target: >= 70% of model-only throughput, zero errors: {'met' if met else 'NOT met'}")
        if run["clients"] == 1:
            targets["1_client_p50_ratio"] = run["p50_ms"] / single_image_ms
            met = run["p50_ms"] <= 1.3 * single_image_ms
            print(
                f"  target: p50 <= 1.3 x (batch-1 forward + preprocessing): {run['p50_ms'] / single_image_ms:.2f} x,"
                f" {'met' if met else 'NOT met'}"
            )
    print(
        "CPU ms/img: CPU time per image of the forward pass alone and of the whole service process; their ratio"
        "\nis the throughput ratio a machine with no other load would allow if the service kept every core busy."
    )
    if args.json:
        args.json.write_text(json.dumps({"service": runs, "targets": targets}, indent=2))


if __name__ == "__main__":
    main()
