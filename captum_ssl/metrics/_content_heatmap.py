"""The Content Heatmap: how much of a map's energy lies on the object.

The localisation measure of the CGC paper (Pillai et al., "Consistent
Explanations by Contrastive Learning", CVPR 2022, after TorchRay's energy-
based pointing game): the map is rectified, upsampled to the image and
min-max normalised, and the score is the fraction of its total energy inside
the union of the object's bounding boxes. Boxes come from ImageNet's or Pascal
VOC's XML annotation files (the same format), read with the standard library.
"""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from captum_ssl.metrics._common import (
    MetricInputError,
    direction,
    mark_undefined,
    prepare_maps,
)

Box = Tuple[float, float, float, float]


def read_boxes(
    path: Union[str, Path], names: Optional[Sequence[str]] = None
) -> Tuple[List[Box], Tuple[int, int]]:
    """Bounding boxes of an ImageNet / Pascal VOC XML annotation file.

    Returns ``(boxes, (height, width))``: boxes ``(xmin, ymin, xmax, ymax)``
    in 0-based pixel coordinates with exclusive ends (the files' 1-based
    inclusive corners ``xmin..xmax`` become ``xmin - 1 .. xmax``), and the
    annotated image size. ``names`` keeps only objects of those classes
    (wnids for ImageNet, class names for VOC).

    Examples::

        >>> boxes, (h, w) = read_boxes("ILSVRC2012_val_00000001.xml")
    """
    try:
        root = ET.parse(path).getroot()
    except (ET.ParseError, OSError) as err:
        raise MetricInputError(
            f"Cannot read the annotation file {path}: {err}. Pass an ImageNet or "
            "Pascal VOC XML file (<annotation> with <size> and <object>s)."
        ) from err
    size = root.find("size")
    if size is None:
        raise MetricInputError(f"{path} has no <size>: not a VOC / ImageNet file.")
    hw = (_size(path, size, "height"), _size(path, size, "width"))
    boxes: List[Box] = []
    for i, obj in enumerate(root.iter("object")):
        if names is not None and obj.findtext("name") not in names:
            continue
        what = f"{path}, <object> {i} ({obj.findtext('name')!r})"
        bb = obj.find("bndbox")
        if bb is None:
            raise MetricInputError(
                f"{what} has no <bndbox>: add its box or delete the object."
            )
        x0, y0, x1, y1 = (_coordinate(what, bb, k) for k in
                          ("xmin", "ymin", "xmax", "ymax"))  # fmt: skip
        if x0 > x1 or y0 > y1:
            raise MetricInputError(
                f"{what} has an inverted box (xmin {x0:g}, xmax {x1:g}, ymin "
                f"{y0:g}, ymax {y1:g}): xmin must be <= xmax and ymin <= ymax; "
                "fix the file (swapped corners?)."
            )
        boxes.append((x0 - 1, y0 - 1, x1, y1))
    return boxes, hw


def _size(path: Union[str, Path], size: ET.Element, key: str) -> int:
    """``<size><height>`` or ``<width>``: a positive whole number of pixels."""
    text = (size.findtext(key) or "").strip()
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (value >= 1 and value == int(value)):
        raise MetricInputError(
            f"{path}: <size><{key}> is {text!r}; it must be the image's {key} in "
            "pixels, a whole number >= 1 (fix the file)."
        )
    return int(value)


def _coordinate(what: str, box: ET.Element, key: str) -> float:
    text = box.findtext(key)
    try:
        value = math.nan if text is None else float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise MetricInputError(
            f"{what}: <bndbox> has {'no' if text is None else 'a bad'} <{key}>"
            f"{'' if text is None else f' ({text!r})'}; give all four of xmin, "
            "ymin, xmax, ymax as pixel coordinates (fix the file)."
        )
    return value


def scale_boxes(
    boxes: Sequence[Box], from_hw: Tuple[int, int], to_hw: Tuple[int, int]
) -> List[Box]:
    """Boxes of an image of size ``from_hw`` moved onto the same image resized
    to ``to_hw`` (a plain resize; for a crop, shift the boxes first)."""
    sy, sx = to_hw[0] / from_hw[0], to_hw[1] / from_hw[1]
    return [(x0 * sx, y0 * sy, x1 * sx, y1 * sy) for x0, y0, x1, y1 in boxes]


def box_mask(boxes: Sequence[Box], hw: Tuple[int, int], device=None) -> Tensor:
    """``(H, W)`` boolean mask of the union of the boxes: pixel ``(i, j)`` is
    inside when its centre ``(j + .5, i + .5)`` lies in a box."""
    ys = torch.arange(hw[0], device=device, dtype=torch.float32) + 0.5
    xs = torch.arange(hw[1], device=device, dtype=torch.float32) + 0.5
    mask = torch.zeros(hw, dtype=torch.bool, device=device)
    for x0, y0, x1, y1 in boxes:
        inside_y = (ys >= y0) & (ys < y1)
        inside_x = (xs >= x0) & (xs < x1)
        mask |= inside_y[:, None] & inside_x[None, :]
    return mask


@direction(True)
def content_heatmap(
    inputs: Tensor, attributions: Tensor, boxes: Sequence[Sequence[Box]]
) -> Tensor:
    r"""Content Heatmap (CGC paper's metric). Higher is better.

    For each image, the map is rectified (as Grad-CAM, at its own
    resolution), upsampled to the input (bilinear) and min-max normalised
    to [0, 1]; the score is

    .. math:: \mathrm{CH} = \frac{\sum_{p \in \text{boxes}} M(p)}{\sum_p M(p)}

    A constant map counts as uniform (the score is the boxes' area fraction).

    Reference: Pillai et al., "Consistent Explanations by Contrastive
    Learning", CVPR 2022 (https://arxiv.org/abs/2110.00527); TorchRay's
    energy-based pointing game.

    Args:
        inputs (Tensor): images ``(B, C, H, W)`` (their size and device).
        attributions (Tensor): maps ``(B, 1, h, w)``, ``(B, h, w)`` or
                    ``(B, C, H, W)``.
        boxes (sequence): per image, its boxes ``(xmin, ymin, xmax, ymax)`` in
                    the input's pixel coordinates (:func:`read_boxes`, then
                    :func:`scale_boxes` for a resized input).

    Returns:
        Tensor: ``(B,)`` in [0, 1] on the inputs' device; NaN, with a
        :class:`~captum_ssl.attr.NonFiniteWarning`, for an image without boxes
        (its annotation has no object of the class) or with a NaN map.

    Examples::

        >>> boxes, hw = read_boxes("n01440764_18.xml")
        >>> boxes = scale_boxes(boxes, hw, (224, 224))
        >>> content_heatmap(x, LayerGradCam(model, model.layer4).attribute(x, 0),
        ...                 [boxes])
    """
    if inputs.dim() != 4:
        raise MetricInputError(
            f"inputs must be images (B, C, H, W), got {tuple(inputs.shape)}."
        )
    if inputs.shape[0] == 0:
        raise MetricInputError("inputs is an empty batch: pass at least one image.")
    if len(boxes) != inputs.shape[0]:
        raise MetricInputError(
            f"boxes has {len(boxes)} entries for {inputs.shape[0]} images: give a "
            "list of boxes per image."
        )
    maps = prepare_maps(attributions.clamp(min=0), inputs).flatten(1)
    lo = maps.min(dim=1, keepdim=True).values
    span = maps.max(dim=1, keepdim=True).values - lo
    maps = torch.where(span > 0, (maps - lo) / span.clamp(min=1e-12), 1.0)
    hw = (inputs.shape[-2], inputs.shape[-1])
    masks = torch.stack([box_mask(b, hw, inputs.device).flatten() for b in boxes])
    empty = torch.tensor([len(b) == 0 for b in boxes], device=inputs.device)
    mark_undefined(
        empty,
        "they have no box (none of the explained class in their annotation), "
        "so there is nothing to measure; drop them or pass the right boxes.",
    )
    return (maps * masks).sum(dim=1) / maps.sum(dim=1)
