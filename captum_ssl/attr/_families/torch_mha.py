"""``torch.nn.MultiheadAttention`` families: torchvision's ``VisionTransformer``
(``vit_b_16`` ...; ``encoder.layers[i].self_attention``) and open_clip's
visual tower (``open_clip.transformer.VisionTransformer``;
``transformer.resblocks[i].attn``).

The attention forward (:func:`mha_forward`) is the packed-projection
self-attention ``nn.MultiheadAttention`` computes (``in_proj_weight``,
``in_proj_bias``, ``1/sqrt(head_dim)`` scaling, ``out_proj``), batch-first or
not; cross-attention, masks, ``bias_k`` / ``bias_v`` and ``add_zero_attn`` are
refused with a message.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, List, Optional, Tuple, cast

import torch
from torch import Tensor, nn

from captum_ssl.attr._core import AttributionInputError
from captum_ssl.attr._families.base import (
    SELF,
    AttentionImpl,
    FamilyAdapter,
    loaded_class,
    register,
    register_attention,
)
from captum_ssl.attr._families.timm_vit import conv_forward
from captum_ssl.attr._layout import TokenLayout
from captum_ssl.attr._lrp.propagate import Plan, Propagator, no_mask, plan_leaf

if TYPE_CHECKING:
    # The module structure the adapters below read, for the type checker only
    # (torchvision and open_clip ship no type information).

    class _TvEncoderBlock(nn.Module):  # torchvision EncoderBlock
        ln_1: nn.LayerNorm
        self_attention: nn.MultiheadAttention
        dropout: nn.Dropout
        ln_2: nn.LayerNorm
        mlp: nn.Sequential

    class _TvEncoder(nn.Module):  # torchvision Encoder
        pos_embedding: nn.Parameter
        dropout: nn.Dropout
        layers: nn.Sequential
        ln: nn.LayerNorm

    class _TvViT(nn.Module):  # torchvision VisionTransformer
        image_size: int
        patch_size: int
        conv_proj: nn.Module  # a Conv2d, or a conv stem (conv_stem_configs)
        encoder: _TvEncoder
        heads: nn.Sequential

    class _OcBlock(nn.Module):  # open_clip ResidualAttentionBlock
        ln_1: nn.LayerNorm
        attn: nn.Module  # nn.MultiheadAttention or a custom attention
        ls_1: nn.Module
        ln_2: nn.LayerNorm
        mlp: nn.Sequential
        ls_2: nn.Module

    class _OcTransformer(nn.Module):  # open_clip Transformer
        resblocks: nn.ModuleList

    class _OcViT(nn.Module):  # open_clip VisionTransformer
        patch_size: Tuple[int, int]
        grid_size: Tuple[int, int]
        conv1: nn.Conv2d
        class_embedding: nn.Parameter
        positional_embedding: nn.Parameter
        patch_dropout: nn.Module
        ln_pre: nn.LayerNorm
        transformer: _OcTransformer
        attn_pool: Optional[nn.Module]
        pool_type: str
        final_ln_after_pool: bool
        ln_post: nn.LayerNorm
        proj: Optional[nn.Parameter]
        output_tokens: bool


def _check_mha(m: nn.MultiheadAttention) -> None:
    if not m._qkv_same_embed_dim or m.bias_k is not None or m.add_zero_attn:
        raise AttributionInputError(
            "Only nn.MultiheadAttention with one packed q/k/v projection and no "
            "bias_k / bias_v / add_zero_attn is supported (as in torchvision's "
            "and open_clip's ViTs)."
        )


def mha_forward(P: Propagator, module: nn.Module) -> Callable:
    """``nn.MultiheadAttention`` self-attention in the Propagator primitives."""
    m = cast(nn.MultiheadAttention, module)

    def forward(
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Optional[Tensor] = None,
        need_weights: bool = True,
        attn_mask: Optional[Tensor] = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> Tuple[Tensor, Optional[Tensor]]:
        no_mask(attn_mask, is_causal, key_padding_mask=key_padding_mask)
        if key is not query or value is not query:
            raise AttributionInputError(
                "nn.MultiheadAttention is supported as self-attention only "
                "(query, key and value the same tensor)."
            )
        _check_mha(m)
        x = query if m.batch_first else query.transpose(0, 1)
        b, n, e = x.shape
        h = m.num_heads
        d = e // h
        qkv = P.linear(x, m.in_proj_weight, m.in_proj_bias).reshape(b, n, 3, h, d)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        kept: List[Tensor] = []
        out = P.attend(m, q, k, v, scale=d**-0.5, keep=kept)
        out = P.leaf(m.out_proj, out.transpose(1, 2).reshape(b, n, e))
        if not m.batch_first:
            out = out.transpose(0, 1)
        weights = None
        if need_weights:
            weights = kept[0].mean(dim=1) if average_attn_weights else kept[0]
        return out, weights

    return forward


register_attention(
    lambda: nn.MultiheadAttention,
    AttentionImpl(
        SELF,
        mha_forward,
        "torch.nn.MultiheadAttention (torchvision ViT "
        "`encoder.layers[i].self_attention`, open_clip `transformer.resblocks[i]"
        ".attn`)",
    ),
)


def _mlp_sequential(P: Propagator, m: nn.Module) -> Callable:
    """An ``nn.Sequential`` MLP (Linear, activation, dropout, Linear, ...)."""

    def forward(x: Tensor) -> Tensor:
        for child in cast(nn.Sequential, m):
            if type(child).__name__ == "QuickGELU":  # open_clip
                x = P.elementwise(lambda t: t * torch.sigmoid(1.702 * t), x)
            else:
                x = P.leaf(child, x)
        return x

    return forward


def _check_mlp(P: Propagator, m: nn.Module, where: str) -> None:
    for name, child in m.named_children():
        if type(child).__name__ != "QuickGELU":
            P.check_leaf(child, f"{where}.{name}")


def _scale(P: Propagator, ls: nn.Module, x: Tensor) -> Tensor:
    """open_clip's ``LayerScale`` (``x * gamma``) or an identity."""
    gamma = getattr(ls, "gamma", None)
    return x if gamma is None else P.scale(x, gamma)


# ---------------------------------------------------------------- torchvision
def _tv_block_forward(P: Propagator, module: nn.Module) -> Callable:
    m = cast("_TvEncoderBlock", module)

    def forward(inp: Tensor) -> Tensor:
        x = P.leaf(m.ln_1, inp)
        x, _ = m.self_attention(x, x, x, need_weights=False)
        x = P.add(P.leaf(m.dropout, x), inp)
        return P.add(x, m.mlp(P.leaf(m.ln_2, x)))

    return forward


def _tv_encoder_forward(P: Propagator, module: nn.Module, embedding: bool) -> Callable:
    m = cast("_TvEncoder", module)

    def forward(inp: Tensor) -> Tensor:
        pos = m.pos_embedding
        x = P.add_const(inp, pos) if embedding else inp + pos
        return P.leaf(m.ln, m.layers(P.leaf(m.dropout, x)))

    return forward


@register
class TorchvisionViTAdapter(FamilyAdapter):
    label = "torchvision VisionTransformer (vit_b_16 ..., nn.MultiheadAttention)"

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        vit = loaded_class("torchvision.models.vision_transformer", "VisionTransformer")
        return vit is not None and isinstance(model, vit)

    @property
    def vit(self) -> _TvViT:
        """The model, typed as the torchvision VisionTransformer it is."""
        return cast("_TvViT", self.model)

    def layout(self, input_hw) -> Optional[TokenLayout]:
        p = self.vit.patch_size
        h, w = input_hw or (self.vit.image_size, self.vit.image_size)
        return TokenLayout(fmt="NLC", num_prefix_tokens=1, patch_grid=(h // p, w // p))

    def norm_layer_hint(self) -> str:
        n = len(self.vit.encoder.layers)
        return f"model.encoder.layers[{n - 1}].ln_1"

    def score_projection(self) -> Callable[[Tensor], Tensor]:
        ln, heads = self.vit.encoder.ln, self.vit.heads
        return lambda z: heads(ln(z.mean(dim=1)))

    def patch_tokens(self) -> nn.Module:
        return self.vit.conv_proj

    def plan(self, P: Propagator, embedding: bool) -> Plan:
        model = self.vit
        plan: Plan = []
        enc = model.encoder
        for i, layer in enumerate(enc.layers):
            blk = cast("_TvEncoderBlock", layer)
            where = f"encoder.layers.{i}"
            for name in ("ln_1", "dropout", "ln_2"):
                P.check_leaf(getattr(blk, name), f"{where}.{name}")
            _check_mha(blk.self_attention)
            P.check_leaf(blk.self_attention.out_proj, f"{where}.self_attention")
            _check_mlp(P, blk.mlp, where + ".mlp")
            plan.append((blk.self_attention, mha_forward(P, blk.self_attention)))
            plan.append((blk.mlp, _mlp_sequential(P, blk.mlp)))
            plan.append((blk, _tv_block_forward(P, blk)))
        plan.append((enc, _tv_encoder_forward(P, enc, embedding)))
        for name, child in model.heads.named_children():
            plan_leaf(P, plan, child, f"heads.{name}")
        if embedding:
            if type(model.conv_proj) is not nn.Conv2d:
                raise AttributionInputError(
                    "No LRP rule for the convolutional stem of this torchvision ViT "
                    "(conv_stem_configs): relevance to the patches / pixels needs a "
                    "single Conv2d patch projection. Use TransformerAttribution or "
                    "the attention methods."
                )
            plan.append((model.conv_proj, conv_forward(P, model.conv_proj)))
        return plan


# ------------------------------------------------------------------ open_clip
def _oc_block_forward(P: Propagator, module: nn.Module) -> Callable:
    m = cast("_OcBlock", module)

    def forward(
        q_x: Tensor,
        k_x: Optional[Tensor] = None,
        v_x: Optional[Tensor] = None,
        attn_mask: Optional[Tensor] = None,
    ) -> Tensor:
        no_mask(attn_mask, False, k_x=k_x, v_x=v_x)
        h = P.leaf(m.ln_1, q_x)
        h = m.attn(h, h, h, need_weights=False)[0]
        x = P.add(q_x, _scale(P, m.ls_1, h))
        return P.add(x, _scale(P, m.ls_2, m.mlp(P.leaf(m.ln_2, x))))

    return forward


def _oc_forward(P: Propagator, module: nn.Module, embedding: bool) -> Callable:
    """open_clip ``VisionTransformer.forward`` (class-token or average
    pooling; the mean of the patch tokens is a fixed linear map)."""
    m = cast("_OcViT", module)

    def pool(x: Tensor) -> Tuple[Tensor, Tensor]:
        if m.pool_type == "avg":
            return P.token_mean(x[:, 1:]), x[:, 1:]
        return x[:, 0], x[:, 1:]

    def forward(x: Tensor) -> Any:
        x = m.conv1(x)
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
        cls = m.class_embedding.view(1, 1, -1).expand(x.shape[0], -1, -1)
        x = torch.cat([cls.to(x.dtype), x], dim=1)
        pos = m.positional_embedding.to(x.dtype)
        x = P.add_const(x, pos) if embedding else x + pos
        x = P.leaf(m.ln_pre, m.patch_dropout(x))
        x = m.transformer(x)
        if m.final_ln_after_pool:
            pooled, tokens = pool(x)
            pooled = P.leaf(m.ln_post, pooled)
        else:
            pooled, tokens = pool(P.leaf(m.ln_post, x))
        if m.proj is not None:
            pooled = P.linear(pooled, m.proj.t())
        return (pooled, tokens) if m.output_tokens else pooled

    return forward


@register
class OpenClipViTAdapter(FamilyAdapter):
    label = (
        "open_clip VisionTransformer (CLIP visual tower, nn.MultiheadAttention; "
        "class-token pooling)"
    )

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        vit = loaded_class("open_clip.transformer", "VisionTransformer")
        return vit is not None and isinstance(model, vit)

    @property
    def vit(self) -> _OcViT:
        """The model, typed as the open_clip VisionTransformer it is."""
        return cast("_OcViT", self.model)

    def layout(self, input_hw) -> Optional[TokenLayout]:
        ph, pw = self.vit.patch_size
        if input_hw is None:
            gh, gw = self.vit.grid_size
            grid = (gh, gw)
        else:
            grid = (input_hw[0] // ph, input_hw[1] // pw)
        return TokenLayout(fmt="NLC", num_prefix_tokens=1, patch_grid=grid)

    def class_token_unread(self) -> Optional[str]:
        m = self.vit
        if m.attn_pool is not None:
            return "This open_clip VisionTransformer pools with attentional pooling"
        if m.pool_type != "tok":
            return (
                f"This open_clip VisionTransformer pools with pool_type={m.pool_type!r}"
            )
        return None

    def norm_layer_hint(self) -> str:
        n = len(self.vit.transformer.resblocks)
        return f"model.transformer.resblocks[{n - 1}].ln_1"

    def score_projection(self) -> Callable[[Tensor], Tensor]:
        m = self.vit

        def project(z: Tensor) -> Tensor:
            pooled = m.ln_post(z.mean(dim=1))
            return pooled if m.proj is None else pooled @ m.proj

        return project

    def patch_tokens(self) -> nn.Module:
        return self.vit.conv1

    def lrp_unsupported(self) -> Optional[str]:
        m = self.vit
        if m.attn_pool is not None or m.pool_type not in ("tok", "avg"):
            why = self.class_token_unread() or f"pool_type={m.pool_type!r}"
            return (
                f"{why}; LRP supports class-token and average pooling (pool_type="
                "'tok' or 'avg'). Use LeGrad or the CAMs."
            )
        blocks = self.vit.transformer.resblocks
        if any(
            not isinstance(getattr(b, "attn", None), nn.MultiheadAttention)
            for b in blocks
        ):
            return (
                "LRP supports open_clip's ResidualAttentionBlock with "
                "nn.MultiheadAttention; this tower uses custom attention blocks."
            )
        return None

    def plan(self, P: Propagator, embedding: bool) -> Plan:
        model = self.vit
        plan: Plan = []
        for i, block in enumerate(model.transformer.resblocks):
            blk = cast("_OcBlock", block)
            where = f"transformer.resblocks.{i}"
            for name in ("ln_1", "ln_2"):
                P.check_leaf(getattr(blk, name), f"{where}.{name}")
            # lrp_unsupported has checked that every block's attn is one
            attn = cast(nn.MultiheadAttention, blk.attn)
            _check_mha(attn)
            _check_mlp(P, blk.mlp, where + ".mlp")
            plan.append((attn, mha_forward(P, attn)))
            plan.append((blk.mlp, _mlp_sequential(P, blk.mlp)))
            plan.append((blk, _oc_block_forward(P, blk)))
        if embedding:
            plan.append((model.conv1, conv_forward(P, model.conv1)))
        plan.append((model, _oc_forward(P, model, embedding)))
        return plan
