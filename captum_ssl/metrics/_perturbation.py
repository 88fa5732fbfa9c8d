"""Deletion / insertion (RISE) and positive / negative perturbation AUC (Chefer).

All three move pixels, in saliency order, from a start image to an end image
and score the model after each step. The perturbed copies of every (image,
step) pair are built on the fly from one rank map per image and evaluated in
chunks of ``batch_size``, so the cost is the ``steps + 1`` forward passes per
image the protocols need and nothing else.
"""

from __future__ import annotations

from typing import Callable, Sequence, Union

import torch
from captum._utils.typing import TargetType
from torch import Tensor

from captum_ssl.metrics._common import (
    MetricInputError,
    ScoreType,
    SubstrateType,
    direction,
    evaluate,
    first_k_mask,
    fraction_grid,
    metric_call,
    n_steps,
    normalized_auc,
    prepare,
    ranks,
    resolve_target,
    substrate,
)


@metric_call
def perturbation_curve(
    model: Callable,
    inputs: Tensor,
    attributions: Tensor,
    target: TargetType,
    counts: Union[Sequence[int], Tensor],
    start: SubstrateType = "input",
    end: SubstrateType = "zero",
    descending: bool = True,
    score: ScoreType = "probability",
    batch_size: int = 64,
    show_progress: bool = False,
) -> Tensor:
    r"""Scores after moving the first ``counts[j]`` pixels from ``start`` to ``end``.

    Pixels are taken in the order of ``attributions`` (most salient first when
    ``descending``); all channels of a pixel move together. Point ``j`` of the
    curve shows image ``start`` with its ``counts[j]`` first pixels replaced by
    those of ``end``.

    Args:
        model (Callable): the classifier, ``(B, C, H, W) -> (B, K)``.
        inputs (Tensor): images ``(B, C, H, W)``.
        attributions (Tensor): one map per image, any resolution that upsamples
                    to the input (``(B, 1, h, w)``, ``(B, h, w)`` or ``(B, C, H, W)``).
        target (int, tuple, Tensor or list): class per image; ``None`` uses
                    the model's top-1 class on ``inputs``.
        counts (sequence of int): number of moved pixels at each point.
        start, end (str, float, Tensor or callable): ``"input"`` (the images),
                    or a substrate (see :func:`~captum_ssl.metrics.substrate`).
        descending (bool): most salient pixels first. Default: True
        score (str or callable): ``"probability"``, ``"logit"``,
                    ``"accuracy"`` or a callable output -> scores.
        batch_size (int): perturbed images per forward pass. Default: 64
        show_progress (bool, optional): print a progress bar of the forward
                    passes (on stderr). Default: False

    Returns:
        Tensor: ``(B, len(counts))`` scores on the model's device.
    """
    x, maps = prepare(model, inputs, attributions)
    target = resolve_target(model, x, target, batch_size)
    a = x if start == "input" else substrate(x, start)
    b = x if end == "input" else substrate(x, end)
    rank = ranks(maps, descending=descending)
    counts = torch.as_tensor(counts, dtype=torch.long, device=x.device)
    hw = (x.shape[2], x.shape[3])

    def rows(t: Tensor, b_idx: Tensor) -> Tensor:
        return t[b_idx] if t.shape[0] > 1 else t

    def make_batch(b_idx: Tensor, j_idx: Tensor) -> Tensor:
        moved = first_k_mask(rank[b_idx], counts[j_idx], hw)
        return torch.where(moved, rows(b, b_idx), rows(a, b_idx))

    return evaluate(
        model, x, target, len(counts), make_batch, score, batch_size,
        show_progress, "perturbed images",
    )  # fmt: skip


def _rise_counts(inputs: Tensor, step: int) -> Tensor:
    hw = (inputs.shape[-2], inputs.shape[-1])
    n = n_steps(hw, step)
    return torch.clamp(torch.arange(n + 1) * int(step), max=hw[0] * hw[1])


@direction(False)
def deletion_auc(
    model: Callable,
    inputs: Tensor,
    attributions: Tensor,
    target: TargetType = None,
    step: int = 224,
    substrate: SubstrateType = "zero",
    score: ScoreType = "probability",
    batch_size: int = 64,
    return_curve: bool = False,
    show_progress: bool = False,
) -> Tensor:
    r"""Deletion AUC (Petsiuk et al., RISE, BMVC 2018). Lower is better.

    The most salient ``step`` pixels are replaced by the substrate (zero by
    default) at each step, from the intact image until no pixel is left
    (``ceil(H*W / step)`` steps); the class probability after each step forms
    a curve whose trapezoid area, with the x-axis scaled to [0, 1], is the
    score. A faithful map makes the probability drop fast (low AUC).

    Cost: ``ceil(H*W / step) + 1`` forward passes per image, ``batch_size``
    copies per pass. The thesis used ``step=224`` (225 passes at 224x224:
    seconds per image on a GPU, up to minutes on a CPU, where
    ``show_progress=True`` shows how far it is); a larger step is
    proportionally cheaper and coarser.

    Args:
        model (Callable): the classifier, ``(B, C, H, W) -> (B, K)``.
        inputs (Tensor): images ``(B, C, H, W)`` as the model takes them.
        attributions (Tensor): maps ``(B, 1, h, w)``, ``(B, h, w)`` or
                    ``(B, C, H, W)``; upsampled bilinearly to the input.
        target (int, tuple, Tensor or list, optional): class per image;
                    ``None`` uses the model's top-1 class (one more pass).
        step (int, optional): pixels removed per step. Default: 224
        substrate (str, float, Tensor or callable, optional): what removed
                    pixels become, in the model's input space. Default: "zero"
        score (str or callable, optional): ``"probability"`` (softmax),
                    ``"logit"``, ``"accuracy"`` or a callable. Default: "probability"
        batch_size (int, optional): perturbed images per forward pass. Default: 64
        return_curve (bool, optional): return the ``(B, steps + 1)`` curve
                    instead of its area. Default: False
        show_progress (bool, optional): print a progress bar of the forward
                    passes (on stderr). Default: False

    Returns:
        Tensor: ``(B,)`` AUC in [0, 1] for probabilities, on the model's device.

    Examples::

        >>> cam = LayerGradCam(model, model.layer4).attribute(x, target=y)
        >>> deletion_auc(model, x, cam, y, step=224).mean()
    """
    counts = _rise_counts(inputs, step)
    curve = perturbation_curve(
        model, inputs, attributions, target, counts, "input", substrate,
        True, score, batch_size, show_progress,
    )  # fmt: skip
    return curve if return_curve else normalized_auc(curve)


@direction(True)
def insertion_auc(
    model: Callable,
    inputs: Tensor,
    attributions: Tensor,
    target: TargetType = None,
    step: int = 224,
    substrate: SubstrateType = "blur",
    score: ScoreType = "probability",
    batch_size: int = 64,
    return_curve: bool = False,
    show_progress: bool = False,
) -> Tensor:
    r"""Insertion AUC (Petsiuk et al., RISE, BMVC 2018). Higher is better.

    Starts from the substrate (the image blurred as in RISE's code: its
    11 x 11 kernel, sigma 5, zero padding; see
    :func:`~captum_ssl.metrics.rise_kernel`; ``substrate="blur_gaussian"``
    takes a normalised Gaussian truncated to the window instead) and puts
    back the most salient
    ``step`` pixels of the image at each step until the image is whole; the
    trapezoid area of the class-probability curve (x-axis scaled to [0, 1])
    is the score. A faithful map makes the probability rise fast (high AUC).

    Cost: ``ceil(H*W / step) + 1`` forward passes per image. Arguments as in
    :func:`deletion_auc`, except ``substrate`` (default ``"blur"``) is the
    starting image.

    Returns:
        Tensor: ``(B,)`` AUC, or the ``(B, steps + 1)`` curve.

    Examples::

        >>> insertion_auc(model, x, cam, y, step=224).mean()
    """
    counts = _rise_counts(inputs, step)
    curve = perturbation_curve(
        model, inputs, attributions, target, counts, substrate, "input",
        True, score, batch_size, show_progress,
    )  # fmt: skip
    return curve if return_curve else normalized_auc(curve)


MODES = {"positive": True, "negative": False}


@direction(("mode", {"positive": False, "negative": True}))
def perturbation_auc(
    model: Callable,
    inputs: Tensor,
    attributions: Tensor,
    target: TargetType = None,
    mode: str = "positive",
    fractions: Sequence[float] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9),
    score: ScoreType = "accuracy",
    substrate: SubstrateType = "zero",
    batch_size: int = 64,
    return_curve: bool = False,
    show_progress: bool = False,
) -> Tensor:
    r"""Positive / negative perturbation AUC (Chefer et al., CVPR 2021).

    ``mode="positive"`` removes the most relevant pixels first (lower is
    better); ``"negative"`` the least relevant first (higher is better).
    ``int(f * H * W)`` pixels are set to the substrate for each fraction ``f``
    (10%..90%); the score (top-1 accuracy against ``target`` by default, or
    the class probability) at 0% and at each fraction forms a curve whose
    trapezoid area over the fraction axis is returned: in [0, 0.9] with the
    default fractions. The paper reports the mean over images x100 (e.g.
    54.16 negative, 17.03 positive for its method on ViT-B).

    Their code zeroes pixels of the [0, 1] image before normalisation, i.e.
    removed pixels are black; here the substrate lives in the model's input
    space: pass ``substrate=(0 - mean) / std`` as a ``(C, 1, 1)`` tensor to
    reproduce that, or keep ``"zero"`` (the normalised mean colour).

    Cost: ``len(fractions) + 1`` forward passes per image.

    Args:
        model, inputs, attributions, target: as in :func:`deletion_auc`
                    (``target`` should be the label for the paper's protocol).
        mode (str, optional): ``"positive"`` or ``"negative"``. Default: "positive"
        fractions (sequence of float, optional): removed fractions, increasing,
                    in (0, 1). Default: 0.1, ..., 0.9
        score (str or callable, optional): Default: "accuracy"
        substrate (optional): Default: "zero"
        batch_size (int, optional): Default: 64
        return_curve (bool, optional): return ``(B, len(fractions) + 1)``
                    scores (the first at 0%). Default: False
        show_progress (bool, optional): print a progress bar of the forward
                    passes (on stderr). Default: False

    Returns:
        Tensor: ``(B,)`` per-image AUC on the model's device.

    Examples::

        >>> neg = perturbation_auc(model, x, cam, labels, mode="negative")
        >>> 100 * neg.mean()      # the number the paper reports
    """
    if mode not in MODES:
        raise MetricInputError(f"mode={mode!r}: use 'positive' or 'negative'.")
    fraction_grid(fractions)  # validates
    hw = inputs.shape[-2] * inputs.shape[-1]
    counts = [0] + [
        int(float(f) * hw) for f in fractions
    ]  # as Chefer's int(f * 224**2)
    curve = perturbation_curve(
        model, inputs, attributions, target, counts, "input", substrate,
        MODES[mode], score, batch_size, show_progress,
    )  # fmt: skip
    if return_curve:
        return curve
    xs = torch.tensor([0.0] + [float(f) for f in fractions], device=curve.device)
    return torch.trapezoid(curve, x=xs, dim=1)
