"""ARCC and its parts: Complexity, Coherency and ROAD (combined MoRF / LeRF).

The combination of pytorch-grad-cam 1.5.7's ``metrics.arcc`` (introduced with
RefineCAM, arXiv:2605.14641); Complexity and Coherency after Rebuffi et al.'s
"AR" scores (arXiv:2104.10252). Maps are taken as pytorch-grad-cam's are:
ReLU'd, at the input's size and min-max normalised per image.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Optional, Sequence

import torch
from captum._utils.typing import TargetType
from torch import Tensor

from captum_ssl.attr._cam.multi_cams import _heatmap
from captum_ssl.metrics._common import (
    MetricInputError,
    ScoreType,
    direction,
    evaluate,
    explainer,
    generator_for,
    prepare,
    resolve_target,
)
from captum_ssl.metrics._road import noisy_linear_imputation
from captum_ssl.viz._maps import as_map, normalize


def _heat(maps: Tensor) -> Tensor:
    """Maps at input size as pytorch-grad-cam returns them: ReLU, min-max."""
    return normalize(maps.clamp(min=0))


@direction(False)
def complexity(
    model: Any,
    inputs: Tensor,
    attributions: Tensor,
    target: TargetType = None,
) -> Tensor:
    r"""Complexity: the mean absolute value of the normalised map. Lower is
    better (a sparse map).

    .. math:: \mathrm{Complexity} = \frac{1}{HW}\sum_{ij} |S_{ij}|

    with :math:`S` the map ReLU'd, resized (bilinear) to the input and min-max
    normalised to ``[0, 1]``: 0 for an empty map, 1 for a uniform one (a
    constant positive map, which min-max scaling alone would make 0 and so
    score best; pytorch-grad-cam's ``Complexity`` gives 0 there).

    Reference: pytorch-grad-cam 1.5.7's ``metrics.arcc.Complexity``; after
    Rebuffi et al., https://arxiv.org/abs/2104.10252

    Args:
        model (Callable): the classifier (only its device is used).
        inputs (Tensor): images ``(B, C, H, W)``.
        attributions (Tensor): maps ``(B, 1, h, w)``, ``(B, h, w)`` or
                    ``(B, C, H, W)``.
        target: unused (kept for the common call shape).

    Returns:
        Tensor: ``(B,)`` on the model's device.

    Examples::

        >>> cam = LayerGradCam(model, model.layer4).attribute(x, target=y)
        >>> complexity(model, x, cam)
    """
    _, maps = prepare(model, inputs, attributions)
    flat = maps.clamp(min=0).flatten(1)  # type: ignore[union-attr]
    hi, lo = flat.max(dim=1).values, flat.min(dim=1).values
    uniform = (hi > 0) & (hi - lo <= 1e-5 * hi)  # every pixel equally salient
    value = _heat(maps).abs().flatten(1).mean(dim=1)
    return torch.where(uniform, torch.ones_like(value), value)


def _pearson_01(a: Tensor, b: Tensor) -> Tensor:
    """``(r + 1) / 2`` of the per-sample Pearson correlation (sample standard
    deviations plus ``1e-8`` in the denominator, as pytorch-grad-cam)."""
    a, b = a.flatten(1).double(), b.flatten(1).double()
    n = a.shape[1]
    a = a - a.mean(dim=1, keepdim=True)
    b = b - b.mean(dim=1, keepdim=True)
    cov = (a * b).sum(dim=1) / (n - 1)
    sa = (a.pow(2).sum(dim=1) / (n - 1)).sqrt()
    sb = (b.pow(2).sum(dim=1) / (n - 1)).sqrt()
    return ((cov / (sa * sb + 1e-8) + 1) / 2).float()


@direction(True)
def coherency(
    model: Any,
    inputs: Tensor,
    attributions: Tensor,
    target: TargetType = None,
    method: Any = None,
    batch_size: int = 64,
    **attribute_kwargs: Any,
) -> Tensor:
    r"""Coherency: does the method explain the image it highlighted the same
    way? Higher is better.

    The images are multiplied by their normalised maps :math:`S` (ReLU,
    resize, min-max), the method explains the masked images, and the score is
    the Pearson correlation of the two maps mapped to ``[0, 1]``:
    :math:`(\rho(S, S') + 1) / 2`.

    Since the masked images must be explained anew, it takes the method too: a
    Captum / captum_ssl attribution object (called as
    ``method.attribute(x, target=target, **attribute_kwargs)``) or a callable
    ``(inputs, target) -> maps``. Cost: one explanation of the batch.

    Reference: pytorch-grad-cam 1.5.7's ``metrics.arcc.Coherency``; after
    Rebuffi et al., https://arxiv.org/abs/2104.10252

    Args:
        model (Callable): the classifier.
        inputs (Tensor): images ``(B, C, H, W)``.
        attributions (Tensor): the method's maps of ``inputs``.
        target (optional): class per image; ``None`` = top-1 class.
        method (attribution object or callable): the explanation method.
        batch_size (int, optional): images per forward pass when ``target``
                    is ``None``. Default: 64
        **attribute_kwargs: passed to ``method.attribute``.

    Returns:
        Tensor: ``(B,)`` in ``[0, 1]`` on the model's device.

    Examples::

        >>> cam = LayerGradCamPlusPlus(model, model.layer4)
        >>> maps = cam.attribute(x, target=y)
        >>> coherency(model, x, maps, y, method=cam)
    """
    if method is None:
        raise MetricInputError(
            "coherency re-explains the masked images: pass method=<the "
            "attribution object or a callable (inputs, target) -> maps>."
        )
    x, maps = prepare(model, inputs, attributions)
    target = resolve_target(model, x, target, batch_size)
    heat = _heat(maps)  # type: ignore[arg-type]
    # a non-finite map's image scores NaN (metric_call); it is re-explained
    # unmasked so that the method does not refuse the whole batch
    heat = torch.where(torch.isfinite(heat), heat, torch.ones_like(heat))
    again = explainer(method, **attribute_kwargs)(x * heat, target)
    if isinstance(again, tuple):
        again = again[0]
    # min-max before and after resizing, as pytorch-grad-cam's maps: the first
    # matters for maps whose range is near normalize's 1e-7 guard
    again = as_map(again.detach().to(x.device, torch.float32))
    return _pearson_01(_heatmap(again, x), heat)


def _percentile(values: Tensor, p: float) -> Tensor:
    """Per-row ``p``-th percentile of ``(B, n)``, computed as
    ``numpy.percentile`` (linear): the index ``p / 100 * (n - 1)`` in double
    precision, the lerp in the values' dtype, from the nearer end. (Where the
    index is an integer only in exact arithmetic, ``torch.quantile`` can land
    on the other side of a pixel value and remove one pixel more or less.)"""
    s = torch.sort(values, dim=1).values
    n = s.shape[1]
    index = p / 100.0 * (n - 1)
    lo = int(math.floor(index))
    hi = min(lo + 1, n - 1)
    t = torch.tensor(index - lo, dtype=s.dtype, device=s.device)
    a, b = s[:, lo], s[:, hi]
    if index - lo < 0.5:
        return a + (b - a) * t
    return b - (b - a) * (1 - t)


@direction(True)
def road_combined(
    model: Any,
    inputs: Tensor,
    attributions: Tensor,
    target: TargetType = None,
    percentiles: Sequence[float] = (20, 40, 60, 80),
    score: ScoreType = "probability",
    noise: float = 0.01,
    seed: Optional[int] = 0,
    generator: Optional[torch.Generator] = None,
    batch_size: int = 64,
    show_progress: bool = False,
) -> Tensor:
    r"""pytorch-grad-cam's ``ROADCombined``: ``(LeRF - MoRF) / 2``, each the
    mean over ``percentiles`` of the change of the target score when pixels
    are removed by noisy linear imputation. Higher is better.

    At percentile ``p`` MoRF removes the pixels whose normalised map value is
    at least the map's ``p``-th percentile (linear interpolation, as
    ``numpy.percentile``), LeRF those at least the ``p``-th percentile of
    ``1 - map``; so ``p = 20`` removes about 80% of the pixels, and more
    where values tie at the percentile. Where that removes every pixel
    (nothing to impute from) the image scores NaN, with a warning. (This differs
    from :func:`road`, which removes a fraction ``p`` of the pixels by rank
    and reports the score itself.)

    Args:
        model, inputs, attributions, target: as :func:`complexity`.
        percentiles (sequence of float, optional): in ``(0, 100)``.
                    Default: (20, 40, 60, 80), as ARCC.
        score (str or callable, optional): ``"probability"`` (softmax, as
                    pytorch-grad-cam's ``ClassifierOutputSoftmaxTarget``),
                    ``"logit"`` (its ``ClassifierOutputTarget``) or a callable.
                    Default: "probability"
        noise (float, optional): imputation noise std. Default: 0.01
        seed, generator: for the noise.
        batch_size (int, optional): Default: 64
        show_progress (bool, optional): print a progress bar of the forward
                    passes (on stderr). Default: False

    Returns:
        Tensor: ``(B,)`` on the model's device.
    """
    if not percentiles or any(not 0 < float(p) < 100 for p in percentiles):
        raise MetricInputError(
            f"percentiles must be values in (0, 100), got {list(percentiles)}."
        )
    x, maps = prepare(model, inputs, attributions)
    target = resolve_target(model, x, target, batch_size)
    heat = _heat(maps)[:, 0]  # type: ignore[index]
    removed = []
    for m in (heat, 1 - heat):  # MoRF, LeRF
        flat = m.flatten(1)
        thr = torch.stack([_percentile(flat, float(p)) for p in percentiles])
        removed.append(m[None] >= thr[:, :, None, None])  # (P, B, H, W)
    masks = torch.cat(removed).transpose(0, 1)  # (B, 2P, H, W)
    everything = masks.flatten(2).all(dim=2)  # (B, 2P)
    if bool(everything.any()):
        warnings.warn(
            "road_combined: at some percentile a map's value is tied over all "
            "remaining pixels (e.g. zeros after ReLU), so the percentile rule "
            "removes every pixel and nothing is left to impute from; those "
            "images score NaN (pytorch-grad-cam's solver is singular there too). "
            "Use higher percentiles or maps without large constant areas.",
            stacklevel=2,
        )
    gen = generator_for(x.device, seed, generator)

    def make_batch(b_idx: Tensor, j_idx: Tensor) -> Tensor:
        out = x[b_idx].clone()
        perturbed = j_idx > 0
        if bool(perturbed.any()):
            b, j = b_idx[perturbed], j_idx[perturbed] - 1
            filled = torch.full_like(x[b], float("nan"))
            ok = ~everything[b, j]
            if bool(ok.any()):
                filled[ok] = noisy_linear_imputation(
                    x[b[ok]], masks[b[ok], j[ok]], noise, gen
                )
            out[perturbed] = filled
        return out

    n = len(percentiles)
    scores = evaluate(
        model, x, target, 1 + 2 * n, make_batch, score, batch_size,
        show_progress, "ROAD combined",
    )  # fmt: skip
    change = scores[:, 1:] - scores[:, :1]
    return (change[:, n:].mean(dim=1) - change[:, :n].mean(dim=1)) / 2


MEANS = ("harmonic", "geometric")


@direction(True)
def arcc(
    model: Any,
    inputs: Tensor,
    attributions: Tensor,
    target: TargetType = None,
    method: Any = None,
    percentiles: Sequence[float] = (20, 40, 60, 80),
    score: ScoreType = "probability",
    noise: float = 0.01,
    seed: Optional[int] = 0,
    generator: Optional[torch.Generator] = None,
    batch_size: int = 64,
    mean: str = "harmonic",
    **attribute_kwargs: Any,
) -> Tensor:
    r"""ARCC: Complexity, Coherency and ROAD in one score. Higher is better.

    With :math:`C` = :func:`coherency`, :math:`1 - X` (:math:`X` =
    :func:`complexity`) and :math:`R` = ``clip(2 *`` :func:`road_combined`
    ``, 0, 1)``:

    .. math:: \mathrm{ARCC} = 3\Big(\frac{1}{C + \epsilon} +
              \frac{1}{1 - X + \epsilon} + \frac{1}{R + \epsilon}\Big)^{-1},
              \quad \epsilon = 10^{-8}

    pytorch-grad-cam 1.5.7 documents ARCC as the *geometric* mean of the three
    but computes this *harmonic* mean; ``mean="harmonic"`` (the default) gives
    its values, ``mean="geometric"`` :math:`(C (1 - X) R)^{1/3}`.
    Cost: one explanation of the masked batch (Coherency) plus
    ``1 + 2 * len(percentiles)`` forward passes and ``2 * len(percentiles)``
    sparse solves per image (ROAD).

    Reference: pytorch-grad-cam 1.5.7's ``metrics.arcc.ARCC``; RefineCAM,
    https://arxiv.org/abs/2605.14641

    Args:
        model, inputs, attributions, target: as :func:`coherency`.
        method (attribution object or callable): the method that made the
                    maps (for Coherency).
        percentiles, score, noise, seed, generator, batch_size: as
                    :func:`road_combined`.
        mean (str, optional): ``"harmonic"`` or ``"geometric"``.
                    Default: "harmonic"
        **attribute_kwargs: passed to ``method.attribute``.

    Returns:
        Tensor: ``(B,)`` in ``[0, 1]`` on the model's device.

    Examples::

        >>> cam = LayerGradCamPlusPlus(model, model.layer4)
        >>> maps = cam.attribute(x, target=y)
        >>> arcc(model, x, maps, y, method=cam)
    """
    if mean not in MEANS:
        raise MetricInputError(f"mean={mean!r}: use one of {MEANS}.")
    x, maps = prepare(model, inputs, attributions)
    target = resolve_target(model, x, target, batch_size)
    cx = complexity(model, x, maps)
    coh = coherency(model, x, maps, target, method, batch_size, **attribute_kwargs)
    road = road_combined(
        model, x, maps, target, percentiles, score, noise, seed, generator, batch_size
    )
    road = (2 * road).clamp(0, 1)
    if mean == "geometric":
        return (coh * (1 - cx) * road).clamp(min=0) ** (1 / 3)
    eps = 1e-8
    return 3 / (1 / (coh + eps) + 1 / ((1 - cx) + eps) + 1 / (road + eps))
