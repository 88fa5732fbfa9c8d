"""Map post-processing: upsampling to the input and per-image normalisation.

These are explicit steps for viewing and for metrics; no attribution method
applies them on its own.
"""

from __future__ import annotations

from typing import Sequence, Union

import torch.nn.functional as F
from torch import Tensor


def as_map(attributions: Tensor) -> Tensor:
    """``(B, 1, h, w)`` view of a map given as ``(B, h, w)`` or ``(B, 1, h, w)``.

    Maps with several channels (e.g. input-resolution RGB attributions of
    Captum's gradient methods) are summed over channels.
    """
    if attributions.dim() == 3:
        return attributions.unsqueeze(1)
    if attributions.dim() == 4:
        if attributions.shape[1] != 1:
            return attributions.sum(dim=1, keepdim=True)
        return attributions
    raise ValueError(
        f"A map must be (B, h, w) or (B, C, h, w); got shape "
        f"{tuple(attributions.shape)}."
    )


def upsample(
    attributions: Tensor,
    size: Union[int, Sequence[int], Tensor],
    mode: str = "bilinear",
) -> Tensor:
    r"""Resize maps to an image size.

    Args:
        attributions (Tensor): maps ``(B, 1, h, w)`` or ``(B, h, w)``.
        size (int, tuple or Tensor): target ``(H, W)``, or an image batch
                    ``(B, C, H, W)`` whose size is used.
        mode (str, optional): ``"bilinear"`` (half-pixel centres, as OpenCV's
                    ``cv2.resize`` and ``captum``'s ``LayerAttribution.interpolate``
                    with ``align_corners=False``) or ``"nearest"``.
                    Default: ``"bilinear"``

    Returns:
        Tensor: ``(B, 1, H, W)`` on the maps' device.

    Examples::

        >>> cam = LayerGradCam(model, model.layer4).attribute(x, target=3)
        >>> heat = upsample(cam, x)          # (B, 1, 224, 224)
    """
    maps = as_map(attributions)
    if isinstance(size, Tensor):
        size = tuple(size.shape[-2:])
    elif isinstance(size, int):
        size = (size, size)
    size = (int(size[0]), int(size[1]))
    if tuple(maps.shape[-2:]) == size:
        return maps
    if mode == "nearest":
        return F.interpolate(maps, size=size, mode="nearest")
    return F.interpolate(maps, size=size, mode=mode, align_corners=False)


def normalize(attributions: Tensor, eps: float = 1e-7) -> Tensor:
    r"""Min-max normalise each map to ``[0, 1]`` (as pytorch-grad-cam does).

    Args:
        attributions (Tensor): maps ``(B, ...)``.
        eps (float, optional): added to the range so constant maps give 0.
                    Default: 1e-7

    Returns:
        Tensor: same shape, each sample in ``[0, 1]``.
    """
    flat = attributions.reshape(attributions.shape[0], -1)
    lo = flat.min(dim=1, keepdim=True).values
    flat = flat - lo
    hi = flat.max(dim=1, keepdim=True).values
    return (flat / (hi + eps)).reshape(attributions.shape)


def to_heatmap(
    attributions: Tensor,
    size: Union[int, Sequence[int], Tensor],
    relu: bool = True,
) -> Tensor:
    """ReLU (optional), upsample and normalise: the usual viewing pipeline."""
    maps = as_map(attributions)
    if relu:
        maps = maps.clamp(min=0)
    return normalize(upsample(maps, size))
