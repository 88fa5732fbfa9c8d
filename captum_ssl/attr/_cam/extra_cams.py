"""More single-layer CAMs: FEM, KPCA-CAM, Random-CAM, ShapleyCAM, Finer-CAM,
and the Sobel-CAM input baseline.

Each states only its weighting; activations, gradients, targets and the
token-to-grid layout come from :mod:`captum_ssl.attr._cam.base` and
:mod:`captum_ssl.attr._core`.
"""

from __future__ import annotations

import contextlib
import math
from typing import (
    Any,
    Callable,
    Dict,
    Iterator,
    List,
    Optional,
    Sequence,
    Tuple,
    Type,
)

import torch
import torch.nn.functional as F
from captum._utils.common import _run_forward
from captum._utils.typing import TargetType
from captum.attr import Attribution
from captum.log import log_usage
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from captum_ssl._outputs import model_output
from captum_ssl.attr._cam.base import (
    LayerGradCam,
    _finish,
    _LayerActivationCam,
    documented,
    require_positions,
)
from captum_ssl.attr._core import (
    AttributionInputError,
    TensorOrTuple,
    attribution_call,
    check_target,
    draw,
    format_inputs,
    layer_errors,
    normalize_target,
    per_sample_targets,
    record_from_layer_only,
    resolve_layout,
    selecting_forward,
)
from captum_ssl.attr._layout import (
    TokenLayout,
    root_module,
    spatial_reduce,
    spatial_shape,
)


# ------------------------------------------------------------------------ FEM
class LayerFEM(_LayerActivationCam):
    r"""FEM, the Feature Explanation Method: channels weighted by how often they
    fire far above their mean.

    .. math:: w_k = \frac{1}{hw}\sum_{ij}\big[A^k_{ij} > \mu_k + K\sigma_k\big],
              \quad L = \sum_k w_k A^k

    with :math:`\mu_k, \sigma_k` the spatial mean and (population) standard
    deviation of channel :math:`k` (the "K-sigma rule", ``k`` below).
    Class-agnostic and gradient-free: ``target`` is only checked.

    Reference: Fuad et al., "Features Understanding in 3D CNNs for Actions
    Recognition in Video", IPTA 2020. https://hal.science/hal-02963298

    Args:
        forward_func (Callable): the model or any function returning scores.
        layer (torch.nn.Module): the layer whose activations are explained.
        device_ids (list[int], optional): for DataParallel models.
        layout (TokenLayout, optional): token / channels-last layout; ``None``
                    reads it from the model.

    Examples::

        >>> fem = LayerFEM(model, model.layer4)
        >>> attr = fem.attribute(images, k=2.0)          # (B, 1, 7, 7)
    """

    @log_usage()
    def attribute(
        self,
        inputs: TensorOrTuple,
        target: TargetType = None,
        additional_forward_args: Any = None,
        attribute_to_layer_input: bool = False,
        relu_attributions: bool = False,
        k: float = 2.0,
    ) -> TensorOrTuple:
        r"""
        Args:
            inputs (Tensor or tuple[Tensor, ...]): input batch.
            target (int, tuple, Tensor or list, optional): ignored by the
                        map (FEM is class-agnostic), but checked against the
                        model's output when given. Default: None
            additional_forward_args (Any, optional): extra forward arguments.
            attribute_to_layer_input (bool, optional): use the layer's input.
            relu_attributions (bool, optional): ReLU the map. Default: False
            k (float, optional): the threshold in standard deviations above
                        the mean. Default: 2.0

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
            k=k,
        )

    def _weights(self, acts: Tensor, inputs, target, args, k: float = 2.0) -> Tensor:
        require_positions(acts, "LayerFEM")
        mean, std = spatial_reduce(acts, "mean"), spatial_reduce(acts, "std")
        hot = (acts > mean + k * std).to(acts.dtype)
        return spatial_reduce(hot, "mean").flatten(1)


# ------------------------------------------------------------------- KPCA-CAM
KERNELS = ("linear", "poly", "rbf", "sigmoid", "cosine")


def _kernel_matrix(
    x: Tensor, kernel: str, gamma: Optional[float], degree: int, coef0: float
) -> Tensor:
    """Kernel ``k(x_i, x_j)`` of the rows of ``x`` ``(B, N, C)`` -> ``(B, N, N)``."""
    g = 1.0 / x.shape[-1] if gamma is None else float(gamma)
    dot = x @ x.transpose(1, 2)
    if kernel == "linear":
        return dot
    if kernel == "poly":
        return (g * dot + coef0) ** degree
    if kernel == "sigmoid":
        return torch.tanh(g * dot + coef0)
    if kernel == "rbf":
        sq = (x * x).sum(-1)
        return torch.exp(-g * (sq[:, :, None] + sq[:, None, :] - 2 * dot).clamp(min=0))
    if kernel == "cosine":
        n = x.norm(dim=-1).clamp(min=1e-12)
        return dot / (n[:, :, None] * n[:, None, :])
    raise AttributionInputError(f"kernel={kernel!r}: use one of {KERNELS}.")


class LayerKPCACam(_LayerActivationCam):
    r"""KPCA-CAM: Eigen-CAM with kernel PCA in place of PCA.

    Each position's activation vector (centred per channel over positions) is
    projected on the first kernel principal component: with the centred kernel
    matrix :math:`\tilde K` of the positions and its top eigenpair
    :math:`(\lambda_1, v_1)`, the map is :math:`\sqrt{\lambda_1}\, v_1` (the
    projection kernel PCA assigns to the training points). Class-agnostic.
    Kernels as scikit-learn's (``gamma`` defaults to ``1 / channels``,
    ``coef0=1``, ``degree=3``); computed in float64 on the input's device.

    Deliberate deviation from pytorch-grad-cam's ``KPCA_CAM``: an eigenvector's
    sign is arbitrary (pytorch-grad-cam keeps scikit-learn's, which can invert
    the map); here the map is oriented to correlate positively with the
    channel-mean activation map, as :class:`LayerEigenCam`.

    Reference: Karmani et al., "KPCA-CAM: Visual Explainability of Deep
    Computer Vision Models using Kernel PCA", 2024.
    https://arxiv.org/abs/2410.00267

    Args:
        forward_func (Callable): the model or any function returning scores.
        layer (torch.nn.Module): the layer whose activations are explained.
        device_ids (list[int], optional): for DataParallel models.
        layout (TokenLayout, optional): token / channels-last layout.

    Examples::

        >>> kpca = LayerKPCACam(model, model.layer4)
        >>> attr = kpca.attribute(images, kernel="rbf")   # (B, 1, 7, 7)
    """

    @log_usage()
    def attribute(
        self,
        inputs: TensorOrTuple,
        target: TargetType = None,
        additional_forward_args: Any = None,
        attribute_to_layer_input: bool = False,
        relu_attributions: bool = False,
        kernel: str = "sigmoid",
        gamma: Optional[float] = None,
        degree: int = 3,
        coef0: float = 1.0,
    ) -> TensorOrTuple:
        r"""
        Args:
            inputs (Tensor or tuple[Tensor, ...]): input batch.
            target (int, tuple, Tensor or list, optional): ignored by the
                        map (class-agnostic), checked when given. Default: None
            additional_forward_args (Any, optional): extra forward arguments.
            attribute_to_layer_input (bool, optional): use the layer's input.
            relu_attributions (bool, optional): ReLU the map. Default: False
            kernel (str, optional): ``"linear"``, ``"poly"``, ``"rbf"``,
                        ``"sigmoid"`` or ``"cosine"``. Default: "sigmoid"
            gamma (float, optional): kernel coefficient; ``None`` is
                        ``1 / channels``. Default: None
            degree (int, optional): degree of ``"poly"``. Default: 3
            coef0 (float, optional): offset of ``"poly"`` / ``"sigmoid"``.
                        Default: 1.0

        Returns:
            Tensor or tuple[Tensor, ...]: ``(B, 1, *spatial)`` maps on the
            input's device; a tuple of maps for a layer with several outputs
            (one per output).
        """
        if kernel not in KERNELS:
            raise AttributionInputError(f"kernel={kernel!r}: use one of {KERNELS}.")
        formatted = format_inputs(inputs, False, self.forward_func)
        with attribution_call(self.forward_func) as record:
            acts = self._activations(
                formatted, additional_forward_args, attribute_to_layer_input, target
            )
            cams = self._each_output(
                acts, lambda a: _kpca_map(a, kernel, gamma, degree, coef0)
            )
            return _finish(cams, relu_attributions, len(cams) > 1, record)


def _kpca_map(
    acts: Tensor, kernel: str, gamma: Optional[float], degree: int, coef0: float
) -> Tensor:
    """KPCA-CAM's map ``(B, 1, *spatial)`` of activations ``(B, C, *spatial)``."""
    require_positions(acts, "LayerKPCACam")
    b, c = acts.shape[:2]
    spatial = spatial_shape(acts)
    n = math.prod(spatial)
    x = acts.reshape(b, c, n).transpose(1, 2).double()
    bad = ~torch.isfinite(x).flatten(1).all(1)  # solved apart, then NaN
    x = x.masked_fill(bad.view(b, 1, 1), 0.0)
    x = x - x.mean(dim=1, keepdim=True)
    k = _kernel_matrix(x, kernel, gamma, degree, coef0)
    k = (
        k
        - k.mean(dim=1, keepdim=True)
        - k.mean(dim=2, keepdim=True)
        + k.mean(dim=(1, 2), keepdim=True)
    )
    evals, evecs = torch.linalg.eigh(k)
    proj = evecs[..., -1] * evals[:, -1:].clamp(min=0).sqrt()  # (B, N)
    ref = acts.mean(dim=1).reshape(b, n).double()
    ref = ref - ref.mean(dim=1, keepdim=True)
    sign = torch.sign((proj * ref).sum(dim=1, keepdim=True))
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    cam = (proj * sign).masked_fill(bad.view(b, 1), float("nan"))
    return cam.reshape(b, 1, *spatial).to(acts.dtype)


# ----------------------------------------------------------------- Random-CAM
class LayerRandomCam(_LayerActivationCam):
    r"""Random-CAM, a sanity baseline: activations weighted by random numbers.

    .. math:: L = \sum_k w_k A^k, \quad w_k \sim U(-1, 1)

    drawn per sample and channel. A method that scores no better than this on
    a metric is not explaining the model (Adebayo et al.'s sanity-check idea).

    Reference: the baseline of pytorch-grad-cam's ``RandomCAM``; Adebayo et al.,
    "Sanity Checks for Saliency Maps", NeurIPS 2018.
    https://arxiv.org/abs/1810.03292

    Args:
        forward_func (Callable): the model or any function returning scores.
        layer (torch.nn.Module): the layer whose activations are used.
        device_ids (list[int], optional): for DataParallel models.
        layout (TokenLayout, optional): token / channels-last layout.

    Examples::

        >>> g = torch.Generator().manual_seed(0)
        >>> attr = LayerRandomCam(model, model.layer4).attribute(x, generator=g)
    """

    @log_usage()
    def attribute(
        self,
        inputs: TensorOrTuple,
        target: TargetType = None,
        additional_forward_args: Any = None,
        attribute_to_layer_input: bool = False,
        relu_attributions: bool = False,
        generator: Optional[torch.Generator] = None,
    ) -> TensorOrTuple:
        r"""
        Args:
            inputs (Tensor or tuple[Tensor, ...]): input batch.
            target (int, tuple, Tensor or list, optional): ignored by the
                        map, checked when given. Default: None
            additional_forward_args (Any, optional): extra forward arguments.
            attribute_to_layer_input (bool, optional): use the layer's input.
            relu_attributions (bool, optional): ReLU the map. Default: False
            generator (torch.Generator, optional): source of the weights, on
                        any device (the same weights for an input on the CPU
                        or a GPU); ``None`` uses torch's global one.

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
            generator=generator,
        )

    def _weights(self, acts: Tensor, inputs, target, args, generator=None) -> Tensor:
        b, c = acts.shape[:2]
        u = draw(torch.rand, (b, c), generator, acts)
        return 2 * u - 1


# ------------------------------------------------------------------ ShapleyCAM
def _layer_leaf(
    layer: nn.Module,
    attribute_to_layer_input: bool,
    store: List[Tuple[Tensor, ...]],
    keep_graph: bool = False,
) -> RemovableHandle:
    """A hook that makes each tensor of the layer's output (or of its
    positional inputs) a fresh leaf requiring grad, so derivatives of any order
    with respect to it can be taken; ``store`` gets the leaves of each call.
    With ``keep_graph`` a tensor that is already in the autograd graph is kept
    (derivatives with respect to it still work, and the graph to the
    parameters before the layer stays)."""

    def leaves(values: Tuple[Any, ...]) -> Tuple[Any, ...]:
        made, passed = [], []
        for v in values:
            if not isinstance(v, Tensor):
                passed.append(v)
                continue
            out = v if keep_graph and v.requires_grad else v.detach().requires_grad_()
            made.append(out)
            passed.append(out.clone())  # later in-place ops (ReLU(inplace)) hit it
        store.append(tuple(made))
        return tuple(passed)

    if attribute_to_layer_input:

        def pre_hook(_m: nn.Module, args: Tuple[Any, ...]) -> Tuple[Any, ...]:
            return leaves(args)

        return layer.register_forward_pre_hook(pre_hook)

    def hook(_m: nn.Module, _inp: Any, out: Any) -> Any:
        several = isinstance(out, tuple) and all(isinstance(t, Tensor) for t in out)
        if not (isinstance(out, Tensor) or several):
            raise AttributionInputError(
                f"The layer {layer.__class__.__name__} returns "
                f"{type(out).__name__}, not a tensor or a tuple of tensors: choose "
                "a submodule that returns tensors."
            )
        return leaves(out) if several else leaves((out,))[0]

    return layer.register_forward_hook(hook)


@contextlib.contextmanager
def unfused_attention(forward_func: Callable) -> Iterator[None]:
    """Turn off fused attention (timm's ``fused_attn``) of every module of the
    model within the block: the fused kernels have no second derivative.
    Each module's own flag is restored on exit, also when the block raises."""
    model = root_module(forward_func)
    saved = []
    try:
        for m in [] if model is None else model.modules():
            if getattr(m, "fused_attn", False) is True:
                own = "fused_attn" in m.__dict__
                saved.append((m, own, m.__dict__.get("fused_attn")))
                m.__dict__["fused_attn"] = False  # a plain attribute (timm)
        yield
    finally:
        for m, own, value in reversed(saved):
            if own:
                m.fused_attn = value
            else:
                del m.fused_attn


@documented
class LayerShapleyCam(LayerGradCam):
    r"""ShapleyCAM: Grad-CAM with a second-order (Shapley value) correction.

    .. math:: w_k = \frac{1}{hw}\sum_{ij}\Big(\frac{\partial y^c}{\partial A}
              - \frac{1}{2}\,\frac{\partial^2 y^c}{\partial A^2} A\Big)^k_{ij},
              \quad L^c = \sum_k w_k A^k

    The Hessian-vector product :math:`H A` is taken with respect to the
    layer's activations (one extra backward pass); it vanishes for layers
    followed only by piecewise-linear operations (ReLU, pooling, linear
    heads), where ShapleyCAM equals Grad-CAM. Fused attention kernels have no
    second derivative, so timm's ``fused_attn`` is turned off during the call
    (and restored). The paper pairs it with the
    ReST target (``logit - cross-entropy``); pass such a score through
    ``forward_func`` if wanted.

    Reference: Cai, "CAMs as Shapley Value-based Explainers", 2025.
    https://arxiv.org/abs/2501.06261

    {gradient_cam_args}

    Examples::

        >>> cam = LayerShapleyCam(vit, vit.blocks[-1].norm1)
        >>> attr = cam.attribute(x, target=[3, 7])          # (2, 1, 14, 14)
    """

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
                        instead of its output. Default: False
            relu_attributions (bool, optional): apply a ReLU to the map.
                        Default: False
            attr_dim_summation (bool, optional): sum over channels; ``False``
                        returns the weighted activations ``(B, C, *spatial)``.
                        Default: True
            grad_kwargs (dict, optional): passed to the first
                        ``torch.autograd.grad`` (the gradient; the
                        Hessian-vector product needs ``create_graph=True``
                        there, which is always set). Default: None
            create_graph (bool, optional): return a differentiable map: the
                        graph to the model's parameters is kept (nothing frozen
                        or detached), so a loss on the map trains the model, as
                        :meth:`LayerGradCam.attribute`. Default: False

        Returns:
            Tensor or tuple[Tensor, ...]: maps ``(B, 1, *spatial)``
            (``(B, 1, h, w)`` on image and token layers) on the input's
            device, not normalised; a tuple for a layer with several outputs
            (one map per output, as :meth:`LayerGradCam.attribute`).
        """
        inputs = format_inputs(inputs, forward_func=self.forward_func)
        with attribution_call(self.forward_func, keep_mode=create_graph) as record:
            cams = self._shapley_cam(
                inputs,
                target,
                additional_forward_args,
                attribute_to_layer_input,
                grad_kwargs,
                create_graph,
            )
            if attr_dim_summation:
                cams = tuple(c.sum(dim=1, keepdim=True) for c in cams)
            return _finish(cams, relu_attributions, len(cams) > 1, record)

    def _shapley_cam(
        self,
        inputs: Tuple[Tensor, ...],
        target: TargetType,
        additional_forward_args: Any,
        attribute_to_layer_input: bool,
        grad_kwargs: Optional[Dict[str, Any]] = None,
        create_graph: bool = False,
    ) -> Tuple[Tensor, ...]:
        """The weighted activations ``w_k A^k`` ``(B, C, *spatial)``, one per
        output of the layer (per input with ``attribute_to_layer_input``)."""
        layout = resolve_layout(
            self.forward_func,
            self.layer,
            inputs,
            self.layout,
            attribute_to_layer_input,
        )
        store: List[Tuple[Tensor, ...]] = []
        handle = _layer_leaf(self.layer, attribute_to_layer_input, store, create_graph)
        frozen = (
            contextlib.nullcontext()
            if create_graph
            else record_from_layer_only(self.forward_func)
        )
        try:
            with (
                layer_errors(self.layer, self.forward_func),
                frozen,
                unfused_attention(self.forward_func),
                torch.enable_grad(),
            ):
                out = _run_forward(
                    selecting_forward(self.forward_func, target),
                    inputs,
                    None,
                    additional_forward_args,
                )
        finally:
            handle.remove()
        if len(store) != 1:
            raise AttributionInputError(
                f"The layer {self.layer.__class__.__name__} ran {len(store)} times "
                "in one forward pass; LayerShapleyCam needs a layer that runs "
                "exactly once (the model's own instance, not a shared module)."
            )
        acts = store[0]
        kwargs = {**(grad_kwargs or {}), "create_graph": True}
        with layer_errors(self.layer, self.forward_func), torch.enable_grad():
            grads = torch.autograd.grad(out.sum(), acts, **kwargs)
            # output i: the Hessian block of output i with itself, times A_i
            # (the other outputs held as the model computes them)
            hvps = [
                torch.autograd.grad(
                    g,
                    a,
                    grad_outputs=a.detach(),
                    allow_unused=True,
                    retain_graph=True,
                    create_graph=create_graph,
                )[0]
                if g.requires_grad
                else None
                for a, g in zip(acts, grads)
            ]
        maps = []
        for act, grad, hvp in zip(acts, grads, hvps):
            hvp = torch.zeros_like(grad) if hvp is None else hvp
            if not create_graph:
                act, grad, hvp = act.detach(), grad.detach(), hvp.detach()
            a, g, h = (layout.to_grid(t) for t in (act, grad, hvp))
            maps.append(spatial_reduce(g - 0.5 * h, "mean") * a)
        return tuple(maps)


# ------------------------------------------------------------------- Finer-CAM
def finer_score(
    output: Tensor,
    target: Tensor,
    comparison_categories: Sequence[int] = (1, 2, 3),
    alpha: float = 1.0,
) -> Tensor:
    r"""Finer-CAM's score: the target's logit minus those of its look-alikes.

    For each sample the classes are ranked by :math:`|y_j - y_c|` (``c`` the
    target, rank 0); the classes at ranks ``comparison_categories`` are the
    comparisons :math:`d`, weighted by their softmax probabilities :math:`p_d`:

    .. math:: s = \frac{\sum_d p_d\,(y_c - \alpha\, y_d)}{\sum_d p_d + 10^{-9}}

    Args:
        output (Tensor): logits ``(B, K)``.
        target (Tensor): class per sample ``(B,)``.
        comparison_categories (sequence of int, optional): similarity ranks of
                    the compared classes; ranks ``>= K`` are dropped.
                    Default: (1, 2, 3)
        alpha (float, optional): strength of the comparison. Default: 1.0

    Returns:
        Tensor: ``(B,)`` scores, differentiable in ``output``.
    """
    ranks = [int(r) for r in comparison_categories if int(r) < output.shape[1]]
    if not ranks:
        raise AttributionInputError(
            "Finer-CAM needs at least one comparison class: the model has "
            f"{output.shape[1]} outputs and comparison_categories="
            f"{list(comparison_categories)}."
        )
    yc = output.gather(1, target[:, None])
    with torch.no_grad():
        order = torch.argsort((output - yc).abs(), dim=1, stable=True)
    comp = order[:, ranks]
    p = torch.softmax(output, dim=1).gather(1, comp)
    num = (p * (yc - alpha * output.gather(1, comp))).sum(dim=1)
    return num / (p.sum(dim=1) + 1e-9)


class LayerFinerCam(LayerGradCam):
    r"""Finer-CAM: a gradient CAM of the target *against its most similar
    classes*, which brings out the details that tell them apart.

    The base CAM (Grad-CAM by default) explains :func:`finer_score` instead of
    the target's logit: the target minus the classes whose logits are closest
    to it (ranks ``comparison_categories``), weighted by their softmax
    probabilities, with strength ``alpha``. Gradients flow through the
    probability weights too, as in pytorch-grad-cam's ``FinerWeightedTarget``.
    ``target`` is required (one class, or one per sample).

    Reference: Zhang et al., "Finer-CAM: Spotting the Difference Reveals
    Finer Details for Visual Explanation", CVPR 2025.
    https://arxiv.org/abs/2501.11309

    Args:
        forward_func (Callable): the model, returning logits ``(B, K)``.
        layer (torch.nn.Module): the layer whose activations are explained.
        device_ids (list[int], optional): for DataParallel models.
        layout (TokenLayout, optional): token / channels-last layout.
        base_method (type, optional): a gradient CAM class (a
                    :class:`LayerGradCam` subclass). Default: LayerGradCam

    Examples::

        >>> finer = LayerFinerCam(model, model.layer4)
        >>> attr = finer.attribute(images, target=[281, 285], alpha=1.0)
    """

    def __init__(
        self,
        forward_func: Callable,
        layer: nn.Module,
        device_ids: Optional[List[int]] = None,
        layout: Optional[TokenLayout] = None,
        base_method: Type[LayerGradCam] = LayerGradCam,
    ) -> None:
        super().__init__(forward_func, layer, device_ids, layout)
        if not (
            isinstance(base_method, type) and issubclass(base_method, LayerGradCam)
        ):
            raise AttributionInputError(
                "base_method must be a gradient CAM class (LayerGradCam or a "
                f"subclass such as LayerGradCamPlusPlus); got {base_method!r}."
            )
        self.base_method = base_method

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
        alpha: float = 1.0,
        comparison_categories: Sequence[int] = (1, 2, 3),
    ) -> TensorOrTuple:
        r"""
        Args:
            inputs (Tensor or tuple[Tensor, ...]): input batch ``(B, ...)``.
            target (int, tuple, Tensor or list): class per sample (required):
                        one index for all samples, or one per sample.
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
            alpha (float, optional): comparison strength. Default: 1.0
            comparison_categories (sequence of int, optional): similarity ranks
                        of the compared classes. Default: (1, 2, 3)

        Returns:
            Tensor or tuple[Tensor, ...]: maps ``(B, 1, *spatial)``
            (``(B, 1, h, w)`` on image and token layers) on the input's
            device, not normalised.
        """
        inputs = format_inputs(inputs, forward_func=self.forward_func)
        if target is None:
            raise AttributionInputError(
                "LayerFinerCam needs target=<class index> (one, or one per sample)."
            )
        layout = resolve_layout(self.forward_func, self.layer, inputs, self.layout)
        batch = inputs[0].shape[0]
        classes = [
            int(t[0] if isinstance(t, tuple) else t)
            for t in per_sample_targets(target, batch)
        ]
        forward_func = self.forward_func

        def finer_forward(*args: Any) -> Tensor:
            out = model_output(forward_func(*args))
            check_target(out, target)
            tgt = torch.as_tensor(classes, device=out.device) % out.shape[1]
            return finer_score(out, tgt, comparison_categories, alpha)

        base = self.base_method(finer_forward, self.layer, self.device_ids, layout)
        # the model's mode, the record
        with attribution_call(self.forward_func, keep_mode=create_graph):
            return base.attribute(
                inputs,
                target=None,
                additional_forward_args=additional_forward_args,
                attribute_to_layer_input=attribute_to_layer_input,
                relu_attributions=relu_attributions,
                attr_dim_summation=attr_dim_summation,
                grad_kwargs=grad_kwargs,
                create_graph=create_graph,
            )


# ------------------------------------------------------------------- Sobel-CAM
class SobelCam(Attribution):
    r"""Sobel-CAM, a model-free sanity baseline: the edge strength of the image.

    .. math:: L = \tfrac12 |S_x * I| + \tfrac12 |S_y * I|

    with :math:`I` the luma ``0.299 R + 0.587 G + 0.114 B`` of a 3-channel
    input (the channel mean otherwise), :math:`S_x, S_y` the 3 x 3 Sobel
    kernels and reflected borders (OpenCV's default). The model and the
    target play no part: a method whose maps score like edge maps may be an
    edge detector (Adebayo et al. 2018). Returns ``(B, 1, H, W)``.

    Deliberate deviation from pytorch-grad-cam's ``sobel_cam``: that function
    takes an 8-bit image and rounds and saturates to ``[0, 255]`` after each
    step; here the input tensor is used in floating point without
    quantisation, so strong edges are not clipped.

    Reference: pytorch-grad-cam's ``sobel_cam``; Adebayo et al., "Sanity
    Checks for Saliency Maps", NeurIPS 2018. https://arxiv.org/abs/1810.03292

    Args:
        forward_func (Callable, optional): the model (unused; kept for the
                    Captum signature). Default: None

    Examples::

        >>> edges = SobelCam(model).attribute(images)       # (B, 1, H, W)
    """

    def __init__(self, forward_func: Optional[Callable] = None) -> None:
        super().__init__(forward_func)

    @log_usage()
    def attribute(
        self,
        inputs: TensorOrTuple,
        target: TargetType = None,
        additional_forward_args: Any = None,
    ) -> Tensor:
        r"""
        Args:
            inputs (Tensor): images ``(B, C, H, W)``.
            target (int, tuple, Tensor or list, optional): ignored (a
                        model-free baseline), held to the target rule.
                        Default: None
            additional_forward_args (Any, optional): ignored. Default: None

        Returns:
            Tensor: ``(B, 1, H, W)`` edge maps on the input's device.
        """
        x = format_inputs(inputs, False, self.forward_func)[0]
        normalize_target(target)  # ignored, but held to the one target rule
        if x.dim() != 4 or min(x.shape[-2:]) < 2:
            raise AttributionInputError(
                "SobelCam needs an image batch (B, C, H, W) with H, W >= 2; got "
                f"{tuple(x.shape)}."
            )
        x = x.detach()
        if x.shape[1] == 3:
            luma = x.new_tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
            gray = (x * luma).sum(dim=1, keepdim=True)
        else:
            gray = x.mean(dim=1, keepdim=True)
        sx = x.new_tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])
        kernels = torch.stack([sx, sx.t()])[:, None]
        padded = F.pad(gray, (1, 1, 1, 1), mode="reflect")
        g = F.conv2d(padded, kernels).abs()
        return 0.5 * g[:, :1] + 0.5 * g[:, 1:]
