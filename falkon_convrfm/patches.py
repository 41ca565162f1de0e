"""Patch geometry: images as rows, patches in ``unfold`` order, and the conv2d view of Lᵀ."""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from .validation import positive_int


@dataclasses.dataclass(frozen=True)
class PatchGeometry:
    """Patches of size ``q×q`` with ``stride`` and zero ``padding`` over images of shape (c, H, W).

    A patch vector has d = c·q² entries in the (channel, row, col) order of
    ``torch.nn.functional.unfold``; an image travels as a row of length c·H·W (C-order).
    """

    image_shape: tuple
    patch_size: int = 3
    stride: int = 1
    padding: int = 0

    def __post_init__(self):
        shape = tuple(self.image_shape)
        if len(shape) != 3:
            raise ValueError(f"image_shape must be (channels, height, width), got {self.image_shape!r}")
        shape = tuple(positive_int(n, v) for n, v in zip(("channels", "height", "width"), shape))
        object.__setattr__(self, "image_shape", shape)
        object.__setattr__(self, "patch_size", positive_int("patch_size", self.patch_size))
        object.__setattr__(self, "stride", positive_int("stride", self.stride))
        object.__setattr__(self, "padding", positive_int("padding", self.padding, minimum=0))
        _, h, w = shape
        q, pad = self.patch_size, self.padding
        if q > h + 2 * pad or q > w + 2 * pad:
            raise ValueError(
                f"patch_size={q} is larger than the padded image ({h + 2 * pad}×{w + 2 * pad} for "
                f"image_shape={shape}, padding={pad})"
            )

    @property
    def out_shape(self) -> tuple:
        """(Ho, Wo): the grid of patch locations."""
        _, h, w = self.image_shape
        q, s, pad = self.patch_size, self.stride, self.padding
        return (h + 2 * pad - q) // s + 1, (w + 2 * pad - q) // s + 1

    @property
    def num_locations(self) -> int:
        """P, the number of patch locations."""
        ho, wo = self.out_shape
        return ho * wo

    @property
    def covered_pixels(self) -> int:
        """How many pixels of an image (per channel) lie in at least one patch."""
        _, h, w = self.image_shape

        def covered(size: int, locations: int) -> int:
            seen = torch.zeros(size, dtype=torch.bool)
            for i in range(locations):
                start = i * self.stride - self.padding
                seen[max(start, 0) : max(start + self.patch_size, 0)] = True
            return int(seen.sum())

        ho, wo = self.out_shape
        return covered(h, ho) * covered(w, wo)

    @property
    def widest_window(self) -> int:
        """The narrowest pooling window that pairs every location with every other: 2·max(Ho, Wo) − 1
        (a wider one adds offsets that fall off the grid everywhere)."""
        return 2 * max(self.out_shape) - 1

    @property
    def patch_dim(self) -> int:
        """d = c·q²."""
        return self.image_shape[0] * self.patch_size**2

    @property
    def row_length(self) -> int:
        """c·H·W, the length of an image row."""
        c, h, w = self.image_shape
        return c * h * w

    def window_partners(self, window: int) -> torch.Tensor:
        """Location pairs of a w×w pooling window: (w², P) int64, row k = offset δ_k = (di, dj)
        (row-major over {−h..h}², h = w // 2), entry p = the location p + δ_k on the (Ho, Wo)
        grid, or −1 where p + δ_k falls outside it. w = 1 gives the aligned pairs (p, p); a window
        wider than :attr:`widest_window` gives the pairs of the widest one (the other offsets pair
        no location)."""
        ho, wo = self.out_shape
        h = min(window, self.widest_window) // 2
        a = torch.arange(ho).repeat_interleave(wo)
        b = torch.arange(wo).repeat(ho)
        rows = []
        for di in range(-h, h + 1):
            for dj in range(-h, h + 1):
                valid = (a + di >= 0) & (a + di < ho) & (b + dj >= 0) & (b + dj < wo)
                rows.append(torch.where(valid, (a + di) * wo + (b + dj), -1))
        return torch.stack(rows)

    def check_rows(self, rows: torch.Tensor, name: str = "X") -> None:
        """Raise ValueError unless ``rows`` is 2-D with c·H·W columns."""
        if rows.dim() != 2 or rows.shape[1] != self.row_length:
            raise ValueError(
                f"{name} has shape {tuple(rows.shape)}; the kernel's geometry expects rows of length "
                f"c·H·W = {self.row_length} (image_shape={self.image_shape}, flattened in C-order)"
            )

    def images(self, rows: torch.Tensor) -> torch.Tensor:
        """Rows (n, c·H·W) as images (n, c, H, W)."""
        self.check_rows(rows)
        return rows.reshape(rows.shape[0], *self.image_shape)

    def patches(self, rows: torch.Tensor) -> torch.Tensor:
        """All patches, (n, P, d), via ``unfold``."""
        cols = F.unfold(self.images(rows), self.patch_size, padding=self.padding, stride=self.stride)
        return cols.transpose(1, 2)

    def filters(self, factor: torch.Tensor) -> torch.Tensor:
        """A (d, r) factor L as r conv2d filters of shape (c, q, q) (rows of Lᵀ)."""
        c, q = self.image_shape[0], self.patch_size
        return factor.t().reshape(factor.shape[1], c, q, q)

    def transformed_patches(self, rows: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
        """Lᵀx_p for every patch: conv2d of the images with Lᵀ, as a (P, n, r) view.

        The convolution runs in channels-last layout (several times faster on CPU for few
        input channels), so its output is already (n, P, r) in memory and the (P, n, r) result
        is a strided view; call ``.contiguous()`` where a dense layout is needed.
        """
        images = self.images(rows).contiguous(memory_format=torch.channels_last)
        out = F.conv2d(images, self.filters(factor), stride=self.stride, padding=self.padding)
        n, r = out.shape[:2]
        return out.permute(0, 2, 3, 1).reshape(n, -1, r).transpose(0, 1)
