"""Applying the rules to a stock timm model, for the duration of one call.

:func:`relevance_rules` gives the supported modules of the model a forward of
their own (an instance attribute ``forward``; the class is never touched)
that computes exactly what timm computes, with every operation routed through
a rule of :mod:`.rules`. The attribute is deleted again in ``finally``, also
when the call raises; parameters, flags and hooks are left as they were.

Supported: timm ``VisionTransformer`` (ViT, DeiT, MoCo v3 / DINO ViTs,
register tokens, class-token pooling) and ``VisionTransformerDistilled``
(DeiT distilled), ``Cait`` (talking-heads self-attention and class
attention). Their leaf modules need a rule: ``nn.Linear``, ``nn.LayerNorm``,
the activations in :data:`ACTIVATIONS`, ``LayerScale``, dropout / drop-path /
identity.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from captum_ssl.attr._core import AttributionInputError
from captum_ssl.attr._lrp.rules import AttnLRPRules, Rules, State, apply_rule

SUPPORTED_MODELS = (
    "timm VisionTransformer (ViT, DeiT, MoCo v3 and DINO ViTs, register tokens; "
    "global_pool='token'), VisionTransformerDistilled (DeiT distilled) and Cait"
)
ACTIVATIONS = (nn.GELU, nn.ReLU, nn.SiLU, nn.Tanh, nn.Sigmoid)
_MISSING = object()


def _timm():
    from timm.layers import Attention, DropPath, LayerScale, Mlp
    from timm.models import cait, vision_transformer

    return Attention, DropPath, LayerScale, Mlp, cait, vision_transformer


def unsupported_model(model: nn.Module) -> Optional[str]:
    """Why LRP does not apply to ``model`` (an error message), or ``None``."""
    _, _, _, _, cait, vit = _timm()
    name = type(model).__name__
    if isinstance(model, vit.VisionTransformer):
        if getattr(model, "attn_pool", None) is not None or model.global_pool != (
            "token"
        ):
            return (
                f"LRP supports class-token pooling (global_pool='token'); this "
                f"{name} pools with {model.global_pool!r}. Supported: "
                f"{SUPPORTED_MODELS}."
            )
        return None
    if isinstance(model, cait.Cait):
        if model.global_pool != "token":
            return (
                f"LRP supports class-token pooling; this Cait pools with "
                f"{model.global_pool!r}. Supported: {SUPPORTED_MODELS}."
            )
        return None
    lower = name.lower()
    if "xcit" in lower or "swin" in lower:
        why = (
            "XCiT's cross-covariance (channel) attention and BatchNorm/convolution "
            "patch stem"
            if "xcit" in lower
            else "Swin's shifted-window attention with relative position bias and "
            "patch merging"
        )
        return (
            f"LRP has no rules for {why}. Supported: {SUPPORTED_MODELS}. For this "
            "model use the attention methods (GenericAttention on XCiT) or the "
            "CAMs (e.g. LayerGradCam on a late block's norm layer)."
        )
    return (
        f"LRP needs a Vision Transformer whose layers have rules; got {name}. "
        f"Supported: {SUPPORTED_MODELS}. For CNNs use the CAMs (e.g. "
        "LayerGradCam(model, model.layer4))."
    )


class Propagator:
    """The model's operations, each applied through its rule."""

    def __init__(self, rules: Rules, state: State) -> None:
        self.rules, self.state = rules, state
        _, DropPath, LayerScale, _, _, _ = _timm()
        #: leaves that are the identity in eval mode (no rule needed)
        self.passthrough = (nn.Identity, nn.Dropout, DropPath)
        self._scale = LayerScale

    # ---------------------------------------------------------------- leaves
    def check_leaf(self, m: nn.Module, where: str) -> None:
        ok = (nn.LayerNorm, self._scale) + ACTIVATIONS + self.passthrough
        if type(m) is nn.Linear or isinstance(m, ok):
            return
        raise AttributionInputError(
            f"No LRP rule for the layer {type(m).__name__} at `{where}`. Rules "
            "exist for nn.Linear, nn.LayerNorm, LayerScale, activations "
            f"({', '.join(a.__name__ for a in ACTIVATIONS)}), dropout and identity "
            f"layers in {SUPPORTED_MODELS}."
        )

    def leaf(self, m: nn.Module, x: Tensor) -> Tensor:
        """``m(x)`` with ``m``'s rule (``m`` is a leaf module)."""
        r, st = self.rules, self.state
        if isinstance(m, self.passthrough):
            return type(m).forward(m, x)
        if isinstance(m, nn.Linear):
            w, b = m.weight, m.bias
            return apply_rule(
                st,
                lambda rr, y, xx: (r.linear(rr, y, xx, w),),
                lambda xx: F.linear(xx, w, b),
                x,
            )
        if isinstance(m, nn.LayerNorm):
            return apply_rule(
                st,
                lambda rr, y, xx: (r.norm(rr, y, xx, m),),
                lambda xx: type(m).forward(m, xx),
                x,
            )
        if isinstance(m, self._scale):
            return self.scale(x, m.gamma)
        if isinstance(m, ACTIVATIONS):
            return apply_rule(
                st,
                lambda rr, y, xx: (r.elementwise(rr, y, xx),),
                lambda xx: type(m).forward(m, xx),
                x,
            )
        self.check_leaf(m, type(m).__name__)
        raise AssertionError("unreachable")

    # ------------------------------------------------------------ operations
    def scale(self, x: Tensor, c: Any) -> Tensor:
        return apply_rule(
            self.state,
            lambda rr, y, xx: (self.rules.elementwise(rr, y, xx),),
            lambda xx: xx * c,
            x,
        )

    def add(self, a: Tensor, b: Tensor) -> Tensor:
        return apply_rule(self.state, self.rules.add, torch.add, a, b)

    def add_const(self, a: Tensor, b: Tensor) -> Tensor:
        """``a + b`` with ``b`` a constant (e.g. the position embedding)."""
        full = b.expand_as(a)

        def rule(rr, z, aa):
            return (self.rules.add(rr, z, aa, full)[0],)

        return apply_rule(self.state, rule, lambda aa: aa + b, a)

    def attend(self, m: nn.Module, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """``softmax(q k^T * scale) v`` of attention module ``m``; talking-heads
        projections (``proj_l``, ``proj_w``) when ``m`` has them. The attention
        probabilities pass through ``m.attn_drop`` (where they are captured)."""
        r, st = self.rules, self.state
        q = self.scale(q, m.scale)
        dots = apply_rule(st, r.matmul, torch.matmul, q, k.transpose(-2, -1))
        if hasattr(m, "proj_l"):
            dots = self.leaf(m.proj_l, dots.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        attn = apply_rule(
            st,
            lambda rr, s, xx: (r.softmax(rr, s, xx),),
            lambda xx: xx.softmax(dim=-1),
            dots,
        )
        if hasattr(m, "proj_w"):
            attn = self.leaf(m.proj_w, attn.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        attn = m.attn_drop(attn)
        if isinstance(r, AttnLRPRules) and r.cp:
            return apply_rule(
                st, r.value_matmul, lambda vv, aa: aa @ vv, v, attn.detach()
            )
        return apply_rule(st, r.matmul, torch.matmul, attn, v)


# ------------------------------------------------------------ module forwards
def _no_mask(attn_mask: Any = None, is_causal: bool = False) -> None:
    if attn_mask is not None or is_causal:
        raise AttributionInputError(
            "LRP supports unmasked attention only: call the model without "
            "attn_mask / is_causal."
        )


def _attention_forward(P: Propagator, m: nn.Module) -> Callable:
    def forward(x: Tensor, attn_mask: Any = None, is_causal: bool = False) -> Tensor:
        _no_mask(attn_mask, is_causal)
        b, n, _ = x.shape
        qkv = P.leaf(m.qkv, x).reshape(b, n, 3, m.num_heads, m.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        q, k = P.leaf(m.q_norm, q), P.leaf(m.k_norm, k)
        out = P.attend(m, q, k, v).transpose(1, 2).reshape(b, n, m.attn_dim)
        out = P.leaf(m.norm, out)
        return P.leaf(m.proj_drop, P.leaf(m.proj, out))

    return forward


def _talking_heads_forward(P: Propagator, m: nn.Module) -> Callable:
    def forward(x: Tensor) -> Tensor:
        b, n, c = x.shape
        qkv = P.leaf(m.qkv, x).reshape(b, n, 3, m.num_heads, c // m.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        out = P.attend(m, q, k, v).transpose(1, 2).reshape(b, n, c)
        return P.leaf(m.proj_drop, P.leaf(m.proj, out))

    return forward


def _class_attention_forward(P: Propagator, m: nn.Module) -> Callable:
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


def _mlp_forward(P: Propagator, m: nn.Module) -> Callable:
    def forward(x: Tensor) -> Tensor:
        x = P.leaf(m.act, P.leaf(m.fc1, x))
        x = P.leaf(m.norm, P.leaf(m.drop1, x))
        return P.leaf(m.drop2, P.leaf(m.fc2, x))

    return forward


def _block_forward(P: Propagator, m: nn.Module) -> Callable:
    def forward(x: Tensor, attn_mask: Any = None, is_causal: bool = False) -> Tensor:
        _no_mask(attn_mask, is_causal)
        h = P.leaf(m.ls1, m.attn(P.leaf(m.norm1, x)))
        x = P.add(x, P.leaf(m.drop_path1, h))
        h = P.leaf(m.ls2, m.mlp(P.leaf(m.norm2, x)))
        return P.add(x, P.leaf(m.drop_path2, h))

    return forward


def _cait_block_forward(P: Propagator, m: nn.Module) -> Callable:
    def forward(x: Tensor) -> Tensor:
        h = P.scale(m.attn(P.leaf(m.norm1, x)), m.gamma_1)
        x = P.add(x, P.leaf(m.drop_path, h))
        h = P.scale(m.mlp(P.leaf(m.norm2, x)), m.gamma_2)
        return P.add(x, P.leaf(m.drop_path, h))

    return forward


def _cait_class_block_forward(P: Propagator, m: nn.Module) -> Callable:
    def forward(x: Tensor, x_cls: Tensor) -> Tensor:
        u = torch.cat((x_cls, x), dim=1)
        h = P.scale(m.attn(P.leaf(m.norm1, u)), m.gamma_1)
        x_cls = P.add(x_cls, P.leaf(m.drop_path, h))
        h = P.scale(m.mlp(P.leaf(m.norm2, x_cls)), m.gamma_2)
        return P.add(x_cls, P.leaf(m.drop_path, h))

    return forward


def _leaf_forward(P: Propagator, m: nn.Module) -> Callable:
    return lambda x: P.leaf(m, x)


# ------------------------------------------------------------------ planning
Plan = List[Tuple[nn.Module, Callable]]


def _plan(model: nn.Module, P: Propagator, embedding: bool) -> Plan:
    """(module, forward) pairs to install, or an error naming what is supported."""
    why = unsupported_model(model)
    if why is not None:
        raise AttributionInputError(why)
    if model.training:
        raise AttributionInputError(
            "LRP explains the model in evaluation mode: call model.eval() first."
        )
    Attention, _, _, Mlp, cait, vit = _timm()
    plan: Plan = []

    def leaf(m: nn.Module, where: str) -> None:
        P.check_leaf(m, where)
        if not isinstance(m, P.passthrough):
            plan.append((m, _leaf_forward(P, m)))

    def leaves(m: nn.Module, names: Tuple[str, ...], where: str) -> None:
        for n in names:
            P.check_leaf(getattr(m, n), f"{where}.{n}")

    def expect(m: nn.Module, cls: type, where: str) -> None:
        if type(m) is not cls:
            raise AttributionInputError(
                f"No LRP rule for {type(m).__name__} at `{where}` (expected "
                f"timm's {cls.__name__}). Supported: {SUPPORTED_MODELS}."
            )

    def mlp(m: nn.Module, where: str) -> None:
        expect(m, Mlp, where)
        leaves(m, ("fc1", "act", "drop1", "norm", "fc2", "drop2"), where)
        plan.append((m, _mlp_forward(P, m)))

    if isinstance(model, vit.VisionTransformer):
        for i, blk in enumerate(model.blocks):
            where = f"blocks.{i}"
            expect(blk, vit.Block, where)
            leaves(
                blk, ("norm1", "ls1", "drop_path1", "norm2", "ls2", "drop_path2"), where
            )
            expect(blk.attn, Attention, where + ".attn")
            if getattr(blk.attn, "gate", None) is not None:
                raise AttributionInputError(
                    f"No LRP rule for the gated attention at `{where}.attn`."
                )
            leaves(blk.attn, ("qkv", "q_norm", "k_norm", "norm", "proj"), where)
            plan.append((blk.attn, _attention_forward(P, blk.attn)))
            mlp(blk.mlp, where + ".mlp")
            plan.append((blk, _block_forward(P, blk)))
        for name in ("norm_pre", "norm", "fc_norm", "head", "head_drop", "patch_drop"):
            leaf(getattr(model, name), name)
        dist = getattr(model, "head_dist", None)
        if dist is not None:
            leaf(dist, "head_dist")
    else:  # Cait
        for i, blk in enumerate(model.blocks):
            where = f"blocks.{i}"
            expect(blk, cait.LayerScaleBlock, where)
            expect(blk.attn, cait.TalkingHeadAttn, where + ".attn")
            leaves(blk, ("norm1", "norm2", "drop_path"), where)
            leaves(blk.attn, ("qkv", "proj_l", "proj_w", "proj"), where + ".attn")
            plan.append((blk.attn, _talking_heads_forward(P, blk.attn)))
            mlp(blk.mlp, where + ".mlp")
            plan.append((blk, _cait_block_forward(P, blk)))
        for i, blk in enumerate(model.blocks_token_only):
            where = f"blocks_token_only.{i}"
            expect(blk, cait.LayerScaleBlockClassAttn, where)
            expect(blk.attn, cait.ClassAttn, where + ".attn")
            leaves(blk, ("norm1", "norm2", "drop_path"), where)
            leaves(blk.attn, ("q", "k", "v", "proj"), where + ".attn")
            plan.append((blk.attn, _class_attention_forward(P, blk.attn)))
            mlp(blk.mlp, where + ".mlp")
            plan.append((blk, _cait_class_block_forward(P, blk)))
        for name in ("norm", "head", "head_drop"):
            leaf(getattr(model, name), name)
    if embedding:
        plan.extend(_embedding_plan(model, P))
    return plan


def _embedding_plan(model: nn.Module, P: Propagator) -> Plan:
    """Rules below the first block: the position-embedding add and the patch
    convolution (relevance down to the patch tokens and the pixels)."""
    embed = model.patch_embed
    proj = getattr(embed, "proj", None)
    if type(proj) is not nn.Conv2d:
        raise AttributionInputError(
            f"No LRP rule for the patch embedding {type(proj).__name__}: relevance "
            "to the input needs a Conv2d patch projection."
        )
    plan: Plan = []
    norm = getattr(embed, "norm", nn.Identity())
    P.check_leaf(norm, "patch_embed.norm")
    if not isinstance(norm, P.passthrough):
        plan.append((norm, _leaf_forward(P, norm)))

    def conv_forward(x: Tensor) -> Tensor:
        return apply_rule(
            P.state,
            lambda rr, y, xx: (P.rules.patch_conv(rr, y, xx, proj),),
            lambda xx: type(proj).forward(proj, xx),
            x,
        )

    plan.append((proj, conv_forward))
    pos = getattr(model, "pos_embed", None)
    drop = getattr(model, "pos_drop", None)
    if pos is not None and drop is not None:
        prefix = getattr(model, "num_prefix_tokens", 0)

        def pos_forward(x: Tensor) -> Tensor:
            b = pos
            if b.shape[1] != x.shape[1] and b.shape[1] + prefix == x.shape[1]:
                b = F.pad(b, (0, 0, prefix, 0))
            if b.shape[1:] != x.shape[1:]:
                raise AttributionInputError(
                    "Relevance to the input needs the position embedding as stored "
                    f"({tuple(pos.shape)}); this input gives {tuple(x.shape)} tokens "
                    "(a resampled embedding). Use the model's native input size."
                )
            return P.add_const(x - b, b)

        plan.append((drop, pos_forward))
    return plan


@contextlib.contextmanager
def relevance_rules(
    model: nn.Module, rules: Rules, state: State, *, embedding: bool = False
) -> Iterator[Propagator]:
    """Within the block, ``model`` computes its usual output with every
    operation routed through ``rules`` (see the module docstring).

    ``embedding`` adds the rules below the first block (position embedding,
    patch convolution) for relevance at the patch tokens or the pixels.
    Everything is restored on exit, also when the block raises.
    """
    P = Propagator(rules, state)
    plan = _plan(model, P, embedding)
    saved: List[Tuple[nn.Module, Any]] = []
    handles = []
    try:
        for m, fwd in plan:
            saved.append((m, m.__dict__.get("forward", _MISSING)))
            m.forward = fwd
        dist = getattr(model, "head_dist", None)
        if dist is not None:
            handles.extend(_distilled_head(model, P))
        yield P
    finally:
        for handle in handles:
            handle.remove()
        for m, old in reversed(saved):
            if old is _MISSING:
                m.__dict__.pop("forward", None)
            else:
                m.forward = old


def _distilled_head(model: nn.Module, P: Propagator) -> list:
    """DeiT distilled averages its two heads, ``(head + head_dist) / 2``: the
    average is routed through the rules (halving, then the add rule)."""
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
