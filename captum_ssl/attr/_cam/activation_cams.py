"""Gradient-free CAMs: weights from activations, perturbed forward passes or
the classifier."""

from __future__ import annotations

from typing import Any, Callable, List, Optional, Tuple

import torch
import torch.nn.functional as F
from captum._utils.typing import TargetType
from captum.attr import PerturbationAttribution
from captum.log import log_usage
from torch import Tensor, nn

from captum_ssl.attr._cam.base import (
    _finish,
    _LayerActivationCam,
    first_principal_projection,
    require_positions,
)
from captum_ssl.attr._cam.layer_perturbation import _LayerOutputPerturbation
from captum_ssl.attr._core import (
    AttributionInputError,
    TensorOrTuple,
    attribution_call,
    chunked_scores,
    format_inputs,
    per_sample_targets,
    resolve_layout,
)
from captum_ssl.attr._layout import TokenLayout, root_module, spatial_reduce

#: interpolation of a mask over 1, 2 or 3 spatial dimensions
MASK_MODES = {1: "linear", 2: "bilinear", 3: "trilinear"}


def masked_input(
    inputs: Tuple[Tensor, ...], acts: Tensor, method: str
) -> Tuple[Tensor, str]:
    """The one input the layer's maps mask, and the interpolation mode that
    takes a map to its size: a batch ``(B, C, *spatial)`` with as many spatial
    dimensions (1 to 3) as the layer's output ``acts``."""
    rank = acts.dim() - 2
    if len(inputs) != 1 or inputs[0].dim() != acts.dim() or rank not in MASK_MODES:
        raise AttributionInputError(
            f"{method} masks the input with the layer's upsampled maps: it needs "
            "one input (B, C, *spatial) with as many spatial dimensions (1 to 3: "
            "signals, images, volumes) as the layer's output; got inputs of shapes "
            f"{[tuple(t.shape) for t in inputs]} for a layer output of shape "
            f"{tuple(acts.shape)}. Choose a layer with positions of the input's "
            "kind, or a gradient CAM."
        )
    return inputs[0], MASK_MODES[rank]


class LayerEigenCam(_LayerActivationCam):
    r"""Eigen-CAM: the first principal component of the layer's activations.

    Each position's activation vector (centred per channel over positions) is
    projected on the first right-singular vector. Class-agnostic: ``target``
    is accepted for API compatibility and ignored.

    Deliberate deviation from pytorch-grad-cam: the SVD's sign is arbitrary and
    pytorch-grad-cam keeps LAPACK's sign, which can invert its map. Here the
    projection is oriented to correlate positively with the channel-mean
    activation map.

    Reference: Muhammad & Yeasin, "Eigen-CAM: Class Activation Map using
    Principal Components", IJCNN 2020. https://arxiv.org/abs/2008.00299

    Args:
        forward_func (Callable): the model or any function returning scores.
        layer (torch.nn.Module): the layer whose activations are explained.
        device_ids (list[int], optional): for DataParallel models.
        layout (TokenLayout, optional): token / channels-last layout; ``None``
                    infers it from the layer's output and the model.

    Examples::

        >>> eigen = LayerEigenCam(model, model.layer4)
        >>> attr = eigen.attribute(images)          # (B, 1, 7, 7)
    """

    @log_usage()
    def attribute(
        self,
        inputs: TensorOrTuple,
        target: TargetType = None,
        additional_forward_args: Any = None,
        attribute_to_layer_input: bool = False,
        relu_attributions: bool = False,
    ) -> TensorOrTuple:
        r"""
        Args:
            inputs (Tensor or tuple[Tensor, ...]): input batch.
            target (int, tuple, Tensor or list, optional): ignored by the
                        map (Eigen-CAM is class-agnostic), but checked against
                        the model's output when given. Default: None
            additional_forward_args (Any, optional): extra forward arguments.
            attribute_to_layer_input (bool, optional): use the layer's input.
            relu_attributions (bool, optional): ReLU the map. Default: False

        Returns:
            Tensor or tuple[Tensor, ...]: ``(B, 1, *spatial)`` maps on the
            input's device; a tuple of maps for a layer with several outputs
            (one per output).
        """
        formatted = format_inputs(inputs, False, self.forward_func)
        with attribution_call(self.forward_func) as record:
            acts = self._activations(
                formatted, additional_forward_args, attribute_to_layer_input, target
            )

            def eigen_cam(a: Tensor) -> Tensor:
                require_positions(a, "LayerEigenCam")
                return first_principal_projection(a, a.mean(dim=1, keepdim=True))

            cams = self._each_output(acts, eigen_cam)
            return _finish(cams, relu_attributions, len(cams) > 1, record)


class _LayerPerturbationCam(_LayerActivationCam, PerturbationAttribution):
    """Base of CAMs whose channel weights come from perturbed forward passes.

    Subclasses implement ``_weights(acts, inputs, target, args,
    perturbations_per_eval, show_progress)``; the evaluations are batched by
    :func:`~captum_ssl.attr._core.chunked_scores`.
    """

    #: False where the method perturbs the layer's output itself.
    supports_layer_input = True

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
    ) -> TensorOrTuple:
        r"""
        Args:
            inputs (Tensor or tuple[Tensor, ...]): input batch.
            target (int, tuple, Tensor or list, optional): output index per
                        sample. Default: None
            additional_forward_args (Any, optional): extra forward arguments.
            attribute_to_layer_input (bool, optional): use the layer's input.
                        Default: False
            relu_attributions (bool, optional): ReLU the map. Default: False
            perturbations_per_eval (int, optional): perturbed inputs per
                        forward pass (one per channel and image in all).
                        ``None`` picks the chunk from the input's size and
                        the free memory: on CUDA up to a quarter of the free
                        memory (at most 256), on the CPU a few 224 px images
                        (larger CPU batches are not faster); see
                        ``captum_ssl.attr._core.auto_perturbations_per_eval``.
                        Speed and memory only: the map is the same for any
                        value. Default: None
            show_progress (bool, optional): print a progress bar of the
                        chunks (Captum's, on stderr); for long runs on the
                        CPU. Default: False

        Returns:
            Tensor or tuple[Tensor, ...]: ``(B, 1, *spatial)`` maps on the
            input's device; a tuple of maps for a layer with several outputs
            (one per output).
        """
        if attribute_to_layer_input and not self.supports_layer_input:
            raise ValueError(
                f"{type(self).__name__} perturbs the layer's output; use "
                "attribute_to_layer_input=False or pick the preceding layer."
            )
        return self._attribute(
            inputs,
            target,
            additional_forward_args,
            attribute_to_layer_input,
            relu_attributions,
            perturbations_per_eval=perturbations_per_eval,
            show_progress=show_progress,
        )


class LayerScoreCam(_LayerPerturbationCam):
    r"""Score-CAM: each channel weighted by the score of the input it masks.

    Each activation map :math:`A^k` is upsampled to the input (bilinear,
    ``align_corners=True``), min-max normalised to :math:`H^k \in [0, 1]`, and
    the model scores the masked input :math:`X \odot H^k`. The weights are the
    softmax over channels of those target scores, as in pytorch-grad-cam:
    :math:`w_k = \mathrm{softmax}_k\, y^c(X \odot H^k)`.

    Masks and masked inputs are built and evaluated ``perturbations_per_eval``
    at a time across images and channels, so memory stays at one such batch
    (pytorch-grad-cam builds all ``B x C x 3 x H x W`` masked inputs at once).

    Cost: one forward pass per channel and image (2048 per image on
    ResNet-50's ``layer4``: minutes per image on a CPU). ``show_progress=True``
    prints a progress bar; ``max_channels=k`` scores only the ``k`` channels
    of highest activation variance per image (Faster Score-CAM, from the
    authors' repository), the others get weight 0: ``k`` passes per image.

    Reference: Wang et al., "Score-CAM: Score-Weighted Visual Explanations for
    Convolutional Neural Networks", CVPR Workshops 2020.
    https://arxiv.org/abs/1910.01279

    Args:
        forward_func (Callable): the model or any function returning scores.
        layer (torch.nn.Module): the layer whose activations are explained.
        device_ids (list[int], optional): for DataParallel models.
        layout (TokenLayout, optional): token / channels-last layout.

    Examples::

        >>> score_cam = LayerScoreCam(model, model.layer4)
        >>> attr = score_cam.attribute(images, target=3, show_progress=True)
        >>> fast = score_cam.attribute(images, target=3, max_channels=64)
    """

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
        max_channels: Optional[int] = None,
    ) -> TensorOrTuple:
        r"""
        Args:
            inputs, target, additional_forward_args, attribute_to_layer_input,
            relu_attributions, perturbations_per_eval, show_progress: as in
                        :meth:`LayerAblationCam.attribute`.
            max_channels (int, optional): score only this many channels per
                        image, those of highest activation variance (Faster
                        Score-CAM); the others get weight 0. ``None``: every
                        channel (the paper). Default: None

        Returns:
            Tensor or tuple[Tensor, ...]: ``(B, 1, *spatial)`` maps on the
            input's device; a tuple of maps for a layer with several outputs
            (one per output).
        """
        if max_channels is not None and (
            isinstance(max_channels, bool)
            or not isinstance(max_channels, int)
            or max_channels < 1
        ):
            raise AttributionInputError(
                f"max_channels must be an integer >= 1, or None for every channel; "
                f"got {max_channels!r}."
            )
        return self._attribute(
            inputs,
            target,
            additional_forward_args,
            attribute_to_layer_input,
            relu_attributions,
            perturbations_per_eval=perturbations_per_eval,
            show_progress=show_progress,
            max_channels=max_channels,
        )

    def _weights(
        self,
        acts: Tensor,
        inputs: Tuple[Tensor, ...],
        target: TargetType,
        additional_forward_args: Any,
        perturbations_per_eval: Optional[int] = None,
        show_progress: bool = False,
        max_channels: Optional[int] = None,
    ) -> Tensor:
        x, mode = masked_input(inputs, acts, "LayerScoreCam")
        chosen = None  # (B, k) channel indices, or None: every channel
        if max_channels is not None and max_channels < acts.shape[1]:
            spread = acts.flatten(2).var(dim=2)
            chosen = spread.topk(max_channels, dim=1).indices

        def make_batch(b: Tensor, k: Tensor) -> Tuple[Tensor, ...]:
            # masks are built per chunk: memory stays at one chunk of inputs
            b, k = b.to(x.device), k.to(x.device)
            if chosen is not None:
                k = chosen[b, k]
            up = F.interpolate(
                acts[b, k].unsqueeze(1),
                size=x.shape[2:],
                mode=mode,
                align_corners=True,
            )
            lo, hi = spatial_reduce(up, "amin"), spatial_reduce(up, "amax")
            return (x[b] * (up - lo) / (hi - lo + 1e-8),)

        scores = chunked_scores(
            self.forward_func,
            inputs,
            target,
            additional_forward_args,
            acts.shape[1] if chosen is None else chosen.shape[1],
            make_batch,
            perturbations_per_eval,
            show_progress,
            desc="Score-CAM",
        )
        weights = torch.softmax(scores, dim=1)
        if chosen is None:
            return weights
        return torch.zeros_like(spread).scatter_(1, chosen, weights)


class LayerAblationCam(_LayerOutputPerturbation, _LayerPerturbationCam):
    r"""Ablation-CAM: each channel weighted by the score drop when it is zeroed.

    .. math:: w_k = \frac{y^c - y^c_k}{y^c}

    where :math:`y^c_k` is the target score with feature map :math:`A^k` set to
    zero at the layer. On token layers the channel is zeroed at the patch
    tokens (the feature map); prefix tokens are left as they are.

    Prefix caching: the network up to the layer runs once per image and each
    ablation re-runs only what follows the layer, with the same scores as
    full forward passes (proven per call, else full passes with a warning;
    see :mod:`captum_ssl.attr._prefix`). ``cam.prefix_cache = False``
    re-runs the whole model for every channel.

    Deliberate deviation from pytorch-grad-cam: when a layer's activations can
    be negative (e.g. a ViT LayerNorm output), pytorch-grad-cam replaces the
    ablated channel with ``min(activations) - 1e7`` instead of zero. That is
    not the paper's ablation and makes the scores depend on an arbitrary
    constant; here the channel is always zeroed as in the paper.

    Reference: Desai & Ramaswamy, "Ablation-CAM: Visual Explanations for Deep
    Convolutional Network via Gradient-free Localization", WACV 2020.
    https://openaccess.thecvf.com/content_WACV_2020/papers/Desai_Ablation-CAM_Visual_Explanations_for_Deep_Convolutional_Network_via_Gradient-free_Localization_WACV_2020_paper.pdf

    Args:
        forward_func (Callable): the model or any function returning scores.
        layer (torch.nn.Module): the layer whose channels are ablated.
        device_ids (list[int], optional): for DataParallel models.
        layout (TokenLayout, optional): token / channels-last layout.

    Examples::

        >>> ablation = LayerAblationCam(model, model.layer4)
        >>> attr = ablation.attribute(images, target=3, perturbations_per_eval=64)
    """

    supports_layer_input = False

    def _weights(
        self,
        acts: Tensor,
        inputs: Tuple[Tensor, ...],
        target: TargetType,
        additional_forward_args: Any,
        perturbations_per_eval: Optional[int] = None,
        show_progress: bool = False,
    ) -> Tensor:
        layout = resolve_layout(self.forward_func, self.layer, inputs, self.layout)
        channels = acts.shape[1]

        def ablate(out: Tensor, b: Tensor, k: Tensor) -> Tensor:
            rows = torch.arange(len(k), device=out.device)
            if layout.resolve(out.shape).channels_first:
                # a copy with one channel zeroed per row (cheaper than a product)
                ablated = out.clone(memory_format=torch.contiguous_format)
                ablated[rows, k.to(out.device)] = 0
                return ablated
            keep = torch.ones(
                len(k), channels, *[1] * (acts.dim() - 2), device=out.device
            ).to(out.dtype)
            keep[rows, k.to(out.device)] = 0
            return layout.from_grid(layout.to_grid(out) * keep, like=out)

        base, ablated = self._output_scores(
            inputs,
            target,
            additional_forward_args,
            channels,
            ablate,
            perturbations_per_eval,
            show_progress,
            desc="Ablation-CAM",
        )
        return (base.unsqueeze(1) - ablated) / base.unsqueeze(1)


class LayerClassActivationMap(_LayerActivationCam):
    r"""CAM: feature maps weighted by the classifier's weights for the target.

    .. math:: L^c = \sum_k w^c_k A^k

    for models that end in global average pooling and a linear classifier
    :math:`y^c = \sum_k w^c_k \frac{1}{hw}\sum_{ij} A^k_{ij} + b^c`. For such
    models Grad-CAM equals CAM divided by :math:`hw`.

    Reference: Zhou et al., "Learning Deep Features for Discriminative
    Localization", CVPR 2016. https://arxiv.org/abs/1512.04150

    Args:
        forward_func (Callable): the model or any function returning scores.
        layer (torch.nn.Module): the last feature layer before global pooling.
        device_ids (list[int], optional): for DataParallel models.
        layout (TokenLayout, optional): token / channels-last layout.
        fc (torch.nn.Linear, optional): the classifier. ``None`` finds it on the
                    model: timm's ``get_classifier()``, else ``fc``,
                    ``classifier`` or ``head``. Default: None

    Examples::

        >>> cam = LayerClassActivationMap(model, model.layer4)   # uses model.fc
        >>> attr = cam.attribute(images, target=[3, 5])
    """

    def __init__(
        self,
        forward_func: Callable,
        layer: nn.Module,
        device_ids: Optional[List[int]] = None,
        layout: Optional[TokenLayout] = None,
        fc: Optional[nn.Linear] = None,
    ) -> None:
        super().__init__(forward_func, layer, device_ids, layout)
        self.fc = fc if fc is not None else _find_classifier(forward_func)

    @log_usage()
    def attribute(
        self,
        inputs: TensorOrTuple,
        target: TargetType = None,
        additional_forward_args: Any = None,
        attribute_to_layer_input: bool = False,
        relu_attributions: bool = False,
    ) -> TensorOrTuple:
        r"""
        Args:
            inputs (Tensor or tuple[Tensor, ...]): input batch.
            target (int, Tensor or list): class index per sample (required).
            additional_forward_args (Any, optional): extra forward arguments.
            attribute_to_layer_input (bool, optional): use the layer's input.
            relu_attributions (bool, optional): ReLU the map. Default: False

        Returns:
            Tensor or tuple[Tensor, ...]: ``(B, 1, *spatial)`` maps on the
            input's device; a tuple of maps for a layer with several outputs
            (one per output).
        """
        return self._attribute(
            inputs,
            target,
            additional_forward_args,
            attribute_to_layer_input,
            relu_attributions,
        )

    def _weights(
        self,
        acts: Tensor,
        inputs: Tuple[Tensor, ...],
        target: TargetType,
        additional_forward_args: Any,
    ) -> Tensor:
        weight = self.fc.weight
        if weight.shape[1] != acts.shape[1]:
            raise AttributionInputError(
                f"The classifier takes {weight.shape[1]} features but the layer has "
                f"{acts.shape[1]} channels: choose the last feature layer before "
                "global pooling, or pass fc= the matching linear layer."
            )
        if target is None:
            raise AttributionInputError(
                "LayerClassActivationMap needs target=<class index> (one, or one "
                "per sample)."
            )
        batch = acts.shape[0]
        classes = torch.as_tensor(
            [
                int(t[0] if isinstance(t, tuple) else t)
                for t in per_sample_targets(target, batch)
            ],
            device=weight.device,
        )
        n = weight.shape[0]
        if bool(((classes < -n) | (classes >= n)).any()):
            raise AttributionInputError(
                f"target out of range for a classifier with {n} classes: use a "
                f"class index in [0, {n - 1}]."
            )
        return weight.detach()[classes].to(acts.device, acts.dtype)


def _find_classifier(forward_func: Callable) -> nn.Linear:
    model = root_module(forward_func)
    while isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        model = model.module  # the classifier is the wrapped model's
    candidates = []
    if model is not None:
        get_classifier = getattr(model, "get_classifier", None)
        if callable(get_classifier):
            candidates.append(get_classifier())
        candidates += [getattr(model, n, None) for n in ("fc", "classifier", "head")]
    for c in candidates:
        if isinstance(c, nn.Linear):
            return c
    raise AttributionInputError(
        "LayerClassActivationMap needs the linear classifier after global pooling: "
        "none was found on the model (get_classifier(), fc, classifier, head). "
        "Pass fc=<the nn.Linear layer>."
    )
