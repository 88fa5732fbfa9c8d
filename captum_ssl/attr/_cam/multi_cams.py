"""CAMs that are not single-layer: FullGrad (every bias), RefineCAM (several
layers) and SESS (a wrapper over any CAM, on many crops).

They return maps at the input's resolution ``(B, 1, H, W)``; what each adds to
Captum's layer-attribution conventions is said in its docstring.
"""

from __future__ import annotations

from typing import Any, Callable, List, Optional, Sequence, Tuple, Type, Union

import torch
import torch.nn.functional as F
from captum._utils.common import _run_forward
from captum._utils.typing import TargetType
from captum.attr import Attribution, GradientAttribution, LayerAttribution
from captum.log import log_usage
from torch import Tensor, nn

from captum_ssl._outputs import model_output
from captum_ssl.attr._cam.gradient_cams import LayerGradCamPlusPlus
from captum_ssl.attr._core import (
    AttributionInputError,
    TensorOrTuple,
    attribution_call,
    check_layer,
    check_not_compiled,
    eval_mode,
    finish_maps,
    format_inputs,
    input_hw,
    layer_errors,
    per_sample_targets,
    record_from_layer_only,
    rows,
    selecting_forward,
    stack_targets,
    target_scores,
    working_dtype,
)
from captum_ssl.attr._layout import TokenLayout, layout_for, root_module
from captum_ssl.viz._maps import normalize, upsample


def _image_batch(
    inputs: TensorOrTuple, who: str, forward_func: Callable, needs_grad: bool = True
) -> Tuple[Tensor, ...]:
    inputs = format_inputs(inputs, needs_grad, forward_func)
    if inputs[0].dim() != 4:
        raise AttributionInputError(
            f"{who} returns maps at the image's resolution and needs an image "
            f"batch (B, C, H, W) as the first input; got {tuple(inputs[0].shape)}."
        )
    return inputs


def _heatmap(maps: Tensor, size: Any) -> Tensor:
    """ReLU, min-max, bilinear resize to ``size``, min-max: each map in
    ``[0, 1]`` (the order pytorch-grad-cam uses; the first min-max matters for
    maps whose range is near the ``1e-7`` guard)."""
    return normalize(upsample(normalize(maps.clamp(min=0)), size))


def _per_map_normalize(t: Tensor) -> Tensor:
    """Min-max normalise every ``(h, w)`` map of ``(B, C, h, w)`` separately."""
    b, c = t.shape[:2]
    return normalize(t.reshape(b * c, 1, *t.shape[2:])).reshape(t.shape)


# ------------------------------------------------------------------- FullGrad
def _bias_layers(model: nn.Module) -> List[nn.Module]:
    return [
        m
        for m in model.modules()
        if type(m) in (nn.Conv2d, nn.BatchNorm2d) and m.bias is not None
    ]


def _effective_bias(layer: nn.Module) -> Tensor:
    """The bias a layer adds to its output (batch norm folded, in eval mode)."""
    if isinstance(layer, nn.modules.batchnorm._BatchNorm) and (
        layer.running_mean is not None and not layer.training
    ):
        var = layer.running_var
        if isinstance(var, Tensor) and isinstance(layer.weight, Tensor):
            scale = layer.weight / torch.sqrt(var + layer.eps)
            return (layer.bias - layer.running_mean * scale).detach()
    bias = getattr(layer, "bias", None)
    if not isinstance(bias, Tensor):
        raise AttributionInputError(
            f"FullGrad: the layer {layer.__class__.__name__} has no bias; pass "
            "layers whose `bias` is a tensor (Conv2d, BatchNorm2d, Linear, "
            "LayerNorm)."
        )
    return bias.detach()


class FullGrad(GradientAttribution):
    r"""FullGrad: input-gradient plus bias-gradient maps of every layer.

    .. math:: S(x) = \psi\big(|\nabla_x y^c \odot x|\big) + \sum_{l}\sum_{k}
              \psi\big(|\nabla_{z_l} y^c \odot b_l|_k\big)

    where :math:`z_l` is the output of a layer with bias :math:`b_l` (batch
    norm folded into an effective bias :math:`\beta - \mu\gamma/\sigma`) and
    :math:`\psi` min-max normalises each channel's map and resizes it
    (bilinear) to the input. Input-gradient channels are summed too.

    Differences from Captum's layer methods, and why: FullGrad is defined on
    *all* biases of the network, so it takes no single ``layer`` but an
    optional list ``layers`` (by default every ``Conv2d`` and ``BatchNorm2d``
    with a bias, as the paper and pytorch-grad-cam); it needs the gradient at
    the input as well, so it is a :class:`~captum.attr.GradientAttribution`,
    and it returns ``(B, 1, H, W)`` at the input's resolution. Its per-channel
    normalisation :math:`\psi` is part of the method's definition, not a
    display step. Token layers (``nn.Linear`` / ``nn.LayerNorm`` of a ViT)
    may be listed: their outputs are laid out on the patch grid.

    Reference: Srinivas & Fleuret, "Full-Gradient Representation for Neural
    Network Visualization", NeurIPS 2019. https://arxiv.org/abs/1905.00780

    Args:
        forward_func (Callable): the model or any function returning scores.
        layers (list[torch.nn.Module], optional): the layers whose bias
                    gradients are used; ``None`` takes every ``Conv2d`` /
                    ``BatchNorm2d`` with a bias of the model. Default: None
        layout (TokenLayout, optional): layout of token / channels-last
                    layers among ``layers``. Default: None

    Examples::

        >>> fullgrad = FullGrad(model)
        >>> attr = fullgrad.attribute(images, target=[281, 285])  # (2, 1, 224, 224)
    """

    def __init__(
        self,
        forward_func: Callable,
        layers: Optional[Sequence[nn.Module]] = None,
        layout: Optional[TokenLayout] = None,
    ) -> None:
        super().__init__(forward_func)
        model = root_module(forward_func)
        check_not_compiled(model)
        if isinstance(layers, str):
            check_layer(forward_func, layers)  # an error naming get_submodule
        for lay in layers or []:
            check_layer(forward_func, lay)
        if layers is None:
            if model is None:
                raise AttributionInputError(
                    "FullGrad finds the bias layers on the model: pass the model "
                    "itself as forward_func, or layers=[...] explicitly."
                )
            layers = _bias_layers(model)
        self.layers = list(layers)
        self.layout = layout

    @log_usage()
    def attribute(
        self,
        inputs: TensorOrTuple,
        target: TargetType = None,
        additional_forward_args: Any = None,
    ) -> Tensor:
        r"""
        Args:
            inputs (Tensor or tuple[Tensor, ...]): image batch ``(B, C, H, W)``
                        first.
            target (int, tuple, Tensor or list, optional): output index per
                        sample. Default: None
            additional_forward_args (Any, optional): extra forward arguments.

        Returns:
            Tensor: ``(B, 1, H, W)`` maps on the input's device.
        """
        inputs = _image_batch(inputs, "FullGrad", self.forward_func)
        with attribution_call(self.forward_func) as record:
            total = self._full_gradient(inputs, target, additional_forward_args)
            return finish_maps((total,), record)[0]

    def _full_gradient(
        self,
        inputs: Tuple[Tensor, ...],
        target: TargetType,
        additional_forward_args: Any,
    ) -> Tensor:
        x = inputs[0].detach().requires_grad_()
        hw = input_hw(inputs)
        captured: List[Tuple[nn.Module, Tensor]] = []

        def hook_for(layer: nn.Module) -> Callable:
            def hook(_m: nn.Module, _inp: Any, out: Any) -> None:
                if isinstance(out, Tensor) and out.requires_grad:
                    captured.append((layer, out))

            return hook

        handles = [
            layer.register_forward_hook(hook_for(layer)) for layer in self.layers
        ]
        try:
            with layer_errors(
                self.layers[0] if self.layers else nn.Identity(), self.forward_func
            ):
                with record_from_layer_only(self.forward_func), torch.enable_grad():
                    out = _run_forward(
                        selecting_forward(self.forward_func, target),
                        (x,) + tuple(inputs[1:]),
                        None,
                        additional_forward_args,
                    )
                    grads = torch.autograd.grad(
                        out.sum(), [x] + [t for _, t in captured]
                    )
        finally:
            for h in handles:
                h.remove()
        total = _per_map_normalize((grads[0] * x).detach().abs()).sum(
            dim=1, keepdim=True
        )
        for (layer, _), g in zip(captured, grads[1:]):
            lay = layout_for(self.forward_func, layer, hw, self.layout).resolve(g.shape)
            bias = _effective_bias(layer).to(g.dtype)
            shape = [1] * g.dim()
            shape[1 if lay.channels_first else -1] = -1
            grid = lay.to_grid((g * bias.view(shape)).abs())
            # the sum of the upsampled channel maps is the upsampled sum
            total = total + upsample(
                _per_map_normalize(grid).sum(dim=1, keepdim=True), x
            )
        return total


# ------------------------------------------------------------------ RefineCAM
class LayerRefineCam(LayerAttribution):
    r"""RefineCAM: the product of one CAM's normalised maps at several layers.

    .. math:: L = \prod_{l} \mathrm{norm}\big(\mathrm{up}(\mathrm{relu}(L_l))\big)

    where :math:`L_l` is the base CAM (Grad-CAM++ by default) at layer
    :math:`l`, upsampled (bilinear) to the input and min-max normalised per
    image. Early layers give sharp but noisy maps, late layers coarse but
    clean ones; the product keeps what all agree on.

    Differences from Captum's layer methods, and why: the method aggregates
    several layers, so ``layer`` is a list; the layers' grids differ, so the
    maps are combined (and returned) at the input's resolution
    ``(B, 1, H, W)``; each factor is normalised, as the product of raw maps
    would be dominated by the layer with the largest values.

    Reference: "RefineCAM" (multi-layer CAM aggregation), arXiv:2605.14641;
    pytorch-grad-cam's ``RefineCAM``.

    Args:
        forward_func (Callable): the model or any function returning scores.
        layer (list[torch.nn.Module]): the layers, e.g. one per stage.
        device_ids (list[int], optional): for DataParallel models.
        layout (TokenLayout, optional): token / channels-last layout.
        base_method (type, optional): the CAM class applied at each layer.
                    Default: LayerGradCamPlusPlus

    Examples::

        >>> refine = LayerRefineCam(model, [model.layer2, model.layer3, model.layer4])
        >>> attr = refine.attribute(images, target=[3, 7])   # (2, 1, 224, 224)
    """

    def __init__(
        self,
        forward_func: Callable,
        layer: Sequence[nn.Module],
        device_ids: Optional[List[int]] = None,
        layout: Optional[TokenLayout] = None,
        base_method: Type[LayerAttribution] = LayerGradCamPlusPlus,
    ) -> None:
        layers = [layer] if isinstance(layer, nn.Module) else list(layer)
        if not layers:
            raise AttributionInputError("LayerRefineCam needs at least one layer.")
        super().__init__(forward_func, layers, device_ids)
        self.base_cams = [
            base_method(forward_func, lay, device_ids, layout=layout) for lay in layers
        ]

    @log_usage()
    def attribute(
        self,
        inputs: TensorOrTuple,
        target: TargetType = None,
        additional_forward_args: Any = None,
        **kwargs: Any,
    ) -> Tensor:
        r"""
        Args:
            inputs (Tensor or tuple[Tensor, ...]): image batch first.
            target (int, tuple, Tensor or list, optional): output index per
                        sample. Default: None
            additional_forward_args (Any, optional): extra forward arguments.
            **kwargs: passed to the base method's ``attribute``.

        Returns:
            Tensor: ``(B, 1, H, W)`` maps in ``[0, 1]`` on the input's device.
        """
        inputs = _image_batch(inputs, "LayerRefineCam", self.forward_func)
        hw = input_hw(inputs)
        out: Optional[Tensor] = None
        with attribution_call(self.forward_func):  # one mode switch, one record
            for cam in self.base_cams:
                m = cam.attribute(
                    inputs,
                    target=target,
                    additional_forward_args=additional_forward_args,
                    **kwargs,
                )
                heat = _heatmap(m, hw)
                out = heat if out is None else out * heat
        if out is None:  # never: the constructor refuses an empty layer list
            raise AttributionInputError("LayerRefineCam needs at least one layer.")
        return out


# ----------------------------------------------------------------------- SESS
def _window_starts(length: int, step: int, window: int) -> List[int]:
    """Window origins covering ``length``; the last one is moved back inside."""
    starts = []
    for s in range(0, length, step):
        if s + window >= length:
            starts.append(max(length - window, 0))
            break
        starts.append(s)
    return starts


def _resize_short_side(x: Tensor, short: int) -> Tensor:
    """Resize ``(1, C, H, W)`` so its shorter side is ``short`` (antialiased
    bilinear, long side truncated, as torchvision's ``resize(x, short)``)."""
    h, w = x.shape[-2:]
    if h <= w:
        size = (short, int(short * w / h))
    else:
        size = (int(short * h / w), short)
    if size == (h, w):
        return x
    # antialiased resizing has no bfloat16 / float16 kernel on the CPU
    out = F.interpolate(
        x.to(working_dtype(x.dtype)),
        size=size,
        mode="bilinear",
        align_corners=False,
        antialias=True,
    )
    return out.to(x.dtype)


def _gaussian_blur_reflect(m: Tensor, size: int = 11, sigma: float = 5.0) -> Tensor:
    """Gaussian blur of ``(B, 1, H, W)`` with mirrored borders (OpenCV's
    ``GaussianBlur`` default, ``BORDER_REFLECT_101``)."""
    ax = torch.arange(size, dtype=m.dtype, device=m.device) - (size - 1) / 2
    g = torch.exp(-(ax**2) / (2 * sigma**2))
    g = g / g.sum()
    r = size // 2
    mode = "reflect" if min(m.shape[-2:]) > r else "replicate"
    out = F.conv2d(F.pad(m, (r, r, 0, 0), mode=mode), g.view(1, 1, 1, size))
    return F.conv2d(F.pad(out, (0, 0, r, r), mode=mode), g.view(1, 1, size, 1))


#: how SESS fuses the maps of overlapping windows
POOLS = ("mean", "max")


class SESS(Attribution):
    r"""SESS: Saliency Enhancing with Scaling and Sliding, around any CAM.

    The image is resized to several scales (shorter side ``window_size +
    i * round(scale_step_ratio * window_size)``), a ``window_size`` square
    window slides over each, and the wrapped method explains every patch. Each
    patch map is ReLU'd, upsampled to the window and min-max normalised,
    weighted by the patch's target score (softmax probability, clipped at 0)
    relative to the best patch, pasted back at its place and resized to the
    image. The maps are fused by a mean over the patches that cover each pixel
    (values above ``theta``) or a max, then Gaussian-blurred (kernel 11,
    sigma 5). The lowest-scoring ``pre_filter_ratio`` of the patches are
    skipped.

    Differences from Captum's conventions, and why: like Captum's
    ``NoiseTunnel`` it wraps an attribution object; the patch maps are
    normalised because the method fuses maps from different crops, whose raw
    scales are not comparable; the result is at the image's resolution
    ``(B, 1, H, W)`` (not normalised as a whole). Images are processed one at a
    time (each has its own patches); ``batch_size`` patches per forward pass.

    Reference: Tagaris et al., "SESS: Saliency Enhancing with Scaling and
    Sliding", ECCV 2022. https://arxiv.org/abs/2207.01769

    Args:
        attribution_method (Attribution): any layer CAM of this package (or an
                    attribution with ``attribute(inputs, target=...)``
                    returning ``(B, 1, h, w)`` maps).

    Examples::

        >>> sess = SESS(LayerGradCam(model, model.layer4))
        >>> attr = sess.attribute(images, target=[281, 285], num_scales=6)
    """

    def __init__(self, attribution_method: Attribution) -> None:
        if not hasattr(attribution_method, "attribute"):
            raise AttributionInputError(
                "SESS wraps an attribution object (e.g. LayerGradCam(model, "
                f"layer)); got {type(attribution_method).__name__}."
            )
        self.attribution_method = attribution_method
        super().__init__(attribution_method.forward_func)

    @log_usage()
    def attribute(
        self,
        inputs: TensorOrTuple,
        target: TargetType = None,
        additional_forward_args: Any = None,
        scales: Optional[Sequence[int]] = None,
        num_scales: int = 12,
        scale_step_ratio: float = 2.0 / 7.0,
        window_size: Optional[int] = None,
        step_size: Optional[int] = None,
        pre_filter_ratio: float = 0.0,
        theta: float = 0.0,
        pool: str = "mean",
        smooth: bool = True,
        use_softmax_scores: bool = True,
        batch_size: int = 32,
        **kwargs: Any,
    ) -> Tensor:
        r"""
        Args:
            inputs (Tensor or tuple[Tensor, ...]): image batch first.
            target (int, tuple, Tensor or list): output index per sample.
            additional_forward_args (Any, optional): extra forward arguments
                        (per-sample tensors follow their image's patches).
            scales (list[int], optional): shorter-side sizes; ``None`` builds
                        ``num_scales`` from ``scale_step_ratio``.
            num_scales (int, optional): Default: 12
            scale_step_ratio (float, optional): Default: 2/7 (the paper's 224,
                        288, ... for 224 px)
            window_size (int, optional): window side; ``None`` is the image's
                        shorter side.
            step_size (int, optional): window stride; ``None`` is the window.
            pre_filter_ratio (float, optional): fraction of the lowest-scoring
                        patches skipped, in ``[0, 1)``. Default: 0.0
            theta (float, optional): only values above it enter the mean.
                        Default: 0.0
            pool (str, optional): ``"mean"`` or ``"max"``. Default: "mean"
            smooth (bool, optional): Gaussian blur of the fused map.
                        Default: True
            use_softmax_scores (bool, optional): weight patches by softmax
                        probabilities (else raw scores). Default: True
            batch_size (int, optional): patches per forward pass. Default: 32
            **kwargs: passed to the wrapped method's ``attribute``.

        Returns:
            Tensor: ``(B, 1, H, W)`` maps on the input's device.
        """
        if pool not in POOLS:
            raise AttributionInputError(f"pool={pool!r}: use 'mean' or 'max'.")
        if not 0.0 <= pre_filter_ratio < 1.0:
            raise AttributionInputError(
                f"pre_filter_ratio={pre_filter_ratio} must be in [0, 1)."
            )
        if num_scales < 1 or batch_size < 1:
            raise AttributionInputError("num_scales and batch_size must be >= 1.")
        inputs = _image_batch(inputs, "SESS", self.forward_func, needs_grad=False)
        x = inputs[0].detach()
        batch, (h, w) = x.shape[0], x.shape[-2:]
        window = int(window_size) if window_size is not None else min(h, w)
        step = int(step_size) if step_size is not None else window
        if scales is None:
            inc = int(round(window * scale_step_ratio))
            scales = [window + inc * i for i in range(num_scales)]
        if min(scales) < window:
            raise AttributionInputError(
                f"Every scale must be at least the window size {window}; got "
                f"{list(scales)}."
            )
        targets = per_sample_targets(target, batch)
        maps = []
        with eval_mode(self.forward_func):
            for b in range(batch):
                maps.append(
                    self._one_image(
                        inputs,
                        b,
                        targets[b],
                        additional_forward_args,
                        scales,
                        window,
                        step,
                        pre_filter_ratio,
                        theta,
                        pool,
                        use_softmax_scores,
                        batch_size,
                        kwargs,
                    )  # fmt: skip
                )
        out = torch.stack(maps)[:, None]
        out = _gaussian_blur_reflect(out) if smooth else out
        return finish_maps((out,), [])[0]

    def _one_image(
        self,
        inputs: Tuple[Tensor, ...],
        b: int,
        target: Any,
        args: Any,
        scales: Sequence[int],
        window: int,
        step: int,
        pre_filter_ratio: float,
        theta: float,
        pool: str,
        use_softmax: bool,
        batch_size: int,
        kwargs: dict,
    ) -> Tensor:
        x = inputs[0][b : b + 1].detach()
        h, w = x.shape[-2:]
        scaled = [_resize_short_side(x, int(s)) for s in scales]
        where = [
            (i, y0, x0)
            for i, img in enumerate(scaled)
            for y0 in _window_starts(img.shape[-2], step, window)
            for x0 in _window_starts(img.shape[-1], step, window)
        ]

        def patches(idx: Sequence[int]) -> Tensor:
            return torch.cat(
                [
                    scaled[where[j][0]][
                        ..., where[j][1] : where[j][1] + window,
                        where[j][2] : where[j][2] + window,
                    ]
                    for j in idx
                ]
            )  # fmt: skip

        def extra(n: int) -> Any:
            index = torch.full((n,), b, dtype=torch.long, device=x.device)
            return rows(args, index, inputs[0].shape[0])

        def tgt(n: int) -> TargetType:
            return stack_targets([target] * n)

        forward = self.forward_func
        if use_softmax:
            forward = _softmax_of(self.forward_func)
        scores = torch.cat(
            [
                target_scores(forward, (patches(idx),), tgt(len(idx)), extra(len(idx)))
                for idx in _chunks(range(len(where)), batch_size)
            ]
        ).clamp(min=0)
        if not bool(torch.isfinite(scores).all()):  # NaN, never a stand-in
            return x.new_full((h, w), float("nan"))
        order = torch.argsort(scores, stable=True)[int(len(where) * pre_filter_ratio) :]
        best = scores[order[-1]]
        weights = scores / best if best > 0 else torch.ones_like(scores)
        total = x.new_zeros(1, 1, h, w)
        count = x.new_zeros(1, 1, h, w)
        for idx in _chunks(order.tolist(), batch_size):
            n = len(idx)
            m = self.attribution_method.attribute(
                patches(idx), target=tgt(n), additional_forward_args=extra(n), **kwargs
            )
            heat = _heatmap(m, window) * weights[idx].view(n, 1, 1, 1)
            for j, patch_map in zip(idx, heat):
                i, y0, x0 = where[j]
                canvas = x.new_zeros(1, 1, *scaled[i].shape[-2:])
                canvas[..., y0 : y0 + window, x0 : x0 + window] = patch_map
                pasted = F.interpolate(
                    canvas, size=(h, w), mode="bilinear", align_corners=False
                )
                if pool == "max":
                    total = torch.maximum(total, pasted)
                else:
                    keep = pasted > theta
                    total = total + torch.where(keep, pasted, 0.0)
                    count = count + keep.to(total.dtype)
        if pool == "max":
            return total[0, 0]
        return torch.where(count > 0, total / count.clamp(min=1), 0.0)[0, 0]


def _chunks(seq: Union[range, List[int]], size: int) -> List[List[int]]:
    items = list(seq)
    return [items[i : i + size] for i in range(0, len(items), size)]


def _softmax_of(forward_func: Callable) -> Callable:
    def forward(*args: Any) -> Tensor:
        return torch.softmax(model_output(forward_func(*args)), dim=-1)

    return forward
