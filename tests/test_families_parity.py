"""The same weights in different ViT implementations give the same maps.

A small random-init timm ``VisionTransformer`` is the reference; the weight
converters below load its weights into torchvision's ``VisionTransformer``
and open_clip's visual ``VisionTransformer`` (written here from the key
layouts of the three libraries). Every ViT method must then give the same
map on each implementation (float64, relative tolerance 1e-4): the family
adapters, not the methods, know the implementations.

:data:`IMPLEMENTATIONS` is a config list: another implementation (Hugging
Face ViT, ...) is one more entry ``(name, timm kwargs, converter)``; Hugging
Face's ``ViTForImageClassification`` is one (passed as it is: its
``ImageClassifierOutput`` is read by its logits).
"""

from __future__ import annotations

from typing import Callable, Dict, List, Tuple

import pytest
import timm
import torch
from torch import nn

from captum_ssl._outputs import model_output
from captum_ssl.attr import (
    AttentionFlow,
    AttentionRollout,
    AttnLRP,
    GenericAttention,
    GradientAttentionRollout,
    LeGrad,
    PartialLRP,
    RawAttention,
    TransformerAttribution,
    TransformerLRP,
)

WIDTH, DEPTH, HEADS, PATCH, SIZE, CLASSES = 16, 2, 2, 8, 32, 5
TARGETS = [1, 4]


def timm_reference(**kw) -> nn.Module:
    """Random-init timm ViT with non-trivial biases, norms, class token and
    position embedding and sharp attention (float64)."""
    torch.manual_seed(0)
    m = timm.create_model(
        "vit_tiny_patch16_224",
        img_size=SIZE,
        patch_size=PATCH,
        embed_dim=WIDTH,
        depth=DEPTH,
        num_heads=HEADS,
        mlp_ratio=2.0,
        num_classes=CLASSES,
        **kw,
    )
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in m.named_parameters():
            p.add_(0.3 * torch.randn_like(p))
            if name.endswith("qkv.weight"):
                p.mul_(4.0)
    return m.double().eval()


def _copy(dst: nn.Module, values: Dict[str, torch.Tensor]) -> nn.Module:
    state = dst.state_dict()
    assert set(values) == set(state), set(values) ^ set(state)
    dst.load_state_dict({k: v.reshape(state[k].shape) for k, v in values.items()})
    return dst.double().eval()


def to_torchvision(ref: nn.Module) -> nn.Module:
    """timm ViT -> torchvision ``VisionTransformer`` (same LayerNorm eps 1e-6)."""
    from torchvision.models import VisionTransformer

    s = ref.state_dict()
    out = {
        "class_token": s["cls_token"],
        "conv_proj.weight": s["patch_embed.proj.weight"],
        "conv_proj.bias": s["patch_embed.proj.bias"],
        "encoder.pos_embedding": s["pos_embed"],
        "encoder.ln.weight": s["norm.weight"],
        "encoder.ln.bias": s["norm.bias"],
        "heads.head.weight": s["head.weight"],
        "heads.head.bias": s["head.bias"],
    }
    for i in range(DEPTH):
        a, b = f"blocks.{i}.", f"encoder.layers.encoder_layer_{i}."
        for src, dst in [
            ("norm1", "ln_1"),
            ("norm2", "ln_2"),
            ("attn.proj", "self_attention.out_proj"),
            ("mlp.fc1", "mlp.0"),
            ("mlp.fc2", "mlp.3"),
        ]:
            for p in ("weight", "bias"):
                out[f"{b}{dst}.{p}"] = s[f"{a}{src}.{p}"]
        out[f"{b}self_attention.in_proj_weight"] = s[f"{a}attn.qkv.weight"]
        out[f"{b}self_attention.in_proj_bias"] = s[f"{a}attn.qkv.bias"]
    tv = VisionTransformer(
        image_size=SIZE,
        patch_size=PATCH,
        num_layers=DEPTH,
        num_heads=HEADS,
        hidden_dim=WIDTH,
        mlp_dim=2 * WIDTH,
        num_classes=CLASSES,
    )
    return _copy(tv, out)


def to_open_clip(ref: nn.Module) -> nn.Module:
    """timm ViT (``pre_norm``: no patch bias; zero head bias) -> open_clip's
    visual ``VisionTransformer``: ``ln_pre`` is timm's ``norm_pre``, ``proj``
    the head's weight transposed; LayerNorm eps set to timm's 1e-6."""
    from open_clip.transformer import VisionTransformer

    s = ref.state_dict()
    assert "patch_embed.proj.bias" not in s and not s["head.bias"].any()
    out = {
        "class_embedding": s["cls_token"],
        "positional_embedding": s["pos_embed"],
        "conv1.weight": s["patch_embed.proj.weight"],
        "ln_pre.weight": s["norm_pre.weight"],
        "ln_pre.bias": s["norm_pre.bias"],
        "ln_post.weight": s["norm.weight"],
        "ln_post.bias": s["norm.bias"],
        "proj": s["head.weight"].t(),
    }
    for i in range(DEPTH):
        a, b = f"blocks.{i}.", f"transformer.resblocks.{i}."
        for src, dst in [
            ("norm1", "ln_1"),
            ("norm2", "ln_2"),
            ("attn.proj", "attn.out_proj"),
            ("mlp.fc1", "mlp.c_fc"),
            ("mlp.fc2", "mlp.c_proj"),
        ]:
            for p in ("weight", "bias"):
                out[f"{b}{dst}.{p}"] = s[f"{a}{src}.{p}"]
        out[f"{b}attn.in_proj_weight"] = s[f"{a}attn.qkv.weight"]
        out[f"{b}attn.in_proj_bias"] = s[f"{a}attn.qkv.bias"]
    oc = VisionTransformer(
        image_size=SIZE,
        patch_size=PATCH,
        width=WIDTH,
        layers=DEPTH,
        heads=HEADS,
        mlp_ratio=2.0,
        output_dim=CLASSES,
    )
    for m in oc.modules():
        if isinstance(m, nn.LayerNorm):
            m.eps = 1e-6
    return _copy(oc, out)


def to_huggingface(ref: nn.Module) -> nn.Module:
    """timm ViT -> Hugging Face ``ViTForImageClassification``: timm's fused
    ``qkv`` split into ``q_proj`` / ``k_proj`` / ``v_proj``."""
    transformers = pytest.importorskip("transformers")
    s = ref.state_dict()
    out = {
        "vit.embeddings.cls_token": s["cls_token"],
        "vit.embeddings.position_embeddings": s["pos_embed"],
        "vit.embeddings.patch_embeddings.projection.weight": s[
            "patch_embed.proj.weight"
        ],
        "vit.embeddings.patch_embeddings.projection.bias": s["patch_embed.proj.bias"],
        "vit.layernorm.weight": s["norm.weight"],
        "vit.layernorm.bias": s["norm.bias"],
        "classifier.weight": s["head.weight"],
        "classifier.bias": s["head.bias"],
    }
    for i in range(DEPTH):
        a, b = f"blocks.{i}.", f"vit.layers.{i}."
        for src, dst in [
            ("norm1", "layernorm_before"),
            ("norm2", "layernorm_after"),
            ("attn.proj", "attention.o_proj"),
            ("mlp.fc1", "mlp.fc1"),
            ("mlp.fc2", "mlp.fc2"),
        ]:
            for p in ("weight", "bias"):
                out[f"{b}{dst}.{p}"] = s[f"{a}{src}.{p}"]
        for p in ("weight", "bias"):
            for name, t in zip("qkv", s[f"{a}attn.qkv.{p}"].split(WIDTH)):
                out[f"{b}attention.{name}_proj.{p}"] = t
    config = transformers.ViTConfig(
        image_size=SIZE,
        patch_size=PATCH,
        hidden_size=WIDTH,
        num_hidden_layers=DEPTH,
        num_attention_heads=HEADS,
        intermediate_size=2 * WIDTH,
        layer_norm_eps=1e-6,
        num_labels=CLASSES,
    )
    return _copy(transformers.ViTForImageClassification(config), out)


def open_clip_reference() -> nn.Module:
    ref = timm_reference(pre_norm=True)  # CLIP layout: no patch bias
    assert ref.patch_embed.proj.bias is None
    with torch.no_grad():
        ref.head.bias.zero_()
    return ref


#: (name, reference builder, converter)
IMPLEMENTATIONS: List[Tuple[str, Callable[[], nn.Module], Callable]] = [
    ("torchvision", timm_reference, to_torchvision),
    ("open_clip", open_clip_reference, to_open_clip),
    ("huggingface", timm_reference, to_huggingface),
]

METHODS = [
    ("raw", lambda m: RawAttention(m, layers=[0, -1]), {}),
    ("rollout", AttentionRollout, {"discard_ratio": 0.5}),
    ("grad_rollout", GradientAttentionRollout, {}),
    ("generic", GenericAttention, {}),
    ("flow", AttentionFlow, {}),
    ("legrad", LeGrad, {}),
    ("transformer_attribution", TransformerAttribution, {}),
    ("partial_lrp", PartialLRP, {}),
    ("lrp", TransformerLRP, {}),
    ("attnlrp", AttnLRP, {}),
    ("attnlrp_pixels", AttnLRP, {"at": "pixels"}),
    ("cp_lrp", AttnLRP, {"cp": True}),
]


def images() -> torch.Tensor:
    torch.manual_seed(2)
    return torch.randn(len(TARGETS), 3, SIZE, SIZE, dtype=torch.float64)


def _close(got, want) -> None:
    if isinstance(want, list):
        for g, w in zip(got, want):
            _close(g, w)
        return
    assert got.shape == want.shape
    assert want.abs().max() > 0
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max())


@pytest.fixture(scope="module", params=IMPLEMENTATIONS, ids=lambda c: c[0])
def pair(request):
    _, build, convert = request.param
    ref = build()
    other = convert(ref)
    x = images()
    with torch.no_grad():  # the converted model computes the same function
        out = model_output(other(x))  # Hugging Face: the logits
        torch.testing.assert_close(out, ref(x), rtol=1e-9, atol=1e-9)
    return ref, other, x


@pytest.mark.parametrize("method", METHODS, ids=lambda m: m[0])
def test_same_weights_same_map(pair, method):
    ref, other, x = pair
    _, make, kwargs = method
    want = make(ref).attribute(x, target=TARGETS, **kwargs)
    got = make(other).attribute(x, target=TARGETS, **kwargs)
    _close(got, want)
