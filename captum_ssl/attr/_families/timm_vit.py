"""timm's ``Attention`` and ``ClassAttn`` families: ViT, DeiT (distilled),
MoCo v3 / DINO ViTs, register tokens, CaiT, XCiT (class attention; its
cross-covariance attention XCA is captured but gives no token map).

Attention modules: ``timm.layers.Attention`` (``model.blocks[i].attn``),
``timm.models.cait.TalkingHeadAttn`` (CaiT ``blocks[i].attn``),
``timm.models.cait.ClassAttn`` (CaiT ``blocks_token_only[i].attn``, XCiT
``cls_attn_blocks[i].attn``) and ``timm.models.xcit.XCA``.
"""

from __future__ import annotations

from typing import (
    TYPE_CHECKING,
    Any,
    Callable,
    Dict,
    List,
    Optional,
    Sequence,
    Tuple,
    Union,
    cast,
)

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from captum_ssl.attr._core import AttributionInputError
from captum_ssl.attr._families.base import (
    CHANNEL,
    CLASS,
    SELF,
    AttentionImpl,
    FamilyAdapter,
    register,
    register_attention,
)
from captum_ssl.attr._layout import TokenLayout
from captum_ssl.attr._lrp.propagate import (
    Plan,
    Propagator,
    check_leaves,
    no_mask,
    plan_leaf,
)
from captum_ssl.attr._lrp.rules import apply_rule

if TYPE_CHECKING:
    from timm.layers import Attention, GluMlp, Mlp, SwiGLU
    from timm.models.cait import (
        ClassAttn,
        LayerScaleBlock,
        LayerScaleBlockClassAttn,
        TalkingHeadAttn,
    )
    from timm.models.deit import VisionTransformerDistilled
    from timm.models.vision_transformer import Block
    from timm.models.xcit import XCA

POOLED = ("avg", "avgmax", "max", "map")
#: timm poolings that are fixed linear maps of the tokens (LRP has their rule)
LINEAR = ("token", "avg")


# ------------------------------------------------------- attention forwards
# (CaiT's talking-heads self-attention runs before the class token joins the
# sequence; its maps are not captured: the attention methods roll CaiT over
# its class-attention layers, as before)
def attention_forward(P: Propagator, module: nn.Module) -> Callable:
    """``timm.layers.Attention`` (also the non-fused path of every timm ViT)."""
    m = cast("Attention", module)

    def forward(x: Tensor, attn_mask: Any = None, is_causal: bool = False) -> Tensor:
        no_mask(attn_mask, is_causal)
        if getattr(m, "gate", None) is not None:
            raise AttributionInputError(
                f"No rule for the gated attention of {type(m).__name__}."
            )
        b, n, _ = x.shape
        qkv = P.leaf(m.qkv, x).reshape(b, n, 3, m.num_heads, m.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        q, k = P.leaf(m.q_norm, q), P.leaf(m.k_norm, k)
        out = P.attend(m, q, k, v).transpose(1, 2).reshape(b, n, m.attn_dim)
        out = P.leaf(m.norm, out)
        return P.leaf(m.proj_drop, P.leaf(m.proj, out))

    return forward


def talking_heads_forward(P: Propagator, module: nn.Module) -> Callable:
    m = cast("TalkingHeadAttn", module)

    def forward(x: Tensor) -> Tensor:
        b, n, c = x.shape
        qkv = P.leaf(m.qkv, x).reshape(b, n, 3, m.num_heads, c // m.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        out = P.attend(m, q, k, v).transpose(1, 2).reshape(b, n, c)
        return P.leaf(m.proj_drop, P.leaf(m.proj, out))

    return forward


def class_attention_forward(P: Propagator, module: nn.Module) -> Callable:
    m = cast("ClassAttn", module)

    def forward(x: Tensor) -> Tensor:
        b, n, c = x.shape
        h = m.num_heads

        def heads(t: Tensor, rows: int) -> Tensor:
            return t.reshape(b, rows, h, c // h).permute(0, 2, 1, 3)

        q = heads(P.leaf(m.q, x[:, 0]).unsqueeze(1), 1)
        k, v = heads(P.leaf(m.k, x), n), heads(P.leaf(m.v, x), n)
        out = P.attend(m, q, k, v).transpose(1, 2).reshape(b, 1, c)
        return P.leaf(m.proj_drop, P.leaf(m.proj, out))

    return forward


def channel_attention_forward(P: Propagator, module: nn.Module) -> Callable:
    """XCiT's XCA: softmax over channels of l2-normalised q, k (no LRP rule;
    captured only)."""
    m = cast("XCA", module)

    def forward(x: Tensor) -> Tensor:
        b, n, c = x.shape
        qkv = m.qkv(x).reshape(b, n, 3, m.num_heads, c // m.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 4, 1).unbind(0)
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        attn = ((q @ k.transpose(-2, -1)) * m.temperature).softmax(dim=-1)
        attn = m.attn_drop(attn)
        P.record(m, attn)
        out = (attn @ v).permute(0, 3, 1, 2).reshape(b, n, c)
        return m.proj_drop(m.proj(out))

    return forward


def _timm_attention():
    from timm.layers import Attention

    return Attention


def _class_attn():
    from timm.models.cait import ClassAttn

    return ClassAttn


def _xca():
    from timm.models.xcit import XCA

    return XCA


register_attention(
    _timm_attention,
    AttentionImpl(SELF, attention_forward, "timm.layers.Attention (`blocks[i].attn`)"),
)
register_attention(
    _class_attn,
    AttentionImpl(
        CLASS,
        class_attention_forward,
        "timm ClassAttn (CaiT `blocks_token_only[i].attn`, XCiT "
        "`cls_attn_blocks[i].attn`)",
    ),
)
register_attention(_xca, AttentionImpl(CHANNEL, channel_attention_forward, "XCiT XCA"))


# ----------------------------------------------------------- block forwards
def mlp_forward(P: Propagator, module: nn.Module) -> Callable:
    m = cast("Mlp", module)

    def forward(x: Tensor) -> Tensor:
        x = P.leaf(m.act, P.leaf(m.fc1, x))
        x = P.leaf(m.norm, P.leaf(m.drop1, x))
        return P.leaf(m.drop2, P.leaf(m.fc2, x))

    return forward


def scaled(P: Propagator, x: Tensor, gamma: Optional[Tensor]) -> Tensor:
    """``x * gamma`` through the scale rule; ``x`` when the block has no layer
    scale (BEiT, EVA: ``gamma`` is ``None``)."""
    return x if gamma is None else P.scale(x, gamma)


def block_forward(P: Propagator, module: nn.Module) -> Callable:
    m = cast("Block", module)

    def forward(x: Tensor, attn_mask: Any = None, is_causal: bool = False) -> Tensor:
        no_mask(attn_mask, is_causal)
        h = P.leaf(m.ls1, m.attn(P.leaf(m.norm1, x)))
        x = P.add(x, P.leaf(m.drop_path1, h))
        h = P.leaf(m.ls2, m.mlp(P.leaf(m.norm2, x)))
        return P.add(x, P.leaf(m.drop_path2, h))

    return forward


def _cait_block_forward(P: Propagator, module: nn.Module) -> Callable:
    m = cast("LayerScaleBlock", module)

    def forward(x: Tensor) -> Tensor:
        h = P.scale(m.attn(P.leaf(m.norm1, x)), m.gamma_1)
        x = P.add(x, P.leaf(m.drop_path, h))
        h = P.scale(m.mlp(P.leaf(m.norm2, x)), m.gamma_2)
        return P.add(x, P.leaf(m.drop_path, h))

    return forward


def _cait_class_block_forward(P: Propagator, module: nn.Module) -> Callable:
    m = cast("LayerScaleBlockClassAttn", module)

    def forward(x: Tensor, x_cls: Tensor) -> Tensor:
        u = torch.cat((x_cls, x), dim=1)
        h = P.scale(m.attn(P.leaf(m.norm1, u)), m.gamma_1)
        x_cls = P.add(x_cls, P.leaf(m.drop_path, h))
        h = P.scale(m.mlp(P.leaf(m.norm2, x_cls)), m.gamma_2)
        return P.add(x_cls, P.leaf(m.drop_path, h))

    return forward


def plan_model(
    P: Propagator,
    model: nn.Module,
    stacks: Sequence[Tuple[str, Dict[type, Any], Dict[type, Any], Tuple, Tuple]],
    top: Sequence[str],
    embedding: bool,
    prefix: str = "",
) -> Plan:
    """The plan of a timm-style model: for each ``(attribute, {block class:
    block forward}, {attention class: attention forward}, block leaves,
    attention leaves)`` stack of blocks, every block's attention, MLP and
    block forward; then the model-level leaves ``top`` and, with
    ``embedding``, the rules below the first block. ``prefix`` is the
    model's path in the module the user passed (for messages)."""
    plan: Plan = []
    for attr, block_fwds, attn_fwds, block_leaves, attn_leaves in stacks:
        for i, blk in enumerate(getattr(model, attr)):
            where = f"{prefix}{attr}.{i}"
            for m, fwds, w in (
                (blk, block_fwds, where),
                (blk.attn, attn_fwds, where + ".attn"),
            ):
                if type(m) not in fwds:
                    names = ", ".join(c.__name__ for c in fwds)
                    raise AttributionInputError(
                        f"No LRP rule for {type(m).__name__} at `{w}` (rules "
                        f"exist for {names})."
                    )
            check_leaves(P, blk, block_leaves, where)
            check_leaves(P, blk.attn, attn_leaves, where + ".attn")
            plan.append((blk.attn, attn_fwds[type(blk.attn)](P, blk.attn)))
            plan_mlp(P, plan, blk.mlp, where + ".mlp")
            plan.append((blk, block_fwds[type(blk)](P, blk)))
    for name in top:
        if getattr(model, name, None) is not None:
            plan_leaf(P, plan, getattr(model, name), prefix + name)
    if getattr(model, "global_pool", None) == "avg":
        plan.append((model, average_pooled_forward(P, model)))
    if embedding:
        plan.extend(timm_embedding_plan(P, model))
    return plan


def average_pooled_forward(P: Propagator, model: nn.Module) -> Callable:
    """The forward of a timm model with ``global_pool='avg'``: the mean of the
    patch tokens (prefix tokens excluded) is a fixed linear map
    (:meth:`Propagator.token_mean`); then ``fc_norm``, ``head_drop``, ``head``
    (leaves with their rules)."""
    k = int(getattr(model, "num_prefix_tokens", 0))
    parts = [getattr(model, n, None) for n in ("fc_norm", "head_drop", "head")]

    def forward(x: Tensor) -> Tensor:
        t = cast(Callable[[Tensor], Tensor], model.forward_features)(x)
        t = P.token_mean(t[:, k:])
        for part in parts:
            if isinstance(part, nn.Module):
                t = part(t)
        return t

    return forward


def plan_mlp(P: Propagator, plan: Plan, m: nn.Module, where: str) -> None:
    """timm ``Mlp`` (fc1, act, fc2), ``GluMlp`` / ``SwiGLU`` (gated)."""
    from timm.layers import GluMlp, Mlp, SwiGLU

    if type(m) is Mlp:
        check_leaves(P, m, ("fc1", "act", "drop1", "norm", "fc2", "drop2"), where)
        plan.append((m, mlp_forward(P, m)))
    elif type(m) is SwiGLU:
        names = ("fc1_g", "fc1_x", "act", "drop1", "norm", "fc2", "drop2")
        check_leaves(P, m, names, where)
        plan.append((m, swiglu_forward(P, m)))
    elif type(m) is GluMlp:
        glu_names = ("fc1", "act", "drop1", "norm", "fc2", "drop2")
        check_leaves(P, m, glu_names, where)
        plan.append((m, glu_forward(P, m)))
    else:
        raise AttributionInputError(
            f"No LRP rule for the MLP {type(m).__name__} at `{where}` (timm Mlp, "
            "GluMlp and SwiGLU have rules)."
        )


def swiglu_forward(P: Propagator, module: nn.Module) -> Callable:
    """timm ``SwiGLU``: ``fc2(act(fc1_g(x)) * fc1_x(x))``."""
    m = cast("SwiGLU", module)

    def forward(x: Tensor) -> Tensor:
        h = P.mul(P.leaf(m.act, P.leaf(m.fc1_g, x)), P.leaf(m.fc1_x, x))
        h = P.leaf(m.norm, P.leaf(m.drop1, h))
        return P.leaf(m.drop2, P.leaf(m.fc2, h))

    return forward


def glu_forward(P: Propagator, module: nn.Module) -> Callable:
    """timm ``GluMlp`` (packed ``fc1``; EVA02's SwiGLU without scale norm)."""
    m = cast("GluMlp", module)

    def forward(x: Tensor) -> Tensor:
        a, g = P.leaf(m.fc1, x).chunk(2, dim=m.chunk_dim)
        h = P.mul(a, P.leaf(m.act, g)) if m.gate_last else P.mul(P.leaf(m.act, a), g)
        h = P.leaf(m.norm, P.leaf(m.drop1, h))
        return P.leaf(m.drop2, P.leaf(m.fc2, h))

    return forward


# ----------------------------------------------------------- shared timm parts
def timm_layout(model: nn.Module, input_hw) -> Optional[TokenLayout]:
    """A timm model's declared layout: ``num_prefix_tokens`` and the grid its
    ``patch_embed`` gives for ``input_hw`` (dynamic sizes included)."""
    from captum_ssl.attr._layout import _grid_from_embed

    embed = getattr(model, "patch_embed", None)
    k = getattr(model, "num_prefix_tokens", None)
    grid = _grid_from_embed(embed, input_hw) if embed is not None else None
    if grid is None and not isinstance(k, int):
        return None
    return TokenLayout(
        fmt="NLC", num_prefix_tokens=k if isinstance(k, int) else None, patch_grid=grid
    )


def pooling_unread(model: nn.Module) -> Optional[str]:
    """timm ``global_pool`` that never reads the class token (or None)."""
    pool = getattr(model, "global_pool", "token")
    if getattr(model, "cls_token", None) is None:
        return None
    if pool in POOLED or getattr(model, "attn_pool", None) is not None:
        how = (
            "pools with an attention-pooling head"
            if pool == "map"
            else "averages (or max-pools) the patch tokens"
        )
        return f"{type(model).__name__} {how} (global_pool={pool!r})"
    return None


def conv_forward(P: Propagator, proj: nn.Conv2d) -> Callable:
    def forward(x: Tensor) -> Tensor:
        return apply_rule(
            P.state,
            lambda rr, y, xx: (P.active_rules.patch_conv(rr, y, xx, proj),),
            lambda xx: type(proj).forward(proj, xx),
            x,
        )

    return forward


def position_forward(
    P: Propagator,
    pos: Union[Tensor, Callable[[], Tensor]],
    prefix: int,
    patches: List[Tensor],
) -> Callable:
    """Forward of the module right after the position-embedding add (its
    input is ``tokens + pos``): the add is redone with the constant rule.

    At the native input size the stored embedding is the constant; at other
    sizes (a resampled embedding, timm ``dynamic_img_size``) it is what was
    added to the patch tokens (``patches``: the patch embedding's output of
    this call), so relevance reaches the patch tokens at any size. ``pos``
    may also be a function returning the embedding this call added (Hugging
    Face models interpolate it with their own ``interpolate_pos_encoding``)."""

    def forward(x: Tensor) -> Tensor:
        b = pos() if callable(pos) else pos
        if b.shape[-2] != x.shape[1] and b.shape[-2] + prefix == x.shape[1]:
            b = F.pad(b, (0, 0, prefix, 0))
        if b.shape[-2:] == x.shape[1:]:
            return P.add_const(x - b, b)
        if not patches:
            raise AttributionInputError(
                "The patch embedding did not run before the position embedding."
            )
        p = patches[-1].reshape(x.shape[0], -1, x.shape[-1])
        k = x.shape[1] - p.shape[1]
        a = torch.cat([x[:, :k], p], dim=1)  # prefix rows keep all relevance
        return P.add_const(a, (x - a).detach())

    return forward


def distilled_head(module: nn.Module, P: Propagator) -> list:
    """DeiT distilled averages its two heads, ``(head + head_dist) / 2``: the
    average is routed through the rules (halving, then the add rule)."""
    model = cast("VisionTransformerDistilled", module)
    outs: Dict[str, Tensor] = {}

    def keep(name: str):
        def hook(_m: nn.Module, _a: Any, out: Tensor) -> None:
            outs[name] = out

        return hook

    def combine(_m: nn.Module, _a: Any, out: Any) -> Any:
        if not isinstance(out, Tensor) or set(outs) != {"head", "dist"}:
            return out
        h, d = outs.pop("head"), outs.pop("dist")
        return P.add(P.scale(h, 0.5), P.scale(d, 0.5))

    return [
        model.head.register_forward_hook(keep("head")),
        model.head_dist.register_forward_hook(keep("dist")),
        model.register_forward_hook(combine),
    ]


class TimmAdapter(FamilyAdapter):
    """Shared by the timm families: layout, roles, pooling from timm's
    attributes (``patch_embed``, ``num_prefix_tokens``, ``cls_token``,
    ``dist_token``, ``global_pool``)."""

    def layout(self, input_hw) -> Optional[TokenLayout]:
        return timm_layout(self.model, input_hw)

    def token_roles(self) -> Dict[str, int]:
        roles: Dict[str, int] = {}
        if getattr(self.model, "cls_token", None) is not None:
            roles["cls"] = 0
        if getattr(self.model, "dist_token", None) is not None:
            roles["dist"] = 1
        return roles

    def class_token_unread(self) -> Optional[str]:
        return pooling_unread(self.model)

    def norm_layer_hint(self) -> str:
        blocks = getattr(self.model, "blocks", None)
        if isinstance(blocks, nn.Sequential) and hasattr(blocks[-1], "norm1"):
            return "model.blocks[-1].norm1"
        return super().norm_layer_hint()

    def lrp_unsupported(self) -> Optional[str]:
        pool = getattr(self.model, "global_pool", "token")
        if getattr(self.model, "attn_pool", None) is not None or pool not in LINEAR:
            return (
                f"LRP supports class-token and average pooling (global_pool="
                f"'token' or 'avg'); this {type(self.model).__name__} pools with "
                f"{pool!r}. Use the attention methods that follow the head "
                "(LeGrad) or the CAMs."
            )
        return None


@register
class TimmViTAdapter(TimmAdapter):
    label = (
        "timm VisionTransformer (ViT, DeiT, MoCo v3 / DINO ViTs, register tokens) "
        "and VisionTransformerDistilled (DeiT distilled)"
    )

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        from timm.models.vision_transformer import VisionTransformer

        return isinstance(model, VisionTransformer)

    def plan(self, P: Propagator, embedding: bool) -> Plan:
        from timm.layers import Attention
        from timm.models import vision_transformer as vit

        return plan_model(
            P,
            self.model,
            [
                (
                    "blocks",
                    {vit.Block: block_forward},
                    {Attention: attention_forward},
                    ("norm1", "ls1", "drop_path1", "norm2", "ls2", "drop_path2"),
                    ("qkv", "q_norm", "k_norm", "norm", "proj"),
                )
            ],
            ("norm_pre", "norm", "fc_norm", "head", "head_drop", "patch_drop")
            + ("head_dist",),
            embedding,
            self.prefix,
        )

    def hooks(self, P: Propagator) -> list:
        if getattr(self.model, "head_dist", None) is None:
            return []
        return distilled_head(self.model, P)


def timm_embedding_plan(P: Propagator, model: nn.Module) -> Plan:
    """Rules below the first block: the patch convolution (relevance down to
    the pixels), the patch embedding's norm, and the position-embedding add
    (installed on ``pos_drop``, which receives the embedded tokens)."""
    embed = cast(nn.Module, model.patch_embed)
    proj = getattr(embed, "proj", None)
    if type(proj) is not nn.Conv2d:
        raise AttributionInputError(
            f"No LRP rule for the patch embedding {type(proj).__name__}: relevance "
            "to the input needs a Conv2d patch projection."
        )
    plan: Plan = [(proj, conv_forward(P, proj))]
    plan_leaf(P, plan, getattr(embed, "norm", nn.Identity()), "patch_embed.norm")
    pos, drop = getattr(model, "pos_embed", None), getattr(model, "pos_drop", None)
    if pos is not None and drop is not None:
        seen: List[Tensor] = []

        def embed_forward(x: Tensor) -> Tensor:
            out = type(embed).forward(embed, x)
            seen.append(out)
            return out

        plan.append((embed, embed_forward))
        k = getattr(model, "num_prefix_tokens", 0)
        plan.append((drop, position_forward(P, pos, k, seen)))
    return plan


@register
class CaitAdapter(TimmAdapter):
    label = "timm CaiT (talking-heads self-attention, class attention)"

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        from timm.models.cait import Cait

        return isinstance(model, Cait)

    def plan(self, P: Propagator, embedding: bool) -> Plan:
        from timm.models import cait

        leaves = ("norm1", "norm2", "drop_path")
        return plan_model(
            P,
            self.model,
            [
                (
                    "blocks",
                    {cait.LayerScaleBlock: _cait_block_forward},
                    {cait.TalkingHeadAttn: talking_heads_forward},
                    leaves,
                    ("qkv", "proj_l", "proj_w", "proj"),
                ),
                (
                    "blocks_token_only",
                    {cait.LayerScaleBlockClassAttn: _cait_class_block_forward},
                    {cait.ClassAttn: class_attention_forward},
                    leaves,
                    ("q", "k", "v", "proj"),
                ),
            ],
            ("norm", "head", "head_drop"),
            embedding,
        )


@register
class TimmAttentionAdapter(TimmAdapter):
    """Any other model built from timm attention modules (XCiT, custom
    models): attention methods only."""

    label = (
        "timm attention modules in any model (timm.layers.Attention, ClassAttn: "
        "XCiT class attention, custom models; attention methods only)"
    )
    has_lrp = False
    fallback = True

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        types = tuple(t for t in (_timm_attention(), _class_attn(), _xca()))
        return any(isinstance(m, types) for m in model.modules())

    def lrp_unsupported(self) -> Optional[str]:
        lower = type(self.model).__name__.lower()
        from captum_ssl.attr._families.base import lrp_supported

        if "xcit" in lower:
            return (
                "LRP has no rules for XCiT's cross-covariance (channel) attention "
                "and BatchNorm/convolution patch stem: its channel attention mixes "
                "channels, not tokens, so no token relevance passes through it. "
                f"Supported: {lrp_supported()}. For this model use the attention "
                "methods (GenericAttention on XCiT) or the CAMs (e.g. LayerGradCam "
                "on a late block's norm layer)."
            )
        return (
            f"LRP needs a Vision Transformer whose layers have rules; got "
            f"{type(self.model).__name__}. Supported: {lrp_supported()}. Use the "
            "attention methods or the CAMs."
        )
