"""The CAM family's two bases: gradient CAMs and activation-only CAMs.

A CAM combines a layer's activations ``A`` (``B, C, h, w``) with per-channel or
per-position weights. Subclasses state only that weighting:

* gradient CAMs override :meth:`LayerGradCam._weights` (or ``_combine``),
* activation CAMs override :meth:`_LayerActivationCam._weights`.

Hooks, the forward/backward passes, target checks and the token-to-grid layout
come from :mod:`captum_ssl.attr._core` and Captum's own helpers.
"""

from __future__ import annotations

import math
import re
import warnings
from typing import Any, Callable, Dict, List, Optional, Tuple, Type, TypeVar

import torch
from captum._utils.common import _format_output
from captum._utils.typing import TargetType
from captum.attr import LayerAttribution
from captum.attr import LayerGradCam as _CaptumLayerGradCam
from captum.log import log_usage
from torch import Tensor, nn

from captum_ssl.attr._core import (
    AttributionInputError,
    TensorOrTuple,
    attribution_call,
    check_layer,
    finish_maps,
    format_inputs,
    layer_activations,
    layer_activations_and_gradients,
)
from captum_ssl.attr._layout import (
    TokenLayout,
    root_module,
    spatial_reduce,
    spatial_shape,
)

_T = TypeVar("_T")


def _finish(
    cams: Tuple[Tensor, ...],
    relu_attributions: bool,
    is_tuple: bool,
    record: Optional[List[Tensor]] = None,
) -> TensorOrTuple:
    if relu_attributions:
        cams = tuple(torch.relu(c) for c in cams)
    cams = finish_maps(cams, record or [])
    return _format_output(is_tuple, cams)


#: the constructor arguments of every subclass of :class:`LayerGradCam` that
#: keeps its constructor: ``{gradient_cam_args}`` in a class docstring
GRADIENT_CAM_ARGS = """Args:
        forward_func (Callable): the model or any function returning scores.
        layer (torch.nn.Module): the layer whose activations are explained;
                    its output may be ``(B, C)``, ``(B, C, L)``,
                    ``(B, C, H, W)``, ``(B, C, D, H, W)``, tokens or
                    channels-last (see :class:`LayerGradCam`).
        device_ids (list[int], optional): device ids for DataParallel models
                    whose forward_func is not the DataParallel module itself.
        layout (TokenLayout, optional): how the layer's output maps onto a
                    grid; ``None`` reads it from the output and the model.
                    Default: None

    ``attribute`` takes :meth:`LayerGradCam.attribute`'s arguments (the
    same signature and defaults) and returns its shapes."""


def documented(cls: Type[_T]) -> Type[_T]:
    """Fill ``{gradient_cam_args}`` in ``cls``'s docstring with
    :data:`GRADIENT_CAM_ARGS` (one text for every gradient CAM)."""
    if cls.__doc__:
        cls.__doc__ = cls.__doc__.replace("{gradient_cam_args}", GRADIENT_CAM_ARGS)
    return cls


class LayerGradCam(_CaptumLayerGradCam):
    r"""Grad-CAM on CNN feature maps and on Vision Transformer token layers.

    Captum's :class:`captum.attr.LayerGradCam` computes, for a layer's
    activations :math:`A^k` and the gradients of the target score :math:`y^c`,

    .. math:: L^c = \sum_k \alpha_k^c A^k, \quad
              \alpha_k^c = \frac{1}{hw}\sum_{i,j}\frac{\partial y^c}{\partial A^k_{ij}}

    This subclass keeps Captum's constructor, hooks and target handling, and
    adds the token-to-grid step Captum lacks: a token output ``(B, N, C)``
    (ViT, DeiT, MoCo v3 / DINO ViTs, CaiT, XCiT, register tokens) or a
    channels-last output ``(B, H, W, C)`` (Swin) is laid out as
    ``(B, C, gh, gw)`` before the weighting, with prefix tokens dropped. A
    3-D output is read as tokens only where the model declares a token layout
    (a timm model, timm's ``patch_embed`` / ``num_prefix_tokens``, see
    :func:`~captum_ssl.attr._layout.declared_layout`) or ``layout=`` says so.
    Every other layer is channels-first ``(B, C, *spatial)`` as in Captum:
    ``(B, C)`` gives ``(B, 1)``, a 1-D CNN's ``(B, C, L)`` gives ``(B, 1, L)``,
    a 3-D CNN's ``(B, C, D, H, W)`` gives ``(B, 1, D, H, W)``, and the result
    equals Captum's ``LayerGradCam`` (tests/test_captum_dropin.py).
    It is also the base of every gradient-based CAM here: subclasses override
    :meth:`_weights` (per-channel or per-position weights) or :meth:`_combine`.

    Reference: Selvaraju et al., "Grad-CAM: Visual Explanations from Deep
    Networks via Gradient-based Localization", ICCV 2017.
    https://arxiv.org/abs/1610.02391

    Args:
        forward_func (Callable): the model or any function returning scores.
        layer (torch.nn.Module): the layer whose activations are explained.
        device_ids (list[int], optional): device ids for DataParallel models
                    whose forward_func is not the DataParallel module itself.
        layout (TokenLayout, optional): how the layer's output maps onto a
                    grid. ``None`` infers it from the layer's actual output
                    (channels-first or channels-last, token grid) and the
                    model (timm's ``patch_embed`` and ``num_prefix_tokens``,
                    also inside a wrapper); ambiguous outputs raise an error
                    asking for it. Default: None

    Examples::

        >>> model = torchvision.models.resnet50().eval()
        >>> cam = LayerGradCam(model, model.layer4)
        >>> attr = cam.attribute(images, target=[3, 7])   # (2, 1, 7, 7)
        >>> vit = timm.create_model("deit_small_patch16_224").eval()
        >>> attr = LayerGradCam(vit, vit.blocks[-1].norm1).attribute(x, target=3)
        >>> attr.shape                                      # (B, 1, 14, 14)
        >>> # a differentiable map: a loss on it trains the model
        >>> m = cam.attribute(images, target=labels, create_graph=True)
        >>> m.relu().mean().backward()
    """

    def __init__(
        self,
        forward_func: Callable,
        layer: nn.Module,
        device_ids: Optional[List[int]] = None,
        layout: Optional[TokenLayout] = None,
    ) -> None:
        check_layer(forward_func, layer)
        super().__init__(forward_func, layer, device_ids)
        self.layout = layout

    @log_usage()
    def attribute(
        self,
        inputs: TensorOrTuple,
        target: TargetType = None,
        additional_forward_args: Any = None,
        attribute_to_layer_input: bool = False,
        relu_attributions: bool = False,
        attr_dim_summation: bool = True,
        grad_kwargs: Optional[Dict[str, Any]] = None,
        create_graph: bool = False,
    ) -> TensorOrTuple:
        r"""
        Args:
            inputs (Tensor or tuple[Tensor, ...]): input batch ``(B, ...)``.
            target (int, tuple, Tensor or list, optional): output index per
                        sample, as in Captum (one index for all samples, or one
                        per sample). Default: None
            additional_forward_args (Any, optional): extra forward arguments.
                        Default: None
            attribute_to_layer_input (bool, optional): explain the layer's input
                        instead of its output (its layout is read from the
                        input's own shape). Default: False
            relu_attributions (bool, optional): apply a ReLU to the map.
                        Default: False
            attr_dim_summation (bool, optional): sum over channels; ``False``
                        returns the weighted activations ``(B, C, *spatial)``.
                        Default: True
            grad_kwargs (dict, optional): passed to ``torch.autograd.grad``.
                        Default: None
            create_graph (bool, optional): return a differentiable map: the
                        graph to the model's parameters is kept (nothing frozen
                        or detached, gradients taken with ``create_graph=True``),
                        so a loss on the map trains the model (CGC,
                        :mod:`captum_ssl.training`). Slower and uses more
                        memory; the default path is unchanged. Default: False

        Returns:
            Tensor or tuple[Tensor, ...]: maps ``(B, 1, *spatial)`` at layer
            (or patch-grid) resolution on the input's device, not normalised:
            ``(B, 1)``, ``(B, 1, L)``, ``(B, 1, h, w)`` or ``(B, 1, d, h, w)``
            (``(B, C, *spatial)`` with ``attr_dim_summation=False``); a tuple
            for a layer with several outputs, as Captum.
        """
        inputs = format_inputs(inputs, forward_func=self.forward_func)
        with attribution_call(self.forward_func, keep_mode=create_graph) as record:
            acts, grads = layer_activations_and_gradients(
                self.forward_func,
                self.layer,
                inputs,
                target,
                additional_forward_args,
                layout=self.layout,
                device_ids=self.device_ids,
                attribute_to_layer_input=attribute_to_layer_input,
                grad_kwargs=grad_kwargs,
                create_graph=create_graph,
            )
            cams = tuple(
                self._combine(a, g, attr_dim_summation) for a, g in zip(acts, grads)
            )
            return _finish(cams, relu_attributions, len(cams) > 1, record)

    def _weights(self, acts: Tensor, grads: Tensor) -> Tensor:
        """Grad-CAM: the spatial mean of the gradients, per channel (the
        gradients themselves on a ``(B, C)`` layer, as Captum)."""
        return spatial_reduce(grads, "mean")

    def _combine(self, acts: Tensor, grads: Tensor, sum_channels: bool) -> Tensor:
        weighted = self._weights(acts, grads) * acts
        return weighted.sum(dim=1, keepdim=True) if sum_channels else weighted


class _LayerActivationCam(LayerAttribution):
    """Base of CAMs that need the layer's activations but no gradients.

    Subclasses implement :meth:`_weights` from the activations, the inputs and
    the target; the map is :math:`\\sum_k w_k A^k`.
    """

    def __init__(
        self,
        forward_func: Callable,
        layer: nn.Module,
        device_ids: Optional[List[int]] = None,
        layout: Optional[TokenLayout] = None,
    ) -> None:
        check_layer(forward_func, layer)
        LayerAttribution.__init__(self, forward_func, layer, device_ids)
        self.layout = layout

    def _activations(
        self,
        inputs: Tuple[Tensor, ...],
        additional_forward_args: Any,
        attribute_to_layer_input: bool,
        target: TargetType = None,
    ) -> Tuple[Tensor, ...]:
        """The layer's activations as grids ``(B, C, *spatial)``: one per
        output tensor of the layer (one per input tensor with
        ``attribute_to_layer_input``)."""
        return layer_activations(
            self.forward_func,
            self.layer,
            inputs,
            additional_forward_args,
            target=target,
            layout=self.layout,
            device_ids=self.device_ids,
            attribute_to_layer_input=attribute_to_layer_input,
        )

    #: the output of the layer being explained: set by :meth:`_each_output`
    #: for the methods that perturb the layer's output (the others do not
    #: read it)
    _output_index = 0

    def _each_output(
        self, acts: Tuple[Tensor, ...], method: Callable[[Tensor], Tensor]
    ) -> Tuple[Tensor, ...]:
        """``method`` applied to each of the layer's outputs in turn: the map of
        output ``i`` is what the method gives on a layer that returns output
        ``i`` alone, the other outputs left as the model computes them (as
        Captum's ``LayerGradCam`` treats a layer with several outputs). The
        one place where every activation CAM handles several outputs."""
        maps = []
        try:
            for i, a in enumerate(acts):
                self._output_index = i
                maps.append(method(a))
        finally:
            self._output_index = 0
        return tuple(maps)

    def _weights(self, *args: Any, **kwargs: Any) -> Tensor:
        """Channel weights ``(B, C)`` from ``(acts, inputs, target,
        additional_forward_args, **options)``."""
        raise NotImplementedError

    def _attribute(
        self,
        inputs: TensorOrTuple,
        target: TargetType,
        additional_forward_args: Any,
        attribute_to_layer_input: bool,
        relu_attributions: bool,
        **kwargs: Any,
    ) -> TensorOrTuple:
        formatted = format_inputs(inputs, False, self.forward_func)
        with attribution_call(self.forward_func) as record:
            acts = self._activations(
                formatted, additional_forward_args, attribute_to_layer_input, target
            )

            def weighted_sum(a: Tensor) -> Tensor:
                weights = self._weights(
                    a, formatted, target, additional_forward_args, **kwargs
                )
                shape = (*weights.shape[:2], *[1] * (a.dim() - 2))
                return (weights.reshape(shape) * a).sum(dim=1, keepdim=True)

            cams = self._each_output(acts, weighted_sum)
            return _finish(cams, relu_attributions, len(cams) > 1, record)


def _working_layer(forward_func: Callable, layer: nn.Module) -> str:
    """A layer near ``layer`` whose channel sum does not vanish, by name."""
    model = root_module(forward_func)
    names = {} if model is None else {id(m): n for n, m in model.named_modules()}
    name = names.get(id(layer))
    shown = re.sub(r"\.(\d+)", r"[\1]", name) if name else "<this layer>"
    blocks = getattr(layer, "blocks", None)
    if isinstance(blocks, nn.Sequential) and hasattr(blocks[-1], "mlp"):
        return f"`{shown}.blocks[-1].mlp`"
    if hasattr(layer, "mlp"):
        return f"`{shown}.mlp`"
    return "the MLP (or last linear layer) of the block that produces it"


def warn_if_channel_sum_vanishes(
    forward_func: Callable,
    layer: nn.Module,
    acts: Tensor,
    grads: Tensor,
    method: str,
    tol: float = 1e-3,
) -> None:
    """Warn when ``sum_k grads * acts`` is zero at every position.

    A layer whose output goes straight into a per-position LayerNorm (Swin's
    ``layers[-1]`` before ``model.norm``, ConvNeXt's ``stages[0..2]`` before
    the next stage's ``LayerNorm2d``) has gradients orthogonal to its
    activations at every position: LayerNorm is invariant to shifting and
    scaling its input, so ``sum_k g_k a_k = 0`` exactly, and what is computed
    is rounding noise.
    """
    prod = grads * acts
    scale = prod.abs().sum(dim=1).amax()
    if scale > 0 and prod.sum(dim=1).abs().amax() <= tol * scale:
        warnings.warn(
            f"{method}: the channel sum of gradient x activation at the layer "
            f"{layer.__class__.__name__} is zero at every position (its output "
            "feeds a per-position LayerNorm, which makes gradients orthogonal to "
            "activations), so the map is rounding noise"
            + (
                " and its sign orientation is arbitrary"
                if method == "LayerEigenGradCam"
                else ""
            )
            + f". Explain {_working_layer(forward_func, layer)} instead, or use "
            "LayerGradCam on this layer.",
            stacklevel=4,
        )


def require_positions(acts: Tensor, method: str) -> None:
    """Refuse a layer without positions: ``method``'s equation needs several
    positions (a map over ``(B, C, L)``, ``(B, C, H, W)`` or
    ``(B, C, D, H, W)``), and a ``(B, C)`` output has one."""
    if acts.dim() < 3:
        raise AttributionInputError(
            f"{method} needs a layer with positions, (B, C, L), (B, C, H, W) or "
            f"(B, C, D, H, W); this layer's output {tuple(acts.shape)} has none "
            "(it comes after global pooling or a linear layer). Choose an earlier "
            "layer, or use a gradient CAM (LayerGradCam works on (B, C) layers "
            "as in Captum)."
        )


def first_principal_projection(x: Tensor, reference: Tensor) -> Tensor:
    """Projection of each position on the first principal component.

    ``x`` is ``(B, C, *spatial)``; rows are positions, columns channels,
    centred per channel over positions (as Eigen-CAM). The projection ``X v1``
    (``v1`` the first right-singular vector) is computed from the
    eigendecomposition of the smaller of ``X X^T`` (positions) and ``X^T X``
    (channels) in float64: the same component as an SVD at a fraction of its
    cost. The sign of a singular vector is arbitrary, so the projection is
    oriented to correlate positively with ``reference`` ``(B, 1, *spatial)``.
    Returns ``(B, 1, *spatial)``; the map of a sample whose ``x`` holds NaN
    or Inf is NaN (never a finite stand-in).
    """
    b, c = x.shape[:2]
    spatial = spatial_shape(x)
    n = math.prod(spatial)
    rows = x.reshape(b, c, n).transpose(1, 2).double()
    bad = ~torch.isfinite(rows).flatten(1).all(1)
    rows = rows.masked_fill(bad.view(b, 1, 1), 0.0)  # solved apart, then NaN
    rows = rows - rows.mean(dim=1, keepdim=True)
    if n <= c:
        evals, evecs = torch.linalg.eigh(rows @ rows.transpose(1, 2))
        proj = evecs[..., -1:] * evals[:, -1:].clamp(min=0).sqrt().unsqueeze(1)
    else:
        _, evecs = torch.linalg.eigh(rows.transpose(1, 2) @ rows)
        proj = rows @ evecs[..., -1:]
    ref = reference.reshape(b, n, 1).double()
    ref = ref - ref.mean(dim=1, keepdim=True)
    sign = torch.sign((proj * ref).sum(dim=1, keepdim=True))
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    proj = (proj * sign).masked_fill(bad.view(b, 1, 1), float("nan"))
    return proj.transpose(1, 2).reshape(b, 1, *spatial).to(x.dtype)
