"""The resume state: one safetensors file, tensors (weights, momentum) plus a JSON header (everything
else: position, schedule, metrics, hyper-parameters, the gradient scaler). Nothing is pickled.

Version 2: the optimizer has two parameter groups (weights, then biases: biases are not decayed), so a
version-1 state (one group) cannot be continued by this code.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from model.files import read_safetensors, write_safetensors

from .data import TrainingError

STATE_FORMAT = "alexnet-train-state"
STATE_VERSION = 2


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
    if meta.get("format_version") != str(STATE_VERSION):
        raise TrainingError(
            f"{path}: state format version {meta.get('format_version')}; this code reads {STATE_VERSION} "
            "(version 2 stopped decaying biases). Finish the run with the code that started it, or start a new "
            "run in another --out directory"
        )
    return json.loads(meta["state"]), tensors


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
    optimizer.load_state_dict({"state": state, "param_groups": info["optimizer"]["param_groups"]})
    if scaler is not None and info.get("grad_scaler"):
        scaler.load_state_dict(info["grad_scaler"])
