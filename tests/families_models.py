"""Small random-init models of each ViT family, shared by the
``test_families_*`` files (one builder per implementation)."""

from __future__ import annotations

import timm
import torch
from torch import Tensor, nn


def jitter(model: nn.Module) -> nn.Module:
    """Non-trivial biases, norms, tokens, position tables; sharper attention
    (q/k/v weights x4) than random init. Returns the model in eval mode."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(0.2 * torch.randn_like(p))
            if "qkv.weight" in name or "in_proj_weight" in name:
                p.mul_(4.0)
    return model.eval()


def images(n: int, size: int) -> Tensor:
    torch.manual_seed(2)
    return torch.randn(n, 3, size, size)


def torchvision_vit() -> nn.Module:
    from torchvision.models import VisionTransformer

    torch.manual_seed(0)
    return jitter(VisionTransformer(32, 8, 2, 2, 16, 32, num_classes=5))


def open_clip_vit(**kw) -> nn.Module:
    from open_clip.transformer import VisionTransformer

    torch.manual_seed(0)
    return jitter(VisionTransformer(32, 8, 16, 2, 2, 2.0, output_dim=5, **kw))


def _timm(name: str, **kw) -> nn.Module:
    torch.manual_seed(0)
    kw = {"embed_dim": 16, "depth": 2, "num_heads": 2, "num_classes": 5, **kw}
    return jitter(timm.create_model(name, **{"global_pool": "token", **kw}))


def eva02(**kw) -> nn.Module:
    """EVA02 (RoPE, SwiGLU) at 28 px, patch 7: a 4 x 4 grid."""
    return _timm("eva02_tiny_patch14_224", img_size=28, patch_size=7, **kw)


def beit(**kw) -> nn.Module:
    """BEiT (relative position bias per block) at 32 px, patch 8."""
    return _timm("beit_base_patch16_224", img_size=32, patch_size=8, **kw)


def timm_vit(**kw) -> nn.Module:
    return _timm("vit_tiny_patch16_224", img_size=32, patch_size=8, **kw)


#: (name, builder, input size)
FAMILIES = [
    ("torchvision", torchvision_vit, 32),
    ("open_clip", open_clip_vit, 32),
    ("eva02", eva02, 28),
    ("beit", beit, 32),
]


def snapshot(model: nn.Module):
    """Parameters, instance attributes (an installed `forward` included),
    hook counts and the config flags of every submodule."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    dicts = {  # instance attributes, an installed `forward` included
        n: {
            k: v
            for k, v in vars(m).items()
            if k not in ("_parameters", "_buffers", "_modules")
        }
        for n, m in model.named_modules()
    }
    hooks = [
        (n, len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks))
        for n, m in model.named_modules()
    ]
    flags = {
        n: (c._attn_implementation, c.output_attentions, c.return_dict)
        for n, c in ((n, getattr(m, "config", None)) for n, m in model.named_modules())
        if c is not None
    }
    return state, dicts, hooks, flags


def assert_same(before, after):
    (s0, d0, h0, f0), (s1, d1, h1, f1) = before, after
    assert s0.keys() == s1.keys()
    assert all(torch.equal(s0[k], s1[k]) for k in s0)
    assert d0.keys() == d1.keys()
    for n in d0:
        assert d0[n].keys() == d1[n].keys(), n
        for k in d0[n]:
            assert d0[n][k] is d1[n][k] or d0[n][k] == d1[n][k], (n, k)
    assert h0 == h1 and f0 == f1
