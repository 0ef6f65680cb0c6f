"""``python tests/support/train_with_hooks.py [--kill-after-steps N] [--nan-on-rank R --nan-at-step S] -- TRAIN ARGS``

``python -m training train`` with test instrumentation injected through ``training.train.Hooks`` (so the
training loop itself carries no test-only switches): SIGKILL this process after N steps (a crash), or
replace rank R's loss at step S of every epoch with NaN (one diverging replica of a DDP run).
Works under torchrun too (``torchrun … tests/support/train_with_hooks.py …``).
"""

import argparse
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from training.__main__ import main  # noqa: E402
from training.train import Hooks  # noqa: E402


def hooks_from(args) -> Hooks:
    hooks = Hooks()
    if args.kill_after_steps:
        hooks.after_step = lambda steps: steps == args.kill_after_steps and os.kill(os.getpid(), signal.SIGKILL)
    if args.nan_on_rank is not None:
        rank = int(os.environ.get("RANK", "0"))

        def loss(value, epoch, step):
            return value * float("nan") if rank == args.nan_on_rank and step == args.nan_at_step else value

        hooks.loss = loss
    return hooks


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--kill-after-steps", type=int, default=0)
    parser.add_argument("--nan-on-rank", type=int, default=None)
    parser.add_argument("--nan-at-step", type=int, default=0)
    ours, train_args = sys.argv[1:], []
    if "--" in ours:
        split = ours.index("--")
        ours, train_args = ours[:split], ours[split + 1 :]
    sys.exit(main(["train", *train_args], hooks=hooks_from(parser.parse_args(ours))))
