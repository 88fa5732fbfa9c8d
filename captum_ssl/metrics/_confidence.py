"""The thesis's confidence metrics on the explanation-masked image.

Following Grad-CAM++ (Chattopadhay et al., WACV 2018), the *explanation map*
input is the image multiplied by the saliency map scaled to [0, 1]; the
model's class probability on it (O) is compared with that on the image (Y).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from captum._utils.typing import TargetType
from torch import Tensor

from captum_ssl.metrics._common import (
    MetricInputError,
    ScoreType,
    direction,
    evaluate,
    prepare,
    prepare_maps,
    resolve_target,
)
from captum_ssl.viz._maps import normalize

nan = float("nan")


def explanation_masked(
    inputs: Tensor, attributions: Tensor, normalize_maps: bool = True
) -> Tensor:
    r"""The explanation-map input: ``inputs * saliency`` with saliency in [0, 1].

    Args:
        inputs (Tensor): images ``(B, C, H, W)``, as the model takes them (the
                    product is taken in the model's input space).
        attributions (Tensor): maps at any resolution that upsamples to the input.
        normalize_maps (bool, optional): min-max scale each upsampled map to
                    [0, 1] (as the thesis and Grad-CAM++); if False the maps
                    must already lie in [0, 1]. Default: True

    Returns:
        Tensor: ``(B, C, H, W)`` on the input's device.
    """
    maps = prepare_maps(attributions, inputs)
    if normalize_maps:
        maps = normalize(maps)
    elif bool((maps < 0).any()) or bool((maps > 1).any()):
        raise MetricInputError(
            "With normalize_maps=False the maps must lie in [0, 1]; pass "
            "normalize_maps=True to min-max scale each map."
        )
    return inputs * maps


def _image_and_masked(
    model: Callable,
    inputs: Tensor,
    attributions: Optional[Tensor],
    target: TargetType,
    score: ScoreType,
    batch_size: int,
    which: str,
) -> Tensor:
    """Scores ``(B, k)``: column 0 the image, column 1 the masked image."""
    x, _ = prepare(model, inputs, None)
    target = resolve_target(model, x, target, batch_size)
    views = []
    if which in ("image", "both"):
        views.append(x)
    if which in ("masked", "both"):
        if attributions is None:
            raise MetricInputError(
                "This metric compares the image with the explanation-masked image: "
                "pass attributions."
            )
        views.append(explanation_masked(x, attributions))

    def make_batch(b_idx: Tensor, j_idx: Tensor) -> Tensor:
        if len(views) == 1:
            return views[0][b_idx]
        return torch.where(j_idx.view(-1, 1, 1, 1) == 0, x[b_idx], views[1][b_idx])

    return evaluate(model, x, target, len(views), make_batch, score, batch_size)


@direction(True)
def class_probability(
    model: Callable,
    inputs: Tensor,
    attributions: Optional[Tensor] = None,
    target: TargetType = None,
    score: ScoreType = "probability",
    batch_size: int = 64,
) -> Tensor:
    r"""Class probability on the image, or on the explanation-masked image.

    With ``attributions=None`` the score of ``target`` on ``inputs``; with maps,
    on :func:`explanation_masked` ``(inputs, attributions)`` (the thesis's
    "confidence on the explanation map"). Higher is better for the masked
    image. Cost: one forward pass per image.

    Args:
        model (Callable): the classifier ``(B, C, H, W) -> (B, K)``.
        inputs (Tensor): images ``(B, C, H, W)``.
        attributions (Tensor, optional): maps; ``None`` scores the image itself.
        target (optional): class per image; ``None`` = top-1 class on the image.
        score (str or callable, optional): Default: "probability"
        batch_size (int, optional): Default: 64

    Returns:
        Tensor: ``(B,)`` on the model's device.

    Examples::

        >>> class_probability(model, x, None, y).mean()     # on the images
        >>> class_probability(model, x, cam, y).mean()      # on image x map
    """
    which = "image" if attributions is None else "masked"
    out = _image_and_masked(
        model, inputs, attributions, target, score, batch_size, which
    )
    return out[:, 0]


@direction(True)
def accuracy(
    model: Callable,
    inputs: Tensor,
    attributions: Optional[Tensor] = None,
    target: TargetType = None,
    batch_size: int = 64,
) -> Tensor:
    r"""Top-1 correctness (1.0 / 0.0) on the image or the explanation-masked image.

    As :func:`class_probability` with ``score="accuracy"``; the mean over
    images is the accuracy the thesis reports. With ``target=None`` the
    reference is the prediction on the unmasked image (so the score on the
    image itself is 1).

    Returns:
        Tensor: ``(B,)`` of 0.0 / 1.0 on the model's device.
    """
    return class_probability(
        model, inputs, attributions, target, "accuracy", batch_size
    )


@direction(False)
def average_drop(
    model: Callable,
    inputs: Tensor,
    attributions: Tensor,
    target: TargetType = None,
    score: ScoreType = "probability",
    batch_size: int = 64,
) -> Tensor:
    r"""Average Drop (Chattopadhay et al., Grad-CAM++, WACV 2018). Lower is better.

    Per image ``max(0, Y - O) / Y``, with ``Y`` the class probability on the
    image and ``O`` on the explanation-masked image (:func:`explanation_masked`).
    The mean over images is Average Drop (papers print it x100, in %).
    Cost: two forward passes per image (batched together).

    Args:
        model, inputs, attributions, target: as in :func:`class_probability`.
        score (str or callable, optional): Default: "probability"
        batch_size (int, optional): Default: 64

    Returns:
        Tensor: ``(B,)`` in [0, 1] on the model's device.

    Examples::

        >>> 100 * average_drop(model, x, cam, y).mean()
    """
    s = _image_and_masked(
        model, inputs, attributions, target, score, batch_size, "both"
    )
    y, o = s[:, 0], s[:, 1]
    return (y - o).clamp(min=0) / y


@direction(True)
def average_increase(
    model: Callable,
    inputs: Tensor,
    attributions: Tensor,
    target: TargetType = None,
    score: ScoreType = "probability",
    batch_size: int = 64,
) -> Tensor:
    r"""Increase in Confidence (Grad-CAM++, WACV 2018). Higher is better.

    Per image the indicator ``O > Y`` (1.0 or 0.0), with ``Y`` the class
    probability on the image and ``O`` on the explanation-masked image; the
    mean over images is Average Increase (x100 in papers). Cost: two forward
    passes per image.

    Returns:
        Tensor: ``(B,)`` of 0.0 / 1.0 on the model's device.
    """
    s = _image_and_masked(
        model, inputs, attributions, target, score, batch_size, "both"
    )
    up = (s[:, 1] > s[:, 0]).to(s.dtype)
    return torch.where(torch.isnan(s).any(dim=1), torch.full_like(up, nan), up)
