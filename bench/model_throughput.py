"""Forward throughput of the network on this machine, against nn.LocalResponseNorm and the fp32 roofline.

    python bench/model_throughput.py [--batches 1 8 32] [--seconds 3] [--threads N]

Prints img/s (the best of --repeats interleaved timed windows, which shrugs off other processes' bursts) for
    ours-cpu       CPUInferenceNet: the net laid out for oneDNN (what the CPU service runs)
    cpu-torch-lrn  CPUInferenceNet with nn.LocalResponseNorm(5, alpha=5e-4, beta=0.75, k=2) in place of our LRN
    ours-towers    AlexNet: the paper's two towers, both on the CPU (what training runs)
    ours-grouped   GroupedAlexNet: the same function with conv2/4/5 as groups=2 convolutions
    towers-torch-lrn  AlexNet with nn.LocalResponseNorm in place of our LRN
    roofline       (GFLOP/s of a large fp32 torch.mm, measured in the same run) / (GFLOP per image)
and the ratios the targets are stated in: ours-cpu against the roofline and against cpu-torch-lrn (the same
net but for the LRN).

The roofline counts the direct convolutions' multiply-adds. CPUInferenceNet computes conv2 and conv3 by
Winograd's minimal filtering, which needs fewer; the script prints how many it does, so that its share of
the roofline can be read for what it is: throughput against a direct-convolution yardstick.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from model import AlexNet, AlexNetConfig, CPUInferenceNet, GroupedAlexNet, keep_freed_memory  # noqa: E402
from model.winograd import WinogradConvReLU  # noqa: E402


OUTPUT_MAPS = {"conv1": 55, "conv2": 27, "conv3": 13, "conv4": 13, "conv5": 13}  # side of each conv's output


def layer_flops(config: AlexNetConfig = AlexNetConfig()) -> dict[str, float]:
    """Multiply-adds × 2 of each layer for one 224×224 image, counted from the layer shapes."""
    flops = {}
    for name, shape in config.grouped_shapes().items():
        if not name.endswith(".weight"):
            continue
        layer = name.split(".")[0]
        per_output = 1
        for d in shape[1:]:
            per_output *= d
        flops[layer] = 2.0 * shape[0] * per_output * OUTPUT_MAPS.get(layer, 1) ** 2
    return flops


def forward_flops(config: AlexNetConfig = AlexNetConfig()) -> float:
    """Multiply-adds × 2 for one image (biases and pooling ignored)."""
    return sum(layer_flops(config).values())


def cpu_net_flops(net: CPUInferenceNet) -> float:
    """forward_flops, with the Winograd layers' own multiply-adds (their batched products) in place of the
    direct convolutions' (the transforms, a few % of those, are not counted)."""
    flops = layer_flops(net.config)
    for name, layer in net.named_children():
        if isinstance(layer, WinogradConvReLU):
            tiles = (-(-OUTPUT_MAPS[name] // layer.tile)) ** 2
            flops[name] = 2.0 * tiles * layer.u.numel()
    return sum(flops.values())


def timed_window(step, seconds: float) -> float:
    """Runs of ``step`` per second over a window of about ``seconds``."""
    n, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds or n == 0:
        step()
        n += 1
    return n / elapsed


def torch_lrn(config: AlexNetConfig) -> nn.LocalResponseNorm:
    """PyTorch's LRN with the config's constants (PyTorch divides alpha by the window size)."""
    c = config.lrn
    return nn.LocalResponseNorm(c.size, alpha=c.coefficient * c.size, beta=c.beta, k=c.k)


def with_torch_lrn(net: AlexNet) -> AlexNet:
    for tower in net.towers:  # each tower normalises over its own maps, as ours does
        tower.lrn = torch_lrn(net.config)
    return net


class TorchLRNPerTower(nn.Module):
    """nn.LocalResponseNorm over each tower's maps, taking and giving channels-last like CPUInferenceNet's."""

    def __init__(self, net: CPUInferenceNet):
        super().__init__()
        self.lrn = torch_lrn(net.config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, channels, h, w = x.shape
        towers = x.contiguous().view(n * 2, channels // 2, h, w)
        return self.lrn(towers).view(n, channels, h, w).contiguous(memory_format=torch.channels_last)


def with_torch_lrn_cpu(net: CPUInferenceNet) -> CPUInferenceNet:
    net.lrn = TorchLRNPerTower(net)
    return net


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--seconds", type=float, default=4.0, help="timed seconds per measurement")
    parser.add_argument("--repeats", type=int, default=8, help="timed windows per measurement; the best is kept")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    keep_freed_memory()  # the allocator the service runs CPUInferenceNet with, for every net here (model/malloc.py)

    torch.manual_seed(0)
    ours = GroupedAlexNet().eval()
    towers = ours.to_towers().eval()
    baseline = with_torch_lrn(ours.to_towers().eval())
    gflop = forward_flops() / 1e9

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__},"
          f" {torch.get_num_threads()} threads")
    print(f"forward cost: {gflop:.3f} GFLOP per 224×224 image")
    # Every measurement gets one window per round, rounds interleaved, and keeps its best window: a burst
    # of another process's work then hurts one window of each, not all of one measurement.
    a, b = torch.randn(4096, 4096), torch.randn(4096, 4096)
    inputs = {batch: torch.randn(batch, 3, 224, 224) for batch in args.batches}
    cpu = CPUInferenceNet(ours)
    cpu_baseline = with_torch_lrn_cpu(CPUInferenceNet(ours))
    nets = {"cpu": cpu, "cpu-torch-lrn": cpu_baseline, "towers": towers, "grouped": ours, "torch-lrn": baseline}
    best = {("mm", 0): 0.0} | {(name, batch): 0.0 for name in nets for batch in args.batches}
    window = args.seconds / args.repeats
    with torch.inference_mode():
        for net in nets.values():
            for x in inputs.values():
                net(x)  # warm-up: oneDNN picks its kernels on the first call
        for _ in range(args.repeats):
            best["mm", 0] = max(best["mm", 0], timed_window(lambda: torch.mm(a, b), window) * 2 * 4096**3 / 1e9)
            for (name, batch) in best:
                if name != "mm":
                    rate = timed_window(lambda: nets[name](inputs[batch]), window) * batch
                    best[name, batch] = max(best[name, batch], rate)

    peak = best["mm", 0]
    roofline = peak / gflop
    print(f"fp32 torch.mm 4096²: {peak:.1f} GFLOP/s → roofline {roofline:.1f} img/s")
    print(f"ours-cpu computes conv2 and conv3 by Winograd: {cpu_net_flops(cpu) / 1e9:.3f} GFLOP of multiply-adds"
          f" per image where the roofline counts {gflop:.3f}")
    print(f"{'batch':>5} {'ours-cpu':>9} {'cpu-torch-lrn':>14} {'ours-towers':>12} {'ours-grouped':>13}"
          f" {'towers-torch-lrn':>17} {'roofline':>9} {'cpu/roof':>9} {'cpu/cpu-torch-lrn':>18}"
          f" {'towers/towers-torch-lrn':>24}")
    for batch in args.batches:
        c, cl, t, g, l = (best[name, batch] for name in ("cpu", "cpu-torch-lrn", "towers", "grouped", "torch-lrn"))
        print(f"{batch:>5} {c:>9.1f} {cl:>14.1f} {t:>12.1f} {g:>13.1f} {l:>17.1f} {roofline:>9.1f} {c / roofline:>8.0%}"
              f" {c / cl:>17.2f}× {t / l:>23.2f}×")
    ours_best = [k for k in best if k[0] in ("cpu", "towers", "grouped")]
    name, batch = max(ours_best, key=best.get)
    rate = best[name, batch]
    print(f"best: {name} at batch {batch}, {rate:.1f} img/s = {rate / roofline:.0%} of the roofline")


if __name__ == "__main__":
    main()
