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
from captum_ssl.attr._core import AttributionInputError, TensorOrTuple, finish_maps
from captum_ssl.attr._layout import TokenLayout

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
    from captum_ssl.attr._families import adapter_for

    n = cap.attentions[0].shape[-1]
    adapter = adapter_for(forward_func)
    roles = adapter.token_roles()
    if query == "cls":
        why = adapter.class_row_unread()
        if why is not None and "cls" not in roles:
            raise AttributionInputError(
                f"{why}, so query='cls' has no row to read: pass query=<token index>."
            )
        if why is not None:
            raise AttributionInputError(
                f"{why}, so the class token's attention row does not explain its "
                "output. Use a method that follows the head: LeGrad (scores the "
                "mean token), AttnLRP (if the family has rules) or the CAMs; or "
                "pass query=<token index> to read that token's row on purpose."
            )
        return roles["cls"]
    if query == "dist":
        if "dist" not in roles:
            raise AttributionInputError(
                "query='dist' needs a distilled model (a DeiT with `dist_token`); "
                "this model has none. Use query='cls' or a token index."
            )
        return roles["dist"]
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
    gh, gw = layout.grid_hw
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


DISCARDS = ("protect", "vit_explain")


def _check_discard(discard: str) -> None:
    if discard not in DISCARDS:
        raise AttributionInputError(
            f"discard must be one of {DISCARDS}, got {discard!r}."
        )


def discard_lowest(
    fused: Tensor, ratio: float, protect: Tuple[int, int], spare: str = "protect"
) -> Tensor:
    """Zero the ``k = int(q * N * ratio)`` lowest entries of each sample's
    ``(q, N)`` matrix.

    ``spare`` says what happens to the ``protect`` entry (the query token's own
    entry): ``"protect"`` never zeroes it and zeroes ``k`` other entries;
    ``"after"`` picks the ``k`` lowest and then spares it, so only ``k - 1``
    are zeroed when it was among them (vit-explain's ``vit_rollout.py``);
    ``"none"`` spares nothing (vit-explain's ``vit_grad_rollout.py``).
    """
    b, q, n = fused.shape
    k = int(q * n * ratio)
    if k == 0:
        return fused
    flat = fused.reshape(b, q * n)
    keep = protect[0] * n + protect[1]
    ranked = flat.clone()
    if spare == "protect":
        ranked[:, keep] = float("inf")
    idx = ranked.topk(k, dim=1, largest=False).indices
    out = flat.scatter(1, idx, 0.0)
    if spare == "after":
        out[:, keep] = flat[:, keep]
    return out.reshape(b, q, n)


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

    @staticmethod
    def _done(maps: Union[Tensor, List[Tensor]], cap: Captured):
        """NaN maps where the model's output is not finite, with a warning."""
        record = [] if cap.bad_rows is None else [cap.bad_rows]
        if isinstance(maps, Tensor):
            return finish_maps((maps,), record)[0]
        return list(finish_maps(tuple(maps), record))

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
        return self._done(maps[0] if single else maps, cap)


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

    Discarding: by default (``discard="protect"``) the ``k`` lowest entries
    other than the query token's own entry are zeroed. vit-explain's
    ``vit_rollout.py`` picks the ``k`` lowest entries and then spares the
    class token's own entry, zeroing ``k - 1`` when it was among them:
    ``discard="vit_explain"`` does that. (vit-explain's division of columns,
    its issue #16, is not reproduced.)

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
        discard: str = "protect",
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
            discard (str, optional): ``"protect"`` (``k`` entries other than
                        the query's own) or ``"vit_explain"`` (the ``k``
                        lowest, then the query's own entry spared).
                        Default: ``"protect"``

        Returns:
            Tensor: ``(B, 1, gh, gw)`` rollout maps.
        """
        _check_ratio(discard_ratio)
        _check_fusion(head_fusion)
        _check_discard(discard)
        modules = _sub_range(self._modules(), start_layer, end_layer)
        cap = self._capture(inputs, modules, target, additional_forward_args, False)
        q = _query_index(query, self.forward_func, cap)
        spare = "protect" if discard == "protect" else "after"
        mats = []
        for attn, kind in zip(cap.attentions, cap.kinds):
            fused = discard_lowest(
                fuse_heads(attn, head_fusion),
                discard_ratio,
                (0 if kind == CLASS else q, q),
                spare,
            )
            mats.append(residual_normalize(embed(fused, kind, "identity")))
        return self._done(_to_map(rollout(mats, q), cap.layout), cap)


class GradientAttentionRollout(_AttentionAttribution):
    r"""Gradient attention rollout: rollout of ``(A * dy/dA).clamp(min=0)``
    fused over heads, where ``A`` is a layer's attention probabilities and
    ``dy/dA`` the gradient of the target score with respect to that same
    layer's ``A`` (the layer pairing vit-explain reverses, its issue #6).

    Then, as in :class:`AttentionRollout`: ``discard_ratio``, ``(A + I) / 2``
    row-normalised, product over layers, the query token's row.

    Two orders, both offered:

    * default: negatives are clamped per head, then heads are fused,
      ``fuse((A * dy/dA).clamp(min=0))`` (the order of Chefer et al.'s
      rule, so that one head's negative evidence cannot cancel another's
      positive evidence), and the discarding never zeroes the query token's
      own entry (``k`` other entries are zeroed);
    * vit-explain's (``fusion_before_clamp=True, discard="vit_explain"``):
      heads are fused first, then negatives clamped,
      ``fuse(A * dy/dA).clamp(min=0)``, and the ``k`` lowest entries are
      zeroed whatever they are, the class token's own entry included.

    The two orders give different maps (see ``docs/deviations.md`` for the
    measured difference). vit-explain's layer pairing (its issue #6), column
    division (#16) and batch-size-1 limit are not reproduced.

    Args:
        forward_func (Callable): the ViT (or a bound method of it).
        layers (list, optional): attention layers; default all token layers.
        layout (TokenLayout, optional): patch grid / prefix tokens override.

    Examples::

        >>> maps = GradientAttentionRollout(model).attribute(images, target=labels)
        >>> as_vit_explain = GradientAttentionRollout(model).attribute(
        ...     images, target=labels, discard_ratio=0.9,
        ...     fusion_before_clamp=True, discard="vit_explain")
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
        fusion_before_clamp: bool = False,
        discard: str = "protect",
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
            fusion_before_clamp (bool, optional): fuse heads, then clamp
                        negatives (vit-explain) instead of clamping per head
                        first. Default: False
            discard (str, optional): ``"protect"`` (never the query's own
                        entry) or ``"vit_explain"`` (no entry spared).
                        Default: ``"protect"``

        Returns:
            Tensor: ``(B, 1, gh, gw)`` maps.
        """
        _check_ratio(discard_ratio)
        _check_fusion(head_fusion)
        _check_discard(discard)
        modules = _sub_range(self._modules(), start_layer, end_layer)
        cap = self._capture(inputs, modules, target, additional_forward_args, True)
        q = _query_index(query, self.forward_func, cap)
        spare = "protect" if discard == "protect" else "none"
        mats = []
        for attn, grad, kind in zip(cap.attentions, cap.grads, cap.kinds):
            if fusion_before_clamp:
                fused = fuse_heads(attn * grad, head_fusion).clamp(min=0)
            else:
                fused = fuse_heads((attn * grad).clamp(min=0), head_fusion)
            protect = (0 if kind == CLASS else q, q)
            fused = discard_lowest(fused, discard_ratio, protect, spare)
            mats.append(residual_normalize(embed(fused, kind, "identity")))
        return self._done(_to_map(rollout(mats, q), cap.layout), cap)


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
        for attn, grad, kind in zip(cap.attentions, cap.grads, cap.kinds):
            cam = embed((grad * attn).clamp(min=0).mean(dim=1), kind, "zeros")
            rel = rel + cam @ rel
        return self._done(_to_map(rel[:, q, :], cap.layout), cap)


class AttentionFlow(_AttentionAttribution):
    r"""Attention flow (Abnar & Zuidema, "Quantifying Attention Flow in
    Transformers", ACL 2020).

    The attention graph has one node per token and layer; token ``j`` of layer
    ``l - 1`` feeds token ``i`` of layer ``l`` with capacity ``A'_l[i, j]``, the
    head-fused attention with the residual ``(A + I) / 2`` re-normalised by
    rows. The map value of a patch token is the maximum flow from it (input
    layer) to the query token (class token) of the output layer, divided by
    the sum of the flows from every input token, the class token (and any
    other prefix token) included: the normalisation of the reference code
    (Abnar & Zuidema's ``compute_flows`` / ``compute_node_flow``, which
    divide each output node's flows by their sum), returned by default.
    ``normalize=False`` returns the raw max-flow values instead.

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
        normalize: bool = True,
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
            normalize (bool, optional): divide by the flows' sum over all
                        input tokens, prefix tokens included (the reference
                        code's normalisation); ``False`` returns raw max-flow
                        values. Default: True

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
        sources = list(range(0 if normalize else k, n))
        # a NaN capacity has no flow: such a sample's map is NaN, not a number
        rows = torch.stack(
            [
                layered_max_flows(m, q, sources)
                if bool(torch.isfinite(m).all())
                else m.new_full((len(sources),), float("nan"))
                for m in mats
            ]
        )
        full = rows.new_zeros(rows.shape[0], n)
        full[:, n - len(sources) :] = rows
        if normalize:
            full = full / full.sum(dim=1, keepdim=True).clamp(min=1e-12)
        return self._done(_to_map(full, cap.layout), cap)
