"""Attention explanations for Vision Transformers as Captum attributions.

Every method reads attention through :mod:`.capture` (one forward pass, plus
one backward pass to the attention probabilities for the gradient methods) and
returns ``(B, 1, gh, gw)`` patch-grid maps on the input's device: the row of
the query token (the class token by default) with the prefix-token columns
(class, distillation, register tokens) removed. No normalisation is applied;
:func:`captum_ssl.viz.normalize` and :func:`captum_ssl.viz.upsample` do that
for display.
"""

from __future__ import annotations

from typing import Any, Callable, List, Optional, Tuple, Union

import torch
from captum._utils.typing import TargetType
from captum.attr import Attribution
from captum.log import log_usage
from torch import Tensor

from captum_ssl.attr._attention.capture import (
    CLASS,
    Captured,
    LayerSpec,
    attention_forward,
    resolve_layers,
)
from captum_ssl.attr._attention.flow import layered_max_flows
from captum_ssl.attr._core import AttributionInputError, TensorOrTuple
from captum_ssl.attr._layout import TokenLayout, root_module

HEAD_FUSIONS = ("mean", "max", "min")
Query = Union[int, str]


# ------------------------------------------------------------------ helpers
def fuse_heads(attn: Tensor, head_fusion: str) -> Tensor:
    """``(B, heads, q, N)`` -> ``(B, q, N)`` by mean / max / min over heads."""
    if head_fusion == "mean":
        return attn.mean(dim=1)
    if head_fusion == "max":
        return attn.amax(dim=1)
    if head_fusion == "min":
        return attn.amin(dim=1)
    _check_fusion(head_fusion)
    raise AssertionError("unreachable")


def _query_index(query: Query, forward_func: Callable, cap: Captured) -> int:
    n = cap.attentions[0].shape[-1]
    if query == "cls":
        if getattr(root_module(forward_func), "cls_token", True) is None:
            raise AttributionInputError(
                "This model has no class token (timm class_token=False), so "
                "query='cls' has no row to read: pass query=<token index>."
            )
        return 0
    if query == "dist":
        model = root_module(forward_func)
        if getattr(model, "dist_token", None) is None:
            raise AttributionInputError(
                "query='dist' needs a distilled model (a DeiT with `dist_token`); "
                "this model has none. Use query='cls' or a token index."
            )
        return 1
    if isinstance(query, bool) or not isinstance(query, int):
        raise AttributionInputError(
            f"query must be 'cls', 'dist' or a token index, got {query!r}."
        )
    if not -n <= query < n:
        raise AttributionInputError(
            f"query {query} is out of range for {n} tokens (0 is the class token)."
        )
    q = query % n
    if q != 0 and CLASS in cap.kinds:
        raise AttributionInputError(
            "Class-attention layers (CaiT `blocks_token_only`, XCiT "
            "`cls_attn_blocks`) have only the class token as query: use query='cls'."
        )
    return q


def _to_map(row: Tensor, layout: TokenLayout) -> Tensor:
    """Query row ``(B, N)`` -> ``(B, 1, gh, gw)`` map of the patch columns."""
    gh, gw = layout.grid  # type: ignore[misc]
    k = layout.num_prefix_tokens or 0
    return row[:, k:].reshape(row.shape[0], 1, gh, gw)


def _check_fusion(head_fusion: str) -> None:
    if head_fusion not in HEAD_FUSIONS:
        raise AttributionInputError(
            f"head_fusion must be one of {HEAD_FUSIONS}, got {head_fusion!r}."
        )


def _check_ratio(discard_ratio: float) -> None:
    if not 0.0 <= discard_ratio < 1.0:
        raise AttributionInputError(
            f"discard_ratio must be in [0, 1), got {discard_ratio}."
        )


def discard_lowest(fused: Tensor, ratio: float, protect: Tuple[int, int]) -> Tensor:
    """Zero the ``ratio`` lowest entries of each sample's ``(q, N)`` matrix,
    never the ``protect`` entry (the query token's own entry)."""
    b, q, n = fused.shape
    k = int(q * n * ratio)
    if k == 0:
        return fused
    flat = fused.reshape(b, q * n)
    ranked = flat.clone()
    ranked[:, protect[0] * n + protect[1]] = float("inf")
    idx = ranked.topk(k, dim=1, largest=False).indices
    return flat.scatter(1, idx, 0.0).reshape(b, q, n)


def embed(fused: Tensor, kind: str, fill: str) -> Tensor:
    """A ``(B, N, N)`` token-mixing matrix. Class-attention layers give only the
    class-token row; the patch tokens pass through unchanged, so their rows are
    the identity (``fill="identity"``) or zero (``fill="zeros"``: a relevance
    increment)."""
    if kind != CLASS:
        return fused
    b, _, n = fused.shape
    if fill == "identity":
        full = torch.eye(n, dtype=fused.dtype, device=fused.device).repeat(b, 1, 1)
    else:
        full = fused.new_zeros(b, n, n)
    full[:, 0, :] = fused[:, 0, :]
    return full


def residual_normalize(mat: Tensor) -> Tensor:
    """``(A + I) / 2`` re-normalised so every row sums to one (keepdim)."""
    eye = torch.eye(mat.shape[-1], dtype=mat.dtype, device=mat.device)
    res = (mat + eye) / 2
    return res / res.sum(dim=-1, keepdim=True)


def rollout(mats: List[Tensor], query: Optional[int] = None) -> Tensor:
    """``M_L @ ... @ M_1`` for per-layer ``(B, N, N)`` matrices in layer order;
    with ``query``, only that row ``(B, N)``, by vector-matrix products
    (``O(L N^2)`` instead of ``O(L N^3)``)."""
    if query is not None:
        row = mats[-1][:, query : query + 1, :]
        for mat in reversed(mats[:-1]):
            row = row @ mat
        return row[:, 0]
    result = torch.eye(mats[0].shape[-1], dtype=mats[0].dtype, device=mats[0].device)
    result = result.expand_as(mats[0])
    for mat in mats:
        result = mat @ result
    return result


def _sub_range(layers: List, start_layer: int, end_layer: Optional[int]) -> List:
    chosen = layers[start_layer:end_layer]
    if not chosen:
        raise AttributionInputError(
            f"start_layer={start_layer}, end_layer={end_layer} select no layer of "
            f"the {len(layers)} attention layers (Python slice semantics)."
        )
    return chosen


class _AttentionAttribution(Attribution):
    _default_layers: LayerSpec = None

    def __init__(
        self,
        forward_func: Callable,
        layers: LayerSpec = None,
        layout: Optional[TokenLayout] = None,
    ) -> None:
        super().__init__(forward_func)
        self.layers = self._default_layers if layers is None else layers
        self.layout = layout
        resolve_layers(forward_func, self.layers)  # fail early on bad layers

    def _modules(self):
        return resolve_layers(self.forward_func, self.layers)

    def _capture(self, inputs, modules, target, args, grads: bool) -> Captured:
        return attention_forward(
            self.forward_func,
            inputs,
            modules,
            target,
            args,
            with_gradients=grads,
            layout=self.layout,
        )


# ------------------------------------------------------------------ methods
class RawAttention(_AttentionAttribution):
    r"""Raw attention of one or several layers: the query token's (class token
    by default) row of ``softmax(Q K^T / sqrt(d))`` over the patch tokens,
    fused over heads.

    With ``power`` ``p``, each head's attention is raised to ``p`` before the
    fusion (mean over heads of ``attn ** p``); ``p < 1`` (e.g. 0.05) lifts
    secondary regions.

    Args:
        forward_func (Callable): a timm ViT/DeiT (also MoCo v3, DINO layouts),
                    CaiT or XCiT model, or a bound method of it.
        layers (int, nn.Module, or list, optional): attention layer(s): index
                    into the model's attention modules in execution order
                    (negative allowed) or the module itself (``blk.attn``).
                    Default: ``-1`` (the last attention layer).
        layout (TokenLayout, optional): patch grid / prefix tokens when the
                    model does not expose them.

    Examples::

        >>> raw = RawAttention(model, layers=[0, 5, 11])
        >>> maps = raw.attribute(images, head_fusion="mean", power=0.05)
        >>> [m.shape for m in maps]  # three (B, 1, 14, 14) maps
    """

    _default_layers = -1

    @log_usage()
    def attribute(
        self,
        inputs: TensorOrTuple,
        target: TargetType = None,
        additional_forward_args: Any = None,
        head_fusion: str = "mean",
        power: float = 1.0,
        query: Query = "cls",
    ) -> Union[Tensor, List[Tensor]]:
        r"""
        Args:
            inputs (Tensor or tuple of Tensor): image batch ``(B, 3, H, W)``.
            target (int, tuple, Tensor, or list, optional): not used by the map
                        (attention is class-agnostic); validated if given.
            additional_forward_args (Any, optional): extra forward arguments.
            head_fusion (str, optional): ``"mean"``, ``"max"`` or ``"min"``.
                        Default: ``"mean"``
            power (float, optional): exponent applied to each head's attention
                        before fusion. Default: 1.0
            query (int or str, optional): ``"cls"`` (token 0), ``"dist"`` (the
                        distillation token of a distilled DeiT) or a token index.
                        Default: ``"cls"``

        Returns:
            Tensor ``(B, 1, gh, gw)`` for a single layer, else a list of them
            in the order of ``layers``.
        """
        _check_fusion(head_fusion)
        modules = self._modules()
        cap = self._capture(inputs, modules, target, additional_forward_args, False)
        q = _query_index(query, self.forward_func, cap)
        maps = []
        for attn, kind in zip(cap.attentions, cap.kinds):
            row = attn[:, :, 0 if kind == CLASS else q, :]
            if power != 1.0:
                row = row.pow(power)
            maps.append(
                _to_map(fuse_heads(row.unsqueeze(2), head_fusion)[:, 0], cap.layout)
            )
        single = not isinstance(self.layers, (list, tuple))
        return maps[0] if single else maps


class AttentionRollout(_AttentionAttribution):
    r"""Attention rollout (Abnar & Zuidema, "Quantifying Attention Flow in
    Transformers", ACL 2020).

    Per layer the heads are fused, the ``discard_ratio`` lowest entries are
    zeroed (never the query token's own entry), the residual connection is
    added and rows are re-normalised: ``A' = (A + I) / 2``,
    ``A' = A' / A'.sum(-1, keepdim=True)``. The product
    ``A'_L @ ... @ A'_1`` over layers ``[start_layer:end_layer]`` gives the
    map as the query token's row over the patch tokens.

    CaiT / XCiT class-attention layers only update the class token: their
    matrix is the identity with the class-attention row in row 0.

    Args:
        forward_func (Callable): the ViT (or a bound method of it).
        layers (list, optional): attention layers to roll; default all
                    token-attention layers in execution order.
        layout (TokenLayout, optional): patch grid / prefix tokens override.

    Examples::

        >>> maps = AttentionRollout(model).attribute(images, discard_ratio=0.9)
    """

    @log_usage()
    def attribute(
        self,
        inputs: TensorOrTuple,
        target: TargetType = None,
        additional_forward_args: Any = None,
        head_fusion: str = "mean",
        discard_ratio: float = 0.0,
        start_layer: int = 0,
        end_layer: Optional[int] = None,
        query: Query = "cls",
    ) -> Tensor:
        r"""
        Args:
            inputs (Tensor or tuple of Tensor): image batch ``(B, 3, H, W)``.
            target (optional): not used (rollout is class-agnostic); validated
                        if given.
            additional_forward_args (Any, optional): extra forward arguments.
            head_fusion (str, optional): ``"mean"``, ``"max"`` or ``"min"``.
            discard_ratio (float, optional): fraction of lowest entries zeroed
                        per layer, in ``[0, 1)``. Default: 0.0
            start_layer, end_layer (int, optional): roll only
                        ``layers[start_layer:end_layer]`` (Python slice).
            query (int or str, optional): ``"cls"``, ``"dist"`` or a token index.

        Returns:
            Tensor: ``(B, 1, gh, gw)`` rollout maps.
        """
        _check_ratio(discard_ratio)
        _check_fusion(head_fusion)
        modules = _sub_range(self._modules(), start_layer, end_layer)
        cap = self._capture(inputs, modules, target, additional_forward_args, False)
        q = _query_index(query, self.forward_func, cap)
        mats = []
        for attn, kind in zip(cap.attentions, cap.kinds):
            fused = discard_lowest(
                fuse_heads(attn, head_fusion),
                discard_ratio,
                (0 if kind == CLASS else q, q),
            )
            mats.append(residual_normalize(embed(fused, kind, "identity")))
        return _to_map(rollout(mats, q), cap.layout)


class GradientAttentionRollout(_AttentionAttribution):
    r"""Gradient attention rollout: rollout of ``(A * dy/dA).clamp(min=0)``
    fused over heads, where ``A`` is a layer's attention probabilities and
    ``dy/dA`` the gradient of the target score with respect to that same
    layer's ``A`` (the layer pairing vit-explain reverses, its issue #6).

    Then, as in :class:`AttentionRollout`: ``discard_ratio``, ``(A + I) / 2``
    row-normalised, product over layers, the query token's row.

    Args:
        forward_func (Callable): the ViT (or a bound method of it).
        layers (list, optional): attention layers; default all token layers.
        layout (TokenLayout, optional): patch grid / prefix tokens override.

    Examples::

        >>> maps = GradientAttentionRollout(model).attribute(images, target=labels)
    """

    @log_usage()
    def attribute(
        self,
        inputs: TensorOrTuple,
        target: TargetType = None,
        additional_forward_args: Any = None,
        head_fusion: str = "mean",
        discard_ratio: float = 0.0,
        start_layer: int = 0,
        end_layer: Optional[int] = None,
        query: Query = "cls",
    ) -> Tensor:
        r"""
        Args:
            inputs (Tensor or tuple of Tensor): image batch ``(B, 3, H, W)``.
            target (int, tuple, Tensor, or list): output index to explain, one
                        for all or one per sample.
            additional_forward_args (Any, optional): extra forward arguments.
            head_fusion (str, optional): ``"mean"``, ``"max"`` or ``"min"``.
            discard_ratio (float, optional): in ``[0, 1)``. Default: 0.0
            start_layer, end_layer (int, optional): roll
                        ``layers[start_layer:end_layer]``.
            query (int or str, optional): ``"cls"``, ``"dist"`` or a token index.

        Returns:
            Tensor: ``(B, 1, gh, gw)`` maps.
        """
        _check_ratio(discard_ratio)
        _check_fusion(head_fusion)
        modules = _sub_range(self._modules(), start_layer, end_layer)
        cap = self._capture(inputs, modules, target, additional_forward_args, True)
        q = _query_index(query, self.forward_func, cap)
        mats = []
        for attn, grad, kind in zip(cap.attentions, cap.gradients, cap.kinds):  # type: ignore[arg-type]
            fused = fuse_heads((attn * grad).clamp(min=0), head_fusion)
            fused = discard_lowest(fused, discard_ratio, (0 if kind == CLASS else q, q))
            mats.append(residual_normalize(embed(fused, kind, "identity")))
        return _to_map(rollout(mats, q), cap.layout)


class GenericAttention(_AttentionAttribution):
    r"""Generic attention explainability (Chefer, Gur & Wolf, "Generic
    Attention-model Explainability for Interpreting Bi-Modal and
    Encoder-Decoder Transformers", ICCV 2021), self-attention rule:

    ``R = I``; for each block ``R = R + mean_heads((grad_A * A).clamp(min=0)) @ R``;
    the map is the query token's row of ``R`` over the patch tokens. ``grad_A``
    is the gradient of the target score with respect to that block's attention
    probabilities ``A``. A class-attention layer contributes its class row
    (other rows zero: patch tokens are not mixed there).

    Args:
        forward_func (Callable): the ViT (or a bound method of it).
        layers (list, optional): attention layers; default all token layers.
        layout (TokenLayout, optional): patch grid / prefix tokens override.

    Examples::

        >>> maps = GenericAttention(model).attribute(images, target=[3, 7])
    """

    @log_usage()
    def attribute(
        self,
        inputs: TensorOrTuple,
        target: TargetType = None,
        additional_forward_args: Any = None,
        query: Query = "cls",
    ) -> Tensor:
        r"""
        Args:
            inputs (Tensor or tuple of Tensor): image batch ``(B, 3, H, W)``.
            target (int, tuple, Tensor, or list): output index to explain, one
                        for all or one per sample.
            additional_forward_args (Any, optional): extra forward arguments.
            query (int or str, optional): ``"cls"``, ``"dist"`` or a token index.

        Returns:
            Tensor: ``(B, 1, gh, gw)`` relevance maps.
        """
        modules = self._modules()
        cap = self._capture(inputs, modules, target, additional_forward_args, True)
        q = _query_index(query, self.forward_func, cap)
        b, _, _, n = cap.attentions[0].shape
        ref = cap.attentions[0]
        rel = torch.eye(n, dtype=ref.dtype, device=ref.device).repeat(b, 1, 1)
        for attn, grad, kind in zip(cap.attentions, cap.gradients, cap.kinds):  # type: ignore[arg-type]
            cam = embed((grad * attn).clamp(min=0).mean(dim=1), kind, "zeros")
            rel = rel + cam @ rel
        return _to_map(rel[:, q, :], cap.layout)


class AttentionFlow(_AttentionAttribution):
    r"""Attention flow (Abnar & Zuidema, "Quantifying Attention Flow in
    Transformers", ACL 2020).

    The attention graph has one node per token and layer; token ``j`` of layer
    ``l - 1`` feeds token ``i`` of layer ``l`` with capacity ``A'_l[i, j]``, the
    head-fused attention with the residual ``(A + I) / 2`` re-normalised by
    rows. The map value of a patch token is the maximum flow from it (input
    layer) to the query token (class token) of the output layer.

    One max-flow problem per patch token is solved with SciPy's compiled Dinic
    solver on CPU (see :mod:`captum_ssl.attr._attention.flow` for why, and for
    the precision: capacities are rounded down to multiples of 2**-23, so a
    value is never above the exact flow and below it by at most 1.2e-7 per
    edge of the minimum cut); the result is on the input's device.
    DeiT-S (12 layers, 197 tokens) costs a few seconds per image: see
    ``benchmarks/bench_attention.py``.

    Args:
        forward_func (Callable): the ViT (or a bound method of it).
        layers (list, optional): attention layers; default all token layers.
        layout (TokenLayout, optional): patch grid / prefix tokens override.

    Examples::

        >>> maps = AttentionFlow(model).attribute(images)
    """

    @log_usage()
    def attribute(
        self,
        inputs: TensorOrTuple,
        target: TargetType = None,
        additional_forward_args: Any = None,
        head_fusion: str = "mean",
        start_layer: int = 0,
        end_layer: Optional[int] = None,
        query: Query = "cls",
    ) -> Tensor:
        r"""
        Args:
            inputs (Tensor or tuple of Tensor): image batch ``(B, 3, H, W)``.
            target (optional): not used (flow is class-agnostic); validated if
                        given.
            additional_forward_args (Any, optional): extra forward arguments.
            head_fusion (str, optional): ``"mean"``, ``"max"`` or ``"min"``.
            start_layer, end_layer (int, optional): use
                        ``layers[start_layer:end_layer]``.
            query (int or str, optional): ``"cls"``, ``"dist"`` or a token index.

        Returns:
            Tensor: ``(B, 1, gh, gw)`` flow values in ``[0, 1]``.
        """
        _check_fusion(head_fusion)
        modules = _sub_range(self._modules(), start_layer, end_layer)
        cap = self._capture(inputs, modules, target, additional_forward_args, False)
        q = _query_index(query, self.forward_func, cap)
        mats = torch.stack(
            [
                residual_normalize(embed(fuse_heads(a, head_fusion), kind, "identity"))
                for a, kind in zip(cap.attentions, cap.kinds)
            ],
            dim=1,
        )  # (B, L, N, N)
        n = mats.shape[-1]
        k = cap.layout.num_prefix_tokens or 0
        sources = list(range(k, n))
        rows = torch.stack([layered_max_flows(m, q, sources) for m in mats])
        full = rows.new_zeros(rows.shape[0], n)
        full[:, k:] = rows
        return _to_map(full, cap.layout)
