"""Training augmentation and data order: statistics, agreement with the shared preprocessing, determinism."""

import pytest
import torch

from model import Preprocessing, Preprocessor
from training.augment import AugmentParams, TrainAugmentation, _crop_gather, _crop_loop
from training.data import ColorStats, ShardedBatches, epoch_order, stats_from_sums
from training.errors import TrainingError


def make_stats(seed=0) -> ColorStats:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(3, 3, generator=g, dtype=torch.float64)
    covariance = a @ a.T / 20 + torch.eye(3, dtype=torch.float64) * 0.002
    eigenvalues, eigenvectors = torch.linalg.eigh(covariance)
    order = eigenvalues.argsort(descending=True)
    return ColorStats(
        mean_image=torch.rand(3, 256, 256, generator=g) * 255,
        covariance=covariance.float(),
        eigenvalues=eigenvalues[order].float(),
        eigenvectors=eigenvectors[:, order].float(),
        images=1,
    )


def random_images(n, seed=1):
    return torch.randint(0, 256, (n, 3, 256, 256), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def test_crop_positions_cover_the_image_uniformly_and_flips_are_half():
    augment = TrainAugmentation(make_stats())
    params = augment.draw(33 * 33 * 20, seed=3, epoch=0, step=0)
    for offsets in (params.top, params.left):
        counts = torch.bincount(offsets, minlength=33)
        assert len(counts) == 33 and offsets.min() == 0 and offsets.max() == 32  # every position, none outside
        expected = len(offsets) / 33
        assert ((counts - expected).abs() < 0.2 * expected).all(), counts  # ~5σ for 660 per bin
    assert abs(params.flip.float().mean().item() - 0.5) < 0.02
    # top and left are independent: all 33×33 positions occur
    assert len(set(zip(params.top.tolist(), params.left.tolist()))) == 33 * 33


def test_lighting_shift_has_the_papers_covariance():
    stats = make_stats()
    augment = TrainAugmentation(stats, alpha_std=0.1)
    alpha = augment.draw(200_000, seed=0, epoch=0, step=0).alpha
    assert abs(alpha.std().item() - 0.1) < 0.002 and abs(alpha.mean().item()) < 0.001
    shifts = augment.lighting_shift(alpha).double()  # [n, 3] in 0–255 pixel units
    empirical = torch.cov(shifts.T)
    # shift = 255 · P (α ⊙ λ), α ~ N(0, 0.1² I)  ⇒  Cov = (0.1 · 255)² · P diag(λ²) Pᵀ
    p, lam = stats.eigenvectors.double(), stats.eigenvalues.double()
    expected = (0.1 * 255) ** 2 * p @ torch.diag(lam**2) @ p.T
    assert torch.linalg.matrix_norm(empirical - expected) < 0.02 * torch.linalg.matrix_norm(expected)
    # and the shift moves pixels along the principal components: mostly along the first
    along = shifts @ p
    assert along[:, 0].var() > along[:, 1].var() > along[:, 2].var()


@pytest.mark.slow
def test_augmentation_agrees_with_the_shared_preprocessing():
    """With no lighting, the corner/centre crops (mirrored or not) equal Preprocessor.from_uint8's 10 patches."""
    stats = make_stats()
    images = random_images(4)
    ten = Preprocessor(Preprocessing(mean="image"), stats.mean_image).from_uint8(images, "ten")  # [4, 10, 3, 224, 224]
    augment = TrainAugmentation(stats)
    positions = [(0, 0), (0, 32), (32, 0), (32, 32), (16, 16)]  # from_uint8's order: corners, then centre
    for patch, (top, left) in enumerate(positions):
        for flip in (False, True):
            params = AugmentParams(
                top=torch.full((4,), top),
                left=torch.full((4,), left),
                flip=torch.full((4,), flip),
                alpha=torch.zeros(4, 3),
            )
            out = augment(images, params)
            torch.testing.assert_close(out, ten[:, patch + 5 * flip], rtol=0, atol=0)


def test_lighting_adds_one_colour_per_image():
    stats = make_stats()
    augment = TrainAugmentation(stats)
    images = random_images(3)
    params = augment.draw(3, seed=1, epoch=2, step=5)
    plain = augment(images, AugmentParams(params.top, params.left, params.flip, torch.zeros(3, 3)))
    lit = augment(images, params)
    difference = lit - plain
    shift = augment.lighting_shift(params.alpha)
    torch.testing.assert_close(difference, shift[:, :, None, None].expand_as(difference), atol=1e-3, rtol=0)
    assert shift.abs().max() > 0.1


def test_cpu_loop_and_gather_paths_agree():
    stats = make_stats()
    augment = TrainAugmentation(stats)
    images = random_images(6)
    params = augment.draw(6, seed=0, epoch=0, step=1)
    a, b = torch.empty(6, 3, 224, 224), torch.empty(6, 3, 224, 224)
    _crop_loop(images, stats.mean_image, params, 224, a)
    _crop_gather(images, stats.mean_image, params, 224, b)
    assert torch.equal(a, b)


def test_parameters_are_a_function_of_seed_epoch_step():
    augment = TrainAugmentation(make_stats())
    a, b = augment.draw(64, seed=5, epoch=1, step=2), augment.draw(64, seed=5, epoch=1, step=2)
    assert all(torch.equal(x, y) for x, y in zip(vars(a).values(), vars(b).values()))
    for other in (augment.draw(64, 6, 1, 2), augment.draw(64, 5, 2, 2), augment.draw(64, 5, 1, 3)):
        assert not torch.equal(other.alpha, a.alpha)
    # A rank's slice of the global draw is what it applies: the draw does not depend on the slicing.
    assert torch.equal(a[16:32].top, a.top[16:32])


def test_sharded_batches_partition_the_global_batch():
    order = epoch_order(50, seed=1, epoch=3)
    assert sorted(order.tolist()) == list(range(50))
    assert not torch.equal(order, epoch_order(50, seed=1, epoch=4))
    single = ShardedBatches(50, 12, seed=1)
    ranks = [ShardedBatches(50, 12, seed=1, rank=r, world=3) for r in range(3)]
    assert single.steps_per_epoch == 4  # the incomplete last batch is dropped
    for step in range(single.steps_per_epoch):
        joined = torch.cat([r.local_indices(order, step) for r in ranks])
        assert torch.equal(joined, single.local_indices(order, step))
    with pytest.raises(TrainingError, match="does not split evenly"):
        ShardedBatches(50, 10, seed=0, world=3)
    with pytest.raises(TrainingError, match="larger than the training split"):
        ShardedBatches(5, 8, seed=0)


def test_stats_from_exact_sums():
    images = random_images(5, seed=7)
    pixels = images.reshape(5, 3, -1).double()
    sum_rgb = pixels.sum((0, 2)).long()
    sum_outer = torch.einsum("ncp,ndp->cd", pixels, pixels).long()
    stats = stats_from_sums(images.long().sum(0), sum_rgb, sum_outer, 5)
    torch.testing.assert_close(stats.mean_image, images.float().mean(0))
    direct = torch.cov(pixels.permute(1, 0, 2).reshape(3, -1) / 255.0, correction=0)
    torch.testing.assert_close(stats.covariance.double(), direct, rtol=1e-5, atol=1e-7)
    reconstructed = stats.eigenvectors @ torch.diag(stats.eigenvalues) @ stats.eigenvectors.T
    torch.testing.assert_close(reconstructed, stats.covariance, rtol=1e-4, atol=1e-6)
    assert (stats.eigenvalues[:-1] >= stats.eigenvalues[1:]).all()
