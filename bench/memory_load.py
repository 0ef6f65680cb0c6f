"""The hostile memory load: the service in a memory cgroup, clients posting the largest bodies and the largest
decodes the settings allow, all at once.

    .venv/bin/python bench/memory_load.py                      # 4 GiB cgroup (compose's ALEXNET_API_MEMORY), 30 s
    .venv/bin/python bench/memory_load.py --memory-limit 0     # no limit: how much the load would take
    .venv/bin/python bench/memory_load.py --duration 120 -- --queue-size 32   # flags after -- go to the service

``--clients`` (64) post back to back: three quarters a noise JPEG just under ``--body-mib`` (28 MiB, under the
32 MiB body limit), as multipart; the rest an image of ``--side``² pixels (7900² = 62 Mpx, under the 64 Mpx
limit) that is a small file but decodes large, cycling through RGBA PNG, GIF with transparency and
deflate TIFF. A refused client asks again at once, without waiting for Retry-After (the worst case).

Prints, and with ``--json`` writes: the count of each status, 503s by problem type and whether they carried
Retry-After, connection errors, whether the server is still ready, OOM kills in the cgroup, and the group's
peak memory against its limit. Needs root for the cgroup (run as root, as CI does); without it, ``--memory-limit
0`` still measures the server's peak RSS.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))

from memory_cgroup import MemoryCgroup  # noqa: E402
from service_process import fresh_checkpoint, start_service  # noqa: E402

GIB = 1024**3
MIB = 1024**2


def parse_size(text: str) -> int:
    """``3g``, ``512m``, ``3221225472``, ``0`` → bytes (Docker's spelling, as compose's ALEXNET_API_MEMORY)."""
    text = text.strip().lower()
    units = {"k": 1024, "m": MIB, "g": GIB}
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    p.add_argument("--memory-limit", default="4g", help="the cgroup's limit (default 4g, compose's; 0: no cgroup)")
    p.add_argument("--clients", type=int, default=64, help="concurrent clients (default 64)")
    p.add_argument("--large-decode-clients", type=int, default=16, help="of them, posting large decodes (16)")
    p.add_argument("--duration", type=float, default=30.0, help="seconds of load (default 30)")
    p.add_argument("--body-mib", type=float, default=28.0, help="size of the noise JPEG (default 28 MiB)")
    p.add_argument("--side", type=int, default=7900, help="side of the large-decode images (default 7900)")
    p.add_argument("--checkpoint", type=Path, help="checkpoint to serve (default: a fresh full-size net, written to a file as users' checkpoints are)")
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument("--service-log", type=Path, help="keep the service's log (JSON lines) here")
    p.add_argument("service_flags", nargs="*", help="flags for python -m service (after --)")
    return p.parse_args(argv)


# ---- the images ------------------------------------------------------------------------------------------


def noise_jpeg(target_bytes: int) -> bytes:
    """A JPEG of random pixels (incompressible) of about ``target_bytes``, never more."""
    side = 1024
    while True:
        data = _encode_noise(side)
        if abs(len(data) - target_bytes) < 0.02 * target_bytes and len(data) <= target_bytes:
            return data
        side = max(64, int(side * (target_bytes / len(data)) ** 0.5 * (0.995 if len(data) > target_bytes else 1)))


def _encode_noise(side: int) -> bytes:
    image = Image.frombytes("RGB", (side, side), os.urandom(side * side * 3))
    out = io.BytesIO()
    image.save(out, "JPEG", quality=100, subsampling=0)
    return out.getvalue()


def large_decodes(side: int) -> list[tuple[str, bytes, str]]:
    """Small files that decode to ``side``² pixels, each in a mode whose conversion to RGB costs the most."""
    out = []
    rgba = Image.new("RGBA", (side, side), (200, 30, 30, 128))
    buffer = io.BytesIO()
    rgba.save(buffer, "PNG", compress_level=9)
    out.append(("large.png", buffer.getvalue(), "image/png"))
    del rgba
    palette = Image.new("P", (side, side), 1)
    palette.putpalette([0, 0, 0, 200, 30, 30] + [0] * 762)
    buffer = io.BytesIO()
    palette.save(buffer, "GIF", transparency=0)
    out.append(("large.gif", buffer.getvalue(), "image/gif"))
    del palette
    rgb = Image.new("RGB", (side, side), (30, 200, 30))
    buffer = io.BytesIO()
    rgb.save(buffer, "TIFF", compression="tiff_adobe_deflate")
    out.append(("large.tiff", buffer.getvalue(), "image/tiff"))
    return out


def multipart(name: str, data: bytes, content_type: str) -> tuple[bytes, str]:
    boundary = "alexnet-memory-load"
    head = f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n'
    head += f"Content-Type: {content_type}\r\n\r\n"
    return head.encode() + data + f"\r\n--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


# ---- the load --------------------------------------------------------------------------------------------


@dataclass
class Result:
    statuses: Counter = field(default_factory=Counter)
    refusals: Counter = field(default_factory=Counter)  # (status, problem type, has Retry-After)
    connection_errors: Counter = field(default_factory=Counter)
    requests: int = 0
    ready_after: bool = False
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return {
            "requests": self.requests,
            "seconds": round(self.seconds, 1),
            "statuses": {str(k): v for k, v in sorted(self.statuses.items())},
            "refusals": {f"{s} {t} retry-after={r}": n for (s, t, r), n in sorted(self.refusals.items())},
            "connection_errors": dict(self.connection_errors),
            "ready_after": self.ready_after,
        }


async def load(url: str, bodies: list[tuple[bytes, str]], large: list[tuple[bytes, str]], args) -> Result:
    """``args.clients`` clients for ``args.duration`` s: the first ``large_decode_clients`` cycle ``large``."""
    result = Result()
    stop = asyncio.Event()

    async def client(number: int, http: httpx.AsyncClient):
        mine = large if number < args.large_decode_clients else bodies
        turn = number
        while not stop.is_set():
            body, content_type = mine[turn % len(mine)]
            turn += 1
            try:
                response = await http.post("/classify", content=body, headers={"Content-Type": content_type})
            except httpx.HTTPError as e:
                kind = "large-decode" if mine is large else "body"
                cause = e.__cause__ or e.__context__
                detail = f"{e}" or repr(cause.__cause__ or cause.__context__ or cause) if cause else f"{e}"
                result.connection_errors[f"{type(e).__name__} ({kind} client): {detail}"[:200]] += 1
                await asyncio.sleep(0.1)
                continue
            result.requests += 1
            result.statuses[response.status_code] += 1
            if response.status_code >= 400:
                try:
                    kind = response.json().get("type", "?").rsplit(":", 1)[-1]
                except ValueError:
                    kind = "not-json"
                result.refusals[(response.status_code, kind, "retry-after" in response.headers)] += 1

    limits = httpx.Limits(max_connections=args.clients, max_keepalive_connections=args.clients)
    started = time.perf_counter()
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as http:
        tasks = [asyncio.create_task(client(n, http)) for n in range(args.clients)]
        await asyncio.sleep(args.duration)
        stop.set()
        await asyncio.gather(*tasks)
    result.seconds = time.perf_counter() - started
    async with httpx.AsyncClient(base_url=url, timeout=30) as probe:
        try:
            result.ready_after = (await probe.get("/readyz")).status_code == 200
        except httpx.HTTPError:
            result.ready_after = False
    return result


def start(args, group: MemoryCgroup | None, log_path: Path) -> tuple[subprocess.Popen, str]:
    """The service in ``group``, every setting at its default but the device (hot reload on, as in compose;
    the flags after ``--`` last, so they win)."""
    checkpoint = args.checkpoint or fresh_checkpoint(log_path.parent / "fresh.safetensors")
    flags = ["--reload-interval-s", "2", "--log-level", "info", *args.service_flags]
    return start_service(checkpoint, flags, log_path, preexec_fn=group.enter if group else None)


def peak_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def run(args) -> dict:
    limit = parse_size(args.memory_limit)
    body = noise_jpeg(int(args.body_mib * MIB) - 4096)  # room for the multipart framing
    bodies = [multipart("noise.jpg", body, "image/jpeg")]
    large_files = large_decodes(args.side)
    large = [multipart(name, data, content_type) for name, data, content_type in large_files]
    with tempfile.TemporaryDirectory() as tmp:
        log_path = Path(tmp) / "service.log"
        group = MemoryCgroup(limit) if limit else None
        try:
            if group:
                group.__enter__()
            process, url = start(args, group, log_path)
            idle = group.usage if group else peak_rss_kib(process.pid) * 1024
            try:
                result = asyncio.run(load(url, bodies, large, args))
            finally:
                alive = process.poll() is None
                rss_peak = peak_rss_kib(process.pid) * 1024 if alive else None
                process.terminate()
                try:
                    process.wait(30)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
            report = {
                "memory_limit": limit or None,
                "noise_jpeg_bytes": len(body),
                "large_decode_bytes": {name: len(data) for name, data, _ in large_files},
                "idle_bytes": idle,
                "server_alive": alive,
                "server_exit": process.returncode,
                "peak_rss_bytes": rss_peak,
                **result.as_dict(),
            }
            if group:
                report |= {"cgroup_peak_bytes": group.peak, "oom_kills": group.oom_kills, "limit_hits": group.limit_hits}
            report["log_tail"] = log_path.read_text()[-2000:]
            if args.service_log:
                args.service_log.write_bytes(log_path.read_bytes())
        finally:
            if group:
                group.__exit__(None, None, None)
    return report


def main():
    args = parse_args()
    report = run(args)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    gib = lambda n: "-" if n is None else f"{n / GIB:.2f} GiB"  # noqa: E731
    print(f"limit {gib(report['memory_limit'])}, {args.clients} clients ({args.large_decode_clients} large decodes)")
    print(f"requests {report['requests']} in {report['seconds']} s; statuses {report['statuses']}")
    for what, n in report["refusals"].items():
        print(f"  {n:6d}  {what}")
    print(f"connection errors {report['connection_errors'] or 0}; ready after: {report['ready_after']}")
    print(f"server alive: {report['server_alive']} (exit {report['server_exit']}); idle {gib(report['idle_bytes'])}")
    print(f"peak RSS {gib(report['peak_rss_bytes'])}", end="")
    if "cgroup_peak_bytes" in report:
        print(f"; cgroup peak {gib(report['cgroup_peak_bytes'])}, OOM kills {report['oom_kills']}", end="")
        print(f", limit reached {report['limit_hits']} times", end="")
    print()
    if not report["server_alive"]:
        print(report["log_tail"])


if __name__ == "__main__":
    main()
