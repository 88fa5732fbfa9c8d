"""timm EVA / EVA02 (``timm.models.eva``): ``EvaAttention`` with rotary
position embedding (RoPE) on the patch tokens, optional q/k norms, scale
norm and gate; ``EvaBlock`` (pre-norm, layer scale ``gamma_1/2``) and
``EvaBlockPostNorm``; MLPs ``Mlp``, ``SwiGLU`` and ``GluMlp`` (SwiGLU).

RoPE rotates q and k by fixed angles: a fixed linear map, so its relevance
rule is the z-rule of a linear map (:meth:`Propagator.linear_map`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Optional, cast

import torch
from torch import Tensor, nn

from captum_ssl.attr._families.base import (
    SELF,
    AttentionImpl,
    register,
    register_attention,
)
from captum_ssl.attr._families.timm_vit import TimmAdapter, plan_model, scaled
from captum_ssl.attr._lrp.propagate import Plan, Propagator, no_mask

if TYPE_CHECKING:
    from timm.models.eva import EvaAttention, EvaBlock, EvaBlockPostNorm


def rotate(t: Tensor, rope: Tensor, prefix: int, half: bool) -> Tensor:
    """EVA's RoPE: the patch tokens of ``t`` (after ``prefix`` tokens)
    rotated by the concatenated sin/cos embedding ``rope``."""
    from timm.layers.pos_embed_sincos import apply_rot_embed_cat

    rotated = apply_rot_embed_cat(t[:, :, prefix:, :], rope, half=half)
    return torch.cat([t[:, :, :prefix, :], rotated], dim=2).type_as(t)


def eva_attention_forward(P: Propagator, module: nn.Module) -> Callable:
    m = cast("EvaAttention", module)

    def forward(
        x: Tensor,
        rope: Optional[Tensor] = None,
        attn_mask: Any = None,
        is_causal: bool = False,
    ) -> Tensor:
        no_mask(attn_mask, is_causal)
        b, n, _ = x.shape
        h = m.num_heads
        gate = None
        if m.gate is not None:
            gate = P.elementwise(torch.sigmoid, P.leaf(m.gate, x))
        if m.qkv is not None:
            bias = None
            if m.q_bias is not None:
                bias = torch.cat((m.q_bias, cast(Tensor, m.k_bias), m.v_bias))
            qkv = P.linear(x, m.qkv.weight, bias).reshape(b, n, 3, h, -1)
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        else:
            q, k, v = (
                P.leaf(p, x).reshape(b, n, h, -1).transpose(1, 2)
                for p in (m.q_proj, m.k_proj, m.v_proj)
            )
        q, k = P.leaf(m.q_norm, q), P.leaf(m.k_norm, k)
        if rope is not None:
            half = getattr(m, "rotate_half", False)
            npt = m.num_prefix_tokens
            q = P.linear_map(lambda t: rotate(t, rope, npt, half), q)
            k = P.linear_map(lambda t: rotate(t, rope, npt, half), k)
        out = P.attend(m, q, k, v).transpose(1, 2).reshape(b, n, -1)
        out = P.leaf(m.norm, out)
        if gate is not None:
            out = P.mul(out, gate)
        return P.leaf(m.proj_drop, P.leaf(m.proj, out))

    return forward


def _eva_attention():
    from timm.models.eva import EvaAttention

    return EvaAttention


register_attention(
    _eva_attention,
    AttentionImpl(SELF, eva_attention_forward, "timm EvaAttention (EVA, EVA02)"),
)


def eva_block_forward(P: Propagator, module: nn.Module) -> Callable:
    m = cast("EvaBlock", module)

    def forward(
        x: Tensor,
        rope: Optional[Tensor] = None,
        attn_mask: Any = None,
        is_causal: bool = False,
    ) -> Tensor:
        no_mask(attn_mask, is_causal)
        h = scaled(P, m.attn(P.leaf(m.norm1, x), rope=rope), m.gamma_1)
        x = P.add(x, P.leaf(m.drop_path1, h))
        h = scaled(P, m.mlp(P.leaf(m.norm2, x)), m.gamma_2)
        return P.add(x, P.leaf(m.drop_path2, h))

    return forward


def eva_post_norm_block_forward(P: Propagator, module: nn.Module) -> Callable:
    m = cast("EvaBlockPostNorm", module)

    def forward(
        x: Tensor,
        rope: Optional[Tensor] = None,
        attn_mask: Any = None,
        is_causal: bool = False,
    ) -> Tensor:
        no_mask(attn_mask, is_causal)
        h = P.leaf(m.norm1, m.attn(x, rope=rope))
        x = P.add(x, P.leaf(m.drop_path1, h))
        h = P.leaf(m.norm2, m.mlp(x))
        return P.add(x, P.leaf(m.drop_path2, h))

    return forward


@register
class EvaAdapter(TimmAdapter):
    label = "timm EVA / EVA02 (rotary position embedding, SwiGLU; Eva)"

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        from timm.models.eva import Eva

        return isinstance(model, Eva)

    def lrp_unsupported(self) -> Optional[str]:
        if getattr(self.model, "rope_mixed", False):
            return "LRP has no rules for EVA's depth-dependent (mixed) RoPE."
        return super().lrp_unsupported()

    def plan(self, P: Propagator, embedding: bool) -> Plan:
        from timm.models import eva

        return plan_model(
            P,
            self.model,
            [
                (
                    "blocks",
                    {
                        eva.EvaBlock: eva_block_forward,
                        eva.EvaBlockPostNorm: eva_post_norm_block_forward,
                    },
                    {eva.EvaAttention: eva_attention_forward},
                    ("norm1", "drop_path1", "norm2", "drop_path2"),
                    ("q_norm", "k_norm", "norm", "proj", "proj_drop"),
                )
            ],
            ("norm_pre", "norm", "fc_norm", "head_drop", "head"),
            embedding,
        )
