"""The paper's training-time augmentation (§4.1), on whole batches of tensors on the training device.

For every image, every time it is used:
  * a random 224×224 patch of the 256×256 image (each of the 33×33 positions equally likely),
  * mirrored left–right with probability ½,
  * the mean image (cropped at the same position) subtracted,
  * PCA lighting: ``[p1 p2 p3] · [α1 λ1, α2 λ2, α3 λ3]ᵀ`` added to every pixel, α_i ~ N(0, 0.1²),
    where p_i, λ_i are the eigenvectors and eigenvalues of the 3×3 covariance of RGB pixel values.

Units of λ: the paper's formula is quadratic in the pixel scale (λ is a variance), so it only means
something for a stated scale. We compute λ from the data with pixels in [0, 1] — the scale in which the
formula is commonly applied (fb.resnet.torch's widely used ImageNet values [0.2175, 0.0188, 0.0045] are
such eigenvalues) — and multiply the shift by 255 for our 0–255 pixels. The shift's covariance is then
``(0.1 · 255)² · P diag(λ²) Pᵀ``; a test checks exactly that.

Random numbers: the parameters (offsets, flips, α) of a whole *global* batch are drawn on the CPU from a
torch.Generator seeded with (seed, epoch, step); each DDP rank applies its own slice. So the result does
not depend on the device, on the number of processes, or on where a run was resumed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .data import ColorStats, derive_seed

ALPHA_STD = 0.1  # paper §4.1
PIXEL_SCALE = 255.0  # our pixels are 0–255; the eigenvalues are for 0–1


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
    def __init__(self, stats: ColorStats, crop: int = 224, alpha_std: float = ALPHA_STD, device="cpu"):
        self.device = torch.device(device)
        self.crop = crop
        self.alpha_std = alpha_std
        self.mean_image = stats.mean_image.float().to(self.device)  # [3, S, S], 0–255
        self.size = self.mean_image.shape[-1]
        self.eigenvalues = stats.eigenvalues.float()  # [3], pixels in [0, 1]
        self.eigenvectors = stats.eigenvectors.float()  # [3, 3], columns
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
        mean = self.mean_image if self.mean_image.device == device else self.mean_image.to(device)
        if out is None:
            out = torch.empty(n, 3, self.crop, self.crop, device=device)
        if device.type == "cpu":
            _crop_loop(images, mean, params, self.crop, out)
        else:
            _crop_gather(images, mean, params, self.crop, out)
        out += self.lighting_shift(params.alpha).to(device)[:, :, None, None]
        return out


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
