"""Explanation consistency under geometric transformations.

The measure the CGC paper (Pillai et al., "Consistent Explanations by
Contrastive Learning", CVPR 2022) optimises: an explanation should follow the
image, i.e. the map of a transformed image ``explain(T(x))`` should equal the
transformed map ``T(explain(x))``.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from captum._utils.typing import TargetType
from torch import Tensor

from captum_ssl.metrics._common import (
    MetricInputError,
    direction,
    explain,
    explainer,
    pearson,
    prepare,
    prepare_maps,
    resolve_target,
    spearman,
    topk_iou,
)

TRANSFORMS = ("hflip", "resized_crop", "rotation")
MEASURES = ("pearson", "spearman", "iou")


def transform_params(
    kind: str,
    batch: int,
    generator: torch.Generator,
    crop_scale: Tuple[float, float] = (0.5, 0.9),
    max_degrees: float = 15.0,
) -> Tensor:
    r"""Per-image affine matrices ``(B, 2, 3)`` (output -> input coordinates).

    ``"hflip"``: horizontal flip. ``"resized_crop"``: a square crop whose side
    is a random fraction in ``crop_scale`` of the image, at a random position,
    resized back to the full image. ``"rotation"``: a random angle in
    ``[-max_degrees, max_degrees]`` about the centre.
    """
    theta = torch.zeros(batch, 2, 3)
    if kind == "hflip":
        theta[:, 0, 0] = -1.0
        theta[:, 1, 1] = 1.0
    elif kind == "resized_crop":
        lo, hi = crop_scale
        s = lo + (hi - lo) * torch.rand(batch, generator=generator)
        t = (1 - s)[:, None] * (2 * torch.rand(batch, 2, generator=generator) - 1)
        theta[:, 0, 0] = s
        theta[:, 1, 1] = s
        theta[:, :, 2] = t
    elif kind == "rotation":
        ang = (2 * torch.rand(batch, generator=generator) - 1) * max_degrees
        rad = ang * math.pi / 180
        theta[:, 0, 0] = torch.cos(rad)
        theta[:, 0, 1] = -torch.sin(rad)
        theta[:, 1, 0] = torch.sin(rad)
        theta[:, 1, 1] = torch.cos(rad)
    else:
        raise MetricInputError(
            f"transform={kind!r}: use one of {TRANSFORMS} or a callable."
        )
    return theta


def warp(images: Tensor, theta: Tensor) -> Tuple[Tensor, Tensor]:
    """Apply affine ``theta``; returns the warped images and the valid mask."""
    theta = theta.to(images.device, images.dtype)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    out = F.grid_sample(images, grid, mode="bilinear", align_corners=False)
    ones = torch.ones_like(images[:, :1])
    valid = F.grid_sample(ones, grid, mode="bilinear", align_corners=False) > 0.999
    return out, valid


@direction(True)
def explanation_consistency(
    model: Callable,
    inputs: Tensor,
    method: Any,
    target: TargetType = None,
    transform: Union[str, Callable[[Tensor], Tensor]] = "hflip",
    measure: str = "pearson",
    top_k: float = 0.1,
    attributions: Optional[Tensor] = None,
    seed: Optional[int] = 0,
    generator: Optional[torch.Generator] = None,
    crop_scale: Tuple[float, float] = (0.5, 0.9),
    max_degrees: float = 15.0,
    **attribute_kwargs: Any,
) -> Tensor:
    r"""Consistency of explanations under a transformation. Higher is better.

    Compares ``explain(T(x))`` with ``T(explain(x))`` per image, over the
    pixels that ``T`` keeps inside the image, by Pearson or Spearman
    correlation, or by the IoU of their top-``top_k`` fraction of pixels.
    Maps are upsampled to the input before ``T`` is applied.

    Since the transformed image must be explained anew, this metric takes the
    method, not maps: a Captum / captum_ssl attribution object (called as
    ``method.attribute(x, target=target, **attribute_kwargs)``) or a callable
    ``(inputs, target) -> maps``. The target stays that of the original image.

    Cost: one (or, with ``attributions`` given, zero) explanation of the
    images plus one of the transformed images.

    Args:
        model (Callable): the classifier (used for its device and, with
                    ``target=None``, for the top-1 class).
        inputs (Tensor): images ``(B, C, H, W)``.
        method (attribution object or callable): the explanation method.
        target (optional): class per image; ``None`` = top-1 class.
        transform (str or callable, optional): ``"hflip"``, ``"resized_crop"``,
                    ``"rotation"`` (all seeded, per-image parameters), or a
                    callable applied alike to images and maps (it must be
                    geometric, e.g. ``torch.flip(t, [-1])``). Default: "hflip"
        measure (str, optional): ``"pearson"``, ``"spearman"`` or ``"iou"``.
                    Default: "pearson"
        top_k (float, optional): fraction of pixels for ``"iou"``. Default: 0.1
        attributions (Tensor, optional): precomputed maps of ``inputs``.
        seed (int, optional): seed of the random parameters. Default: 0
        generator (torch.Generator, optional): CPU generator used instead.
        crop_scale, max_degrees: ranges of the random crops and rotations.
        **attribute_kwargs: passed to ``method.attribute``.

    Returns:
        Tensor: ``(B,)`` on the model's device; correlation in [-1, 1] or IoU
        in [0, 1].

    Examples::

        >>> gc = LayerGradCam(model, model.layer4)
        >>> explanation_consistency(model, x, gc, y, transform="resized_crop")
    """
    if measure not in MEASURES:
        raise MetricInputError(f"measure={measure!r}: use one of {MEASURES}.")
    x, _ = prepare(model, inputs, None)
    target = resolve_target(model, x, target)
    fn = explainer(method, **attribute_kwargs)
    if attributions is None:
        base = explain(fn, x, target)
    else:
        base = prepare_maps(attributions, x)
    if callable(transform):
        tx = transform(x)
        t_base = transform(base)
        valid = torch.ones_like(t_base, dtype=torch.bool)
    else:
        if generator is None:
            generator = torch.Generator().manual_seed(0 if seed is None else seed)
        theta = transform_params(
            transform, x.shape[0], generator, crop_scale, max_degrees
        )
        tx, _ = warp(x, theta)
        t_base, valid = warp(base, theta)
    maps_t = explain(fn, tx, target)
    if measure == "pearson":
        return pearson(maps_t, t_base, valid)
    if measure == "spearman":
        return spearman(maps_t, t_base, valid)
    return topk_iou(maps_t, t_base, top_k, valid)
