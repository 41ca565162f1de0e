"""Patch geometry (falkon_convrfm.patches): patches in ``unfold`` order against the loop reference
(tests/naive.py), the pooling window's location pairs, and Lᵀx_p as a convolution. Geometry
errors raised through the kernel's constructor are in test_kernel.py."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import naive
from falkon_convrfm.patches import PatchGeometry


@pytest.mark.parametrize("q,stride,padding", [(1, 1, 0), (3, 1, 1), (3, 2, 0), (5, 2, 2), (5, 1, 0)])
def test_naive_patch_order_is_unfold_order(q, stride, padding, rng):
    """The reference's patches equal torch's unfold (channel, row, col), and so do the geometry's."""
    shape = (3, 7, 9)
    x = rng.standard_normal(int(np.prod(shape)))
    ours = naive.extract_patches(x, shape, q, stride, padding)
    cols = F.unfold(torch.from_numpy(x).reshape(1, *shape), q, padding=padding, stride=stride)[0].T
    np.testing.assert_array_equal(ours, cols.numpy())
    geometry = PatchGeometry(shape, q, stride, padding)
    np.testing.assert_array_equal(geometry.patches(torch.from_numpy(x)[None])[0].numpy(), ours)
    assert (geometry.num_locations, geometry.patch_dim, geometry.row_length) == (len(ours), 3 * q * q, 3 * 7 * 9)


def test_window_partners():
    """Row k is the offset δ_k (row-major over {−h..h}²); −1 where p + δ_k leaves the grid."""
    geometry = PatchGeometry((1, 5, 6), 3)  # a 3×4 grid of locations
    assert torch.equal(geometry.window_partners(1), torch.arange(12)[None])
    partners = geometry.window_partners(3)
    assert partners.shape == (9, 12)
    assert partners[:, 5].tolist() == [0, 1, 2, 4, 5, 6, 8, 9, 10]  # an interior location, (1, 1)
    assert partners[:, 0].tolist() == [-1, -1, -1, -1, 0, 1, -1, 4, 5]  # the corner (0, 0)
    assert torch.equal(partners[4], torch.arange(12))  # δ = (0, 0)


def test_transformed_patches_are_projected_patches(rng):
    geometry = PatchGeometry((2, 6, 5), 3, stride=1, padding=1)
    rows = torch.from_numpy(rng.standard_normal((4, geometry.row_length)))
    factor = torch.from_numpy(rng.standard_normal((geometry.patch_dim, 5)))
    projected = geometry.transformed_patches(rows, factor)  # (P, n, r)
    torch.testing.assert_close(projected.transpose(0, 1), geometry.patches(rows) @ factor)
    assert geometry.filters(factor).shape == (5, 2, 3, 3)


@pytest.mark.parametrize("shape, q, stride, padding, covered", [
    ((1, 8, 8), 3, 1, 0, 64), ((1, 8, 8), 3, 9, 0, 9), ((1, 8, 8), 2, 3, 0, 36), ((1, 8, 8), 3, 9, 1, 4),
    ((3, 5, 7), 5, 1, 0, 35),
])
def test_covered_pixels(shape, q, stride, padding, covered):
    geometry = PatchGeometry(shape, q, stride, padding)
    images = torch.zeros(1, *shape)
    seen = F.fold(F.unfold(images + 1, q, padding=padding, stride=stride), shape[1:], q, padding=padding, stride=stride)
    assert geometry.covered_pixels == covered == int((seen[0, 0] > 0).sum())


def test_windows_wider_than_the_grid_are_the_widest_one():
    geometry = PatchGeometry((1, 5, 6), 3)  # a 3×4 grid: every pair of locations is within offsets ±3
    assert geometry.widest_window == 7
    widest = geometry.window_partners(7)
    assert torch.equal(geometry.window_partners(99), widest)
    assert (widest >= 0).sum() == 12 * 12  # every (location, location) pair once
