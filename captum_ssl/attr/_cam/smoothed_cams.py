"""Score-CAM and Grad-CAM++ variants that average over several evaluations:
IS-CAM (integrated masks), SS-CAM (noisy masks), Smooth Grad-CAM++ (noisy
inputs).

Random noise is drawn per chunk from ``generator`` (``torch.Generator``), or
taken from an explicit ``noise`` tensor so that runs can be reproduced and
compared with other implementations exactly.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from captum._utils.typing import TargetType
from captum.log import log_usage
from torch import Tensor

from captum_ssl.attr._cam.activation_cams import (
    _LayerPerturbationCam,
    masked_input,
)
from captum_ssl.attr._cam.base import LayerGradCam, _finish
from captum_ssl.attr._core import (
    AttributionInputError,
    TensorOrTuple,
    attribution_call,
    chunked_scores,
    draw,
    format_inputs,
    layer_activations,
    layer_activations_and_gradients,
    working_dtype,
)
from captum_ssl.attr._layout import spatial_reduce


def _check_samples(num_samples: int, noise: Optional[Tensor], shape: tuple) -> None:
    if num_samples < 1:
        raise AttributionInputError("num_samples must be >= 1.")
    if noise is not None and (
        noise.dim() != len(shape) or noise.shape[0] != num_samples
    ):
        raise AttributionInputError(
            f"noise must have shape {tuple(shape)} (num_samples first) or "
            f"broadcast to it, got {tuple(noise.shape)}."
        )


class _LayerSmoothedScoreCam(_LayerPerturbationCam):
    """Score-CAM averaged over ``num_samples`` masks per channel.

    Masks follow torchcam: each activation map is min-max normalised per
    channel at layer resolution, then upsampled (bilinear,
    ``align_corners=False``) to the input. Subclasses implement
    :meth:`_mask` (mask of sample ``i``); the channel weights are the softmax
    over channels of the mean target score of ``x * mask``.
    """

    def __init__(self, forward_func, layer, device_ids=None, layout=None, **kw) -> None:
        super().__init__(forward_func, layer, device_ids, layout)
        for k, v in kw.items():
            setattr(self, k, v)

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
        num_samples: Optional[int] = None,
        noise: Optional[Tensor] = None,
        generator: Optional[torch.Generator] = None,
    ) -> TensorOrTuple:
        r"""
        Args:
            inputs (Tensor or tuple[Tensor, ...]): image batch ``(B, C, H, W)``.
            target (int, tuple, Tensor or list, optional): output index per
                        sample. Default: None
            additional_forward_args (Any, optional): extra forward arguments.
            attribute_to_layer_input (bool, optional): use the layer's input.
                        Default: False
            relu_attributions (bool, optional): ReLU the map. Default: False
            perturbations_per_eval (int, optional): masked inputs per forward
                        pass. ``None`` chooses a chunk from the
                        input size and free memory
                        (``captum_ssl.attr._core.auto_perturbations_per_eval``).
                        Default: None
            show_progress (bool, optional): show a progress bar.
            num_samples (int, optional): evaluations per channel; ``None``
                        uses the class default (IS-CAM 10, SS-CAM 35).
            noise (Tensor, optional): SS-CAM only: pre-drawn mask noise of
                        shape ``(num_samples, B, C_layer, H, W)`` (or
                        broadcastable), for exactly reproducible runs.
            generator (torch.Generator, optional): SS-CAM only: the random
                        source of the noise when ``noise`` is None.

        Returns:
            Tensor or tuple[Tensor, ...]: ``(B, 1, *spatial)`` maps on the
            input's device; a tuple for a layer with several outputs (one map
            per output).
        """
        self._num = int(num_samples if num_samples is not None else self.num_samples)
        self._output_noise: Optional[Tensor] = None
        self._noise, self._generator = noise, generator
        return super().attribute(
            inputs,
            target,
            additional_forward_args,
            attribute_to_layer_input,
            relu_attributions,
            perturbations_per_eval,
            show_progress,
        )

    def _mask(self, up: Tensor, b: Tensor, k: Tensor, i: Tensor) -> Tensor:
        raise NotImplementedError

    def _weights(
        self,
        acts: Tensor,
        inputs: Tuple[Tensor, ...],
        target: TargetType,
        additional_forward_args: Any,
        perturbations_per_eval: Optional[int] = None,
        show_progress: bool = False,
    ) -> Tensor:
        x, mode = masked_input(inputs, acts, type(self).__name__)
        channels, n = acts.shape[1], self._num
        self._output_noise = None  # this output's noise, expanded
        if self._noise is not None:
            shape = (n, *acts.shape[:2], *x.shape[2:])
            _check_samples(n, self._noise, shape)
            self._output_noise = self._noise.to(x.device).expand(shape)
        lo, hi = spatial_reduce(acts, "amin"), spatial_reduce(acts, "amax")
        norm = (acts - lo) / (hi - lo + 1e-8)

        def make_batch(b: Tensor, j: Tensor) -> Tuple[Tensor, ...]:
            b, j = b.to(x.device), j.to(x.device)
            i, k = j // channels, j % channels
            up = F.interpolate(
                norm[b, k].unsqueeze(1),
                size=x.shape[2:],
                mode=mode,
                align_corners=False,
            )
            return (x[b] * self._mask(up, b, k, i),)

        scores = chunked_scores(
            self.forward_func,
            inputs,
            target,
            additional_forward_args,
            n * channels,
            make_batch,
            perturbations_per_eval,
            show_progress,
            desc=type(self).__name__,
        )
        return torch.softmax(scores.reshape(-1, n, channels).mean(dim=1), dim=1)


class LayerISCam(_LayerSmoothedScoreCam):
    r"""IS-CAM (Integrated Score-CAM): Score-CAM with the mask scaled along a
    path, the scores averaged (a Riemann sum of the path integral).

    With :math:`H^k` the normalised, upsampled activation map (see
    :class:`LayerScoreCam`) and :math:`N` samples,

    .. math:: w_k = \mathrm{softmax}_k \frac{1}{N}\sum_{i=1}^{N}
              y^c\Big(X \odot c_i H^k\Big), \qquad
              c_i = \sum_{j=1}^{i} \frac{j}{N}

    and :math:`L^c = \sum_k w_k A^k`. The coefficients :math:`c_i` are
    torchcam 0.5.0's (its docstring writes :math:`\sum_{j=0}^{i-1}`, its code
    and ours :math:`\sum_{j=1}^{i}`). Masks are min-max normalised per channel
    at layer resolution and then upsampled bilinearly (``align_corners=False``)
    as in torchcam; this is also where IS-CAM differs from our Score-CAM
    (pytorch-grad-cam's order).

    Reference: Naidu et al., "IS-CAM: Integrated Score-CAM for axiomatic-based
    explanations", 2020. https://arxiv.org/abs/2010.03023

    Args:
        forward_func (Callable): the model or any function returning scores.
        layer (torch.nn.Module): the layer whose activations are explained.
        device_ids (list[int], optional): for DataParallel models.
        layout (TokenLayout, optional): token / channels-last layout.
        num_samples (int, optional): integration steps. Default: 10

    Examples::

        >>> iscam = LayerISCam(model, model.layer4, num_samples=10)
        >>> attr = iscam.attribute(images, target=[3, 5], perturbations_per_eval=64)
    """

    def __init__(
        self, forward_func, layer, device_ids=None, layout=None, num_samples: int = 10
    ) -> None:
        super().__init__(
            forward_func, layer, device_ids, layout, num_samples=num_samples
        )

    def _mask(self, up: Tensor, b: Tensor, k: Tensor, i: Tensor) -> Tensor:
        step = (i + 1).to(up.dtype)
        coeff = step * (step + 1) / (2 * self._num)
        return up * coeff.reshape(-1, *[1] * (up.dim() - 1))


class LayerSSCam(_LayerSmoothedScoreCam):
    r"""SS-CAM (Smoothed Score-CAM): Score-CAM with Gaussian noise added to
    each mask, the scores averaged over ``num_samples`` noisy masks.

    .. math:: w_k = \mathrm{softmax}_k \frac{1}{N}\sum_{i=1}^{N}
              y^c\big(X \odot (H^k + \delta_i)\big), \quad
              \delta_i \sim \mathcal{N}(0, \sigma^2)

    per pixel, and :math:`L^c = \sum_k w_k A^k`, with :math:`H^k` as in
    :class:`LayerISCam` (torchcam 0.5.0's masks and defaults, ``N = 35``,
    :math:`\sigma = 2`). Noise is drawn per chunk from ``generator``; pass
    ``noise`` to fix it.

    Reference: Wang et al., "SS-CAM: Smoothed Score-CAM for Sharper Visual
    Feature Localization", 2020. https://arxiv.org/abs/2006.14255

    Args:
        forward_func (Callable): the model or any function returning scores.
        layer (torch.nn.Module): the layer whose activations are explained.
        device_ids (list[int], optional): for DataParallel models.
        layout (TokenLayout, optional): token / channels-last layout.
        num_samples (int, optional): noisy masks per channel. Default: 35
        std (float, optional): noise standard deviation. Default: 2.0

    Examples::

        >>> sscam = LayerSSCam(model, model.layer4, num_samples=8, std=2.0)
        >>> g = torch.Generator().manual_seed(0)
        >>> attr = sscam.attribute(images, target=3, generator=g,
        ...                        perturbations_per_eval=64)
    """

    def __init__(
        self,
        forward_func,
        layer,
        device_ids=None,
        layout=None,
        num_samples: int = 35,
        std: float = 2.0,
    ) -> None:
        super().__init__(
            forward_func, layer, device_ids, layout, num_samples=num_samples, std=std
        )

    def _mask(self, up: Tensor, b: Tensor, k: Tensor, i: Tensor) -> Tensor:
        noise = self._output_noise
        if noise is not None:
            return up + noise[i, b, k].to(up.device, up.dtype).unsqueeze(1)
        return up + self.std * draw(torch.randn, up.shape, self._generator, up)


class LayerSmoothGradCamPlusPlus(LayerGradCam):
    r"""Smooth Grad-CAM++: Grad-CAM++ with the gradient powers averaged over
    noisy copies of the input (SmoothGrad).

    With :math:`D^{p}_{k,ij} = \frac{1}{N}\sum_{n=1}^{N}
    (\partial y^c(X + \epsilon_n) / \partial A^k_{ij})^p`,
    :math:`\epsilon_n \sim \mathcal{N}(0, \sigma^2)`,

    .. math:: \alpha^{kc}_{ij} = \frac{D^2_{k,ij}}{2D^2_{k,ij} +
              \sum_{ab}A^k_{ab}\,D^3_{k,ij}}, \quad
              w^c_k = \sum_{ij}\alpha^{kc}_{ij}\,\mathrm{relu}(D^1_{k,ij}),
              \quad L^c = \sum_k w^c_k A^k

    where :math:`A` are the activations of the clean input (Grad-CAM++'s
    exponential-output form, as :class:`LayerGradCamPlusPlus`).

    Deliberate deviations from torchcam 0.5.0's ``SmoothGradCAMpp``: torchcam
    takes the ReLU of the *last* noisy sample's gradient instead of the mean
    :math:`D^1`, combines the weights with the *last noisy* sample's
    activations instead of the clean ones (so its map depends on the order of
    the samples), and uses :math:`\sum_{ab} A_{ab} D^3_{ab}` (one number per
    channel) in the denominator instead of the paper's
    :math:`\sum_{ab} A_{ab}\, D^3_{ij}`. Each is shown by a test.

    Reference: Omeiza et al., "Smooth Grad-CAM++: An Enhanced Inference Level
    Visualization Technique for Deep Convolutional Neural Network Models",
    2019. https://arxiv.org/abs/1908.01224

    Args:
        forward_func (Callable): the model or any function returning scores.
        layer (torch.nn.Module): the layer whose activations are explained.
        device_ids (list[int], optional): for DataParallel models.
        layout (TokenLayout, optional): token / channels-last layout.
        num_samples (int, optional): noisy inputs. Default: 4 (torchcam's)
        std (float, optional): noise standard deviation. Default: 0.3

    Examples::

        >>> cam = LayerSmoothGradCamPlusPlus(model, model.layer4, num_samples=8)
        >>> attr = cam.attribute(images, target=[3, 5])     # (2, 1, 7, 7)
    """

    eps = 1e-8

    def __init__(
        self,
        forward_func,
        layer,
        device_ids=None,
        layout=None,
        num_samples: int = 4,
        std: float = 0.3,
    ) -> None:
        super().__init__(forward_func, layer, device_ids, layout)
        self.num_samples, self.std = num_samples, std

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
        noise: Optional[Tensor] = None,
        generator: Optional[torch.Generator] = None,
    ) -> TensorOrTuple:
        r"""
        Args:
            inputs (Tensor): one input batch ``(B, ...)`` (the noise is added
                        to it).
            target (int, tuple, Tensor or list, optional): output index per
                        sample, as in Captum. Default: None
            additional_forward_args (Any, optional): extra forward arguments.
                        Default: None
            attribute_to_layer_input (bool, optional): explain the layer's input
                        instead of its output. Default: False
            relu_attributions (bool, optional): apply a ReLU to the map.
                        Default: False
            attr_dim_summation (bool, optional): sum over channels; ``False``
                        returns the weighted activations. Default: True
            grad_kwargs (dict, optional): passed to ``torch.autograd.grad``.
                        Default: None
            create_graph (bool, optional): return a differentiable map (see
                        :meth:`LayerGradCam.attribute`). Default: False
            noise (Tensor, optional): pre-drawn input noise of shape
                        ``(num_samples, *inputs.shape)`` (or broadcastable),
                        for exactly reproducible runs.
            generator (torch.Generator, optional): the random source of the
                        noise when ``noise`` is None.

        Returns:
            Tensor or tuple[Tensor, ...]: ``(B, 1, *spatial)`` maps on the
            input's device; a tuple for a layer with several outputs (one map
            per output).
        """
        inputs = format_inputs(inputs, forward_func=self.forward_func)
        if len(inputs) != 1:
            raise AttributionInputError(
                "LayerSmoothGradCamPlusPlus adds noise to one input tensor; got "
                f"{len(inputs)}."
            )
        with attribution_call(self.forward_func, keep_mode=create_graph) as record:
            x, n = inputs[0], self.num_samples
            _check_samples(n, noise, (n, *x.shape))
            common = dict(
                layout=self.layout,
                device_ids=self.device_ids,
                attribute_to_layer_input=attribute_to_layer_input,
            )
            if create_graph:  # activations in the graph to the parameters
                acts, _ = layer_activations_and_gradients(
                    self.forward_func,
                    self.layer,
                    inputs,
                    target,
                    additional_forward_args,
                    grad_kwargs=grad_kwargs,
                    create_graph=True,
                    **common,
                )
            else:
                acts = layer_activations(
                    self.forward_func,
                    self.layer,
                    inputs,
                    additional_forward_args,
                    **common,
                )
            powers: List[Tensor] = []
            for i in range(n):
                if noise is not None:
                    delta = noise[i].to(x.device, x.dtype).expand_as(x)
                else:
                    delta = self.std * draw(torch.randn, x.shape, generator, x)
                _, grads = layer_activations_and_gradients(
                    self.forward_func,
                    self.layer,
                    (x + delta,),
                    target,
                    additional_forward_args,
                    grad_kwargs=grad_kwargs,
                    create_graph=create_graph,
                    **common,
                )
                # the cubes overflow float16 (and lose bfloat16's few bits)
                work = [g.to(working_dtype(g.dtype)) for g in grads]
                step = [torch.stack([g, g * g, g * g * g]) for g in work]
                powers = [p + s for p, s in zip(powers, step)] if powers else step
            cams = []
            for a, p in zip(acts, powers):
                d1, d2, d3 = p / n
                sum_acts = spatial_reduce(a, "sum")
                alpha = d2 / (2 * d2 + sum_acts * d3 + self.eps)
                w = spatial_reduce(alpha * torch.relu(d1), "sum")
                weighted = w * a
                cams.append(
                    weighted.sum(dim=1, keepdim=True)
                    if attr_dim_summation
                    else weighted
                )
            return _finish(tuple(cams), relu_attributions, len(cams) > 1, record)
