"""DistributedDataParallel: 2 CPU processes (gloo, under torchrun) train the same net as 1 process.

Same global batch (4 = 2 processes × 2), same images in the same order, same crops/flips/lighting (drawn
per global batch and sliced by rank). Dropout is off: its masks are drawn per process, so with dropout
the two runs are equally valid but not equal.

Not bitwise equal: the mean of two half-batch means rounds differently from one mean over the batch,
and once a ReLU input within rounding of 0 lands on the other side, that position's gradient changes.
Replaying both computations in one process gives a relative difference in the weight updates of ~2e-6
after 3 steps and ~8e-4 after 6 (the DDP run reproduces the replay exactly); a real bug — a sum instead
of a mean, a shard trained twice — differs by O(1).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import safetensors.torch
import torch
from support.training import REPO, TINY_RUN, make_source, one_thread, prepare_quietly, train_cli

from model import AlexNet
from training.data import derive_seed
from training.initialise import scale_init_to_width_

ARGS = ("--dropout", "0", "--seed", "1", "--lr", "0.005", "--devices", "cpu")


def initial_weights(seed, num_classes, width):
    """What training starts from (the same seeding as training/train.py), in the checkpoint layout."""
    torch.manual_seed(derive_seed(seed, "init"))
    net = AlexNet(num_classes, width=width, dropout=0.0)
    scale_init_to_width_(net)
    return net.grouped_state_dict()


@pytest.mark.slow
def test_two_gloo_processes_equal_one_process(tmp_path):
    prepared = tmp_path / "prepared"
    prepare_quietly(make_source(tmp_path / "src", classes=3, train=4, val=3), prepared)

    single = tmp_path / "single"
    with one_thread():  # as each of the two processes (OMP_NUM_THREADS=1)
        assert train_cli(prepared, single, *ARGS) == 0

    ddp = tmp_path / "ddp"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "training",
        "train",
        str(prepared),
        "--out",
        str(ddp),
        *TINY_RUN,
        *ARGS,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "2 process(es)" in result.stderr  # rank 0's log: it really ran as two processes

    one = safetensors.torch.load_file(str(single / "last.safetensors"))
    two = safetensors.torch.load_file(str(ddp / "last.safetensors"))
    initial = initial_weights(seed=1, num_classes=3, width=0.0625)
    assert one.keys() - {"mean_image"} == initial.keys()
    update_one = torch.cat([(one[k] - initial[k]).flatten() for k in initial])
    update_two = torch.cat([(two[k] - initial[k]).flatten() for k in initial])
    assert update_one.norm() > 1e-3  # it trained
    assert (update_two - update_one).norm() < 1e-2 * update_one.norm()
    assert torch.equal(one["mean_image"], two["mean_image"])

    m1 = [json.loads(line) for line in (single / "metrics.jsonl").read_text().splitlines()]
    m2 = [json.loads(line) for line in (ddp / "metrics.jsonl").read_text().splitlines()]
    assert len(m1) == len(m2) == 2
    for a, b in zip(m1, m2):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-3)
        assert b["val_loss"] == pytest.approx(a["val_loss"], rel=1e-3)  # evaluated in shards, summed over ranks
        assert (b["val_top1_error"], b["train_top1_error"]) == (a["val_top1_error"], a["train_top1_error"])
    state = safetensors.safe_open(str(ddp / "state.safetensors"), "pt").metadata()
    assert json.loads(state["state"])["processes"] == 2
