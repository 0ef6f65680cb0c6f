"""The hyperparameters: what a training run is, each declared once.

A declaration holds the default (the paper's value), the help text, the bounds and whether a resumed run
may change it. The ``train`` flags, their checks and the resume rule all come from these declarations.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass

from .augment import ALPHA_STD
from .errors import TrainingError
from .update_rule import UPDATE_RULES

INITS = ("width-scaled", "paper", "caffe")  # --init; see training/initialise.py
AMP_MODES = ("off", "bf16", "fp16")


def knob(default, help="", *, kept=True, flag=True, choices=None, at_least=None, positive=False, **more):
    """One hyperparameter's declaration (a dataclass field).

    ``kept``: a resumed run keeps it, and refuses a flag that changes it.
    ``flag``: it has a ``train`` flag. The bounds are checked on the resolved value.
    ``more``: ``below`` (an upper bound, excluded) and ``note`` (said after the bounds in the error message).
    """
    rules = dict(help=help, kept=kept, flag=flag, choices=choices, at_least=at_least, positive=positive)
    return dataclasses.field(default=default, metadata={**rules, "below": None, "note": "", **more})


@dataclass
class Hyperparameters:
    """The run's recipe: the paper's values are the defaults."""

    epochs: int = knob(90, kept=False, at_least=1)
    batch_size: int = knob(128, "global batch size", at_least=1)  # split over the processes of a run
    lr: float = knob(0.01, "initial learning rate", positive=True)
    momentum: float = knob(0.9, at_least=0, below=1)
    weight_decay: float = knob(5e-4, at_least=0)
    patience: int = knob(5, "epochs without a better val top-1 error before lr ÷ 10", kept=False, at_least=1)
    min_improvement: float = knob(
        0.002,
        "a val top-1 error lower by at least this much (absolute) counts as an improvement "
        "(default 0.002: 0.2 percentage points)",
        kept=False,
        at_least=0,
        below=1,
        note="an absolute top-1 error",
    )
    # The flag keeps its name: checkpoints and resume states record it as plateau_start.
    plateau_start: int = knob(
        10,
        "epochs 1..N never count towards --patience, so lr cannot drop before learning starts",
        kept=False,
        at_least=0,
    )
    max_lr_drops: int = knob(3, kept=False, at_least=0)  # the paper divided the lr 3 times
    width: float = knob(1.0, "scale every layer's width (default 1: the paper's net)", positive=True)
    # The paper decays w; cuda-convnet and Caffe's bvlc_alexnet leave the biases alone.
    decay_biases: bool = knob(
        False, "weight decay on biases too (default: weights only, as cuda-convnet and Caffe's bvlc_alexnet)"
    )
    dropout: float = knob(0.5, at_least=0, below=1)
    conv1_padding: str = knob(
        "overhang",
        "overhang (cuda-convnet, 224 crops; default), symmetric (224), none (227 crops)",
        choices=("overhang", "symmetric", "none"),
    )
    lighting_std: float = knob(ALPHA_STD, "σ of the PCA lighting α")
    init: str = knob(
        "width-scaled",
        "paper: N(0, 0.01²) weights, biases 1/0 as in §5; width-scaled (default): the same, with the "
        "std of conv2…fc8 ×1/√width so that a narrow net starts like the full one (identical at width 1); "
        "caffe: width-scaled, but the biases the paper sets to 1 start at 0.1 — a deviation from the paper, "
        "as Caffe's bvlc_alexnet, where 1 'gave flat loss'",
        choices=INITS,
    )
    update_rule: str = knob(
        "paper",
        "paper (default): v ← momentum·v − decay·lr·w − lr·∇L, w ← w + v, so after an lr drop the step "
        "shrinks over ~20-40 steps; pytorch: torch.optim.SGD, lr outside the momentum, the step shrinks at once",
        choices=UPDATE_RULES,
    )
    seed: int = knob(0)
    amp: str = knob("off", "mixed precision (default off, as the paper)", choices=AMP_MODES)  # fp16 adds scaling
    channels_last: bool = knob(False, "channels-last memory format", kept=False)
    lr_drop_factor: float = knob(0.1, flag=False)


FIELDS = dataclasses.fields(Hyperparameters)


def flag_of(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per declared hyperparameter.

    A flag not given stays out of the parsed namespace (SUPPRESS), so that a resume keeps the run's value.
    """
    for f in FIELDS:
        meta = f.metadata
        if not meta["flag"]:
            continue
        if f.type == "bool":
            parser.add_argument(flag_of(f.name), action="store_true", default=argparse.SUPPRESS, help=meta["help"])
            continue
        help_text = meta["help"] if "default" in meta["help"] else f"{meta['help']} (default {f.default})".lstrip()
        kind = {"int": int, "float": float, "str": str}[f.type]
        parser.add_argument(
            flag_of(f.name), type=kind, choices=meta["choices"], default=argparse.SUPPRESS, help=help_text
        )


def given_flags(namespace: argparse.Namespace) -> dict:
    """The hyperparameters given on the command line."""
    return {f.name: getattr(namespace, f.name) for f in FIELDS if hasattr(namespace, f.name)}


def resolve(given: dict, saved: dict | None) -> Hyperparameters:
    """Defaults ← the saved run's values (when resuming) ← flags given on this command line."""
    names = {f.name for f in FIELDS}
    values = dict(saved or {})
    if saved is not None:
        kept = [f.name for f in FIELDS if f.metadata["kept"]]
        changed = [k for k in kept if k in given and given[k] != saved.get(k)]
        if changed:
            detail = ", ".join(f"{flag_of(k)} {given[k]} (run: {saved.get(k)})" for k in changed)
            raise TrainingError(f"--resume: cannot change {detail}; start a new run in another --out directory")
    values.update({k: v for k, v in given.items() if k in names})
    return Hyperparameters(**{k: v for k, v in values.items() if k in names})


def check(hp: Hyperparameters) -> None:
    """Every value within its declared bounds, or one error naming each that is not."""
    problems = [problem for f in FIELDS if (problem := _out_of_bounds(f, getattr(hp, f.name)))]
    if problems:
        raise TrainingError("; ".join(problems))


def _out_of_bounds(f: dataclasses.Field, value) -> str | None:
    meta, flag = f.metadata, flag_of(f.name)
    low, high = meta["at_least"], meta["below"]
    if meta["choices"] is not None:
        return None if value in meta["choices"] else f"{flag} must be one of {', '.join(meta['choices'])}"
    if meta["positive"]:
        return None if value > 0 else f"{flag} must be positive"
    note = f" ({meta['note']})" if meta["note"] else ""
    if low is not None and high is not None:
        return None if low <= value < high else f"{flag} must be in [{low}, {high}){note}"
    if low is not None:
        return None if value >= low else f"{flag} must be at least {low}{note}"
    return None


# Changing these in the middle of a run would make it a different run; --resume refuses.
FIXED_ON_RESUME = tuple(f.name for f in FIELDS if f.metadata["kept"])


def markdown_table() -> str:
    """The declarations as a Markdown table, for docs/training-formats.md (a test keeps the two equal)."""
    rows = ["| flag | default | bounds | on --resume |", "|---|---|---|---|"]
    for f in FIELDS:
        meta = f.metadata
        flag = f"`{flag_of(f.name)}`" if meta["flag"] else f"({f.name}, no flag)"
        rows.append(f"| {flag} | {f.default} | {_bounds(meta)} | {'kept' if meta['kept'] else 'may change'} |")
    return "\n".join(rows) + "\n"


def _bounds(meta) -> str:
    if meta["choices"] is not None:
        return ", ".join(meta["choices"])
    if meta["positive"]:
        return "> 0"
    low, high = meta["at_least"], meta["below"]
    if low is not None and high is not None:
        return f"[{low}, {high})"
    return f"≥ {low}" if low is not None else ""
