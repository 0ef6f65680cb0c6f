"""The paper's training-time augmentation (§4.1), drawn on the CPU and applied on each tower's device.

Each image, each time it is used, gets a random 224×224 patch of its 256×256 image, a mirror with
probability ½, the mean image (at the same patch) subtracted, and the PCA lighting shift.
The draws for a global batch are a function of (seed, epoch, step) alone.
So the result depends neither on the device, nor on the number of processes, nor on where a run resumed.
``DeviceFeed`` moves a loaded uint8 batch to the devices and applies the draws there.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .data import ColorStats, derive_seed

ALPHA_STD = 0.1  # paper §4.1

# λ is a variance, so the paper's formula only means something at a stated pixel scale.
# We compute λ with pixels in [0, 1], the scale of the widely used values [0.2175, 0.0188, 0.0045].
# The shift is then multiplied by 255 for our 0–255 pixels; a test checks its covariance.
PIXEL_SCALE = 255.0


@dataclass(frozen=True)
class AugmentParams:
    """Per-image random choices for one batch (CPU tensors)."""

    top: torch.Tensor  # int64 [n], 0..size-crop
    left: torch.Tensor  # int64 [n]
    flip: torch.Tensor  # bool [n]
    alpha: torch.Tensor  # float32 [n, 3]

    def __getitem__(self, part: slice) -> AugmentParams:
        return AugmentParams(self.top[part], self.left[part], self.flip[part], self.alpha[part])

    def __len__(self) -> int:
        return len(self.top)

    def packed(self, pin_memory: bool = False) -> torch.Tensor:
        """All parameters as one float32 [n, 6] tensor (top, left, flip, α1..α3; the integers are exact in
        float32): one host→device copy per step instead of four."""
        out = torch.empty(len(self), 6, pin_memory=pin_memory)
        out[:, 0], out[:, 1], out[:, 2], out[:, 3:] = self.top, self.left, self.flip, self.alpha
        return out

    @classmethod
    def unpacked(cls, packed: torch.Tensor) -> AugmentParams:
        """The inverse of ``packed``, on whatever device ``packed`` is."""
        return cls(packed[:, 0].long(), packed[:, 1].long(), packed[:, 2] > 0.5, packed[:, 3:])


class TrainAugmentation:
    """Draws a batch's parameters (``draw``) and applies them to images on any device (call it)."""

    def __init__(self, stats: ColorStats, crop: int = 224, alpha_std: float = ALPHA_STD):
        self.crop = crop
        self.alpha_std = alpha_std
        self.mean_image = stats.mean_image.float()  # [3, S, S], 0–255
        self.size = self.mean_image.shape[-1]
        self.eigenvalues = stats.eigenvalues.float()  # [3], pixels in [0, 1]
        self.eigenvectors = stats.eigenvectors.float()  # [3, 3], columns
        self._mean_on = {self.mean_image.device: self.mean_image}  # copied once to each device used
        self._eigen_on = {self.eigenvalues.device: (self.eigenvalues, self.eigenvectors)}

    def draw(self, n: int, seed: int, epoch: int, step: int) -> AugmentParams:
        """The parameters for global batch ``step`` of ``epoch`` (n images)."""
        g = torch.Generator().manual_seed(derive_seed(seed, "augment", epoch, step))
        span = self.size - self.crop + 1
        return AugmentParams(
            top=torch.randint(0, span, (n,), generator=g),
            left=torch.randint(0, span, (n,), generator=g),
            flip=torch.rand(n, generator=g) < 0.5,
            alpha=torch.randn(n, 3, generator=g) * self.alpha_std,
        )

    def lighting_shift(self, alpha: torch.Tensor) -> torch.Tensor:
        """[n, 3] α → [n, 3] RGB shift in 0–255 units: P · (α ⊙ λ), ×255 (on α's device)."""
        if alpha.device not in self._eigen_on:
            self._eigen_on[alpha.device] = (self.eigenvalues.to(alpha.device), self.eigenvectors.to(alpha.device))
        eigenvalues, eigenvectors = self._eigen_on[alpha.device]
        return (alpha * eigenvalues) @ eigenvectors.T * PIXEL_SCALE

    def __call__(self, images: torch.Tensor, params: AugmentParams, out: torch.Tensor | None = None) -> torch.Tensor:
        """uint8 [n, 3, S, S] (on the device) → float32 [n, 3, crop, crop], ready for the network.

        ``out`` may be a float32 [n, 3, crop, crop] buffer to fill (saves the page faults of a fresh 77 MB
        allocation per batch on CPU, where large tensors are not cached). ``params`` may be on the CPU or,
        to avoid any host↔device wait, already on the images' device (``AugmentParams.unpacked``).
        """
        n = images.shape[0]
        if len(params) != n:
            raise ValueError(f"{len(params)} augmentation parameters for {n} images")
        device = images.device
        if device not in self._mean_on:
            self._mean_on[device] = self.mean_image.to(device)
        mean = self._mean_on[device]
        if out is None:
            out = torch.empty(n, 3, self.crop, self.crop, device=device)
        if device.type == "cpu":
            _crop_loop(images, mean, params, self.crop, out)
        else:
            _crop_gather(images, mean, params, self.crop, out)
        out += self.lighting_shift(params.alpha).to(device)[:, :, None, None]
        return out


class DeviceFeed:
    """From a loaded uint8 batch to the network's input on the towers' devices, without waiting for them.

    On GPUs the uint8 batch (25 MB at 128 images, a third of float32's) and the packed parameters cross
    to each tower's device on a side stream, overlapping the previous step's compute.
    Each device then augments its own copy with the same parameters: no float32 batch crosses GPUs.
    The loader's slot is handed back once its copy is done.
    On the CPU the batch is augmented into one reused buffer: a fresh 77 MB each step costs page faults.
    """

    def __init__(self, augmentation: TrainAugmentation, devices, channels_last: bool = False):
        self.augmentation = augmentation
        self.devices = list(dict.fromkeys(devices))  # distinct, tower 0's first
        self.tower_devices = tuple(devices)
        self.crop, self.channels_last = augmentation.crop, channels_last
        self.cuda = self.devices[0].type == "cuda"
        self.streams = {d: torch.cuda.Stream(d) for d in self.devices} if self.cuda else {}
        self._in_flight = None  # (events, batch) of the last copy, released at the next step
        self._cpu_buffer = torch.empty(0)

    def __call__(self, batch, params: AugmentParams):
        """(inputs for the net — one tensor, or one per tower device —, labels on tower 0's device)."""
        if not self.cuda:
            x = self._augment_on_cpu(batch.images, params)
            labels = batch.labels.clone()
            batch.release()
            return x, labels
        return self._augment_on_gpus(batch, params)

    def _augment_on_cpu(self, images: torch.Tensor, params: AugmentParams) -> torch.Tensor:
        shape = (len(images), 3, self.crop, self.crop)
        if self._cpu_buffer.shape != shape:
            self._cpu_buffer = torch.empty(shape)
        x = self.augmentation(images, params, out=self._cpu_buffer)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def _augment_on_gpus(self, batch, params: AugmentParams):
        self._release_previous()
        packed = params.packed(pin_memory=True)
        placed, events = {}, []
        for device in self.devices:
            stream = self.streams[device]
            with torch.cuda.stream(stream):
                placed[device] = (
                    batch.images.to(device, non_blocking=True),
                    packed.to(device, non_blocking=True),
                    batch.labels.to(device, non_blocking=True) if device == self.devices[0] else None,
                )
            events.append(stream.record_event())
            compute = torch.cuda.current_stream(device)
            compute.wait_stream(stream)
            for tensor in placed[device]:
                if tensor is not None:
                    tensor.record_stream(compute)  # allocated on the side stream, used on the compute stream
        self._in_flight = (events, batch)
        inputs = {}
        for device, (images, device_params, _) in placed.items():
            x = self.augmentation(images, AugmentParams.unpacked(device_params))
            inputs[device] = x.contiguous(memory_format=torch.channels_last) if self.channels_last else x
        labels = placed[self.devices[0]][2]
        if len(self.devices) == 1:
            return inputs[self.devices[0]], labels
        return [inputs[d] for d in self.tower_devices], labels

    def _release_previous(self) -> None:
        """Hand the previous step's slot back once its copies are done (they were queued a step ago, on
        streams of their own: this wait is short or nothing)."""
        if self._in_flight is not None:
            events, batch = self._in_flight
            for event in events:
                event.synchronize()
            batch.release()
            self._in_flight = None

    def close(self) -> None:
        self._release_previous()


def _crop_loop(images, mean, params: AugmentParams, crop: int, out: torch.Tensor) -> None:
    """One slice per image: on CPU several times faster than a gather (contiguous row copies)."""
    for i, (top, left, flip) in enumerate(zip(params.top.tolist(), params.left.tolist(), params.flip.tolist())):
        patch = images[i, :, top : top + crop, left : left + crop]
        patch_mean = mean[:, top : top + crop, left : left + crop]
        if flip:
            patch, patch_mean = patch.flip(-1), patch_mean.flip(-1)
        torch.sub(patch, patch_mean, out=out[i])


def _crop_gather(images, mean, params: AugmentParams, crop: int, out: torch.Tensor) -> None:
    """Two gathers for the whole batch: a handful of kernels on a GPU instead of hundreds."""
    device, n = images.device, images.shape[0]
    arange = torch.arange(crop, device=device)
    top, left, flip = params.top.to(device), params.left.to(device), params.flip.to(device)
    rows = top[:, None] + arange  # [n, crop]
    # A mirrored patch reads its columns right to left: the flip costs nothing extra.
    cols = torch.where(flip[:, None], left[:, None] + crop - 1 - arange, left[:, None] + arange)
    torch.sub(_gather(images, rows, cols), _gather(mean.expand(n, -1, -1, -1), rows, cols), out=out)


def _gather(x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """x [n, C, H, W], rows [n, h], cols [n, w] → x[i, :, rows[i]][:, :, cols[i]] for every i: [n, C, h, w]."""
    n, channels, _, width = x.shape
    h, w = rows.shape[1], cols.shape[1]
    x = x.gather(2, rows[:, None, :, None].expand(n, channels, h, width))
    return x.gather(3, cols[:, None, None, :].expand(n, channels, h, w))
