"""Hugging Face BEiT (``BeitModel`` / ``BeitForImageClassification``): the
attention of :mod:`.hf_vit` (``q_proj`` with bias, ``k_proj`` without,
``v_proj``, ``o_proj``) plus a relative position bias, per layer
(``layers[i].relative_position_bias``) or shared
(``shared_position_bias``), that the model passes to the attention as its
float ``attention_mask``: a constant added to the scores
(:meth:`Propagator.add_const`); layer scale ``lambda_1`` / ``lambda_2``;
the pooler averages the patch tokens and normalises them
(``use_mean_pooling=True``, the classifier's default) or takes the class
token.
"""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING, Any, Callable, Dict, Optional, Tuple, cast

from torch import Tensor, nn

from captum_ssl.attr._families.base import (
    SELF,
    AttentionImpl,
    Site,
    loaded_class,
    register,
    register_attention,
)
from captum_ssl.attr._families.hf_vit import (
    Block,
    Family,
    HFViTAdapter,
    _get,
    hf_attention_forward,
    mlp_forward,
)
from captum_ssl.attr._families.timm_vit import conv_forward
from captum_ssl.attr._lrp.propagate import Plan, Propagator, plan_leaf

if TYPE_CHECKING:

    class _BeitLayer(nn.Module):
        attention: nn.Module
        layernorm_before: nn.Module
        layernorm_after: nn.Module
        mlp: nn.Module
        dropout: nn.Module
        drop_path: nn.Module
        lambda_1: Any  # a Parameter, or 1.0 without layer scale
        lambda_2: Any
        patch_size: int
        relative_position_bias: Optional[nn.Module]

    class _Pooler(nn.Module):
        layernorm: Optional[nn.Module]


BEIT_BLOCK = Block("layernorm_before", "attention", "layernorm_after", drop="dropout")

FAMILIES: Dict[str, Family] = {
    "BeitModel": Family("beit", "BeitAttention", "layers", BEIT_BLOCK)
}
HEADS: Dict[str, Tuple[str, str]] = {"BeitForImageClassification": ("beit", "pooler")}


register_attention(
    partial(loaded_class, "transformers.models.beit.modeling_beit", "BeitAttention"),
    AttentionImpl(
        SELF,
        partial(hf_attention_forward, mask_is_bias=True),
        "transformers BeitAttention (`layers[i].attention`, relative position bias)",
    ),
)


def with_relative_bias(
    rel: Optional[nn.Module],
    other: Any,
    patch: int,
    resolution: Optional[Tuple[int, int]],
    interpolate_pos_encoding: bool,
    n: int,
) -> Any:
    """``other`` (the shared bias the model passes, or ``None``) plus the
    relative position bias ``rel`` computes, as the HF code calls it, for
    the patch grid of an input of ``resolution`` and ``n`` tokens."""
    if rel is None or resolution is None:
        return other
    window = (resolution[0] // patch, resolution[1] // patch)
    bias = rel(window, interpolate_pos_encoding, dim_size=n)
    return bias if other is None else bias + other


def beit_layer_forward(P: Propagator, module: nn.Module) -> Callable:
    """``BeitLayer.forward``: its relative position bias computed as the layer
    does (added to the shared one the model passes as ``attention_mask``),
    the residual branches scaled by ``lambda_1`` / ``lambda_2``."""
    m = cast("_BeitLayer", module)

    def scaled(h: Tensor, lam: Any) -> Tensor:
        h = m.dropout(h)  # identities in eval mode
        if isinstance(lam, Tensor):
            h = P.scale(h, lam)
        return m.drop_path(h)

    def forward(
        hidden_states: Tensor,
        attention_mask: Any = None,
        interpolate_pos_encoding: bool = False,
        resolution: Optional[Tuple[int, int]] = None,
        **kw: Any,
    ) -> Tensor:
        x = hidden_states
        attention_mask = with_relative_bias(
            m.relative_position_bias,
            attention_mask,
            m.patch_size,
            resolution,
            interpolate_pos_encoding,
            x.shape[1],
        )
        h, _ = m.attention(m.layernorm_before(x), attention_mask=attention_mask, **kw)
        x = P.add(scaled(h, m.lambda_1), x)
        h = m.mlp(m.layernorm_after(x))
        return P.add(scaled(h, m.lambda_2), x)

    return forward


def pooler_forward(P: Propagator, module: nn.Module) -> Callable:
    """``BeitPooler``: the mean of the patch tokens (a fixed linear map) then
    its layernorm, or the class token."""
    m = cast("_Pooler", module)
    norm = m.layernorm

    def forward(hidden_states: Tensor) -> Tensor:
        if norm is None:
            return hidden_states[:, 0]
        mean = P.linear_map(lambda t: t[:, 1:].mean(dim=1), hidden_states)
        return P.leaf(norm, mean)

    return forward


@register
class HFBeitAdapter(HFViTAdapter):
    label = (
        "Hugging Face transformers BeitModel / BeitForImageClassification "
        "(relative position bias, mean or class-token pooling; eager, sdpa)"
    )
    families = FAMILIES
    heads = HEADS

    def _pooler(self) -> Optional[nn.Module]:
        return getattr(self.base, "pooler", None)

    def _mean_pooled(self) -> bool:
        pooler = self._pooler()
        return pooler is not None and getattr(pooler, "layernorm", None) is not None

    def class_token_unread(self) -> Optional[str]:
        if self._mean_pooled():
            return (
                f"{type(self.model).__name__} averages the patch tokens "
                "(config.use_mean_pooling=True)"
            )
        return None

    def lrp_unsupported(self) -> Optional[str]:
        return None  # both poolings are linear maps with their rules

    def score_projection(self) -> Callable[[Tensor], Tensor]:
        """LeGrad: the mean token through the final layernorm (class-token
        pooling) or the pooler's layernorm (mean pooling), then the classifier
        (a backbone: its pooled output)."""
        norm = cast(nn.Module, self.base.layernorm)
        pooler = self._pooler()
        pool_norm = getattr(pooler, "layernorm", None) or nn.Identity()
        classifier = getattr(self.model, "classifier", None) or nn.Identity()
        return lambda z: classifier(pool_norm(norm(z.mean(dim=1))))

    def _layer_plan(self, P: Propagator, layer: nn.Module, where: str) -> Plan:
        """The (module, forward) pairs of one encoder layer, its norms aside."""
        blk = cast("_BeitLayer", layer)
        attn = blk.attention
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            P.check_leaf(getattr(attn, name), f"{where}.attention.{name}")
        forward = partial(hf_attention_forward, mask_is_bias=True)
        return [
            (attn, forward(P, attn)),
            (blk.mlp, mlp_forward(P, blk.mlp)),
            (blk, beit_layer_forward(P, blk)),
        ]

    def plan(self, P: Propagator, embedding: bool) -> Plan:
        plan: Plan = []
        for i, layer in enumerate(self._blocks()):
            where = self._path(f"{self.family.blocks}.{i}")
            plan.extend(self._layer_plan(P, layer, where))
            for name in ("layernorm_before", "layernorm_after"):
                plan_leaf(P, plan, getattr(layer, name), f"{where}.{name}")
        plan_leaf(P, plan, _get(self.base, "layernorm"), self._path("layernorm"))
        pooler = self._pooler()
        if pooler is not None:
            plan.append((pooler, pooler_forward(P, pooler)))
            norm = getattr(pooler, "layernorm", None)
            if norm is not None:
                P.check_leaf(norm, self._path("pooler.layernorm"))
        classifier = getattr(self.model, "classifier", None)
        if self.reads is not None and isinstance(classifier, nn.Module):
            plan_leaf(P, plan, classifier, "classifier")
        if embedding:
            plan.extend(self._embedding_plan(P))
        return plan

    def _embedding_plan(self, P: Propagator) -> Plan:
        """The patch convolution, and the absolute position add where the
        model has one (``use_absolute_position_embeddings=True``)."""
        if getattr(self.base.embeddings, "position_embeddings", None) is not None:
            return super()._embedding_plan(P)
        proj = _get(self.base, self.family.proj)
        return [(proj, conv_forward(P, proj))]


# ------------------------------------------------------- Data2VecVision
# The BEiT design in transformers' older module structure: the self-attention
# (``query`` / ``key`` without bias / ``value``, its own relative position bias
# and the shared one as an argument; an eager and an sdpa class) inside
# ``attention``, whose ``output.dense`` projects; ``intermediate.dense`` and
# ``output.dense`` are the MLP; ``lambda_1`` / ``lambda_2`` are ``None``
# without layer scale.

if TYPE_CHECKING:

    class _D2VSelfAttention(nn.Module):
        query: nn.Linear
        key: nn.Linear
        value: nn.Linear
        attention_head_size: int
        has_relative_position_bias: bool
        relative_position_bias: nn.Module
        config: Any

    class _D2VLayer(nn.Module):
        attention: Any  # .attention (self-attention), .output.dense
        intermediate: Any  # .dense, .intermediate_act_fn
        output: Any  # .dense
        layernorm_before: nn.Module
        layernorm_after: nn.Module
        drop_path: nn.Module
        lambda_1: Optional[Tensor]
        lambda_2: Optional[Tensor]


def d2v_attention_forward(P: Propagator, module: nn.Module) -> Callable:
    """``Data2VecVisionSelfAttention`` (eager and sdpa): ``softmax(q k^T /
    sqrt(d) + bias) v`` with its own relative position bias plus the shared
    one it is passed; returns ``(context,)`` as the eager module does."""
    m = cast("_D2VSelfAttention", module)

    def forward(
        hidden_states: Tensor,
        output_attentions: bool = False,
        relative_position_bias: Optional[Tensor] = None,
        interpolate_pos_encoding: bool = False,
        resolution: Optional[Tuple[int, int]] = None,
    ) -> Tuple[Tensor]:
        b, n, _c = hidden_states.shape
        bias = with_relative_bias(
            m.relative_position_bias if m.has_relative_position_bias else None,
            relative_position_bias,
            m.config.patch_size,
            resolution,
            interpolate_pos_encoding,
            n,
        )

        def heads(t: Tensor) -> Tensor:
            return t.reshape(b, n, -1, m.attention_head_size).transpose(1, 2)

        q = heads(P.leaf(m.query, hidden_states))
        k = heads(P.leaf(m.key, hidden_states))
        v = heads(P.leaf(m.value, hidden_states))
        scale = m.attention_head_size**-0.5
        out = P.attend(m, q, k, v, scale=scale, bias=bias)
        return (out.transpose(1, 2).reshape(b, n, -1),)

    return forward


register_attention(
    partial(
        loaded_class,
        "transformers.models.data2vec.modeling_data2vec_vision",
        "Data2VecVisionSelfAttention",
    ),
    AttentionImpl(
        SELF,
        d2v_attention_forward,
        "transformers Data2VecVisionSelfAttention (`encoder.layer[i].attention."
        "attention`, relative position bias)",
    ),
)


def d2v_layer_forward(P: Propagator, module: nn.Module) -> Callable:
    """``Data2VecVisionLayer.forward`` with the output projection, the MLP
    and the layer scales routed through the rules."""
    m = cast("_D2VLayer", module)
    attn, dense = m.attention.attention, m.attention.output.dense
    fc1, act, fc2 = (
        m.intermediate.dense,
        m.intermediate.intermediate_act_fn,
        (m.output.dense),
    )

    def scaled(h: Tensor, lam: Optional[Tensor]) -> Tensor:
        return m.drop_path(h if lam is None else P.scale(h, lam))

    def forward(
        hidden_states: Tensor,
        output_attentions: bool = False,
        relative_position_bias: Optional[Tensor] = None,
        interpolate_pos_encoding: bool = False,
        resolution: Optional[Tuple[int, int]] = None,
    ) -> Tuple[Tensor]:
        x = hidden_states
        (h,) = attn(
            m.layernorm_before(x),
            False,
            relative_position_bias,
            interpolate_pos_encoding,
            resolution,
        )
        x = P.add(scaled(P.leaf(dense, h), m.lambda_1), x)
        h = P.leaf(fc1, m.layernorm_after(x))
        h = P.leaf(fc2, P.elementwise(act, h))
        return (P.add(scaled(h, m.lambda_2), x),)

    return forward


@register
class HFData2VecVisionAdapter(HFBeitAdapter):
    label = (
        "Hugging Face transformers Data2VecVisionModel / "
        "Data2VecVisionForImageClassification (as BEiT; eager, sdpa)"
    )
    families = {
        "Data2VecVisionModel": Family(
            "data2vec_vision",
            "Data2VecVisionSelfAttention",
            "encoder.layer",
            BEIT_BLOCK,
        )
    }
    heads = {"Data2VecVisionForImageClassification": ("data2vec_vision", "pooler")}

    def attention_sites(self):
        return [
            Site(s.name + ".attention", cast(Any, s.module).attention, SELF)
            for s in super().attention_sites()
        ]

    def block_of(self, attention: nn.Module) -> Optional[nn.Module]:
        """The layer two levels up (``encoder.layer[i].attention.attention``)."""
        for layer in self._blocks():
            if cast(Any, layer).attention.attention is attention:
                return layer
        return None

    def _layer_plan(self, P: Propagator, layer: nn.Module, where: str) -> Plan:
        blk = cast("_D2VLayer", layer)
        attn = blk.attention.attention
        for name in ("query", "key", "value"):
            P.check_leaf(getattr(attn, name), f"{where}.attention.attention.{name}")
        for path in ("attention.output.dense", "intermediate.dense", "output.dense"):
            P.check_leaf(_get(blk, path), f"{where}.{path}")
        return [
            (attn, d2v_attention_forward(P, attn)),
            (blk, d2v_layer_forward(P, blk)),
        ]
