"""Processes and devices: where the towers go, the process group, the CUDA settings, dropout's seeds.

One process drives one two-tower replica; torchrun starts several (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``) and DistributedDataParallel averages their gradients.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as torch_distributed

from model import parse_devices

from .data import derive_seed
from .errors import TrainingError


@dataclass(frozen=True)
class Distributed:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1

    @classmethod
    def from_environment(cls) -> Distributed:
        """torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE; a plain run is rank 0 of 1."""
        env = os.environ
        return cls(
            rank=int(env.get("RANK", 0)),
            world=int(env.get("WORLD_SIZE", 1)),
            local_rank=int(env.get("LOCAL_RANK", 0)),
            local_world=int(env.get("LOCAL_WORLD_SIZE", 1)),
        )


def resolve_devices(spec: str | None, dist: Distributed) -> tuple[torch.device, torch.device]:
    """Where the two towers go.

    Default: two GPUs per process when there are enough, one GPU for both towers when there is one per
    process, the CPU otherwise ("auto" says the same). ``spec`` ("cuda:0,cuda:1", "cuda:0", "cpu"; the rule
    is model.parse_devices) names the devices of local rank 0; under torchrun local rank r shifts every
    GPU index by r × (GPUs in the spec), so that
    ``--devices cuda:0,cuda:1`` with 2 processes gives cuda:0+1 and cuda:2+3 rather than the same two
    GPUs twice (which NCCL refuses: "duplicate GPU").
    """
    gpus = torch.cuda.device_count()
    try:
        parts = parse_devices(spec) if spec is not None else ("auto",)
    except ValueError as e:
        raise TrainingError(f"--devices: {e}") from None
    if parts == ("auto",):
        r = dist.local_rank
        if gpus >= 2 * dist.local_world:
            return torch.device(f"cuda:{2 * r}"), torch.device(f"cuda:{2 * r + 1}")
        if gpus >= dist.local_world:
            return (torch.device(f"cuda:{r}"),) * 2
        return torch.device("cpu"), torch.device("cpu")
    devices = [torch.device(p) for p in parts]
    if len({d.type for d in devices}) > 1:
        raise TrainingError(f"--devices {spec!r}: put both towers on GPUs or both on the CPU")
    if devices[0].type == "cuda":
        indices = [d.index or 0 for d in devices]
        shift = dist.local_rank * len(set(indices))
        devices = [torch.device("cuda", i + shift) for i in indices]
        beyond = [str(d) for d in devices if d.index >= gpus]
        if beyond:
            where = f" (local rank {dist.local_rank} of {dist.local_world} uses {', '.join(map(str, devices))})"
            raise TrainingError(
                f"--devices {spec!r}: this machine has {gpus} GPU(s)"
                + (where if dist.local_world > 1 else "")
                + (
                    "; under torchrun --devices names local rank 0's GPUs and each further rank takes the next ones"
                    if dist.local_world > 1
                    else ""
                )
            )
    return (devices[0], devices[-1])


def select_device(devices) -> None:
    """Make tower 0's GPU this process's current device, first thing: whatever touches CUDA before (the
    loader's pinned buffers, cuDNN's handles, default streams) would otherwise open a context on GPU 0,
    in every process of a multi-process run and in a single-process run on another GPU alike."""
    if devices[0].type == "cuda":
        torch.cuda.set_device(devices[0])


def init_distributed(dist: Distributed, devices, timeout_seconds: float) -> None:
    """Join the process group (NCCL on GPUs, gloo on CPUs). ``timeout_seconds`` bounds how long a
    collective waits for the slowest rank: it must outlast rank 0 writing a checkpoint (~1 GB per epoch)."""
    if dist.world == 1:
        return
    backend = "nccl" if devices[0].type == "cuda" else "gloo"
    torch_distributed.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_seconds))


@contextlib.contextmanager
def backend_settings(*, tf32: bool, cudnn_benchmark: bool, deterministic: bool):
    """The numeric settings of a run, restored afterwards (they are process-wide).

    TF32 (10-bit mantissa matmuls and convolutions on Ampere and later) and cuDNN's autotuner are on by
    default: several times faster, and the paper's fp32 needs no more than that. ``deterministic`` picks
    deterministic kernels (cuDNN's backward otherwise sums in a varying order), so that a resumed GPU run
    continues exactly — on the CPU every run is deterministic anyway.
    """
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    before = (
        matmul.allow_tf32,
        cudnn.allow_tf32,
        cudnn.benchmark,
        cudnn.deterministic,
        torch.are_deterministic_algorithms_enabled(),
        os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
    )
    matmul.allow_tf32 = cudnn.allow_tf32 = tf32
    cudnn.benchmark = cudnn_benchmark and not deterministic
    cudnn.deterministic = deterministic
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS's condition for determinism
        torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        matmul.allow_tf32, cudnn.allow_tf32, cudnn.benchmark, cudnn.deterministic = before[:4]
        torch.use_deterministic_algorithms(before[4])
        if before[5] is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)


def autocast_for(amp: str, device: torch.device):
    if amp == "off":
        return contextlib.nullcontext
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]
    return lambda: torch.autocast(device.type, dtype=dtype)


def dropout_seeds(seed: int, rank: int, epoch: int, step: int, devices) -> dict[str, int]:
    """The seed of each generator dropout draws from in one step: the CPU's, and each GPU's by index.

    ``torch.manual_seed`` alone gives every GPU the same seed; each tower's first dropout draw has the
    same shape on its own GPU, so tower 0 and tower 1 would drop the same units, step after step.
    """
    seeds = {"cpu": derive_seed(seed, "dropout", rank, epoch, step)}
    for device in devices:
        if device.type == "cuda":
            seeds[str(device)] = derive_seed(seed, "dropout", rank, epoch, step, device.index)
    return seeds


def seed_dropout(seed: int, rank: int, epoch: int, step: int, devices) -> None:
    for name, value in dropout_seeds(seed, rank, epoch, step, devices).items():
        if name == "cpu":
            torch.manual_seed(value)  # the CPU's generator (and, for now, every GPU's: overridden below)
        else:
            torch.cuda.default_generators[torch.device(name).index].manual_seed(value)


def check_compiler(device: torch.device) -> None:
    """``--compile`` needs a working torch.compile (Triton on GPUs, a C++ compiler on CPUs): try it on a
    small function once, so that a missing compiler is one clear message rather than a traceback."""
    try:
        import torch._dynamo

        probe = torch.compile(lambda x: (x * x).sum(1) + 1, dynamic=False)
        probe(torch.ones(4, 8, device=device)).cpu()
    except Exception as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TrainingError(
            f"--compile: torch.compile does not work on {device} here ({reason[:300]}); run without --compile"
        ) from None
