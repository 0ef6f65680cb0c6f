"""The resume state: one safetensors file, tensors (weights, momentum) plus a JSON header. Nothing is pickled.

The header holds everything else: the position, schedule, metrics, hyperparameters and gradient scaler.
Version 2 has two parameter groups (weights, then undecayed biases): a version-1 state cannot be continued.
Version 3 names the update rule. A version-2 state was trained with torch.optim.SGD and continues with it.
docs/training-formats.md says why it is not converted to the paper's rule.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from model.files import read_safetensors, write_safetensors

from .errors import TrainingError
from .update_rule import STATE_KEYS

STATE_FORMAT = "alexnet-train-state"
STATE_VERSION = 3
READABLE_VERSIONS = ("2", "3")


def save_state(path: Path, model, optimizer, scaler, info: dict) -> None:
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    opt = optimizer.state_dict()
    scalars = {}
    for index, entries in opt["state"].items():
        for key, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"optimizer.{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{index}.{key}"] = value
    info = {**info, "optimizer": {"param_groups": opt["param_groups"], "scalars": scalars}}
    if scaler is not None:
        info["grad_scaler"] = scaler.state_dict()
    meta = {"format": STATE_FORMAT, "format_version": str(STATE_VERSION), "state": json.dumps(info)}
    write_safetensors(path, tensors, meta)


def read_state(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    try:
        meta, tensors = read_safetensors(path)
    except Exception as e:
        raise TrainingError(f"{path}: cannot read the resume state ({e})") from None
    if meta.get("format") != STATE_FORMAT:
        raise TrainingError(f"{path}: not a training state file")
    version = meta.get("format_version")
    if version not in READABLE_VERSIONS:
        raise TrainingError(
            f"{path}: state format version {version}; this code reads {' and '.join(READABLE_VERSIONS)} "
            "(version 2 stopped decaying biases). Finish the run with the code that started it, or start a new "
            "run in another --out directory"
        )
    info = json.loads(meta["state"])
    if version == "2":  # before --update-rule: every run used torch.optim.SGD
        info["hyperparameters"].setdefault("update_rule", "pytorch")
    return info, tensors


def restore_state(info: dict, tensors: dict, model, optimizer, scaler) -> None:
    model.load_state_dict({k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")})
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        if name.startswith("optimizer."):
            _, index, key = name.split(".", 2)
            state.setdefault(int(index), {})[key] = value
    for name, value in info["optimizer"]["scalars"].items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    rule = info["hyperparameters"].get("update_rule")
    found = {key for entries in state.values() for key in entries}
    if found and found != {STATE_KEYS.get(rule)}:  # (the rule is fixed on resume: this is a damaged file)
        raise TrainingError(
            f"the resume state's optimizer holds {', '.join(sorted(found))}, not the {STATE_KEYS.get(rule)} of "
            f"update rule {rule}; start a new run in another --out directory"
        )
    optimizer.load_state_dict({"state": state, "param_groups": info["optimizer"]["param_groups"]})
    if scaler is not None and info.get("grad_scaler"):
        scaler.load_state_dict(info["grad_scaler"])
