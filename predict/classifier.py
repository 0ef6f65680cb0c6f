"""The checkpoint's net on a device, from uint8 batches to probabilities and hidden activations."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from model import CPUInferenceNet, keep_freed_memory
from model.devices import resolve_devices
from model.ten_crop import flatten_crops, mean_over_crops, run_in_chunks

from .errors import PredictError


def _device(spec: str) -> torch.device:
    try:
        devices = resolve_devices(spec)
    except ValueError as e:  # a bad specification, or a device this machine lacks (DeviceError)
        raise PredictError(f"--device {spec}: {e}") from None
    if len(devices) != 1:
        raise PredictError(f"--device {spec}: predict runs on one device")
    return devices[0]


class Classifier:
    """The checkpoint's net on a device, from uint8 batches to probabilities (and hidden activations)."""

    def __init__(self, checkpoint, device: torch.device, crops: str, layer: str | None, normalize: bool):
        self.preprocessor = checkpoint.preprocessor()
        self.device, self.crops, self.layer, self.normalize = device, crops, layer, normalize
        if device.type == "cpu":
            keep_freed_memory()  # reuse the pages each forward pass frees (model/malloc.py), as the service does
            self.net = CPUInferenceNet(checkpoint.build_grouped("cpu"))  # the service's CPU form
        else:
            self.net = checkpoint.build_grouped(device).eval()
        state = checkpoint.state_dict
        self.feature_width = state["fc7.weight"].shape[1 if layer == "fc6" else 0]
        # fc7 and fc8 as plain linear layers: logits from the features, without a second forward pass
        names = ("fc7.weight", "fc7.bias", "fc8.weight", "fc8.bias")
        self.head = {k: state[k].to(device) for k in names} if layer is not None else {}

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor, max_rows: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """uint8 [n, 3, S, S] → (softmax probabilities [n, classes], features [n, d] or None), on the CPU."""
        x = self.preprocessor.from_uint8(images.to(self.device), self.crops)  # THE shared preprocessing
        rows = flatten_crops(x)
        if self.layer is None:
            logits, features = run_in_chunks(self.net, rows, max_rows), None
        else:
            features = run_in_chunks(functools.partial(self.net.features, layer=self.layer), rows, max_rows)
            logits = self._logits(features)
        # The paper's 10-patch prediction: the softmax averaged over the patches.
        probabilities = mean_over_crops(logits.softmax(dim=1), self.crops)
        features = None if features is None else mean_over_crops(features, self.crops)
        if features is not None and self.normalize:
            features = F.normalize(features, dim=1)
        return probabilities.cpu(), None if features is None else features.cpu()

    def _logits(self, features: torch.Tensor) -> torch.Tensor:
        h = self.head
        x = features
        if self.layer == "fc6":
            x = F.relu(F.linear(x, h["fc7.weight"], h["fc7.bias"]))
        return F.linear(x, h["fc8.weight"], h["fc8.bias"])
