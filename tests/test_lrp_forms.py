"""AttnLRP runs its rules in gradient x input form (one backward pass with
autograd's own gradient through every linear operation, as the authors' LXT
does); ``AttnLRPRules`` also writes each rule out explicitly (relevance in,
relevance out). Both forms must give the same maps on every ViT family, with
and without CP-LRP, at the patch tokens and at the pixels.

The explicit form stabilises every division by ``epsilon``, the gradient form
only the identity rule's ``y / x``: with a tiny ``epsilon`` (float64) the two
are the same equations.
"""

from __future__ import annotations

import pytest
import timm
import torch
from families_models import FAMILIES, beit, eva02, images, jitter, open_clip_vit
from torch import nn

from captum_ssl.attr import AttnLRP
from captum_ssl.attr._lrp.rules import AttnLRPRules


def _hf_dinov2() -> nn.Module:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.Dinov2Config(
        image_size=28,
        patch_size=7,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        num_labels=5,
        layerscale_value=0.5,
    )
    return jitter(transformers.Dinov2ForImageClassification(cfg))


def _timm(name: str, size: int, **kw) -> nn.Module:
    torch.manual_seed(0)
    kw = dict(embed_dim=16, depth=2, num_heads=2, num_classes=5, **kw)
    return jitter(timm.create_model(name, img_size=size, patch_size=8, **kw))


BUILDERS = {name: (build, size) for name, build, size in FAMILIES}
BUILDERS.update(
    {
        "timm_layer_scale": (
            lambda: _timm("vit_tiny_patch16_224", 32, init_values=0.5),
            32,
        ),
        # talking-heads attention (proj_l / proj_w) and class-attention blocks
        "cait": (lambda: _timm("cait_xxs24_224", 32, depth_token_only=1), 32),
        "hf_dinov2": (_hf_dinov2, 28),
        # average pooling (EVA's and BEiT's default): the mean of the patch
        # tokens is a fixed linear map with its own rule in the explicit form
        "timm_avg": (lambda: _timm("vit_tiny_patch16_224", 32, global_pool="avg"), 32),
        "eva02_avg": (lambda: eva02(global_pool="avg"), 28),
        "beit_avg": (lambda: beit(global_pool="avg"), 32),
        "open_clip_avg": (lambda: open_clip_vit(pool_type="avg"), 32),
    }
)


def explicit(model: nn.Module, x, target, cp: bool, at: str) -> torch.Tensor:
    """The same call with every rule applied explicitly."""
    rules = AttnLRPRules(1e-12, cp)
    rules.implicit = False
    lrp = AttnLRP(model)
    res = lrp._propagate(x, target, None, rules, to=at)
    rel = res.relevances[0]
    if at == "patches":
        rel = res.layout.to_grid(rel)
    return rel.sum(dim=1, keepdim=True)


@pytest.mark.parametrize("name", list(BUILDERS))
def test_gradient_form_equals_the_explicit_rules(name):
    build, size = BUILDERS[name]
    model = build().double()
    x = images(2, size).double()
    target = [1, 3]
    for cp in (False, True):
        for at in ("patches", "pixels"):
            ours = AttnLRP(model).attribute(
                x, target=target, cp=cp, at=at, epsilon=1e-12
            )
            ref = explicit(model, x, target, cp, at)
            assert ref.abs().amax() > 0
            err = (ours - ref).abs().amax() / ref.abs().amax()
            assert err <= 1e-8, (name, cp, at, float(err))


def test_epsilon_stabilises_the_identity_rule():
    """``epsilon`` is the stabiliser of ``y / x`` at the activations: a large
    one changes the map, the default does not (against a tiny one)."""
    model = BUILDERS["timm_layer_scale"][0]()
    x = images(2, 32)
    tiny = AttnLRP(model).attribute(x, target=[0, 1], epsilon=1e-12)
    default = AttnLRP(model).attribute(x, target=[0, 1])
    large = AttnLRP(model).attribute(x, target=[0, 1], epsilon=1.0)
    scale = tiny.abs().amax()
    assert (default - tiny).abs().amax() <= 1e-4 * scale
    assert (large - tiny).abs().amax() >= 1e-2 * scale
