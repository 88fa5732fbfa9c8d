"""Hugging Face ``transformers`` families: ViT, DeiT, DINOv2 (with and without
registers), CLIP vision, ViT-MAE (with ``config.mask_ratio == 0``; its
embeddings keep the patch order for the call, see :func:`mae_embeddings_forward`).

Every one of them computes attention the same way (``q_proj``, ``k_proj``,
``v_proj``, ``o_proj`` / ``out_proj``; ``softmax(q k^T * scaling) v`` through
the eager, sdpa or flash kernel that ``config._attn_implementation`` names),
so one attention forward serves all; what differs is data: where the blocks
are, the names inside a block, the prefix tokens and what the head reads
(:data:`FAMILIES`, :data:`HEADS`). The attention forward below replaces the
module's own for one call only, whatever kernel the config names, so eager
and sdpa models give the same maps and the config is never touched.

Nothing here imports ``transformers``: classes are recognised by name and
module, and an attention class is looked up only once its module has been
imported (a model of it exists).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from functools import partial
from typing import (
    TYPE_CHECKING,
    Any,
    Callable,
    ClassVar,
    Container,
    Dict,
    Optional,
    Tuple,
    Union,
    cast,
)

import torch
from torch import Tensor, nn

from captum_ssl.attr._core import AttributionInputError
from captum_ssl.attr._families.base import (
    SELF,
    AttentionImpl,
    FamilyAdapter,
    Site,
    register,
    register_attention,
)
from captum_ssl.attr._families.timm_vit import conv_forward, position_forward
from captum_ssl.attr._layout import TokenLayout
from captum_ssl.attr._lrp.propagate import Plan, Propagator, plan_leaf

if TYPE_CHECKING:
    # The module structure this adapter reads, for the type checker only: the
    # families are recognised by class name, so no one transformers class
    # stands for them.

    class _Attention(nn.Module):  # ViTSelfAttention, CLIPAttention, ...
        q_proj: nn.Linear
        k_proj: nn.Linear
        v_proj: nn.Linear
        o_proj: nn.Linear  # CLIP: out_proj
        out_proj: nn.Linear
        head_dim: int
        scale: float  # CLIP (the others: scaling)

    class _MLP(nn.Module):  # fc1/fc2 (ViT, DeiT, DINOv2, CLIP) or SwiGLU
        fc1: nn.Linear
        fc2: nn.Linear
        activation_fn: Callable[[Tensor], Tensor]
        gate_proj: nn.Linear
        up_proj: nn.Linear
        down_proj: nn.Linear
        act_fn: Callable[[Tensor], Tensor]

    class _Layer(nn.Module):  # one encoder layer
        mlp: nn.Module

    class _Config:  # the config fields read here
        patch_size: Union[int, Tuple[int, int]]
        num_register_tokens: int  # DINOv2 with registers

    class _Embeddings(nn.Module):
        def interpolate_pos_encoding(
            self, embeddings: Tensor, height: int, width: int
        ) -> Tensor: ...

    class _Base(nn.Module):  # ViTModel, Dinov2Model, CLIPVisionModel, ...
        config: _Config
        embeddings: _Embeddings

    class _Classifier(nn.Module):  # ...ForImageClassification
        classifier: nn.Module
        cls_classifier: nn.Module  # DeiT with teacher
        distillation_classifier: nn.Module


# ------------------------------------------------------------ the families
@dataclass(frozen=True)
class Block:
    """Names inside one encoder layer (``None``: the layer has no such part)."""

    norm1: str
    attn: str
    norm2: str
    scale1: Optional[str] = None  # layer scale (DINOv2)
    scale2: Optional[str] = None
    drop: Optional[str] = None  # dropout after attention and MLP (ViT)
    drop_path: Optional[str] = None  # stochastic depth (DINOv2)


VIT_BLOCK = Block("layernorm_before", "attention", "layernorm_after", drop="dropout")
DINO_BLOCK = Block(
    "norm1",
    "attention",
    "norm2",
    scale1="layer_scale1",
    scale2="layer_scale2",
    drop_path="drop_path",
)
CLIP_BLOCK = Block("layer_norm1", "self_attn", "layer_norm2")


@dataclass(frozen=True)
class Family:
    """One Hugging Face backbone class (paths relative to the backbone)."""

    module: str  # transformers.models.<module>.modeling_<module>
    attention: str  # its attention class
    blocks: str  # the layer list
    block: Block
    #: module whose output are the patch tokens, and the patch convolution
    patches: str = "embeddings.patch_embeddings"
    proj: str = "embeddings.patch_embeddings.projection"
    #: the module that receives the tokens plus position embeddings
    after_pos: str = "embeddings.dropout"
    norm: str = "layernorm"  # the final norm (LeGrad reads tokens through it)
    leaves: Tuple[str, ...] = ()  # other leaves of the backbone (pooler)
    distilled: bool = False  # DeiT: a distillation token after the class token
    registers: bool = False  # DINOv2 with registers
    #: ViT-MAE: the embeddings shuffle the patches (and drop config.mask_ratio
    #: of them) after the position add; no module receives the sum
    shuffles: bool = False


POOLER = ("pooler.dense", "pooler.activation")

#: backbone class name -> its family
FAMILIES: Dict[str, Family] = {
    "ViTModel": Family("vit", "ViTAttention", "layers", VIT_BLOCK, leaves=POOLER),
    "DeiTModel": Family(
        "deit", "DeiTAttention", "layers", VIT_BLOCK, leaves=POOLER, distilled=True
    ),
    "Dinov2Model": Family("dinov2", "Dinov2Attention", "encoder.layer", DINO_BLOCK),
    "Dinov2WithRegistersModel": Family(
        "dinov2_with_registers",
        "Dinov2WithRegistersAttention",
        "encoder.layer",
        DINO_BLOCK,
        registers=True,  # they join after the positions, before the dropout
    ),
    "CLIPVisionModel": Family(
        "clip",
        "CLIPAttention",
        "encoder.layers",
        CLIP_BLOCK,
        patches="embeddings.patch_embedding",
        proj="embeddings.patch_embedding",
        after_pos="pre_layrnorm",
        norm="post_layernorm",
    ),
    "ViTMAEModel": Family(
        "vit_mae", "ViTMAEAttention", "layers", VIT_BLOCK, shuffles=True
    ),
}

#: classifier class name -> (attribute of its backbone, what its head reads)
HEADS: Dict[str, Tuple[str, str]] = {
    "ViTForImageClassification": ("vit", "cls"),
    "DeiTForImageClassification": ("deit", "cls"),
    "DeiTForImageClassificationWithTeacher": ("deit", "cls+dist"),
    "Dinov2ForImageClassification": ("dinov2", "cls+mean"),
    "Dinov2WithRegistersForImageClassification": (
        "dinov2_with_registers",
        "cls+mean",
    ),
    "CLIPForImageClassification": ("vision_model", "mean"),
}

MAE_REFUSAL = (
    "ViTMAEModel drops config.mask_ratio={ratio} of the patches at random in "
    "every forward pass, so its tokens are no patch grid and two calls see "
    "different images. Set `model.config.mask_ratio = 0.0` (all patches, kept "
    "in order while a map is computed), or load its weights into ViTModel: "
    "`vit = transformers.ViTModel(transformers.ViTConfig(**mae.config.to_dict()), "
    "add_pooling_layer=False)`, `vit.load_state_dict(mae.state_dict(), "
    "strict=False)`."
)


def _hf_class(model: Optional[nn.Module], names: Container[str]) -> Optional[str]:
    """The name of ``model``'s transformers class if it is in ``names``."""
    cls = type(model)
    if cls.__module__.startswith("transformers.") and cls.__name__ in names:
        return cls.__name__
    return None


def _get(module: Any, path: str) -> Any:
    """The submodule at a dotted path; ``None`` where a part is ``None`` (a
    ViTModel built with ``add_pooling_layer=False``)."""
    for part in path.split("."):
        module = getattr(module, part) if module is not None else None
    return module


# ------------------------------------------------------ attention forward
def hf_attention_forward(
    P: Propagator, module: nn.Module, mask_is_bias: bool = False
) -> Callable:
    """Every Hugging Face ViT attention: ``q_proj`` / ``k_proj`` / ``v_proj``,
    ``softmax(q k^T * scaling) v``, ``o_proj`` (CLIP: ``out_proj``); returns
    ``(output, None)`` as the module does when no kernel returns weights.

    ``mask_is_bias``: the float ``attention_mask`` the layer passes is a
    constant added to the scores (BEiT's relative position bias)."""
    m = cast("_Attention", module)
    out_proj = m.o_proj if hasattr(m, "o_proj") else m.out_proj
    scale = getattr(m, "scaling", None) or m.scale

    def forward(
        hidden_states: Tensor, attention_mask: Any = None, **_: Any
    ) -> Tuple[Tensor, None]:
        bias = None
        if mask_is_bias and isinstance(attention_mask, Tensor):
            if attention_mask.is_floating_point():
                bias, attention_mask = attention_mask, None
        if attention_mask is not None:
            raise AttributionInputError(
                "The attention methods and LRP support unmasked self-attention "
                "only: call the model without attention_mask."
            )
        b, n, _c = hidden_states.shape

        def heads(t: Tensor) -> Tensor:
            return t.reshape(b, n, -1, m.head_dim).transpose(1, 2)

        q = heads(P.leaf(m.q_proj, hidden_states))
        k = heads(P.leaf(m.k_proj, hidden_states))
        v = heads(P.leaf(m.v_proj, hidden_states))
        out = P.attend(m, q, k, v, scale=scale, bias=bias)
        return P.leaf(out_proj, out.transpose(1, 2).reshape(b, n, -1)), None

    return forward


def _loader(family: Family) -> Callable[[], Optional[type]]:
    def load() -> Optional[type]:
        mod = f"transformers.models.{family.module}.modeling_{family.module}"
        return getattr(sys.modules.get(mod), family.attention, None)

    return load


for _family in FAMILIES.values():
    register_attention(
        _loader(_family),
        AttentionImpl(
            SELF,
            hf_attention_forward,
            f"transformers {_family.attention} (`{_family.blocks}[i]."
            f"{_family.block.attn}`)",
        ),
    )


# ----------------------------------------------------------- LRP forwards
def mlp_forward(P: Propagator, module: nn.Module) -> Callable:
    """``fc2(act(fc1(x)))`` (ViT, DeiT, DINOv2, CLIP) or DINOv2's SwiGLU
    ``down_proj(silu(gate_proj(x)) * up_proj(x))``."""
    m = cast("_MLP", module)
    if hasattr(m, "gate_proj"):

        def swiglu(x: Tensor) -> Tensor:
            gate = P.elementwise(m.act_fn, P.leaf(m.gate_proj, x))
            return P.leaf(m.down_proj, P.mul(gate, P.leaf(m.up_proj, x)))

        return swiglu

    def forward(x: Tensor) -> Tensor:
        return P.leaf(m.fc2, P.elementwise(m.activation_fn, P.leaf(m.fc1, x)))

    return forward


def block_forward(P: Propagator, module: nn.Module, names: Block) -> Callable:
    m = cast("_Layer", module)
    attn, mlp = getattr(m, names.attn), m.mlp

    def part(h: Tensor, scale: Optional[str]) -> Tensor:
        if scale is not None:
            h = P.scale(h, getattr(m, scale).lambda1)
        for drop in (names.drop, names.drop_path):
            if drop is not None:
                h = getattr(m, drop)(h)  # identities in eval mode
        return h

    def forward(hidden_states: Tensor, attention_mask: Any = None, **kw: Any):
        x = hidden_states
        h, _ = attn(getattr(m, names.norm1)(x), attention_mask, **kw)
        x = P.add(part(h, names.scale1), x)
        h = mlp(getattr(m, names.norm2)(x))
        return P.add(part(h, names.scale2), x)

    return forward


def head_forward(P: Propagator, module: nn.Module, base: str, reads: str) -> Callable:
    """The classifier's forward (``logits`` of an ``ImageClassifierOutput``)
    with its reading of the tokens routed through the rules."""
    model = cast("_Classifier", module)
    from transformers.modeling_outputs import ImageClassifierOutput

    backbone = getattr(model, base)
    registers = getattr(model.config, "num_register_tokens", 0)

    def forward(pixel_values: Tensor, *args: Any, **kwargs: Any):
        kwargs.pop("labels", None)
        seq = backbone(pixel_values, *args, **kwargs).last_hidden_state
        if reads == "cls":
            logits = P.leaf(model.classifier, seq[:, 0])
        elif reads == "cls+dist":
            a = P.leaf(model.cls_classifier, seq[:, 0])
            d = P.leaf(model.distillation_classifier, seq[:, 1])
            logits = P.add(P.scale(a, 0.5), P.scale(d, 0.5))
        elif reads == "mean":  # CLIP: the mean patch token only
            logits = P.leaf(model.classifier, P.token_mean(seq[:, 1:]))
        else:  # DINOv2: class token and mean patch token
            cat = torch.cat([seq[:, 0], P.token_mean(seq[:, 1 + registers :])], dim=1)
            logits = P.leaf(model.classifier, cat)
        return ImageClassifierOutput(logits=logits)

    return forward


# ----------------------------------------------------------------- adapter
@register
class HFViTAdapter(FamilyAdapter):
    label = (
        "Hugging Face transformers ViTModel / ViTForImageClassification, DeiT "
        "(with teacher), Dinov2Model / Dinov2ForImageClassification (with and "
        "without registers), CLIPVisionModel, ViTMAEModel (mask_ratio=0) (eager, "
        "sdpa)"
    )

    #: the backbones and classifiers this adapter knows (subclasses: theirs)
    families: ClassVar[Dict[str, Family]] = FAMILIES
    heads: ClassVar[Dict[str, Tuple[str, str]]] = HEADS

    def __init__(self, model: nn.Module, prefix: str = "") -> None:
        super().__init__(model, prefix)
        head = _hf_class(model, self.heads)
        self.reads = self.heads[head][1] if head else None
        self.base_name = self.heads[head][0] if head else ""
        base = getattr(model, self.base_name) if head else model
        self.base = cast("_Base", base)
        self.family = self.families[type(self.base).__name__]

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        if _hf_class(model, cls.families) is not None:
            return True
        head = _hf_class(model, cls.heads)
        return head is not None and isinstance(
            _hf_class(getattr(model, cls.heads[head][0], None), cls.families), str
        )

    def _path(self, path: str) -> str:
        return f"{self.base_name}.{path}" if self.base_name else path

    def _blocks(self) -> nn.ModuleList:
        return _get(self.base, self.family.blocks)

    def _mae_refusal(self) -> Optional[str]:
        """Why a ViT-MAE cannot be explained (it drops patches), or None."""
        ratio = getattr(self.base.config, "mask_ratio", 0.0)
        if self.family.shuffles and ratio != 0:
            return MAE_REFUSAL.format(ratio=ratio)
        return None

    def _refuse_mae(self) -> None:
        why = self._mae_refusal()
        if why is not None:
            raise AttributionInputError(why)

    # ------------------------------------------------------------ structure
    def attention_sites(self):
        self._refuse_mae()
        return [
            Site(
                self._path(f"{self.family.blocks}.{i}.{self.family.block.attn}"),
                getattr(blk, self.family.block.attn),
                SELF,
            )
            for i, blk in enumerate(self._blocks())
        ]

    def norm_layer(self) -> Optional[str]:
        return self._path(f"{self.family.blocks}.-1.{self.family.block.norm1}")

    def norm_layer_hint(self) -> str:
        from captum_ssl.models._layers import layer_expression

        return layer_expression(self.norm_layer() or "")

    # ---------------------------------------------------------------- tokens
    def prefix_tokens(self) -> int:
        config = self.base.config
        return (
            1
            + int(self.family.distilled)
            + (config.num_register_tokens if self.family.registers else 0)
        )

    def layout(self, input_hw) -> Optional[TokenLayout]:
        self._refuse_mae()
        patch = self.base.config.patch_size
        ph, pw = (patch, patch) if isinstance(patch, int) else patch
        grid = None if input_hw is None else (input_hw[0] // ph, input_hw[1] // pw)
        return TokenLayout(
            fmt="NLC", num_prefix_tokens=self.prefix_tokens(), patch_grid=grid
        )

    def token_roles(self) -> Dict[str, int]:
        return {"cls": 0, "dist": 1} if self.family.distilled else {"cls": 0}

    def class_token_unread(self) -> Optional[str]:
        if self.reads == "mean":
            return f"{type(self.model).__name__} averages the patch tokens"
        return None

    def score_projection(self) -> Callable[[Tensor], Tensor]:
        """LeGrad: the mean token through the backbone's final norm and the
        classifier, read as the classifier reads its tokens; for a backbone
        without classifier, its embedding as
        :func:`~captum_ssl._outputs.model_output` reads it (through the
        pooler where the model has one)."""
        norm = _get(self.base, self.family.norm)
        if self.reads is None:
            pooler = getattr(self.base, "pooler", None)
            if isinstance(pooler, nn.Module):  # ViTModel: dense + tanh of token 0
                return lambda z: pooler(norm(z.mean(dim=1))[:, None])
            return lambda z: norm(z.mean(dim=1))
        model, reads = cast("_Classifier", self.model), self.reads

        def project(z: Tensor) -> Tensor:
            t = norm(z.mean(dim=1))
            if reads == "cls+dist":
                return (model.cls_classifier(t) + model.distillation_classifier(t)) / 2
            if reads == "cls+mean":
                t = torch.cat([t, t], dim=1)
            return model.classifier(t)

        return project

    # ------------------------------------------------------------------- LRP
    def lrp_unsupported(self) -> Optional[str]:
        # a head that averages the patch tokens (CLIP) is a fixed linear map:
        # the class-row methods refuse it themselves (``class_token_unread``)
        return self._mae_refusal()

    def plan(self, P: Propagator, embedding: bool) -> Plan:
        fam = self.family
        plan: Plan = []
        for i, layer in enumerate(self._blocks()):
            blk = cast("_Layer", layer)
            where = self._path(f"{fam.blocks}.{i}")
            attn = getattr(blk, fam.block.attn)
            for name in ("q_proj", "k_proj", "v_proj"):
                P.check_leaf(getattr(attn, name), f"{where}.{fam.block.attn}.{name}")
            plan.append((attn, hf_attention_forward(P, attn)))
            plan.append((blk.mlp, mlp_forward(P, blk.mlp)))
            plan.append((blk, block_forward(P, blk, fam.block)))
            for name in (fam.block.norm1, fam.block.norm2):
                plan_leaf(P, plan, getattr(blk, name), f"{where}.{name}")
        for path in (fam.norm,) + fam.leaves:
            leaf = _get(self.base, path)
            if leaf is None:
                continue  # e.g. ViTModel(add_pooling_layer=False)
            if _is_activation(leaf):
                act = leaf  # its class's forward: the instance's is this plan's
                plan.append(
                    (
                        act,
                        lambda x, f=act: P.elementwise(partial(type(f).forward, f), x),
                    )
                )
            else:
                plan_leaf(P, plan, leaf, self._path(path))
        if self.reads is not None:
            head = head_forward(P, self.model, self.base_name, self.reads)
            plan.append((self.model, head))
        if embedding:
            plan.extend(self._embedding_plan(P))
        return plan

    def _embedding_plan(self, P: Propagator) -> Plan:
        """The patch convolution and the position-embedding add (computed for
        the input's size, so interpolated embeddings are handled: DINOv2 at
        any size, ``interpolate_pos_encoding=True``)."""
        fam, base = self.family, self.base
        proj = _get(base, fam.proj)
        plan: Plan = [(proj, conv_forward(P, proj))]
        add = position_forward(P, self._positions, 0, [])  # always this call's
        if fam.shuffles:  # ViT-MAE: no module receives the sum; its embeddings
            embeddings = base.embeddings  # in patch order, the add redone
            ordered = mae_embeddings_forward(embeddings)

            def mae(pixel_values: Tensor, *args: Any, **kw: Any):
                tokens, *rest = ordered(pixel_values, *args, **kw)
                return (add(tokens), *rest)

            return plan + [(embeddings, mae)]
        after = _get(base, fam.after_pos)
        if isinstance(after, nn.LayerNorm):  # CLIP: the add, then its norm
            plan.append((after, lambda x: P.leaf(after, add(x))))
        else:
            plan.append((after, add))
        return plan

    def _positions(self) -> Tensor:
        """The position embedding the model added for the current input
        (its size recorded by :meth:`hooks`), as the model computes it; zeros
        at the register tokens, which join after it."""
        config, (h, w) = self.base.config, self._input_hw
        patch = config.patch_size
        ph, pw = (patch, patch) if isinstance(patch, int) else patch
        registers = config.num_register_tokens if self.family.registers else 0
        weight = _get(self.base, self.family.proj).weight
        n = self.prefix_tokens() - registers + (h // ph) * (w // pw)
        like = weight.new_zeros(1, n, weight.shape[0])
        pos = self.base.embeddings.interpolate_pos_encoding(like, h, w)
        if registers:
            pad = pos.new_zeros(1, registers, pos.shape[-1])
            pos = torch.cat([pos[:, :1], pad, pos[:, 1:]], dim=1)
        return pos

    def hooks(self, P: Propagator) -> list:
        """Record the input size for :meth:`_positions`."""

        def size(_m: nn.Module, args: Tuple[Any, ...]) -> None:
            self._input_hw = tuple(args[0].shape[-2:])

        return [self.base.embeddings.register_forward_pre_hook(size)]

    def patch_tokens(self) -> nn.Module:
        return _get(self.base, self.family.patches)

    def call_plan(self) -> Plan:
        """ViT-MAE with ``mask_ratio == 0``: its embeddings keep the patch
        order (the class token's output does not depend on it)."""
        if not self.family.shuffles or self._mae_refusal() is not None:
            return []
        embeddings = self.base.embeddings
        return [(embeddings, mae_embeddings_forward(embeddings))]


def mae_embeddings_forward(embeddings: nn.Module) -> Callable:
    """ViT-MAE's embeddings as the model computes them, with the patches kept
    in order: ``noise = 0, 1, 2, ...`` (whatever noise the caller passed), so
    its ``argsort`` is the identity. With ``config.mask_ratio == 0`` no patch
    is dropped and the position embeddings are added before the shuffle, so
    the model's result does not depend on the order (up to rounding), while
    the tokens form the plain ViT layout: class token, then the patch grid in
    raster order."""
    cls = type(embeddings)
    ph, pw = cast(Any, embeddings).patch_embeddings.patch_size

    def forward(pixel_values: Tensor, noise: Any = None, *args: Any, **kw: Any):
        h, w = pixel_values.shape[-2:]
        n = int(h // ph) * int(w // pw)
        order = torch.arange(n, device=pixel_values.device, dtype=torch.float32)
        noise = order.expand(pixel_values.shape[0], n)
        return cls.forward(embeddings, pixel_values, noise, *args, **kw)

    return forward


def _is_activation(m: nn.Module) -> bool:
    return type(m).__module__ == "transformers.activations" or isinstance(
        m, (nn.Tanh, nn.GELU, nn.SiLU, nn.ReLU)
    )
