"""The checkpoint's net on a device, from uint8 batches to probabilities and hidden activations."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from model import CPUInferenceNet, keep_freed_memory

from .errors import PredictError


def _device(spec: str) -> torch.device:
    try:
        device = torch.device(spec)
    except (RuntimeError, ValueError) as e:
        raise PredictError(f"--device {spec}: {e}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise PredictError(f"--device {spec}: torch {torch.__version__} sees no CUDA GPU")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise PredictError(f"--device {spec}: {torch.cuda.device_count()} CUDA GPU(s) visible")
    return device


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
        n = len(x)
        if self.crops == "ten":
            x = x.flatten(0, 1)
        if self.layer is None:
            logits, features = torch.cat([self.net(part).float() for part in x.split(max_rows)]), None
        else:
            features = torch.cat([self.net.features(part, self.layer).float() for part in x.split(max_rows)])
            logits = self._logits(features)
        probabilities = logits.softmax(dim=1)
        if self.crops == "ten":  # the paper's 10-patch prediction: the softmax averaged over the patches
            probabilities = probabilities.view(n, 10, -1).mean(dim=1)
            features = None if features is None else features.view(n, 10, -1).mean(dim=1)
        if features is not None and self.normalize:
            features = F.normalize(features, dim=1)
        return probabilities.cpu(), None if features is None else features.cpu()

    def _logits(self, features: torch.Tensor) -> torch.Tensor:
        h = self.head
        x = features
        if self.layer == "fc6":
            x = F.relu(F.linear(x, h["fc7.weight"], h["fc7.bias"]))
        return F.linear(x, h["fc8.weight"], h["fc8.bias"])
