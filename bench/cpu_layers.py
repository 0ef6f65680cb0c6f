"""Where CPUInferenceNet's time goes, layer by layer, and what its Winograd convolutions buy.

    python bench/cpu_layers.py [--batch 8] [--rounds 12] [--window 0.6]

1. Per layer: the best of --rounds timings of each stage of one forward pass (conv1..pool2 as one chunk
   of --batch images, as the net runs them at batch ≤ 8), for the default net (Winograd conv2 and conv3)
   and for CPUInferenceNet(net, winograd=False), interleaved. GFLOP/s are the direct convolutions' counts
   over the time taken, so the Winograd layers can exceed the matmul peak.
2. Whole net: img/s of both nets at batch 8 and 32 over --rounds interleaved windows of --window seconds;
   best and median of each, and their ratio.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from model import CPUInferenceNet, GroupedAlexNet, keep_freed_memory  # noqa: E402
from model.network import pad_image  # noqa: E402
from model_throughput import layer_flops  # noqa: E402  (this directory is on the path when run as a script)


def best_ms(step, rounds: int) -> float:
    step()
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        step()
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def stages(net: CPUInferenceNet, images: torch.Tensor) -> dict:
    """Each stage of net's forward pass as a closure on the previous stage's real output."""
    with torch.inference_mode():
        padded = pad_image(images, net.config, torch.channels_last)
        c1 = net.conv1(padded)
        l1 = net.lrn(c1)
        p1 = F.max_pool2d(l1, 3, 2)
        c2 = net.conv2(p1)
        l2 = net.lrn(c2)
        p2 = F.max_pool2d(l2, 3, 2)
        c3 = net.conv3(p2)
        c4 = net.conv4(c3)
        c5 = net.conv5(c4)
        flat = F.max_pool2d(c5, 3, 2).contiguous().flatten(1)
        h6 = F.relu(net._fc("fc6", flat))
        h7 = F.relu(net._fc("fc7", h6))
    return {
        "conv1": lambda: net.conv1(padded), "lrn1": lambda: net.lrn(c1), "pool1": lambda: F.max_pool2d(l1, 3, 2),
        "conv2": lambda: net.conv2(p1), "lrn2": lambda: net.lrn(c2), "pool2": lambda: F.max_pool2d(l2, 3, 2),
        "conv3": lambda: net.conv3(p2), "conv4": lambda: net.conv4(c3), "conv5": lambda: net.conv5(c4),
        "pool5": lambda: F.max_pool2d(c5, 3, 2), "fc6": lambda: net._fc("fc6", flat),
        "fc7": lambda: net._fc("fc7", h6), "fc8": lambda: net._fc("fc8", h7),
        "whole": lambda: net(images),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    parser.add_argument("--batch", type=int, default=8, help="batch of the per-layer timings")
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--window", type=float, default=0.6, help="seconds per whole-net window")
    args = parser.parse_args()

    keep_freed_memory()  # the allocator the service runs CPUInferenceNet with (model/malloc.py)
    torch.manual_seed(0)
    source = GroupedAlexNet().eval()
    nets = {"winograd": CPUInferenceNet(source), "direct": CPUInferenceNet(source, winograd=False)}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")

    images = torch.randn(args.batch, 3, 224, 224)
    steps = {name: stages(net, images) for name, net in nets.items()}
    times = {name: {} for name in nets}
    with torch.inference_mode():
        for _ in range(2):  # interleaved, each keeps its best
            for layer in steps["direct"]:
                for name in nets:
                    t = best_ms(steps[name][layer], max(1, args.rounds // 2))
                    times[name][layer] = min(times[name].get(layer, float("inf")), t)
    flops_of = layer_flops(source.config)
    print(f"\nper layer, batch {args.batch}, best of {args.rounds} (ms; GFLOP/s at the direct count)")
    print(f"{'layer':>6} {'direct':>8} {'GFLOP/s':>8} {'winograd':>9} {'GFLOP/s':>8}")
    for layer in steps["direct"]:
        d, w = times["direct"][layer], times["winograd"][layer]
        flops = flops_of.get(layer)
        rate = (lambda ms: f"{flops * args.batch / ms / 1e6:>8.0f}") if flops else (lambda ms: f"{'':>8}")
        print(f"{layer:>6} {d:>8.2f} {rate(d)} {w:>9.2f} {rate(w)}")

    inputs = {batch: torch.randn(batch, 3, 224, 224) for batch in (8, 32)}
    rates = {(name, batch): [] for name in nets for batch in inputs}
    with torch.inference_mode():
        for _ in range(args.rounds):
            for name, batch in rates:
                n, start = 0, time.perf_counter()
                while time.perf_counter() - start < args.window or n == 0:
                    nets[name](inputs[batch])
                    n += 1
                rates[name, batch].append(n * batch / (time.perf_counter() - start))
    print(f"\nwhole net, img/s over {args.rounds} interleaved windows of {args.window} s")
    print(f"{'batch':>5} {'direct best':>12} {'median':>7} {'winograd best':>14} {'median':>7}"
          f" {'ratio best':>11} {'median':>7}")
    for batch in inputs:
        d, w = rates["direct", batch], rates["winograd", batch]
        print(f"{batch:>5} {max(d):>12.1f} {statistics.median(d):>7.1f} {max(w):>14.1f} {statistics.median(w):>7.1f}"
              f" {max(w) / max(d):>10.2f}× {statistics.median(w) / statistics.median(d):>6.2f}×")


if __name__ == "__main__":
    main()
