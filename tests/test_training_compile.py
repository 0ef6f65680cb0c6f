"""``--compile`` compiles each tower's stretches without hitting dynamo's recompile limit: every graph of
a few training steps and the evaluations stays compiled (nothing falls back to running uncompiled).

The backend is dynamo's "eager" (graphs captured and guarded as with inductor, no C++ compile): which
graphs dynamo makes, and whether it gives up on a frame, does not depend on the backend."""

from __future__ import annotations

import functools

import pytest
import torch
import torch._dynamo
import torch._dynamo.utils
from support.training import make_source, prepare_quietly, train_cli


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("compile")
    prepare_quietly(make_source(root / "src", classes=3, train=4, val=3), root / "prepared")
    return root / "prepared"  # 12 train images: 3 steps of 4; 9 val images: batches of 4, 4 and 1


@pytest.mark.slow
def test_compiled_towers_stay_compiled_through_training_and_evaluation(prepared, tmp_path, monkeypatch):
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", functools.partial(real_compile, backend="eager"))
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    # 2 epochs: 6 training steps, 2 centre-crop evaluations, then the final centre + 10-crop evaluation.
    assert train_cli(prepared, tmp_path / "run", "--compile", "--eval-batch-size", "4") == 0
    counters = torch._dynamo.utils.counters
    frames = dict(counters["frames"])
    assert frames.get("ok", 0) >= 8, frames  # 4 stretches × 2 towers at least: it did compile
    assert frames["ok"] == frames["total"], frames  # no frame fell back to running uncompiled
    assert not counters["unimplemented"], list(counters["unimplemented"])  # (where the recompile limit shows)
    assert not counters["graph_break"], dict(counters["graph_break"])
    torch._dynamo.reset()
