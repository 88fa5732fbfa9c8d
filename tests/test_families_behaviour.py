"""Every ViT method on every family adapter of part A: batched per-sample
targets, the model left exactly as it was (also after an error), AttnLRP on
torchvision's ViT against LXT 2.1's own torchvision patch, and the refusals
(Swin, XCiT channel attention for LRP, heads that never read the class
token) that say why and name the alternative."""

from __future__ import annotations

import pytest
import timm
import torch
from families_models import (
    FAMILIES,
    beit,
    eva02,
    images,
    jitter,
    open_clip_vit,
    timm_vit,
    torchvision_vit,
)
from torch import Tensor, nn

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
from captum_ssl.attr._core import AttributionInputError
from captum_ssl.attr._families import adapter_for

TARGETS = [1, 4, 2]
ALL = (
    RawAttention,
    AttentionRollout,
    GradientAttentionRollout,
    GenericAttention,
    AttentionFlow,
    LeGrad,
    TransformerAttribution,
    PartialLRP,
    TransformerLRP,
    AttnLRP,
)


def snapshot(model: nn.Module):
    """Everything a call could leave behind: parameters and buffers, every
    module's instance attributes (by identity), hooks, modes, grads."""
    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        [
            (
                name,
                {k: id(v) for k, v in m.__dict__.items()},
                m.training,
                [
                    len(getattr(m, h))
                    for h in (
                        "_forward_hooks",
                        "_forward_pre_hooks",
                        "_backward_hooks",
                        "_backward_pre_hooks",
                    )
                ],
            )
            for name, m in model.named_modules()
        ],
        [(p.requires_grad, p.grad) for p in model.parameters()],
    )


def assert_same(model: nn.Module, before) -> None:
    after = snapshot(model)
    assert before[0].keys() == after[0].keys()
    assert all(torch.equal(before[0][k], after[0][k]) for k in before[0])
    assert before[1] == after[1]
    assert before[2] == after[2]


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f[0])
def test_every_method_batched_per_sample_and_model_untouched(family):
    _, build, size = family
    model = build()
    x = images(3, size)
    with torch.no_grad():
        logits = model(x)
    before = snapshot(model)
    for cls in ALL:
        maps = cls(model).attribute(x, target=TARGETS)
        assert maps.shape[:2] == (3, 1) and torch.isfinite(maps).all(), cls
        assert maps.abs().sum() > 0, cls
        one = cls(model).attribute(x[1:2], target=TARGETS[1:2])
        torch.testing.assert_close(maps[1:2], one, rtol=1e-4, atol=1e-6)
    assert_same(model, before)
    # errors in the middle of a call leave nothing behind either
    last = adapter_for(model).attention_sites()[-1].name
    block = model.get_submodule(last.rsplit(".", 1)[0])

    def boom(*_):
        raise RuntimeError("raised in the middle of the forward pass")

    handle = block.register_forward_pre_hook(boom)
    for cls in (GenericAttention, TransformerAttribution, AttnLRP, LeGrad):
        with pytest.raises(RuntimeError, match="middle"):
            cls(model).attribute(x, target=TARGETS)
    handle.remove()
    with pytest.raises(AttributionInputError, match="out of range"):
        TransformerAttribution(model).attribute(x, target=[1, 99, 2])
    assert_same(model, before)
    with torch.no_grad():
        torch.testing.assert_close(model(x), logits)


def lxt_torchvision_patch() -> dict:
    """LXT 2.1's ``cp_LRP`` patch map for torchvision's ViT.

    ``import lxt.efficient`` fails with transformers 5 (its package
    ``__init__`` imports every model patch, and the BERT one imports a
    function transformers removed), so LXT's own files ``rules.py``,
    ``patches.py`` and ``models/vit_torch.py`` are imported under stand-in
    package entries, removed again from ``sys.modules`` afterwards."""
    import importlib
    import os
    import sys
    import types

    import lxt

    base = os.path.join(os.path.dirname(lxt.__file__), "efficient")
    names = [
        "lxt.efficient",
        "lxt.efficient.models",
        "lxt.efficient.rules",
        "lxt.efficient.patches",
        "lxt.efficient.models.vit_torch",
    ]
    saved = {n: sys.modules.get(n) for n in names}
    for name, path in ((names[0], base), (names[1], os.path.join(base, "models"))):
        pkg = types.ModuleType(name)
        pkg.__path__ = [path]
        sys.modules[name] = pkg
    try:
        return importlib.import_module("lxt.efficient.models.vit_torch").cp_LRP
    finally:
        for name, old in saved.items():
            if old is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = old


def test_attnlrp_on_torchvision_equals_lxt_patch():
    """LXT 2.1 patches torchvision's ViT (``lxt.efficient.models.vit_torch.
    cp_LRP``: CP-LRP in the attention, AttnLRP rules outside); its relevance
    is gradient x input of the patched model. The patch changes classes
    globally, so it is undone here in ``finally``."""
    from torchvision.models import vision_transformer

    cp_LRP = lxt_torchvision_patch()

    model = torchvision_vit().double()
    x = images(3, 32).double()
    ours = AttnLRP(model).attribute(x, target=TARGETS, cp=True, epsilon=1e-12)
    ours_px = AttnLRP(model).attribute(
        x, target=TARGETS, cp=True, epsilon=1e-12, at="pixels"
    )
    saved = {
        cls: {
            k: cls.__dict__[k]
            for k in ("forward", "original_forward")
            if k in cls.__dict__
        }
        for cls in cp_LRP
    }
    patches = []
    handle = model.conv_proj.register_forward_hook(
        lambda _m, _a, out: patches.append(out) or out.retain_grad()
    )
    try:
        for target, patch in cp_LRP.items():  # what lxt's monkey_patch does
            assert patch(target)
        assert vision_transformer.nn.MultiheadAttention is nn.MultiheadAttention
        xx = x.clone().requires_grad_()
        out = model(xx)
        out[torch.arange(3), TARGETS].sum().backward()
    finally:
        handle.remove()
        for cls, attrs in saved.items():
            for k in ("forward", "original_forward"):
                if k in attrs:
                    setattr(cls, k, attrs[k])
                elif k in cls.__dict__:
                    delattr(cls, k)
    assert nn.GELU.forward is saved[nn.GELU]["forward"]
    lxt_patches = (patches[0] * patches[0].grad).sum(1, keepdim=True)
    lxt_pixels = (xx * xx.grad).sum(1, keepdim=True)
    torch.testing.assert_close(ours, lxt_patches, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(ours_px, lxt_pixels, rtol=1e-6, atol=1e-9)


# -------------------------------------------------------------------- refusals
def test_swin_is_refused_with_the_reason_and_the_cams():
    torch.manual_seed(0)
    swin = timm.create_model(
        "swin_tiny_patch4_window7_224",
        img_size=56,
        embed_dim=12,
        depths=(1, 1),
        num_heads=(1, 2),
        num_classes=5,
    ).eval()
    for cls in (RawAttention, AttnLRP):
        with pytest.raises(AttributionInputError, match="window.*LayerGradCam"):
            cls(swin)


def test_xcit_channel_attention_refused_for_lrp():
    torch.manual_seed(0)
    xcit = timm.create_model("xcit_nano_12_p8_224", img_size=32, depth=1).eval()
    with pytest.raises(AttributionInputError, match="channel.*GenericAttention"):
        AttnLRP(xcit)
    GenericAttention(xcit).attribute(images(1, 32), target=0)  # works


@pytest.mark.parametrize(
    "build",
    [
        lambda: timm_vit(global_pool="avg"),
        lambda: eva02(global_pool="avg"),
        lambda: beit(global_pool="avg"),
    ],
    ids=["timm_vit_avg", "eva02_avg", "beit_avg"],
)
def test_head_that_ignores_the_class_token_is_refused(build):
    model = build()
    size = 28 if "Eva" in type(model).__name__ else 32
    x = images(2, size)
    for cls in (RawAttention, AttentionRollout, GenericAttention, AttentionFlow):
        with pytest.raises(
            AttributionInputError, match="never reads the class.*LeGrad"
        ):
            cls(model).attribute(x, target=[0, 1])
    for cls in (TransformerAttribution, PartialLRP):  # the class token's row
        with pytest.raises(
            AttributionInputError, match="never reads the class.*AttnLRP"
        ):
            cls(model)
    # relevance of the patch tokens / pixels flows through the average pooling
    # (its rule: tests/test_lrp_forms.py)
    for cls in (AttnLRP, TransformerLRP):
        maps = cls(model).attribute(x, target=[0, 1])
        assert torch.isfinite(maps).all() and maps.abs().amax() > 0
    assert LeGrad(model).attribute(x, target=[0, 1]).shape[:2] == (2, 1)
    # a token row read on purpose stays available
    RawAttention(model).attribute(x, query=3)


def test_class_row_lrp_refused_without_a_class_token():
    """timm ``class_token=False`` with average pooling: no class token, so
    TransformerAttribution / PartialLRP have no row to return (they used to
    return a patch token's row); AttnLRP and TransformerLRP run."""
    model = timm_vit(class_token=False, global_pool="avg")
    x = images(2, 32)
    for cls in (TransformerAttribution, PartialLRP):
        with pytest.raises(AttributionInputError, match="no class token.*AttnLRP"):
            cls(model)
    for cls in (AttnLRP, TransformerLRP):
        assert torch.isfinite(cls(model).attribute(x, target=[0, 1])).all()


def test_open_clip_average_pooling_refuses_the_class_row_methods():
    oc = open_clip_vit(pool_type="avg")
    x = images(2, 32)
    with pytest.raises(AttributionInputError, match="pool_type='avg'.*never reads"):
        RawAttention(oc).attribute(x)
    for cls in (TransformerAttribution, PartialLRP):
        with pytest.raises(AttributionInputError, match="never reads.*AttnLRP"):
            cls(oc)
    # the average is a fixed linear map: relevance of the patches passes it
    # (gradient form == explicit rules: tests/test_lrp_forms.py)
    assert torch.isfinite(AttnLRP(oc).attribute(x, target=[0, 1])).all()


def test_attnlrp_at_dynamic_input_sizes():
    """At another input size (timm ``dynamic_img_size``: the position
    embedding is resampled in the forward pass) AttnLRP at the patch tokens
    and at the pixels equals AttnLRP on the same weights built for that size,
    with the resampled embedding stored (the native-size path)."""
    from timm.layers import resample_abs_pos_embed

    kw = dict(patch_size=8, embed_dim=16, depth=2, num_heads=2, num_classes=5)
    torch.manual_seed(0)
    dyn = timm.create_model(
        "vit_tiny_patch16_224", img_size=32, dynamic_img_size=True, **kw
    )
    dyn = jitter(dyn)
    fixed = timm.create_model("vit_tiny_patch16_224", img_size=48, **kw).eval()
    state = dict(dyn.state_dict())
    state["pos_embed"] = resample_abs_pos_embed(
        state["pos_embed"], new_size=(6, 6), old_size=(4, 4), num_prefix_tokens=1
    )
    fixed.load_state_dict(state)
    x = images(2, 48)
    for at in ("patches", "pixels"):
        got = AttnLRP(dyn).attribute(x, target=[0, 3], at=at)
        want = AttnLRP(fixed).attribute(x, target=[0, 3], at=at)
        assert got.shape[-2:] == ((6, 6) if at == "patches" else (48, 48))
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    eva = eva02(dynamic_img_size=True)  # RoPE on the 6 x 6 grid
    maps = AttnLRP(eva).attribute(images(2, 42), target=[0, 3])
    assert maps.shape == (2, 1, 6, 6) and torch.isfinite(maps).all()


def test_lrp_refuses_a_wrapper_whose_operations_have_no_rule():
    """A probe on a backbone: the attention methods find the ViT inside, LRP
    (which must route every operation through its rules) names the inner
    model to pass instead."""

    class Probe(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.backbone = torchvision_vit()
            self.scale = nn.Parameter(torch.tensor(2.0))

        def forward(self, x: Tensor) -> Tensor:
            return self.backbone(x) * self.scale

    probe = Probe().eval()
    assert RawAttention(probe).attribute(images(2, 32)).shape == (2, 1, 4, 4)
    with pytest.raises(AttributionInputError, match="wraps the Vision.*`backbone`"):
        AttnLRP(probe)
