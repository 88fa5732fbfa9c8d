"""Map post-processing: upsampling to the input and per-image normalisation.

These are explicit steps for viewing and for metrics; no attribution method
applies them on its own.
"""

from __future__ import annotations

from typing import Sequence, Union

import torch.nn.functional as F
from torch import Tensor


def as_map(attributions: Tensor, rank: int = 2) -> Tensor:
    """``(B, 1, *spatial)`` view of maps with ``rank`` spatial dimensions (1:
    signals, 2: images, 3: volumes), given as ``(B, *spatial)`` or
    ``(B, C, *spatial)``.

    Maps with several channels (e.g. input-resolution RGB attributions of
    Captum's gradient methods) are summed over channels.
    """
    if attributions.dim() == rank + 1:
        return attributions.unsqueeze(1)
    if attributions.dim() == rank + 2:
        if attributions.shape[1] != 1:
            return attributions.sum(dim=1, keepdim=True)
        return attributions
    names = {1: "(L)", 2: "(h, w)", 3: "(d, h, w)"}.get(rank, f"{rank} dims")
    raise ValueError(
        f"A map must be (B, *spatial) or (B, C, *spatial) with spatial size "
        f"{names}; got shape {tuple(attributions.shape)}."
    )


#: interpolation giving ``"bilinear"``'s half-pixel resampling in each rank
_LINEAR = {1: "linear", 2: "bilinear", 3: "trilinear"}


def upsample(
    attributions: Tensor,
    size: Union[int, Sequence[int], Tensor],
    mode: str = "bilinear",
) -> Tensor:
    r"""Resize maps to the input's size: signals, images or volumes.

    Args:
        attributions (Tensor): maps ``(B, 1, *spatial)`` or ``(B, *spatial)``
                    with 1 to 3 spatial dimensions (``(B, 1, L)``,
                    ``(B, 1, h, w)``, ``(B, 1, d, h, w)``).
        size (int, tuple or Tensor): the target size: an int (a square
                    image), a tuple of 1 to 3 ints (``(L,)``, ``(H, W)``,
                    ``(D, H, W)``), or an input batch ``(B, C, *spatial)``
                    whose size is used.
        mode (str, optional): ``"bilinear"`` (half-pixel centres, as OpenCV's
                    ``cv2.resize`` and ``captum``'s ``LayerAttribution.interpolate``
                    with ``align_corners=False``; linear on signals, trilinear
                    on volumes) or ``"nearest"``. Default: ``"bilinear"``

    Returns:
        Tensor: ``(B, 1, *size)`` on the maps' device.

    Examples::

        >>> cam = LayerGradCam(model, model.layer4).attribute(x, target=3)
        >>> heat = upsample(cam, x)          # (B, 1, 224, 224)
        >>> sig = LayerGradCam(net1d, net1d.conv).attribute(s, target=0)
        >>> upsample(sig, s).shape           # (B, 1, L) of the signal s
    """
    if isinstance(size, Tensor):
        size = tuple(size.shape[2:])
    elif isinstance(size, int):
        size = (size, size)
    size = tuple(int(s) for s in size)
    if len(size) not in _LINEAR:
        raise ValueError(
            f"size must have 1 to 3 spatial dimensions (signal, image, volume); "
            f"got {size}."
        )
    maps = as_map(attributions, len(size))
    if tuple(maps.shape[2:]) == size:
        return maps
    if mode == "nearest":
        return F.interpolate(maps, size=size, mode="nearest")
    if mode == "bilinear":
        mode = _LINEAR[len(size)]
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
    """ReLU (optional), upsample and normalise: the usual viewing pipeline
    (signals, images and volumes, as :func:`upsample`)."""
    maps = attributions
    if relu:
        maps = maps.clamp(min=0)
    return normalize(upsample(maps, size))
