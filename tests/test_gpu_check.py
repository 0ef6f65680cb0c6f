"""bench/gpu_check.py's CPU dry run: the GPU acceptance script runs every section end to end on a tiny
net, so that it cannot rot between the sessions that have a GPU to run it on."""

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_gpu_acceptance_script_dry_runs_on_the_cpu():
    command = [sys.executable, str(REPO / "bench" / "gpu_check.py"), "--device", "cpu"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, (result.stdout[-4000:], result.stderr[-4000:])
    rows = [line.split(" | ") for line in result.stdout.splitlines() if line.startswith("| ") and "---" not in line]
    rows = [[cell.strip(" |") for cell in row] for row in rows[1:]]  # (after the header)
    by_result = {}
    for section, check, outcome, figure, threshold in rows:
        by_result.setdefault(outcome, []).append((section, check, threshold))
    assert set(by_result) == {"ok", "skipped (no GPU)"}, by_result.keys()
    sections = {section for section, *_ in by_result["ok"]}
    assert sections == {"steps", "logits", "precision", "loader", "train", "eval", "serve"}, sections
    # The rates are shown with their thresholds on the GPU machine.
    thresholds = {threshold for section, _, threshold in by_result["ok"] if section in ("train", "loader")}
    assert "> 0 (on the GPU: ≥ 8,000 img/s)" in thresholds and "> 0 (on the GPU: ≥ 16,000 img/s)" in thresholds
    assert sum(section == "train" and "store" in check for section, check, _ in by_result["ok"]) == 4  # raw ×3, jpeg
    gpu_only = {section for section, *_ in by_result["skipped (no GPU)"]}
    assert gpu_only == {"precision", "memory", "loader", "two GPUs", "serve"}, gpu_only
    assert result.stdout.splitlines()[-2] == f"{len(by_result['ok'])} passed, 0 failed, " \
        f"{len(by_result['skipped (no GPU)'])} not run"


@pytest.mark.slow
def test_a_service_that_does_not_start_is_a_failed_row_and_the_table_still_prints(tmp_path):
    """service_process.start_service ends with sys.exit when the service exits: a row, not the end."""
    script = tmp_path / "run.py"
    script.write_text(
        "import sys, runpy\n"
        f"sys.argv = ['gpu_check.py', '--device', 'cpu']\n"
        f"sys.path.insert(0, {str(REPO / 'bench')!r})\n"
        "import gpu_check\n"
        "def broken(args, table, root):\n"
        "    sys.exit('the service exited with 1')\n"
        "for name in ('check_resume', 'check_logits', 'check_precision', 'check_steps', 'check_memory'):\n"
        "    setattr(gpu_check, name, lambda *a, **k: None)\n"
        "gpu_check.make_stores = lambda *a: {}\n"
        "gpu_check.check_service = broken\n"
        "sys.exit(gpu_check.main())\n"
    )
    result = subprocess.run([sys.executable, str(script)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stdout[-3000:]
    assert "| serve | raised | FAIL | SystemExit: the service exited with 1 |" in result.stdout, result.stdout[-3000:]
    assert "0 passed, 1 failed, 0 not run" in result.stdout
