"""timm BEiT (``timm.models.beit``): attention with a relative position bias
(per block, ``relative_position_bias_table[relative_position_index]``, or one
shared by all blocks, ``model.rel_pos_bias``), added to the scaled scores
before the softmax; blocks with optional layer scale ``gamma_1/2``.

The bias is a constant of the input: in the relevance rules it is a constant
addend of the scores (:meth:`Propagator.add_const`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Optional, cast

import torch
from torch import Tensor, nn

from captum_ssl.attr._families.base import (
    SELF,
    AttentionImpl,
    register,
    register_attention,
)
from captum_ssl.attr._families.timm_vit import TimmAdapter, plan_model, scaled
from captum_ssl.attr._lrp.propagate import Plan, Propagator

if TYPE_CHECKING:
    from timm.models.beit import Attention, Block


def beit_attention_forward(P: Propagator, module: nn.Module) -> Callable:
    m = cast("Attention", module)

    def forward(x: Tensor, shared_rel_pos_bias: Optional[Tensor] = None) -> Tensor:
        b, n, _ = x.shape
        bias = None
        if m.q_bias is not None:
            bias = torch.cat((m.q_bias, cast(Tensor, m.k_bias), m.v_bias))
        qkv = P.linear(x, m.qkv.weight, bias).reshape(b, n, 3, m.num_heads, -1)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        pos = None
        if m.relative_position_bias_table is not None:
            pos = m._get_rel_pos_bias()
        if shared_rel_pos_bias is not None:
            pos = shared_rel_pos_bias if pos is None else pos + shared_rel_pos_bias
        out = P.attend(m, q, k, v, bias=pos).transpose(1, 2).reshape(b, n, -1)
        return P.leaf(m.proj_drop, P.leaf(m.proj, out))

    return forward


def _beit_attention():
    from timm.models.beit import Attention

    return Attention


register_attention(
    _beit_attention,
    AttentionImpl(
        SELF, beit_attention_forward, "timm BEiT Attention (relative position bias)"
    ),
)


def beit_block_forward(P: Propagator, module: nn.Module) -> Callable:
    m = cast("Block", module)

    def forward(x: Tensor, shared_rel_pos_bias: Optional[Tensor] = None) -> Tensor:
        h = m.attn(P.leaf(m.norm1, x), shared_rel_pos_bias=shared_rel_pos_bias)
        h = scaled(P, h, m.gamma_1)
        x = P.add(x, P.leaf(m.drop_path1, h))
        h = scaled(P, m.mlp(P.leaf(m.norm2, x)), m.gamma_2)
        return P.add(x, P.leaf(m.drop_path2, h))

    return forward


@register
class BeitAdapter(TimmAdapter):
    label = "timm BEiT (relative position bias; Beit)"

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        from timm.models.beit import Beit

        return isinstance(model, Beit)

    def plan(self, P: Propagator, embedding: bool) -> Plan:
        from timm.models import beit

        return plan_model(
            P,
            self.model,
            [
                (
                    "blocks",
                    {beit.Block: beit_block_forward},
                    {beit.Attention: beit_attention_forward},
                    ("norm1", "drop_path1", "norm2", "drop_path2"),
                    ("proj", "proj_drop"),
                )
            ],
            ("norm", "fc_norm", "head_drop", "head"),
            embedding,
        )
