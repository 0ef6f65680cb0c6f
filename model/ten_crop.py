"""The paper's test-time rule: the net over each image's ten patches, the softmax averaged over them.

The ten patches are the four corners and the centre, and their mirror images (preprocessing.py cuts them).
The net runs over the patches as rows of a batch, at most ``max_rows`` at a time, so that memory stays
bounded. The service, training's evaluation and predict all use these pieces.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .preprocessing import Crops

TEN_CROPS = 10  # the paper's 4 corners + centre, and their mirror images


def rows_per_image(crops: Crops) -> int:
    """How many network inputs one image becomes."""
    return TEN_CROPS if crops == "ten" else 1


def flatten_crops(x: torch.Tensor) -> torch.Tensor:
    """Ten patches [n, 10, 3, h, w] → rows [n·10, 3, h, w]; a centre crop [n, 3, h, w] stays as it is."""
    return x.flatten(0, 1) if x.dim() == 5 else x


def run_in_chunks(forward: Callable[[torch.Tensor], torch.Tensor], rows: torch.Tensor, max_rows: int) -> torch.Tensor:
    """``forward`` over ``rows``, at most ``max_rows`` at a time, as one float32 tensor."""
    return torch.cat([forward(part).float() for part in rows.split(max_rows)])


def mean_over_crops(rows: torch.Tensor, crops: Crops) -> torch.Tensor:
    """Each image's rows averaged: [n·10, d] → [n, d] for ten patches; a centre crop's rows stay."""
    if crops != "ten":
        return rows
    return rows.view(-1, TEN_CROPS, *rows.shape[1:]).mean(dim=1)
