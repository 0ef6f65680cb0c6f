"""``python -m training train DATA --out DIR``: the paper's recipe (§5), resumable, on 1–2 devices per
process and any number of processes (torchrun + DistributedDataParallel).

One training step, in three files: this one (the loop, forward, backward, update), data.py (which images
each step reads: ``epoch_order``, ``ShardedBatches``) and augment.py (the draws, and applying them on
the towers' devices). loader.py reads the batches ahead; update_rule.py is the paper's SGD.
Every random draw is a function of (seed, epoch, step[, rank, device]), so a resume continues exactly.
The set-up is in run.py, what follows an epoch in epoch_end.py; docs/training-formats.md lists DIR's files.
"""

from __future__ import annotations

import contextlib
import math
import time

import torch
import torch.distributed as torch_distributed
import torch.nn.functional as F

from model.progress import Progress

from .data import epoch_order
from .devices import seed_dropout
from .epoch_end import end_of_epoch, final_evaluation, state_info
from .errors import TrainingError
from .run import Hooks, Options, Run, start_run
from .state import save_state


class RunDiverged(TrainingError):
    """A non-finite loss on some rank; every rank raises it at the same step, rank 0 says so."""

    rank_zero_only = True


def train(given: dict, options: Options, hooks: Hooks | None = None) -> dict:
    """Train (or continue) a run; return the final summary. ``given``: hyper-parameters from the command line."""
    with contextlib.ExitStack() as cleanup:  # the lock, the loader, the process group: released on any exit
        run = start_run(given, options, hooks or Hooks(), cleanup)
        for epoch in range(run.start_epoch, run.hp.epochs):
            totals, seconds = train_one_epoch(run, epoch)
            end_of_epoch(run, epoch, totals, seconds)
        return final_evaluation(run)


def train_one_epoch(run: Run, epoch: int) -> tuple[list[float], float]:
    """One pass over the training split; returns the sums over all ranks (loss, wrong, images, non-finite
    steps) and the seconds it took."""
    hp, batches, options = run.hp, run.batches, run.options
    run.train_model.train()
    for group in run.optimizer.param_groups:
        group["lr"] = run.schedule.lr
    order = epoch_order(batches.dataset_size, hp.seed, epoch)
    first_step = run.start_step if epoch == run.start_epoch else 0
    totals, seconds_before = _epoch_totals(run, first_step)  # kept on the device: no wait per step
    started = time.perf_counter()
    bar = Progress(
        batches.steps_per_epoch * hp.batch_size,
        f"epoch {epoch + 1}/{hp.epochs}",
        enabled=run.is_writer and options.show_progress,
    )
    bar.done = first_step * hp.batch_size
    steps = ((step, batches.local_indices(order, step)) for step in range(first_step, batches.steps_per_epoch))

    for batch in run.loader.batches(steps):
        step = batch.key
        params = run.feed.augmentation.draw(hp.batch_size, hp.seed, epoch, step)[batches.local_slice()]
        x, labels = run.feed(batch, params)

        loss, logits = train_step(run, x, labels, epoch, step)
        with torch.no_grad():
            totals[0] += loss.detach().double() * len(labels)
            totals[1] += (logits.argmax(1) != labels).sum()
            totals[2] += len(labels)
            totals[3] += ~torch.isfinite(loss.detach())
        bar.update(hp.batch_size)
        run.steps_run += 1
        if run.hooks.after_step is not None:
            run.hooks.after_step(run.steps_run)
        done = step + 1
        if done % options.log_every == 0:  # the only waits for the devices, every log_every steps
            summed = _checked_sums(run, totals, epoch, step)
            bar.figures.update(loss=f"{summed[0] / summed[2]:.4f}", lr=f"{run.schedule.lr:g}")
        if options.save_every and done % options.save_every == 0 and done < batches.steps_per_epoch:
            summed = _checked_sums(run, totals, epoch, step)
            if run.is_writer:
                seconds = seconds_before + time.perf_counter() - started
                save_state(
                    run.state_path,
                    run.model,
                    run.optimizer,
                    run.scaler,
                    state_info(run, epoch, done, {"totals": summed, "seconds": seconds}),
                )
    run.feed.close()
    bar.close()
    summed = _checked_sums(run, totals, epoch, batches.steps_per_epoch)
    return summed, seconds_before + time.perf_counter() - started


def train_step(run: Run, x, labels: torch.Tensor, epoch: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward, backward, SGD update; returns the loss and the logits (nothing here waits for a device,
    except fp16's gradient scaler, which reads whether the gradients overflowed)."""
    seed_dropout(run.hp.seed, run.dist.rank, epoch, step, run.devices)
    with run.autocast():
        logits = run.train_model(x)
    loss = F.cross_entropy(logits.float(), labels)
    if run.hooks.loss is not None:
        loss = run.hooks.loss(loss, epoch, step)
    run.optimizer.zero_grad(set_to_none=True)
    if run.scaler is not None:
        run.scaler.scale(loss).backward()
        run.scaler.step(run.optimizer)
        run.scaler.update()
    else:
        loss.backward()
        run.optimizer.step()
    return loss, logits


def _epoch_totals(run: Run, first_step: int) -> tuple[torch.Tensor, float]:
    """This rank's running sums (loss, wrong, images, non-finite steps) on its device, and the seconds
    already spent, for an epoch that starts at ``first_step``."""
    totals = torch.zeros(4, dtype=torch.float64, device=run.devices[0])
    if first_step and run.running:
        if run.is_writer:  # the saved sums are over all ranks; counted once, on rank 0
            totals += torch.tensor(run.running["totals"], dtype=torch.float64, device=run.devices[0])
        return totals, run.running["seconds"]
    return totals, 0.0


def _checked_sums(run: Run, totals: torch.Tensor, epoch: int, step: int) -> list[float]:
    """The sums over all ranks (one all-reduce); stops every rank alike when any rank saw a non-finite
    loss, so that none is left waiting in a collective for one that stopped."""
    summed = totals.clone()
    if run.dist.world > 1:
        torch_distributed.all_reduce(summed)
    values = summed.tolist()
    if values[3] > 0 or not math.isfinite(values[0]):
        raise RunDiverged(
            f"training diverged: the loss was not finite in {values[3]:.0f} step(s) of epoch {epoch + 1} up to step "
            f"{step}; the files in --out still hold the last good epoch. Start again with a lower --lr."
        )
    return values
