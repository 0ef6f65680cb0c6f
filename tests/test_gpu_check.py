"""bench/gpu_check.py's CPU dry run: the GPU acceptance script runs every section end to end on a tiny
net, so that it cannot rot between the sessions that have a GPU to run it on."""

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_gpu_acceptance_script_dry_runs_on_the_cpu():
    command = [sys.executable, str(REPO / "bench" / "gpu_check.py"), "--device", "cpu", "--http-seconds", "1"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, (result.stdout[-4000:], result.stderr[-4000:])
    rows = [line for line in result.stdout.splitlines() if line.startswith("| ") and " | ok | " in line]
    sections = {row.split("|")[1].strip() for row in rows}
    assert sections == {"logits", "steps", "train", "serve"}, result.stdout[-4000:]
    assert sum("store" in row for row in rows if row.startswith("| train")) == 4  # raw ×3 and jpeg
    assert result.stdout.splitlines()[-2] == f"{len(rows)} passed, 0 failed, 1 skipped"  # (DDP needs 2 GPUs)
