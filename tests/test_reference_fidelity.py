"""Agreement with the reference code the docs cite (issue 14.2 to 14.5).

Each reference's arithmetic is written again here from its description:
RISE's ``gkern`` (SciPy's ``gaussian_filter`` of an impulse), vit-explain's
``grad_rollout`` (fuse, clamp, discard without sparing), Abnar & Zuidema's
``compute_flows`` (networkx max flow, divided by the sum over input tokens),
and LayerNorm's invariance that zeroes HiRes-CAM's channel sum.
"""

from __future__ import annotations

import warnings

import networkx as nx
import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from conftest import make_tiny_vit
from scipy.ndimage import gaussian_filter

import captum_ssl.attr as A
import captum_ssl.metrics as M


# ------------------------------------------------------------- 14.2 RISE blur
def _gkern(klen: int, nsig: float) -> torch.Tensor:
    """RISE's evaluation.gkern: gaussian_filter of a centred impulse."""
    impulse = np.zeros((klen, klen))
    impulse[klen // 2, klen // 2] = 1
    return torch.from_numpy(gaussian_filter(impulse, nsig).astype("float32"))


@pytest.mark.parametrize("klen,nsig", [(11, 5.0), (7, 2.0), (5, 0.8), (11, 1.5)])
def test_rise_kernel_is_rise_gkern(klen, nsig):
    torch.testing.assert_close(
        M.rise_kernel(klen, nsig), _gkern(klen, nsig), atol=1e-8, rtol=0
    )


def test_blur_substrates_rise_default_and_gaussian_option():
    x = torch.randn(2, 3, 20, 24)
    rise = F.conv2d(x, _gkern(11, 5.0).expand(3, 1, 11, 11), padding=5, groups=3)
    torch.testing.assert_close(M.substrate(x, "blur"), rise, atol=1e-6, rtol=1e-5)
    ax = torch.arange(11.0) - 5
    g = torch.exp(-(ax[:, None] ** 2 + ax[None, :] ** 2) / 50)
    old = F.conv2d(x, (g / g.sum()).expand(3, 1, 11, 11), padding=5, groups=3)
    torch.testing.assert_close(
        M.substrate(x, "blur_gaussian"), old, atol=1e-6, rtol=1e-5
    )
    assert not torch.allclose(rise, old, atol=1e-3)


def test_insertion_takes_rise_kernel_by_default(tiny_cnn, images):
    maps = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    kw = dict(target=[0, 1, 2], step=128)
    with torch.no_grad():
        default = M.insertion_auc(tiny_cnn, images, maps, **kw)
        rise = M.insertion_auc(
            tiny_cnn,
            images,
            maps,
            substrate=lambda t: F.conv2d(
                t, _gkern(11, 5.0).expand(3, 1, 11, 11), padding=5, groups=3
            ),
            **kw,
        )
    torch.testing.assert_close(default, rise, atol=1e-6, rtol=0)


# ---------------------------------------------------- attention capture (test)
def _sharp_vit():
    vit = make_tiny_vit()
    with torch.no_grad():
        for name, p in vit.named_parameters():
            if name.endswith("qkv.weight"):
                p.mul_(25.0)
    return vit


def _attentions_and_grads(vit, x, target):
    """Attention probabilities and d(target logit)/d(attention), per layer."""
    store = []
    hooks = []
    for blk in vit.blocks:
        blk.attn.fused_attn = False
        hooks.append(
            blk.attn.attn_drop.register_forward_hook(
                lambda _m, _i, out: store.append(out)
            )
        )
    try:
        logits = vit(x)
        grads = torch.autograd.grad(logits[torch.arange(len(x)), target].sum(), store)
    finally:
        for h in hooks:
            h.remove()
        for blk in vit.blocks:
            blk.attn.fused_attn = True
    return [a.detach() for a in store], [g.detach() for g in grads]


def _rollout_rows(mats_per_layer):
    result = torch.eye(mats_per_layer[0].shape[-1])
    for a in mats_per_layer:
        a = (a + torch.eye(a.shape[-1])) / 2
        result = (a / a.sum(-1, keepdim=True)) @ result
    return result[0, 1:]


# ------------------------------------------------ 14.3 gradient rollout orders
def test_gradient_rollout_vit_explain_order_and_default_order():
    vit = _sharp_vit()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    target = torch.tensor([2, 5])
    attns, grads = _attentions_and_grads(vit, x, target)
    ratio = 0.9
    n = attns[0].shape[-1]
    k = int(n * n * ratio)
    roll = A.GradientAttentionRollout(vit)
    explain = roll.attribute(
        x,
        target=target,
        discard_ratio=ratio,
        fusion_before_clamp=True,
        discard="vit_explain",
    )
    default = roll.attribute(x, target=target, discard_ratio=ratio)
    for b in range(2):
        # vit-explain: mean over heads, then negatives to 0, then the k lowest
        # entries to 0 (no entry spared); rows normalised with keepdim (#16)
        mats = []
        for a, g in zip(attns, grads):
            fused = (a[b] * g[b]).mean(0)
            fused[fused < 0] = 0
            flat = fused.view(-1)
            flat[flat.topk(k, largest=False).indices] = 0
            mats.append(fused)
        want = _rollout_rows(mats).reshape(1, 4, 4)
        torch.testing.assert_close(explain[b], want, atol=1e-6, rtol=1e-4)
        # default: negatives to 0 per head, then the mean, then k entries
        # other than the class token's own entry
        mats = []
        for a, g in zip(attns, grads):
            fused = (a[b] * g[b]).clamp(min=0).mean(0)
            ranked = fused.flatten().clone()
            ranked[0] = float("inf")
            fused = fused.flatten().scatter(
                0, ranked.topk(k, largest=False).indices, 0.0
            )
            mats.append(fused.view(n, n))
        want = _rollout_rows(mats).reshape(1, 4, 4)
        torch.testing.assert_close(default[b], want, atol=1e-6, rtol=1e-4)
    assert not torch.allclose(explain, default, rtol=1e-2, atol=0)


def test_attention_rollout_vit_explain_discard_spares_after_picking():
    vit = _sharp_vit()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    attns, _ = _attentions_and_grads(vit, x, torch.tensor([0, 0]))
    n, ratio = attns[0].shape[-1], 0.5
    k = int(n * n * ratio)
    got = A.AttentionRollout(vit).attribute(
        x, discard_ratio=ratio, discard="vit_explain"
    )
    for b in range(2):
        mats = []
        for a in attns:
            fused = a[b].mean(0)
            flat = fused.view(-1)
            idx = flat.topk(k, largest=False).indices
            flat[idx[idx != 0]] = 0  # vit_rollout.py: index 0 is spared
            mats.append(fused)
        torch.testing.assert_close(
            got[b], _rollout_rows(mats).reshape(1, 4, 4), atol=1e-6, rtol=1e-4
        )
    with pytest.raises(ValueError, match="discard must be one of"):
        A.AttentionRollout(vit).attribute(x, discard="spare")


# ---------------------------------------------- 14.4 attention flow normalised
def test_attention_flow_is_normalised_as_the_reference():
    vit = _sharp_vit()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(6))
    attns, _ = _attentions_and_grads(vit, x, torch.tensor([0, 0]))
    got = A.AttentionFlow(vit).attribute(x)
    raw = A.AttentionFlow(vit).attribute(x, normalize=False)
    n, layers = attns[0].shape[-1], len(attns)
    for b in range(2):
        # the reference's get_adjmat / compute_flows: edges from a token of
        # layer i to the tokens of layer i - 1, flow from the output class
        # token to every input token, divided by their sum
        g = nx.DiGraph()
        for i, a in enumerate(attns, start=1):
            m = a[b].mean(0) + torch.eye(n)
            m = m / m.sum(-1, keepdim=True)
            for f in range(n):
                for t in range(n):
                    g.add_edge((i, f), (i - 1, t), capacity=float(m[f, t]))
        flows = torch.tensor(
            [
                nx.maximum_flow_value(
                    g, (layers, 0), (0, v), flow_func=nx.algorithms.flow.edmonds_karp
                )
                for v in range(n)
            ]
        )
        want = (flows / flows.sum())[1:].reshape(1, 4, 4).float()
        torch.testing.assert_close(got[b], want, atol=1e-4, rtol=0)
        torch.testing.assert_close(
            raw[b], flows[1:].reshape(1, 4, 4).float(), atol=1e-4, rtol=0
        )
    assert got.sum() < raw.sum()


# ------------------------------------ 14.5 HiRes-CAM before a per-position LN
def _warnings_of(cls, model, layer, x):
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        out = cls(model, layer).attribute(x, target=1)
    return out, [str(w.message) for w in seen if "channel sum" in str(w.message)]


def test_hires_and_eigen_grad_cam_warn_before_a_layernorm():
    torch.manual_seed(0)
    cnx = timm.create_model("convnext_tiny", pretrained=False).eval()
    x = torch.randn(1, 3, 64, 64)
    for i in range(3):  # the next stage starts with a LayerNorm2d
        out, msgs = _warnings_of(A.LayerHiResCam, cnx, cnx.stages[i], x)
        assert len(msgs) == 1 and f"`stages[{i}].blocks[-1].mlp`" in msgs[0]
        # the map is rounding noise next to Grad-CAM's
        grad_cam = A.LayerGradCam(cnx, cnx.stages[i]).attribute(x, target=1)
        assert out.abs().max() < 1e-3 * grad_cam.abs().max()
    # the last stage is pooled before its LayerNorm: a real map, no warning
    assert _warnings_of(A.LayerHiResCam, cnx, cnx.stages[3], x)[1] == []
    swin = timm.create_model(
        "swin_tiny_patch4_window7_224",
        pretrained=False,
        img_size=56,
        depths=(1, 1),
        num_heads=(2, 2),
        embed_dim=16,
        window_size=7,
        num_classes=5,
    ).eval()
    xs = torch.randn(2, 3, 56, 56)
    for cls in (A.LayerHiResCam, A.LayerEigenGradCam):
        _, msgs = _warnings_of(cls, swin, swin.layers[-1], xs)
        assert len(msgs) == 1 and "`layers[1].blocks[-1].mlp`" in msgs[0]
    assert "orientation is arbitrary" in msgs[0]
    # the layer the warning names works
    out, msgs = _warnings_of(A.LayerHiResCam, swin, swin.layers[1].blocks[-1].mlp, xs)
    assert msgs == [] and out.shape == (2, 1, 7, 7) and out.abs().max() > 0


def test_no_channel_sum_warning_on_a_cnn(tiny_cnn, images):
    assert (
        _warnings_of(A.LayerHiResCam, tiny_cnn, tiny_cnn.features[3], images)[1] == []
    )
