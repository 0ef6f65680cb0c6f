"""How long a new user waits: a fresh clone, no .venv, `make serve`, until /readyz first answers 200.

    .venv/bin/python bench/cold_serve.py                       # this repository's HEAD
    .venv/bin/python bench/cold_serve.py --baseline dd0c3cd    # and an older commit's Makefile, same run

Each run clones the committed tree into a temporary folder (so nothing of this checkout's .venv is reused),
runs `make serve PORT=…` there, polls /readyz every 0.2 s and prints the seconds to the first 200, the
seconds the install took (until `python -m service` started) and the size of the new .venv. pip's cache
and the machine's local wheel folders are used as they are: a first install on a machine with no cache
downloads torch (~190 MB) on top. The clone is deleted afterwards.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from service_process import REPO, free_port  # bench/ is on sys.path when this runs as a script


def ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as answer:
            return answer.status == 200
    except OSError:
        return False


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


def cold_start(ref: str, timeout: float) -> dict:
    """Clone ``ref``, `make serve` in the clone, and time it to the first 200 from /readyz."""
    with tempfile.TemporaryDirectory(prefix="cold-serve-") as tmp:
        clone = Path(tmp) / "repo"
        subprocess.run(["git", "clone", "--quiet", "--no-checkout", str(REPO), str(clone)], check=True)
        commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", ref], capture_output=True, text=True, check=True)
        subprocess.run(["git", "-C", str(clone), "checkout", "--quiet", commit.stdout.strip()], check=True)
        port = free_port()
        log = open(Path(tmp) / "make.log", "w")  # noqa: SIM115 (make's output, for as long as the clone lives)
        # The service would find no checkpoint in the clone and serve the untrained net: what a new user gets.
        env = {k: v for k, v in os.environ.items() if not k.startswith(("ALEXNET_", "VIRTUAL_ENV"))}
        load_before = os.getloadavg()[0]
        start = time.perf_counter()
        make = subprocess.Popen(
            ["make", "serve", f"PORT={port}"], cwd=clone, stdout=log, stderr=subprocess.STDOUT, env=env,
            start_new_session=True,
        )  # fmt: skip
        installed = None
        try:
            while time.perf_counter() - start < timeout:
                if installed is None and any(clone.glob(".venv/.installed*")):
                    installed = time.perf_counter() - start
                if ready(f"http://127.0.0.1:{port}/readyz"):
                    break
                if make.poll() is not None:
                    raise SystemExit(f"make serve exited {make.returncode}; see its log:\n" + log_tail(tmp))
                time.sleep(0.2)
            else:
                raise SystemExit(f"not ready after {timeout:.0f} s; make serve's log:\n" + log_tail(tmp))
            seconds = time.perf_counter() - start
        finally:
            os.killpg(make.pid, signal.SIGTERM)
            make.wait(timeout=60)
        return {
            "ref": ref,
            "ready_s": seconds,
            "install_s": installed,
            "venv_mb": folder_bytes(clone / ".venv") / 1e6,
            "load": (load_before, os.getloadavg()[0]),  # a shared machine: how busy it was, before and after
        }


def log_tail(tmp: str) -> str:
    return "".join((Path(tmp) / "make.log").read_text().splitlines(keepends=True)[-20:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--ref", default="HEAD", help="commit to clone (default HEAD)")
    parser.add_argument("--baseline", help="another commit, measured the same way after --ref")
    parser.add_argument("--timeout", type=float, default=900, help="seconds to wait for /readyz (default 900)")
    args = parser.parse_args()
    if shutil.which("make") is None:
        sys.exit("error: make is not installed")
    runs = [cold_start(args.ref, args.timeout)]
    if args.baseline:
        runs.append(cold_start(args.baseline, args.timeout))
    print(f"{os.cpu_count()} CPUs; load average: the 1-minute figure before and after each run")
    print(f"{'ref':>12}  {'ready s':>8}  {'install s':>9}  {'.venv MB':>8}  {'load':>11}")
    for r in runs:
        load = f"{r['load'][0]:.1f} → {r['load'][1]:.1f}"
        print(f"{r['ref']:>12}  {r['ready_s']:8.1f}  {r['install_s']:9.1f}  {r['venv_mb']:8.0f}  {load:>11}")
    if args.baseline:
        print(f"{args.ref} is ready in {runs[0]['ready_s'] / runs[1]['ready_s']:.2f}× the time of {args.baseline}")


if __name__ == "__main__":
    main()
