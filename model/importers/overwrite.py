"""May an import replace what is at ``--out``? Only an earlier import, unless ``--force``."""

from __future__ import annotations

from pathlib import Path

from ..checkpoint import CheckpointError, load_checkpoint
from .common import OverwriteRefused
from .formats import describe_content

TRAINING_SOURCE = "python -m training train"  # a training checkpoint's provenance["source"]
IMPORTED_BY = "model.import_weights"  # an imported checkpoint's provenance["imported_by"]


def check_out(out: str | Path, force: bool = False) -> str | None:
    """May an import write ``out``? Nothing there, an earlier import, or ``force``: yes (returns what is
    replaced, None for nothing). A checkpoint from training, of unknown origin, or a file that is not a
    readable checkpoint: OverwriteRefused, naming the file, what it holds, and --force."""
    out = Path(out)
    if not out.exists() and not out.is_symlink():
        return None
    try:
        checkpoint = load_checkpoint(out)
    except CheckpointError as e:
        what = f"a file that is not a readable checkpoint ({e.problem})"
        try:
            with open(out, "rb") as f:
                looks = describe_content(f.read(512))
        except OSError:
            looks = None
        if looks:
            what += f"; it looks like {looks}"
    else:
        p = checkpoint.provenance
        if p.get("imported_by") == IMPORTED_BY:
            return f"an earlier import (of {p.get('source_name') or p.get('source')})"
        what = describe_checkpoint(p)
    if force:
        return what
    raise OverwriteRefused(
        f"{out} holds {what}; importing would replace it. Pass --force to overwrite it, or choose another --out "
        "(an earlier import is replaced without --force)"
    )


def describe_checkpoint(provenance: dict) -> str:
    """e.g. "a checkpoint trained by `python -m training train`, epoch 12, val top-1 error 41.2%"."""
    source = provenance.get("source")
    parts = [f"a checkpoint trained by `{source}`" if source == TRAINING_SOURCE else
             f"a checkpoint of unknown origin (source: {source})" if source else "a checkpoint of unknown origin"]
    if provenance.get("dataset"):
        parts[0] += f" on {provenance['dataset']}"
    if isinstance(provenance.get("epoch"), (int, float)):
        parts.append(f"epoch {provenance['epoch']:g}")
    if isinstance(provenance.get("val_top1_error"), (int, float)):
        parts.append(f"val top-1 error {provenance['val_top1_error']:.1%}")
    return ", ".join(parts)
