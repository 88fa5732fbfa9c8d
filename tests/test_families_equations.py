"""Captured attention equals the probabilities recomputed here from each
family's own q/k weights, with EVA's rotary embedding and BEiT's relative
position bias written out as equations (not taken from the library's or
timm's code paths), and the model computes the same output while its
attention is captured."""

from __future__ import annotations

import math

import pytest
import torch
from families_models import beit, eva02, open_clip_vit, torchvision_vit
from families_models import images as _images
from torch import Tensor, nn

from captum_ssl.attr import RawAttention
from captum_ssl.attr._attention.capture import attention_forward, capture_attention

SIZE, PATCH = 32, 8


def images(n: int = 2, size: int = SIZE) -> Tensor:
    return _images(n, size)


def inputs_of(model: nn.Module, modules, x: Tensor):
    """The (args, kwargs) each attention module receives in a plain forward."""
    seen = []
    handles = [
        m.register_forward_pre_hook(
            lambda _m, a, kw: seen.append((a, kw)), with_kwargs=True
        )
        for m in modules
    ]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return seen


def heads(t: Tensor, h: int) -> Tensor:
    b, n, c = t.shape
    return t.reshape(b, n, h, c // h).transpose(1, 2)


def softmax_scores(q: Tensor, k: Tensor, bias=0.0) -> Tensor:
    d = q.shape[-1]
    return torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(d) + bias, dim=-1)


def check(model: nn.Module, modules, want, x: Tensor, patch: int = PATCH) -> None:
    cap = attention_forward(model, x, modules)
    for got, w in zip(cap.attentions, want):
        torch.testing.assert_close(got, w, rtol=1e-4, atol=1e-6)
    # RawAttention: the class-token row over the patch columns, mean of heads
    raw = RawAttention(model, layers=list(range(len(modules)))).attribute(x)
    grid = (x.shape[-2] // patch, x.shape[-1] // patch)
    for m, w in zip(raw, want):
        row = w.mean(dim=1)[:, 0, -grid[0] * grid[1] :]
        torch.testing.assert_close(m, row.reshape(-1, 1, *grid), rtol=1e-4, atol=1e-6)
    # the same output while captured (the adapter's forward is the model's)
    with torch.no_grad():
        plain = model(x)
        with capture_attention(modules):
            captured = model(x)
    torch.testing.assert_close(captured, plain, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------ nn.MultiheadAttention
def mha_probs(mha: nn.MultiheadAttention, x: Tensor) -> Tensor:
    e = x.shape[-1]
    w, b = mha.in_proj_weight, mha.in_proj_bias
    q = heads(x @ w[:e].T + b[:e], mha.num_heads)
    k = heads(x @ w[e : 2 * e].T + b[e : 2 * e], mha.num_heads)
    return softmax_scores(q, k)


def test_torchvision_attention_from_in_proj():
    tv = torchvision_vit()
    mods = [blk.self_attention for blk in tv.encoder.layers]
    x = images()
    want = [mha_probs(m, a[0]) for m, (a, _) in zip(mods, inputs_of(tv, mods, x))]
    check(tv, mods, want, x)


def test_open_clip_attention_from_in_proj():
    oc = open_clip_vit()
    mods = [blk.attn for blk in oc.transformer.resblocks]
    x = images()
    want = [mha_probs(m, a[0]) for m, (a, _) in zip(mods, inputs_of(oc, mods, x))]
    check(oc, mods, want, x)


# --------------------------------------------------------------- EVA02 RoPE
def rope_rotate(t: Tensor, sin: Tensor, cos: Tensor) -> Tensor:
    """Interleaved rotary embedding: each channel pair (2i, 2i+1) rotated by
    its angle, ``(a, b) -> (a cos - b sin, b cos + a sin)``."""
    a, b = t[..., 0::2], t[..., 1::2]
    s, c = sin[..., 0::2], cos[..., 0::2]  # one angle per pair (repeated)
    out = torch.stack([a * c - b * s, b * c + a * s], dim=-1)
    return out.flatten(-2)


@pytest.mark.parametrize("size", [28, 42], ids=["native", "dynamic"])
def test_eva02_attention_with_rotary_embedding(size):
    eva = eva02(dynamic_img_size=True)
    mods = [blk.attn for blk in eva.blocks]
    x = images(size=size)
    want = []
    for m, (a, kw) in zip(mods, inputs_of(eva, mods, x)):
        h, c = m.num_heads, a[0].shape[-1]
        w = m.qkv.weight
        q = heads(a[0] @ w[:c].T + m.q_bias, h)
        k = heads(a[0] @ w[c : 2 * c].T, h)  # EVA has no key bias
        sin, cos = kw["rope"].chunk(2, dim=-1)  # (patches, head_dim) each
        assert sin.shape[0] == (size // 7) ** 2
        q = torch.cat([q[:, :, :1], rope_rotate(q[:, :, 1:], sin, cos)], dim=2)
        k = torch.cat([k[:, :, :1], rope_rotate(k[:, :, 1:], sin, cos)], dim=2)
        want.append(softmax_scores(q, k))
    check(eva, mods, want, x, patch=7)


# ------------------------------------------------ BEiT relative position bias
def beit_bias(table: Tensor, wh: int, ww: int) -> Tensor:
    """BEiT's relative position bias ``(heads, N, N)`` for a class token and
    a ``wh x ww`` grid: patch i (query) to patch j (key) reads the table at
    ``(dy + wh - 1) * (2 ww - 1) + (dx + ww - 1)`` with ``(dy, dx)`` = position
    of i minus position of j; the three last rows of the table hold class ->
    patch, patch -> class and class -> class."""
    n = wh * ww + 1
    r = table.shape[0]
    idx = torch.empty(n, n, dtype=torch.long)
    for i in range(n):
        for j in range(n):
            if i == 0 and j == 0:
                idx[i, j] = r - 1
            elif i == 0:
                idx[i, j] = r - 3
            elif j == 0:
                idx[i, j] = r - 2
            else:
                (yi, xi), (yj, xj) = divmod(i - 1, ww), divmod(j - 1, ww)
                idx[i, j] = (yi - yj + wh - 1) * (2 * ww - 1) + (xi - xj + ww - 1)
    return table[idx].permute(2, 0, 1)


def test_beit_attention_with_relative_position_bias():
    model = beit()
    mods = [blk.attn for blk in model.blocks]
    x = images()
    want = []
    for m, (a, _) in zip(mods, inputs_of(model, mods, x)):
        c = a[0].shape[-1]
        w, h = m.qkv.weight, m.num_heads
        q = heads(a[0] @ w[:c].T + m.q_bias, h)
        k = heads(a[0] @ w[c : 2 * c].T, h)
        g = SIZE // PATCH
        want.append(
            softmax_scores(q, k, beit_bias(m.relative_position_bias_table, g, g))
        )
    check(model, mods, want, x)
