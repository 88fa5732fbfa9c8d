"""Attention methods on small random-init timm models.

References are computed here from the papers' equations on attention tensors
that the tests obtain independently of the library: ``manual_vit`` re-runs a
timm ViT/DeiT forward pass with the attention written out explicitly.
"""

from __future__ import annotations

import networkx as nx
import pytest
import timm
import torch
from conftest import make_tiny_vit

from captum_ssl.attr._attention import (
    AttentionFlow,
    AttentionRollout,
    GenericAttention,
    GradientAttentionRollout,
    RawAttention,
    attention_forward,
    capture_attention,
)
from captum_ssl.attr._core import AttributionInputError

TARGETS = [1, 5, 3]
SMALL = dict(img_size=32, embed_dim=32, depth=2, num_heads=4, num_classes=7)


def sharpen(model: torch.nn.Module, factor: float = 25.0) -> torch.nn.Module:
    """Scale query/key weights so random-init attention is far from uniform."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("qkv.weight", "q.weight", "k.weight")):
                p.mul_(factor)
    return model


@pytest.fixture
def vit():
    return sharpen(make_tiny_vit())


@pytest.fixture
def deit_dist():
    torch.manual_seed(0)
    m = timm.create_model("deit_tiny_distilled_patch16_224", patch_size=8, **SMALL)
    return sharpen(m.eval())


def cait():
    torch.manual_seed(0)
    m = timm.create_model("cait_xxs24_224", patch_size=8, **SMALL)
    return sharpen(m.eval())


def xcit():
    torch.manual_seed(0)
    return sharpen(timm.create_model("xcit_nano_12_p8_224", **SMALL).eval())


def manual_vit(model, x):
    """timm ViT/DeiT forward with explicit attention; returns (logits, [A_l])."""
    h = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x))))
    attns = []
    for blk in model.blocks:
        at = blk.attn
        y = blk.norm1(h)
        b, n, c = y.shape
        qkv = at.qkv(y).reshape(b, n, 3, at.num_heads, c // at.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        a = torch.softmax(q @ k.transpose(-2, -1) / (c // at.num_heads) ** 0.5, -1)
        attns.append(a)
        o = at.proj((a @ v).transpose(1, 2).reshape(b, n, c))
        h = h + blk.ls1(o)
        h = h + blk.ls2(blk.mlp(blk.norm2(h)))
    return model.forward_head(model.norm(h)), attns


def reference_grads(model, x, targets):
    logits, attns = manual_vit(model, x)
    score = logits[torch.arange(len(targets)), torch.tensor(targets)].sum()
    grads = torch.autograd.grad(score, attns)
    return [a.detach() for a in attns], [g.detach() for g in grads]


def patch_row(row, prefix, grid):
    return row[prefix:].reshape(1, *grid)


def rollout_reference(mats, q=0):
    """Abnar & Zuidema for ONE sample: product of (A + I)/2 row-normalised."""
    n = mats[0].shape[-1]
    result = torch.eye(n)
    for a in mats:
        a = (a + torch.eye(n)) / 2
        a = a / a.sum(dim=-1, keepdim=True)
        result = a @ result
    return result[q]


def discard_reference(a, ratio):
    """Zero the lowest ratio of entries of one (N, N) matrix, never [0, 0]."""
    flat = a.flatten().clone()
    k = int(flat.numel() * ratio)
    order = [i for i in flat.argsort().tolist() if i != 0][:k]
    flat[order] = 0
    return flat.reshape(a.shape)


def model_state(model):
    flags = {n: m.__dict__.get("fused_attn") for n, m in model.named_modules()}
    hooks = {
        n: (
            len(m._forward_hooks),
            len(m._forward_pre_hooks),
            len(m._backward_hooks),
        )
        for n, m in model.named_modules()
    }
    params = {k: v.clone() for k, v in model.state_dict().items()}
    return flags, hooks, params, model.training


def assert_same_state(model, before):
    flags, hooks, params, training = model_state(model)
    assert flags == before[0]
    assert hooks == before[1]
    assert all(torch.equal(params[k], before[2][k]) for k in params)
    assert training == before[3]
    assert timm.layers.use_fused_attn() == GLOBAL_FUSED


GLOBAL_FUSED = timm.layers.use_fused_attn()


def set_fused(model, value: bool):
    for m in model.modules():
        if "fused_attn" in m.__dict__:
            m.fused_attn = value


# ------------------------------------------------------------------ capture
@pytest.mark.parametrize("fused", [True, False])
def test_capture_matches_explicit_attention_and_restores_model(vit, images, fused):
    set_fused(vit, fused)
    before = model_state(vit)
    with torch.no_grad():
        _, ref = manual_vit(vit, images)
    cap = attention_forward(vit, images, [b.attn for b in vit.blocks])
    assert_same_state(vit, before)
    assert len(cap.attentions) == 3
    for got, want in zip(cap.attentions, ref):
        assert got.shape == (3, 4, 17, 17)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    # the same model still computes the same logits afterwards
    torch.testing.assert_close(
        vit(images), manual_vit(vit, images)[0], atol=1e-4, rtol=0
    )


def test_capture_restores_model_when_forward_raises(vit, images):
    set_fused(vit, True)
    before_flags = model_state(vit)[0]

    def boom(*_):
        raise RuntimeError("boom in block 1")

    handle = vit.blocks[1].register_forward_hook(boom)
    with pytest.raises(RuntimeError, match="boom"):
        GenericAttention(vit).attribute(images, target=TARGETS)
    handle.remove()
    before = model_state(vit)
    assert before[0] == before_flags
    assert all(h == (0, 0, 0) for h in before[1].values())
    assert all(m.fused_attn for m in (b.attn for b in vit.blocks))
    with pytest.raises(RuntimeError, match="boom"):
        with capture_attention([b.attn for b in vit.blocks]):
            raise RuntimeError("boom inside the block")
    assert_same_state(vit, before)


def test_capture_keeps_class_attribute_flags_and_global_setting(vit, images):
    # a module whose flag lives on the class (no instance attribute) keeps it so
    attn = vit.blocks[0].attn
    del attn.fused_attn
    type_flag = getattr(type(attn), "fused_attn", "absent")
    RawAttention(vit, layers=0).attribute(images)
    assert "fused_attn" not in attn.__dict__
    assert getattr(type(attn), "fused_attn", "absent") == type_flag
    assert timm.layers.use_fused_attn() == GLOBAL_FUSED


# ------------------------------------------------------------------- methods
def test_raw_attention_matches_equation(vit, images):
    with torch.no_grad():
        _, ref = manual_vit(vit, images)
    maps = RawAttention(vit, layers=[0, -1]).attribute(images, power=0.25)
    assert isinstance(maps, list) and len(maps) == 2
    for got, a in zip(maps, [ref[0], ref[-1]]):
        want = (a[:, :, 0, 1:] ** 0.25).mean(1).reshape(3, 1, 4, 4)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    for fusion, fn in [("max", torch.amax), ("min", torch.amin)]:
        got = RawAttention(vit, layers=1).attribute(images, head_fusion=fusion, query=5)
        want = fn(ref[1][:, :, 5, 1:], dim=1).reshape(3, 1, 4, 4)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_raw_attention_distillation_token(deit_dist, images):
    with torch.no_grad():
        _, ref = manual_vit(deit_dist, images)
    raw = RawAttention(deit_dist)
    got_cls, got_dist = raw.attribute(images), raw.attribute(images, query="dist")
    torch.testing.assert_close(
        got_cls, ref[-1][:, :, 0, 2:].mean(1).reshape(3, 1, 4, 4), atol=1e-5, rtol=1e-4
    )
    torch.testing.assert_close(
        got_dist, ref[-1][:, :, 1, 2:].mean(1).reshape(3, 1, 4, 4), atol=1e-5, rtol=1e-4
    )


@pytest.mark.parametrize("discard_ratio", [0.0, 0.5])
def test_rollout_matches_equation_per_sample(vit, images, discard_ratio):
    with torch.no_grad():
        _, ref = manual_vit(vit, images)
    got = AttentionRollout(vit).attribute(images, discard_ratio=discard_ratio)
    for b in range(3):
        mats = [discard_reference(a[b].mean(0), discard_ratio) for a in ref]
        want = patch_row(rollout_reference(mats), 1, (4, 4))
        torch.testing.assert_close(got[b], want, atol=1e-5, rtol=1e-4)
    # sub-range: layers 1..2 only (thesis roll_from / roll_to)
    got = AttentionRollout(vit).attribute(images, start_layer=1, end_layer=3)
    want = patch_row(rollout_reference([a[2].mean(0) for a in ref[1:3]]), 1, (4, 4))
    torch.testing.assert_close(got[2], want, atol=1e-5, rtol=1e-4)


def test_rollout_discard_never_drops_class_token_self_entry(vit, images):
    with torch.no_grad():
        _, ref = manual_vit(vit, images)
    # make the class token's own entry the smallest of layer 0 for sample 0
    got = AttentionRollout(vit).attribute(images, head_fusion="min", discard_ratio=0.9)
    mats = [discard_reference(a[0].amin(0), 0.9) for a in ref]
    assert all(m[0, 0] > 0 for m in mats)
    torch.testing.assert_close(
        got[0], patch_row(rollout_reference(mats), 1, (4, 4)), atol=1e-5, rtol=1e-4
    )


def test_rollout_normalises_rows_with_keepdim_not_like_vit_explain(vit, images):
    """vit-explain issue #16: `a / a.sum(dim=-1)` divides columns by row sums."""
    with torch.no_grad():
        _, ref = manual_vit(vit, images)
    got = AttentionRollout(vit).attribute(images, head_fusion="max")
    n = 17
    buggy = torch.eye(n)
    for a in ref:
        a = (a[0].amax(0) + torch.eye(n)) / 2
        a = a / a.sum(dim=-1)  # the bug: no keepdim
        buggy = a @ buggy
    correct = patch_row(rollout_reference([a[0].amax(0) for a in ref]), 1, (4, 4))
    torch.testing.assert_close(got[0], correct, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(got[0], patch_row(buggy[0], 1, (4, 4)), atol=1e-4)


def test_gradient_rollout_matches_equation_and_pairs_layers(vit, images):
    attns, grads = reference_grads(vit, images, TARGETS)
    got = GradientAttentionRollout(vit).attribute(images, target=TARGETS)
    for b in range(3):
        mats = [(a[b] * g[b]).clamp(min=0).mean(0) for a, g in zip(attns, grads)]
        want = patch_row(rollout_reference(mats), 1, (4, 4))
        torch.testing.assert_close(got[b], want, atol=1e-5, rtol=1e-4)
    # vit-explain issue #6: gradients paired with attentions in reversed order
    rev = [(a[0] * g[0]).clamp(min=0).mean(0) for a, g in zip(attns, reversed(grads))]
    assert not torch.allclose(
        got[0], patch_row(rollout_reference(rev), 1, (4, 4)), atol=1e-4
    )


def test_gradient_rollout_batch_equals_single_samples(vit, images):
    method = GradientAttentionRollout(vit)
    batch = method.attribute(images, target=TARGETS, discard_ratio=0.3)
    for b in range(3):
        one = method.attribute(images[b : b + 1], target=TARGETS[b], discard_ratio=0.3)
        torch.testing.assert_close(batch[b : b + 1], one, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(
        batch[0], method.attribute(images[:1], target=TARGETS[1])[0], atol=1e-5
    )


def test_generic_attention_matches_chefer_equation(vit, images):
    attns, grads = reference_grads(vit, images, TARGETS)
    set_fused(vit, True)
    got = GenericAttention(vit).attribute(images, target=torch.tensor(TARGETS))
    for b in range(3):
        rel = torch.eye(17)
        for a, g in zip(attns, grads):
            rel = rel + (g[b] * a[b]).clamp(min=0).mean(0) @ rel
        torch.testing.assert_close(
            got[b], patch_row(rel[0], 1, (4, 4)), atol=1e-6, rtol=1e-4
        )


@pytest.mark.parametrize("fused", [True, False])
def test_methods_identical_with_fused_attention_on_and_off(vit, images, fused):
    set_fused(vit, not fused)
    ref = GenericAttention(vit).attribute(images, target=TARGETS)
    set_fused(vit, fused)
    torch.testing.assert_close(
        GenericAttention(vit).attribute(images, target=TARGETS), ref
    )
    assert all(b.attn.fused_attn == fused for b in vit.blocks)


def test_attention_flow_matches_networkx_max_flow(vit, images):
    with torch.no_grad():
        _, ref = manual_vit(vit, images)
    got = AttentionFlow(vit).attribute(images[:2], normalize=False)
    n, layers = 17, len(ref)
    for b in range(2):
        g = nx.DiGraph()
        for layer, a in enumerate(ref):
            m = (a[b].mean(0) + torch.eye(n)) / 2
            m = m / m.sum(-1, keepdim=True)
            for i in range(n):
                for j in range(n):
                    g.add_edge((layer, j), (layer + 1, i), capacity=float(m[i, j]))
        want = torch.tensor(
            [nx.maximum_flow_value(g, (0, s), (layers, 0)) for s in range(1, n)]
        )
        torch.testing.assert_close(got[b].flatten(), want.float(), atol=1e-4, rtol=0)
    assert got.min() >= 0 and got.max() <= 1 + 1e-6


# ------------------------------------------------------- CaiT / XCiT class attn
@pytest.mark.parametrize("factory", [cait, xcit])
def test_class_attention_models(factory, images):
    model = factory()
    cls_blocks = (
        model.blocks_token_only if hasattr(model, "blocks_token_only") else None
    ) or model.cls_attn_blocks
    rows = []

    def grab(module, args, _out):  # explicit ClassAttn on the captured input
        x = args[0]
        b, n, c = x.shape
        h = module.num_heads
        q = module.q(x[:, 0]).reshape(b, 1, h, c // h).permute(0, 2, 1, 3)
        k = module.k(x).reshape(b, n, h, c // h).permute(0, 2, 1, 3)
        rows.append(torch.softmax(q @ k.transpose(-2, -1) * module.scale, -1))

    handles = [blk.attn.register_forward_hook(grab) for blk in cls_blocks]
    with torch.no_grad():
        model(images)
    for hd in handles:
        hd.remove()
    got = RawAttention(model).attribute(images)
    torch.testing.assert_close(
        got, rows[-1][:, :, 0, 1:].mean(1).reshape(3, 1, 4, 4), atol=1e-5, rtol=1e-4
    )
    # rollout over class attention: patch rows are the identity
    roll = AttentionRollout(model).attribute(images)
    for b in range(3):
        mats = []
        for r in rows:
            full = torch.eye(17)
            full[0] = r[b].mean(0)[0]
            mats.append(full)
        want = patch_row(rollout_reference(mats), 1, (4, 4))
        torch.testing.assert_close(roll[b], want, atol=1e-5, rtol=1e-4)
    for method in (GradientAttentionRollout, GenericAttention):
        out = method(model).attribute(images, target=TARGETS)
        assert out.shape == (3, 1, 4, 4) and out.abs().sum() > 0
    with pytest.raises(AttributionInputError, match="only the class token"):
        RawAttention(model).attribute(images, query=3)


def test_xcit_channel_attention_is_captured_but_not_a_token_map(images):
    model = xcit()
    xca = model.blocks[0].attn
    with capture_attention([xca]) as store, torch.no_grad():
        model(images)
    chan = store[0][0]
    assert chan.shape == (3, 4, 8, 8)  # (B, heads, C/heads, C/heads)
    torch.testing.assert_close(chan.sum(-1), torch.ones(3, 4, 8))
    with pytest.raises(AttributionInputError, match="attend over channels"):
        RawAttention(model, layers=xca)
    with pytest.raises(AttributionInputError, match="attend over channels"):
        AttentionRollout(model, layers=0)


# --------------------------------------------------------------------- errors
def test_non_attention_model_gets_clear_error(tiny_cnn):
    with pytest.raises(AttributionInputError, match="no supported attention.*CaiT"):
        AttentionRollout(tiny_cnn)


def test_bad_arguments_get_clear_errors(vit, images):
    with pytest.raises(AttributionInputError, match="out of range"):
        RawAttention(vit, layers=7)
    with pytest.raises(AttributionInputError, match=r"Pass its `\.attn`"):
        RawAttention(vit, layers=vit.blocks[0])
    with pytest.raises(AttributionInputError, match="head_fusion"):
        AttentionRollout(vit).attribute(images, head_fusion="median")
    with pytest.raises(AttributionInputError, match="discard_ratio"):
        AttentionRollout(vit).attribute(images, discard_ratio=1.0)
    with pytest.raises(AttributionInputError, match="distilled"):
        RawAttention(vit).attribute(images, query="dist")
    with pytest.raises(AttributionInputError, match="select no layer"):
        AttentionRollout(vit).attribute(images, start_layer=3)
    with pytest.raises(AttributionInputError, match="out of range"):
        GenericAttention(vit).attribute(images, target=[1, 2, 9])
    with pytest.raises(AttributionInputError, match="target="):
        GenericAttention(vit).attribute(images)
    assert all(len(m._forward_hooks) == 0 for m in vit.modules())


# ------------------------------------------------------------- CAMs on ViTs
def test_last_block_patch_tokens_get_no_gradient_through_class_token_head(vit, images):
    """Why docs/attention.md recommends `blocks[-1].norm1` for CAMs on ViTs."""
    acts = {}

    def keep(name):
        def hook(_m, _i, out):
            out.retain_grad()
            acts[name] = out

        return hook

    h1 = vit.blocks[-1].register_forward_hook(keep("block_out"))
    h2 = vit.blocks[-1].norm1.register_forward_hook(keep("norm1"))
    vit(images)[:, 2].sum().backward()
    h1.remove()
    h2.remove()
    assert acts["block_out"].grad[:, 1:].abs().max() == 0
    assert acts["block_out"].grad[:, 0].abs().max() > 0
    assert acts["norm1"].grad[:, 1:].abs().max() > 0


def test_noise_tunnel_wraps_attention_methods(vit, images):
    """Per-sample targets survive NoiseTunnel's expansion (zero noise: exact)."""
    from captum.attr import NoiseTunnel

    for method in (GenericAttention, GradientAttentionRollout):
        nt = NoiseTunnel(method(vit))
        got = nt.attribute(images, nt_samples=2, stdevs=0.0, target=TARGETS)
        want = method(vit).attribute(images, target=TARGETS)
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-4)
        noisy = nt.attribute(images, nt_samples=2, stdevs=0.5, target=TARGETS)
        assert noisy.shape == (3, 1, 4, 4) and not torch.allclose(noisy, want)


def test_register_tokens_are_removed_from_the_columns(images):
    model = sharpen(make_tiny_vit(reg_tokens=2))
    with torch.no_grad():
        _, ref = manual_vit(model, images)
    assert ref[0].shape[-1] == 19  # class + 2 registers + 16 patches
    got = RawAttention(model, layers=1).attribute(images)
    want = ref[1][:, :, 0, 3:].mean(1).reshape(3, 1, 4, 4)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    roll = AttentionRollout(model).attribute(images)
    want = patch_row(rollout_reference([a[1].mean(0) for a in ref]), 3, (4, 4))
    torch.testing.assert_close(roll[1], want, atol=1e-5, rtol=1e-4)


def test_model_without_class_token_needs_a_query_index(images):
    model = make_tiny_vit(class_token=False, global_pool="avg")
    with pytest.raises(AttributionInputError, match="no class token"):
        AttentionRollout(model).attribute(images)
    assert AttentionRollout(model).attribute(images, query=5).shape == (3, 1, 4, 4)
