"""Relevance-propagation explanations for Vision Transformers (issue 9).

All methods run the unchanged timm model once with the rules of
:mod:`.rules` applied per call (:func:`.propagate.relevance_rules`), then one
backward pass that carries relevance (and, for :class:`TransformerAttribution`,
one that carries the ordinary gradient). Batches and per-sample targets need
nothing special: every rule acts per sample.
"""

from __future__ import annotations

from typing import Any, Callable, List, Optional, Sequence

import torch
from captum._utils.common import _run_forward
from captum._utils.typing import TargetType
from captum.attr import Attribution
from captum.log import log_usage
from torch import Tensor

from captum_ssl.attr._attention.capture import (
    _model_of,
    _single_calls,
    capture_attention,
    checked_attention_kind,
    resolve_layers,
)
from captum_ssl.attr._attention.methods import _to_map, embed
from captum_ssl.attr._core import (
    AttributionInputError,
    TensorOrTuple,
    attribution_call,
    check_target,
    checked_forward,
    finish_maps,
    format_inputs,
    input_hw,
    per_sample_targets,
    record_from_layer_only,
    refuse_precision,
    working_dtype,
)
from captum_ssl.attr._layout import TokenLayout, layout_for
from captum_ssl.attr._lrp.propagate import relevance_rules
from captum_ssl.attr._lrp.rules import AttnLRPRules, CheferRules, Rules, State

ATS = ("patches", "pixels")


def _target_index(out: Tensor, target: TargetType) -> Tensor:
    """Per-sample class indices ``(B,)`` for a ``(B, classes)`` output."""
    check_target(out, target)
    if out.dim() != 2:
        raise AttributionInputError(
            f"LRP needs class scores of shape (B, classes); the model returns "
            f"{tuple(out.shape)}."
        )
    n = out.shape[1]
    idx = []
    for t in per_sample_targets(target, out.shape[0]):
        if isinstance(t, tuple):
            if len(t) != 1:
                raise AttributionInputError(
                    "LRP targets are class indices: pass an int per sample."
                )
            t = t[0]
        idx.append(int(t) % n)
    return torch.tensor(idx, device=out.device)


class _Pass:
    """What one rule-applied forward (+ backward passes) gave."""

    def __init__(self) -> None:
        self.attentions: List[Tensor] = []
        self.gradients: Optional[List[Tensor]] = None
        self.relevances: List[Tensor] = []
        self.kinds: List[str] = []
        self.layout: Optional[TokenLayout] = None
        #: rows whose model output was not finite (see ``finish_maps``)
        self.record: List[Tensor] = []

    @property
    def grads(self) -> List[Tensor]:
        """:attr:`gradients` of a pass run with ``gradients=True``."""
        if self.gradients is None:
            raise AssertionError("propagated without gradients: gradients=True")
        return self.gradients

    @property
    def token_layout(self) -> TokenLayout:
        """:attr:`layout` of a pass that read a token layout."""
        if self.layout is None:
            raise AssertionError("no token layout was read in this pass")
        return self.layout

    def done(self, maps: Tensor) -> Tensor:
        """NaN maps where the model's output is not finite, with a warning."""
        return finish_maps((maps,), self.record)[0]


class _LRPAttribution(Attribution):
    #: whether the map is the class token's row of attention relevances (then
    #: a head that never reads the class token is refused)
    class_row = False

    def __init__(
        self, forward_func: Callable, layout: Optional[TokenLayout] = None
    ) -> None:
        super().__init__(forward_func)
        self.layout = layout
        from captum_ssl.attr._families import lrp_adapter

        adapter = lrp_adapter(_model_of(forward_func))
        why = adapter.class_row_unread() if self.class_row else None
        if why is not None:
            raise AttributionInputError(
                f"{why}, so the class token's row that {type(self).__name__} "
                "returns explains nothing the model outputs. Use AttnLRP "
                "(relevance of the patch tokens through the pooling), "
                "TransformerLRP, LeGrad or the CAMs."
            )

    def _propagate(
        self,
        inputs: TensorOrTuple,
        target: TargetType,
        additional_forward_args: Any,
        rules: Rules,
        *,
        attention: bool = False,
        gradients: bool = False,
        to: Optional[str] = None,
        keep: slice = slice(None),
    ) -> _Pass:
        """One forward pass with ``rules``; relevance (and gradients) of the
        attention maps (``attention``; of the layers ``keep`` selects: the
        backward passes stop there) or of the patch tokens / pixels (``to``)."""
        from captum_ssl.attr._families import adapter_for

        inputs = format_inputs(inputs, True, self.forward_func)
        model = _model_of(self.forward_func)
        adapter = adapter_for(model)
        modules = resolve_layers(self.forward_func, None) if attention else []
        # rules that are "input x a modified gradient" run in that form: one
        # backward pass, autograd's own gradient through every linear operation
        implicit = rules.implicit and not attention and not gradients
        state = State(mode="gi" if implicit else "grad", need_grad=gradients)
        res = _Pass()
        patches: List[Tensor] = []
        handle = None
        try:
            with (
                attribution_call(self.forward_func) as record,
                record_from_layer_only(self.forward_func),
                relevance_rules(model, rules, state, embedding=to is not None) as P,
                capture_attention(modules, P) as store,
                torch.enable_grad(),
            ):
                if to == "patches":  # on under the call's model lock, not before
                    handle = adapter.patch_tokens().register_forward_hook(
                        lambda _m, _a, out: patches.append(
                            out[0] if isinstance(out, tuple) else out
                        )  # Data2VecVision: (tokens, grid)
                    )
                xs = tuple(
                    x.detach().requires_grad_() if x.is_floating_point() else x
                    for x in inputs
                )
                out = _run_forward(
                    checked_forward(self.forward_func, target),
                    xs,
                    None,
                    additional_forward_args,
                )
                idx = _target_index(out, target)
                one_hot = torch.zeros_like(out)
                rows = torch.arange(out.shape[0], device=out.device)
                one_hot[rows, idx] = 1.0
                start = one_hot * out.detach() if rules.start == "logit" else one_hot
                every = _single_calls(store, modules) if attention else []
                attns = every[keep]
                # products over layers accumulate error in bf16 / fp16
                work = working_dtype(out.dtype)
                if gradients:
                    res.gradients = [
                        g.detach().to(work)
                        for g in torch.autograd.grad(
                            out, attns, start, retain_graph=True
                        )
                    ]
                if to == "patches":
                    wrt: Sequence[Tensor] = patches[:1]
                elif to == "pixels":
                    wrt = xs[:1]
                else:
                    wrt = attns
                if implicit:  # R = x * g; R starts as the logit: g = one_hot
                    grads = torch.autograd.grad(out, wrt, one_hot)
                    rels = [w.detach() * g for w, g in zip(wrt, grads)]
                else:
                    state.mode = "rel"
                    rels = list(torch.autograd.grad(out, wrt, start))
                res.relevances = [r.detach().to(work) for r in rels]
        finally:
            if handle is not None:
                handle.remove()
        res.record = record
        res.attentions = [a.detach().to(work) for a in attns]
        res.kinds = [checked_attention_kind(m) for m in modules[keep]]
        hw = input_hw(inputs)
        if attention:
            lay = layout_for(self.forward_func, modules[-1], hw, self.layout)
            res.layout = lay.resolve(torch.Size((1, every[0].shape[-1], 1)))
        elif to == "patches":
            res.layout = layout_for(
                self.forward_func, adapter.patch_tokens(), hw, self.layout
            )
        return res


class TransformerAttribution(_LRPAttribution):
    r"""Transformer attribution (Chefer, Gur & Wolf, "Transformer
    Interpretability Beyond Attention Visualization", CVPR 2021).

    For every attention layer :math:`b`, :math:`R^{A_b}` is the LRP relevance
    of its attention map (the rules of :class:`~captum_ssl.attr._lrp.rules.
    CheferRules`: :math:`\alpha\beta` with ``alpha`` for linear layers,
    identity for LayerNorm / GELU / softmax, the halved matmul rule, the
    normalised residual add; relevance starts as 1 at the target class) and
    :math:`\nabla A_b` the gradient of the target score with respect to it:

    .. math::
        \bar A_b = I + \mathbb{E}_h\left[(\nabla A_b \odot R^{A_b})^+\right],
        \qquad C = \bar A_L \cdots \bar A_{s+1} \bar A_s

    (:math:`s` = ``start_layer``); the map is the class token's row of
    :math:`C` over the patch tokens (all prefix tokens removed). This equals
    the authors' ``generate_LRP(method="transformer_attribution")`` on the
    same weights (tested to 1e-4), for any batch and per-sample targets.

    Supported models: timm ViT, DeiT, DeiT distilled, MoCo v3 / DINO ViTs,
    register tokens, CaiT (rolled over its class-attention layers). One
    forward pass and two backward passes (gradients, relevance).

    Args:
        forward_func (Callable): the timm model (or a bound method of it).
        layout (TokenLayout, optional): patch grid / prefix tokens override.

    Examples::

        >>> attr = TransformerAttribution(model)
        >>> maps = attr.attribute(images, target=labels)  # (B, 1, 14, 14)
        >>> maps = attr.attribute(images, target=labels, start_layer=4)
    """

    class_row = True

    @log_usage()
    def attribute(
        self,
        inputs: TensorOrTuple,
        target: TargetType = None,
        additional_forward_args: Any = None,
        start_layer: int = 0,
        alpha: float = 1.0,
    ) -> Tensor:
        r"""
        Args:
            inputs (Tensor or tuple of Tensor): image batch ``(B, 3, H, W)``.
            target (int, tuple, Tensor, or list): class to explain, one for
                        all or one per sample.
            additional_forward_args (Any, optional): extra forward arguments.
            start_layer (int, optional): first attention layer of the rollout
                        (index into the token-attention layers). Default: 0
            alpha (float, optional): :math:`\alpha` of the linear layers'
                        :math:`\alpha\beta`-rule (:math:`\beta = \alpha - 1`).
                        Default: 1.0

        Returns:
            Tensor: ``(B, 1, gh, gw)`` relevance maps.
        """
        refuse_precision(
            self.forward_func,
            inputs,
            (torch.bfloat16,),
            "TransformerAttribution",
            "the clamped product of bfloat16 gradients and relevances correlates "
            "0.6 with the float32 map of the same weights",
        )
        n_layers = len(resolve_layers(self.forward_func, None))
        if not -n_layers <= start_layer < n_layers:
            raise AttributionInputError(
                f"start_layer={start_layer} is out of range for {n_layers} "
                "attention layers."
            )
        res = self._propagate(  # nothing below start_layer is propagated
            inputs,
            target,
            additional_forward_args,
            CheferRules(alpha),
            attention=True,
            gradients=True,
            keep=slice(start_layer, None),
        )
        joint = None
        for grad, rel, kind in zip(res.grads, res.relevances, res.kinds):
            cam = embed((grad * rel).clamp(min=0).mean(dim=1), kind, "zeros")
            eye = torch.eye(cam.shape[-1], dtype=cam.dtype, device=cam.device)
            mat = cam + eye
            joint = mat if joint is None else mat @ joint
        if joint is None:  # never: start_layer indexes at least one layer
            raise AttributionInputError("No attention layer to propagate through.")
        return res.done(_to_map(joint[:, 0, :], res.token_layout))


class PartialLRP(_LRPAttribution):
    r"""Partial LRP (Voita et al., "Analyzing Multi-Head Self-Attention",
    ACL 2019; the "partial LRP" baseline of Chefer et al., CVPR 2021): the LRP
    relevance of the last attention map only,

    .. math:: \mathbb{E}_h\left[(R^{A_L})^+\right]_{0,\,\text{patches}}

    with the rules of :class:`TransformerAttribution` (relevance 1 at the
    target class), the class token's row over the patch tokens.

    Args:
        forward_func (Callable): the timm model (or a bound method of it).
        layout (TokenLayout, optional): patch grid / prefix tokens override.

    Examples::

        >>> maps = PartialLRP(model).attribute(images, target=labels)
    """

    class_row = True

    @log_usage()
    def attribute(
        self,
        inputs: TensorOrTuple,
        target: TargetType = None,
        additional_forward_args: Any = None,
        alpha: float = 1.0,
    ) -> Tensor:
        r"""
        Args:
            inputs (Tensor or tuple of Tensor): image batch ``(B, 3, H, W)``.
            target (int, tuple, Tensor, or list): class to explain.
            additional_forward_args (Any, optional): extra forward arguments.
            alpha (float, optional): :math:`\alpha` of the linear layers.
                        Default: 1.0

        Returns:
            Tensor: ``(B, 1, gh, gw)`` relevance maps.
        """
        res = self._propagate(
            inputs,
            target,
            additional_forward_args,
            CheferRules(alpha),
            attention=True,
            keep=slice(-1, None),  # the last map only: no pass below it
        )
        rel = res.relevances[-1].clamp(min=0).mean(dim=1)  # (B, q, N)
        return res.done(_to_map(rel[:, 0, :], res.token_layout))


class TransformerLRP(_LRPAttribution):
    r"""Full LRP to the input pixels with the rules of Chefer et al. (CVPR
    2021; their "LRP" baseline): :math:`\alpha\beta` for linear layers,
    identity for LayerNorm / GELU / softmax, halved matmul rule, normalised
    residual and position-embedding add, :math:`z^\mathcal{B}` on the patch
    convolution (bounds: each image's minimum and maximum value), relevance 1
    at the target class; summed over the colour channels.

    Not Captum's :class:`captum.attr.LRP` (layer-wise rules for any model,
    relevance at the input per element): a different algorithm, so a
    different name.

    Args:
        forward_func (Callable): the timm model (or a bound method of it).
        layout (TokenLayout, optional): unused (pixel maps); for symmetry.

    Examples::

        >>> lrp = TransformerLRP(model)
        >>> maps = lrp.attribute(images, target=labels)  # (B, 1, H, W)
    """

    @log_usage()
    def attribute(
        self,
        inputs: TensorOrTuple,
        target: TargetType = None,
        additional_forward_args: Any = None,
        alpha: float = 1.0,
    ) -> Tensor:
        r"""
        Args:
            inputs (Tensor or tuple of Tensor): image batch ``(B, 3, H, W)``.
            target (int, tuple, Tensor, or list): class to explain.
            additional_forward_args (Any, optional): extra forward arguments.
            alpha (float, optional): :math:`\alpha` of the linear layers.
                        Default: 1.0

        Returns:
            Tensor: ``(B, 1, H, W)`` pixel relevance.
        """
        res = self._propagate(
            inputs,
            target,
            additional_forward_args,
            CheferRules(alpha),
            to="pixels",
        )
        return res.done(res.relevances[0].sum(dim=1, keepdim=True))


class AttnLRP(_LRPAttribution):
    r"""AttnLRP (Achtibat et al., "AttnLRP: Attention-Aware Layer-Wise
    Relevance Propagation for Transformers", ICML 2024), with CP-LRP (Ali et
    al., "XAI for Transformers: Better Explanations through Conservative
    Propagation", ICML 2022) as an option.

    Relevance starts as the target logit and is propagated with
    (:class:`~captum_ssl.attr._lrp.rules.AttnLRPRules`):

    * linear / convolution / residual add, epsilon rule at
      :math:`\epsilon \to 0`:
      :math:`R_{x_i} = \sum_j x_i w_{ji} R_j / z_j` (the bias absorbs its share);
    * LayerNorm: identity on :math:`1/\sigma`, epsilon rule on centring and
      affine; GELU: identity;
    * softmax: :math:`R_{x} = x \odot (R - s \sum_j R_j)`;
    * ``Q K^T`` and ``A V``, uniform rule:
      :math:`R_a = \tfrac12 a \odot (S b^\top)`,
      :math:`R_b = \tfrac12 b \odot (a^\top S)`, :math:`S = R / z`;
      CP-LRP (``cp=True``): ``A`` constant, :math:`R_V = V \odot (A^\top S)`.

    Every rule is the input times a modified gradient, so the relevance is
    computed in that form, as the authors' LXT does: one backward pass with
    autograd's own gradient through the linear operations and the softmax,
    half of it at the two matmuls, :math:`\sigma` held constant in LayerNorm
    and :math:`g\,y / x` at the activations, then :math:`R_x = x \odot g_x`.
    The cost is about one forward plus one backward pass.
    (:class:`~captum_ssl.attr._lrp.rules.AttnLRPRules` also writes each rule
    out explicitly; the tests check that both forms agree.)

    Without biases (and with a zero class token and position embedding) the
    relevance is conserved up to the softmax rule's remainder; see
    ``docs/lrp.md`` for the measured deviation.

    Args:
        forward_func (Callable): the timm model (or a bound method of it).
        layout (TokenLayout, optional): patch grid / prefix tokens override.

    Examples::

        >>> lrp = AttnLRP(model)
        >>> maps = lrp.attribute(images, target=labels)  # (B, 1, 14, 14)
        >>> pixels = lrp.attribute(images, target=labels, at="pixels", cp=True)
    """

    @log_usage()
    def attribute(
        self,
        inputs: TensorOrTuple,
        target: TargetType = None,
        additional_forward_args: Any = None,
        cp: bool = False,
        epsilon: float = 1e-6,
        at: str = "patches",
    ) -> Tensor:
        r"""
        Args:
            inputs (Tensor or tuple of Tensor): image batch ``(B, 3, H, W)``.
            target (int, tuple, Tensor, or list): class to explain.
            additional_forward_args (Any, optional): extra forward arguments.
            cp (bool, optional): CP-LRP: attention weights as constants.
                        Default: False
            epsilon (float, optional): stabiliser of the identity rule's
                        division :math:`y / (x + \epsilon\,\mathrm{sign}(x))`
                        at the activations, the one division of the
                        gradient form. Default: 1e-6
            at (str, optional): ``"patches"``: relevance of the patch tokens
                        (after the patch embedding) summed over channels,
                        ``(B, 1, gh, gw)``; ``"pixels"``: relevance of the
                        input pixels summed over channels, ``(B, 1, H, W)``.
                        Default: ``"patches"``

        Returns:
            Tensor: the relevance map.
        """
        if at not in ATS:
            raise AttributionInputError(f"at must be one of {ATS}, got {at!r}.")
        res = self._propagate(
            inputs,
            target,
            additional_forward_args,
            AttnLRPRules(epsilon, cp),
            to=at,
        )
        rel = res.relevances[0]
        if at == "pixels":
            return res.done(rel.sum(dim=1, keepdim=True))
        return res.done(res.token_layout.to_grid(rel).sum(dim=1, keepdim=True))
