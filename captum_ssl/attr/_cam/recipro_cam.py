"""Recipro-CAM: spatial masks on the feature map, scored by the rest of the
network."""

from __future__ import annotations

import math
from typing import Any, Callable, List, Optional, Sequence

import torch
import torch.nn.functional as F
from captum._utils.typing import TargetType
from captum.attr import PerturbationAttribution
from captum.log import log_usage
from torch import Tensor, nn

from captum_ssl.attr._cam.base import (
    _finish,
    require_positions,
)
from captum_ssl.attr._cam.layer_perturbation import _LayerOutputPerturbation
from captum_ssl.attr._core import (
    AttributionInputError,
    TensorOrTuple,
    attribution_call,
    format_inputs,
    resolve_layout,
)
from captum_ssl.attr._layout import TokenLayout, spatial_shape

#: the paper's Gaussian kernel around a position, per spatial dimension: its
#: outer product is the paper's 3 x 3 kernel (1/4, 1/8, 1/16) on 2-D maps, and
#: the same separable kernel on 1-D signals and 3-D volumes
GAUSSIAN_1D = torch.tensor([1.0, 2.0, 1.0]) / 4.0
_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def spatial_masks(positions: Tensor, spatial: Sequence[int], gaussian: bool) -> Tensor:
    """Masks ``(n, 1, *spatial)`` for 1 to 3 spatial dimensions: 1 at each
    position, or the Gaussian kernel (3 wide per dimension) centred on it, cut
    at the border."""
    size = math.prod(spatial)
    one_hot = F.one_hot(positions, size).reshape(-1, 1, *spatial).float()
    if not gaussian:
        return one_hot
    kernel = GAUSSIAN_1D.to(positions.device)
    for _ in range(len(spatial) - 1):
        kernel = kernel.unsqueeze(-1) * GAUSSIAN_1D.to(positions.device)
    conv = _CONV[len(spatial)]
    return conv(one_hot, kernel.reshape(1, 1, *kernel.shape), padding=1)


class LayerReciproCam(_LayerOutputPerturbation, PerturbationAttribution):
    r"""Recipro-CAM: the target's probability when the feature map is kept
    only around one position.

    For each position :math:`p` of the layer's ``h x w`` grid the feature map
    :math:`A` is multiplied by a spatial mask :math:`M_p` (a 3 x 3 Gaussian
    kernel centred on :math:`p`, weights 1/4, 1/8, 1/16; or 1 at :math:`p`
    only) and the rest of the network scores it (on ``(B, C, L)`` and
    ``(B, C, D, H, W)`` layers the same separable kernel, 3 wide in each
    dimension):

    .. math:: L^c(p) = \mathrm{softmax}\big(g(A \odot M_p)\big)_c

    where :math:`g` is everything after the layer. The masks are applied to
    the feature map, not the input; on token layers to the patch tokens, with
    the prefix tokens kept. ``h * w`` evaluations per image, which share the
    network up to the layer (prefix caching, see
    :mod:`captum_ssl.attr._prefix`; ``prefix_cache = False`` re-runs the
    whole model). The map is not min-max normalised (the paper normalises it
    for display).

    Reference: Byun & Lee, "Recipro-CAM: Fast gradient-free visual explanations
    for convolutional neural networks", 2022. https://arxiv.org/abs/2209.14074

    Args:
        forward_func (Callable): the model or any function returning scores.
        layer (torch.nn.Module): the layer whose output is masked.
        device_ids (list[int], optional): for DataParallel models.
        layout (TokenLayout, optional): token / channels-last layout.
        gaussian (bool, optional): 3 x 3 Gaussian masks (the paper's
                    default); False masks one position. Default: True

    Examples::

        >>> recipro = LayerReciproCam(model, model.layer4)
        >>> attr = recipro.attribute(images, target=[3, 5],
        ...                          perturbations_per_eval=49)   # (2, 1, 7, 7)
    """

    def __init__(
        self,
        forward_func: Callable,
        layer: nn.Module,
        device_ids: Optional[List[int]] = None,
        layout: Optional[TokenLayout] = None,
        gaussian: bool = True,
    ) -> None:
        super().__init__(forward_func, layer, device_ids, layout)
        self.gaussian = gaussian

    @log_usage()
    def attribute(
        self,
        inputs: TensorOrTuple,
        target: TargetType = None,
        additional_forward_args: Any = None,
        attribute_to_layer_input: bool = False,
        relu_attributions: bool = False,
        perturbations_per_eval: Optional[int] = None,
        show_progress: bool = False,
        softmax: bool = True,
    ) -> TensorOrTuple:
        r"""
        Args:
            inputs (Tensor or tuple[Tensor, ...]): input batch.
            target (int, tuple, Tensor or list, optional): output index per
                        sample. Default: None
            additional_forward_args (Any, optional): extra forward arguments.
            attribute_to_layer_input (bool, optional): must stay False:
                        Recipro-CAM masks the layer's output (explain the
                        preceding layer instead). In the signature so that
                        every layer CAM takes the same arguments in the same
                        order. Default: False
            relu_attributions (bool, optional): ReLU the map (no effect on
                        probabilities; for the CAM family's common options).
                        Default: False
            perturbations_per_eval (int, optional): masked feature maps per
                        evaluation of the network after the layer. ``None``
                        chooses a chunk from the input size and free memory
                        (``captum_ssl.attr._core.auto_perturbations_per_eval``).
                        Default: None
            show_progress (bool, optional): show a progress bar.
            softmax (bool, optional): score the softmax of the output over its
                        last dimension (the paper); False scores the output
                        itself. Default: True

        Returns:
            Tensor or tuple[Tensor, ...]: ``(B, 1, *spatial)`` maps
            (``(B, 1, h, w)`` on image layers) on the input's device; a tuple
            for a layer with several outputs (one map per output, each with
            only that output masked).
        """
        if attribute_to_layer_input:
            raise AttributionInputError(
                "LayerReciproCam masks the layer's output; use "
                "attribute_to_layer_input=False or pick the preceding layer."
            )
        formatted = format_inputs(inputs, False, self.forward_func)
        with attribution_call(self.forward_func) as record:
            acts = self._activations(formatted, additional_forward_args, False, target)
            layout = resolve_layout(
                self.forward_func, self.layer, formatted, self.layout
            )
            softmax_of = (lambda o: torch.softmax(o, dim=-1)) if softmax else None

            def recipro_cam(a: Tensor) -> Tensor:
                require_positions(a, "LayerReciproCam")
                spatial = spatial_shape(a)

                def mask(out: Tensor, b: Tensor, p: Tensor) -> Tensor:
                    m = spatial_masks(p.to(out.device), spatial, self.gaussian)
                    return layout.from_grid(layout.to_grid(out) * m.to(out.dtype), out)

                _, scores = self._output_scores(
                    formatted,
                    target,
                    additional_forward_args,
                    math.prod(spatial),
                    mask,
                    perturbations_per_eval,
                    show_progress,
                    "Recipro-CAM",
                    output_transform=softmax_of,
                )
                return scores.reshape(-1, 1, *spatial)

            cams = self._each_output(acts, recipro_cam)
            return _finish(cams, relu_attributions, len(cams) > 1, record)
