"""Augmentations that record their geometry, so maps can follow the image.

The CGC loss (Pillai et al., CVPR 2022) compares the map of an augmented view
with the original image's map moved into that view's geometry by the *same*
crop and flip. :class:`CropFlip` draws a per-image random resized crop and
horizontal flip, applies it to the images and keeps the affine matrices, so
:meth:`Views.apply` repeats exactly that geometry on maps of any resolution.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch
from torch import Tensor

from captum_ssl.metrics._consistency import warp


@dataclass
class Views:
    """Augmented views and the geometry that made them.

    Attributes:
        images (Tensor): the views ``(B, C, H, W)``.
        theta (Tensor): per-image affine matrices ``(B, 2, 3)`` mapping view
                    coordinates to original coordinates (``affine_grid``'s
                    convention, normalised to [-1, 1]).
    """

    images: Tensor
    theta: Tensor

    def apply(self, maps: Tensor) -> Tensor:
        """Move maps ``(B, c, h, w)`` of the originals into the views' geometry.

        Works at any resolution (the matrices are in normalised coordinates)
        and is differentiable with respect to ``maps``."""
        return warp(maps, self.theta)[0]


class CropFlip:
    r"""Random resized crop and horizontal flip, per image, with its geometry.

    Each image gets a square crop whose side is a uniform fraction in
    ``scale`` of the image side, at a uniform position inside the image,
    resized back to the full size, and is flipped with probability ``flip_p``.
    The crop always lies inside the image, so a map moved by
    :meth:`Views.apply` has no pixels from outside.

    Args:
        scale (tuple[float, float], optional): range of the crop side as a
                    fraction of the image side. Default: (0.5, 1.0)
        flip_p (float, optional): probability of a horizontal flip.
                    Default: 0.5
        seed (int, optional): seed of the CPU generator (``None``: random).

    Examples::

        >>> aug = CropFlip(seed=0)
        >>> views = aug(images)                       # views.images, views.theta
        >>> moved = views.apply(cam(images))          # the map in view geometry
    """

    def __init__(
        self,
        scale: Tuple[float, float] = (0.5, 1.0),
        flip_p: float = 0.5,
        seed: Optional[int] = None,
    ) -> None:
        lo, hi = scale
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"scale={scale}: use 0 < low <= high <= 1.")
        if not 0 <= flip_p <= 1:
            raise ValueError(f"flip_p={flip_p}: use a probability in [0, 1].")
        self.scale = (float(lo), float(hi))
        self.flip_p = float(flip_p)
        self.generator = torch.Generator()
        if seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(seed)

    def params(self, batch: int) -> Tensor:
        """Draw ``(B, 2, 3)`` matrices (view -> original coordinates)."""
        g = self.generator
        lo, hi = self.scale
        side = lo + (hi - lo) * torch.rand(batch, generator=g)
        shift = (1 - side)[:, None] * (2 * torch.rand(batch, 2, generator=g) - 1)
        flip = torch.where(torch.rand(batch, generator=g) < self.flip_p, -1.0, 1.0)
        theta = torch.zeros(batch, 2, 3)
        theta[:, 0, 0] = side * flip
        theta[:, 1, 1] = side
        theta[:, :, 2] = shift
        return theta

    def __call__(self, images: Tensor) -> Views:
        if images.dim() != 4:
            raise ValueError(
                f"images must be a batch (B, C, H, W), got {tuple(images.shape)}."
            )
        theta = self.params(images.shape[0])
        return Views(warp(images, theta)[0], theta.to(images.device, images.dtype))
