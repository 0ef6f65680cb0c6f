"""Soak test: many concurrent clients for a fixed time, good and bad requests mixed, memory watched.

    python bench/soak.py                                # 64 clients, 180 s, 30% bad requests
    python bench/soak.py --duration 600 --queue-size 32 --checkpoint checkpoints/best.safetensors
    python bench/soak.py --memory-limit 3g              # the service in a 3 GiB memory cgroup (root)

``python -m service`` runs in a subprocess (every limit at its default unless a flag says otherwise); N
httpx async clients post back to back for the duration. Each request is, at random (seeded), a real photo
(multipart) or an entry of the hostile-input corpus (tests/corpus/make_corpus.py: not-images, truncated and
corrupt files, bombs, odd Content-Types, hostile forms, unusual but valid images). The corpus entry
``large-decoded.webp`` (a 16-MP image: ~290 MiB and a second to decode) is left out: it would turn the run
into a benchmark of one decoder. (``largest-allowed.webp``, 64 MP, is refused from its header: its decode
can never fit the default decode budget.)

Prints: throughput, latency percentiles (good and bad requests apart), the count of each status, 503s with
and without Retry-After and what each said, answers other than expected, connection errors, the server's
peak RSS, and RSS growth between the first and the last minute of the run (for runs under 5 minutes: the
first and last fifth). The server's RSS is sampled every second from /proc/PID/status. With
``--memory-limit`` the service runs in a memory cgroup of its own with that limit (bench/memory_cgroup.py),
and the group's peak and OOM kills are reported too; without it, when the soak itself runs in a cgroup with
a memory limit (a container), that group's peak is reported.

Clients do not wait for Retry-After: a refused client asks again at once (the worst case for the server).

Targets: zero 5xx other than those 503s, zero connection errors, every 503 a queue-full one (counted by the
server's own queue-rejection counter, so only when the queue was full) or a memory-busy one (the body budget
full), each with Retry-After, RSS growth under 10%, and in a cgroup no OOM kill.

Without --checkpoint the net is the paper's full-size AlexNet, freshly initialised.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests" / "corpus"))

import make_corpus  # noqa: E402

from memory_cgroup import MemoryCgroup, own_group_peak  # noqa: E402  (bench/ is on sys.path as a script)
from memory_load import parse_size  # noqa: E402
from service_process import fresh_checkpoint, start_service  # noqa: E402

PHOTOS = REPO / "tests" / "fixtures" / "images"
LEFT_OUT = {"large-decoded.webp"}


def parse_args():
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    p.add_argument("--duration", type=float, default=180.0, help="seconds of measured load (default 180)")
    p.add_argument("--warmup", type=float, default=5.0, help="seconds of load before measuring (default 5)")
    p.add_argument("--clients", type=int, default=64, help="concurrent clients (default 64)")
    p.add_argument("--bad-fraction", type=float, default=0.3, help="share of corpus requests (default 0.3)")
    p.add_argument("--checkpoint", type=Path, help="checkpoint to serve (default: a fresh full-size net)")
    p.add_argument("--queue-size", type=int, help="the service's ALEXNET_QUEUE_SIZE (default: the service's)")
    p.add_argument("--threads", type=int, help="the service's ALEXNET_THREADS (default: the service's)")
    p.add_argument("--decode-workers", type=int, help="the service's ALEXNET_DECODE_WORKERS")
    p.add_argument("--memory-limit", help="run the service in a memory cgroup with this limit (3g, 512m; root)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="also write the results here")
    return p.parse_args()


class Request:
    """One pre-encoded request and what its answer must be ("ok": 200; an int: that status; "any")."""

    def __init__(self, name: str, body: bytes, content_type: str, expect, good: bool):
        self.name, self.body, self.content_type, self.expect, self.good = name, body, content_type, expect, good

    def expected(self, status: int) -> bool:
        if status == 503:
            return True  # judged separately (queue-full with Retry-After only)
        if self.expect == "any":
            return status == 200 or 400 <= status < 500
        return status == (200 if self.expect == "ok" else self.expect)


def multipart(name: str, data: bytes, content_type: str) -> tuple[bytes, str]:
    boundary = "alexnet-soak-boundary"
    head = f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n'
    body = head.encode() + f"Content-Type: {content_type}\r\n\r\n".encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def requests() -> tuple[list[Request], list[Request]]:
    good = []
    for path in sorted(PHOTOS.glob("*.JPEG")):
        body, content_type = multipart(path.name, path.read_bytes(), "image/jpeg")
        good.append(Request(path.name, body, content_type, "ok", True))
    bad = []
    for entry, data in make_corpus.build():
        if entry.name in LEFT_OUT:
            continue
        if entry.send == "multipart":
            body, content_type = multipart(entry.name, data, entry.content_type)
        else:  # a raw body, or a complete multipart body with its own Content-Type
            body, content_type = data, entry.content_type
        bad.append(Request(entry.name, body, content_type, entry.expect, False))
    return good, bad


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def memory_kib(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0])
    return out


def metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def soak(url: str, pid: int, good: list[Request], bad: list[Request], args) -> dict:
    latencies = {"good": [], "bad": []}
    statuses: Counter = Counter()
    by_kind: Counter = Counter()
    unexpected: Counter = Counter()
    refusals: Counter = Counter()  # 503s by (problem type, with Retry-After)
    all_refusals = 0  # 503s over the whole run, warm-up included: compared with the server's own counter
    connection_errors: Counter = Counter()
    samples: list[tuple[float, int]] = []  # (seconds since the measurement began, RSS KiB)
    measuring, stop = asyncio.Event(), asyncio.Event()
    started = 0.0

    async def client(number: int, http: httpx.AsyncClient):
        rng = random.Random(args.seed * 1000 + number)
        while not stop.is_set():
            request = rng.choice(bad) if rng.random() < args.bad_fraction else rng.choice(good)
            t0 = time.perf_counter()
            try:
                response = await http.post(
                    "/classify", content=request.body, headers={"Content-Type": request.content_type}
                )
            except httpx.HTTPError as e:
                if measuring.is_set() and not stop.is_set():
                    connection_errors[type(e).__name__] += 1
                continue
            status = response.status_code
            if status == 503:
                nonlocal all_refusals
                all_refusals += 1
            if not measuring.is_set() or stop.is_set():
                continue
            kind = "good" if request.good else "bad"
            latencies[kind].append(time.perf_counter() - t0)
            statuses[status] += 1
            by_kind[(kind, status)] += 1
            if status == 503:
                problem = response.json().get("type", "?").rsplit(":", 1)[-1]
                refusals[(problem, "retry-after" in response.headers)] += 1
            elif not request.expected(status):
                unexpected[f"{request.name}: {status}"] += 1

    async def sample_memory():
        while not stop.is_set():
            if measuring.is_set():
                samples.append((time.perf_counter() - started, memory_kib(pid)["VmRSS"]))
            await asyncio.sleep(1.0)

    async with httpx.AsyncClient(base_url=url, timeout=30) as probe:
        rejections_before = metric((await probe.get("/metrics")).text, "alexnet_queue_rejections_total")
    limits = httpx.Limits(max_connections=args.clients, max_keepalive_connections=args.clients)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as http:
        tasks = [asyncio.create_task(client(n, http)) for n in range(args.clients)]
        sampler = asyncio.create_task(sample_memory())
        await asyncio.sleep(args.warmup)
        started = time.perf_counter()
        measuring.set()
        await asyncio.sleep(args.duration)
        stop.set()
        elapsed = time.perf_counter() - started
        await asyncio.gather(*tasks, sampler)
        async with httpx.AsyncClient(base_url=url, timeout=30) as probe:
            rejections = metric((await probe.get("/metrics")).text, "alexnet_queue_rejections_total")
            ready = (await probe.get("/readyz")).status_code

    window = 60.0 if elapsed >= 300 else elapsed / 5
    first = [rss for t, rss in samples if t <= window]
    last = [rss for t, rss in samples if t >= elapsed - window]
    memory = memory_kib(pid)
    ok = statuses.get(200, 0)
    return {
        "clients": args.clients,
        "seconds": round(elapsed, 1),
        "requests": sum(statuses.values()),
        "requests_per_s": sum(statuses.values()) / elapsed,
        "answers_200_per_s": ok / elapsed,
        "good_images_per_s": by_kind[("good", 200)] / elapsed,
        "latency_ms": {
            kind: {f"p{q}": round(1000 * percentile(v, q), 1) for q in (50, 95, 99, 100)} if v else None
            for kind, v in latencies.items()
        },
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "statuses_by_kind": {f"{k}:{s}": v for (k, s), v in sorted(by_kind.items())},
        "server_errors": sum(v for k, v in statuses.items() if k >= 500 and k != 503),  # 503s: judged apart
        "refusals_503": {f"{p} ({'with' if r else 'without'} Retry-After)": v for (p, r), v in refusals.items()},
        "queue_rejections_counted_by_server": rejections - rejections_before,
        "refusals_503_whole_run": all_refusals,
        "unexpected_answers": dict(unexpected),
        "connection_errors": dict(connection_errors),
        "ready_after": ready == 200,
        "rss_window_s": round(window, 1),
        "rss_first_window_mib": round(statistics.mean(first) / 1024, 1) if first else None,
        "rss_last_window_mib": round(statistics.mean(last) / 1024, 1) if last else None,
        "rss_growth": (statistics.mean(last) / statistics.mean(first) - 1) if first and last else None,
        "peak_rss_mib": round(memory["VmHWM"] / 1024, 1),
        "rss_end_mib": round(memory["VmRSS"] / 1024, 1),
    }


def main():
    args = parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # so that `finally` stops the service
    good, bad = requests()
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = args.checkpoint or fresh_checkpoint(Path(tmp) / "fresh.safetensors")
        log_path = Path(tmp) / "service.log"
        flags = [f"--{flag.replace('_', '-')}={getattr(args, flag)}" for flag in ("queue_size", "threads", "decode_workers")
                 if getattr(args, flag) is not None]
        group = MemoryCgroup(parse_size(args.memory_limit)) if args.memory_limit else None
        if group:
            group.__enter__()
        process, url = start_service(checkpoint, flags, log_path, preexec_fn=group.enter if group else None)
        print(
            f"machine: {os.cpu_count()} CPUs; {args.clients} clients for {args.duration:.0f} s "
            f"(+{args.warmup:.0f} s warm-up), {args.bad_fraction:.0%} of requests from the corpus "
            f"({len(bad)} kinds), the rest {len(good)} photos",
            flush=True,
        )
        try:
            result = asyncio.run(soak(url, process.pid, good, bad, args))
        finally:
            process.send_signal(signal.SIGTERM)
            exit_code = process.wait(120)
            if group:
                result_group = {"limit": group.limit_bytes, "peak": group.peak, "oom_kills": group.oom_kills}
                group.__exit__(None, None, None)
        result["service_exit_status"] = exit_code
        result["cgroup"] = result_group if group else own_group_peak()
        log = log_path.read_text(errors="replace")
        result["unhandled_errors_logged"] = log.count("unhandled error")

    r = result
    print(f"requests: {r['requests']} in {r['seconds']} s = {r['requests_per_s']:.1f}/s")
    print(f"200s: {r['answers_200_per_s']:.1f}/s, of which photos {r['good_images_per_s']:.1f}/s")
    for kind, lat in r["latency_ms"].items():
        if lat:
            print(f"latency ({kind} requests), ms: " + "  ".join(f"{k} {v}" for k, v in lat.items()))
    print(f"statuses: {r['statuses']}")
    print(f"  by kind: {r['statuses_by_kind']}")
    print(f"503s: {r['refusals_503'] or 'none'}; over the whole run (warm-up too) {r['refusals_503_whole_run']}, "
          f"queue rejections counted by the server {r['queue_rejections_counted_by_server']:.0f}")  # fmt: skip
    print(f"answers other than expected: {r['unexpected_answers'] or 'none'}")
    print(f"connection errors: {r['connection_errors'] or 'none'}")
    print(f"server RSS: peak {r['peak_rss_mib']} MiB, mean over the first {r['rss_window_s']} s "
          f"{r['rss_first_window_mib']} MiB, over the last {r['rss_last_window_mib']} MiB "
          f"(growth {r['rss_growth']:+.1%}), at the end {r['rss_end_mib']} MiB")  # fmt: skip
    if r["cgroup"]:
        c = r["cgroup"]
        where = c.get("path", "the service's own")
        print(f"memory cgroup ({where}): peak {c['peak'] / 2**20:,.0f} MiB of a "
              f"{c['limit'] / 2**20:,.0f} MiB limit, OOM kills {c['oom_kills']}")  # fmt: skip
    print(f"service: ready at the end {r['ready_after']}, exit status after SIGTERM {r['service_exit_status']}, "
          f"unhandled errors logged {r['unhandled_errors_logged']}")  # fmt: skip

    refusals_ok = all(k.startswith(("queue-full (with", "memory-busy (with")) for k in r["refusals_503"])
    queue_full = sum(v for k, v in r["refusals_503"].items() if k.startswith("queue-full"))
    refusals_ok = refusals_ok and queue_full <= round(r["queue_rejections_counted_by_server"])
    targets = {
        "zero 5xx": r["server_errors"] == 0 and r["unhandled_errors_logged"] == 0,
        "zero connection errors": not r["connection_errors"],
        "every 503 is queue-full (counted by the server) or memory-busy, with Retry-After": refusals_ok,
        "every answer as expected": not r["unexpected_answers"],
        "RSS growth < 10%": r["rss_growth"] is not None and r["rss_growth"] < 0.10,
        "still ready, clean exit": r["ready_after"] and r["service_exit_status"] == 0,
    }
    if r["cgroup"]:
        targets["no OOM kill, peak below the cgroup's limit"] = (
            r["cgroup"]["oom_kills"] == 0 and (r["cgroup"]["peak"] or 0) < r["cgroup"]["limit"]
        )
    for name, met in targets.items():
        print(f"target: {name}: {'met' if met else 'NOT met'}")
    if args.json:
        args.json.write_text(json.dumps({"soak": r, "targets": targets}, indent=2))
    sys.exit(0 if all(targets.values()) else 1)


if __name__ == "__main__":
    main()
