"""The speed of what goes beyond /classify, each against the forward pass /classify runs, in one command.

    python bench/beyond_classify.py [--seconds 5] [--batch 16]

On the paper's full-size net (freshly initialised: speed does not depend on the weights), with this
machine's threads, in this process:
(a) ONNX Runtime (CPU execution provider) running the file ``python -m model.export`` writes, against
    ``CPUInferenceNet`` (the service's CPU net) on the same batches: img/s at --batch and at batch 1
(b) ``features(x, "fc7")`` (/embed, predict --features) against the logits, on CPUInferenceNet: img/s
(c) Grad-CAM (``model.visualize.grad_cam``: the two-tower net, forward and backward; /explain) per image,
    against CPUInferenceNet's batch-1 forward: ms
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from model import AlexNet, Checkpoint, CPUInferenceNet, keep_freed_memory  # noqa: E402
from model.visualize import grad_cam  # noqa: E402


def rate(fn, seconds: float) -> float:
    """Calls of fn per second, after one warm-up call."""
    fn()
    calls, started = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - started) < seconds or calls < 3:
        fn()
        calls += 1
    return calls / elapsed


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    p.add_argument("--seconds", type=float, default=5.0, help="time for each measurement")
    p.add_argument("--batch", type=int, default=16, help="batch size (the service's ALEXNET_MAX_BATCH default)")
    args = p.parse_args()
    threads = torch.get_num_threads()
    print(f"machine: {os.cpu_count()} CPUs, torch {torch.__version__}, {threads} threads; full-size net")

    keep_freed_memory()  # the allocator the service runs CPUInferenceNet with (model/malloc.py)
    torch.manual_seed(0)
    towers = AlexNet().eval()
    cpu_net = CPUInferenceNet(towers)
    x = torch.randn(args.batch, 3, 224, 224) * 60
    one = x[:1].contiguous()
    rows = []

    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = Path(tmp) / "fresh.safetensors"
        Checkpoint.from_model(towers, provenance={"trained": False, "source": "bench"}).save(checkpoint)
        from model.export import main as export

        assert export([str(checkpoint), str(Path(tmp) / "alexnet.onnx")]) == 0
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        session = ort.InferenceSession(str(Path(tmp) / "alexnet.onnx"), options, providers=["CPUExecutionProvider"])
    feed = {"image": x.numpy()}
    feed_one = {"image": one.numpy()}

    ours = rate(lambda: cpu_net(x), args.seconds) * args.batch
    theirs = rate(lambda: session.run(None, feed), args.seconds) * args.batch
    rows.append((f"(a) ONNX Runtime, batch {args.batch}", theirs, "img/s", theirs / ours, f"CPUInferenceNet {ours:,.1f}"))
    ours1 = rate(lambda: cpu_net(one), args.seconds)
    theirs1 = rate(lambda: session.run(None, feed_one), args.seconds)
    rows.append(("(a) ONNX Runtime, batch 1", theirs1, "img/s", theirs1 / ours1, f"CPUInferenceNet {ours1:,.1f}"))

    features = rate(lambda: cpu_net.features(x, "fc7"), args.seconds) * args.batch
    rows.append((f"(b) fc7 features, batch {args.batch}", features, "img/s", features / ours, f"logits {ours:,.1f}"))

    explain = 1000 / rate(lambda: grad_cam(towers, one), args.seconds)
    forward1 = 1000 / ours1
    rows.append(("(c) Grad-CAM, one image", explain, "ms", explain / forward1, f"batch-1 forward {forward1:,.1f} ms"))

    print(f"\n{'':<34} {'value':>10} {'unit':<6} {'ratio':>7}  baseline (same run)")
    for name, value, unit, ratio, baseline in rows:
        print(f"{name:<34} {value:>10,.1f} {unit:<6} {ratio:>6.2f}×  {baseline}")


if __name__ == "__main__":
    main()
