"""LeGrad against its paper's equation, written out from timm's attention
math (independent of the attention capture), and its errors."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_vit

import captum_ssl.attr as A

TARGETS = [1, 5, 6]


def _block_legrad(model, block, x_in, target):
    """E^l for one block: rebuild the block with A^l as a leaf tensor."""
    attn = block.attn
    b, n, c = x_in.shape
    h = attn.num_heads
    qkv = attn.qkv(block.norm1(x_in)).reshape(b, n, 3, h, c // h).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    probs = ((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
    probs = probs.detach().requires_grad_()
    y = attn.proj((probs @ v).transpose(1, 2).reshape(b, n, c))
    z = x_in + block.ls1(y)
    z = z + block.ls2(block.mlp(block.norm2(z)))
    s = model.head(model.fc_norm(model.norm(z.mean(dim=1))))
    (g,) = torch.autograd.grad(s[torch.arange(b), target].sum(), probs)
    return g.clamp(min=0).mean(dim=(1, 2))  # (B, N)


def test_legrad_is_the_papers_equation(tiny_vit, images):
    model = tiny_vit
    attr = A.LeGrad(model).attribute(images, target=TARGETS)
    inputs = []
    hooks = [
        blk.register_forward_pre_hook(lambda _m, a: inputs.append(a[0].detach()))
        for blk in model.blocks
    ]
    try:
        with torch.no_grad():
            model(images)
    finally:
        for hk in hooks:
            hk.remove()
    maps = [
        _block_legrad(model, blk, x, TARGETS) for blk, x in zip(model.blocks, inputs)
    ]
    expected = torch.stack(maps).mean(dim=0)[:, 1:].reshape(3, 1, 4, 4)
    assert float(expected.abs().max()) > 0
    torch.testing.assert_close(attr, expected, rtol=1e-4, atol=1e-8)
    # a subset of layers averages only those
    last = A.LeGrad(model, layers=[-1]).attribute(images, target=TARGETS)
    torch.testing.assert_close(
        last, maps[-1][:, 1:].reshape(3, 1, 4, 4), rtol=1e-4, atol=1e-8
    )


def test_legrad_targets_and_errors(tiny_vit, tiny_cnn, images):
    a = A.LeGrad(tiny_vit).attribute(images, target=[0, 0, 0])
    b = A.LeGrad(tiny_vit).attribute(images, target=0)
    torch.testing.assert_close(a, b)
    with pytest.raises(A.AttributionInputError, match="no supported attention"):
        A.LeGrad(tiny_cnn)
    with pytest.raises(A.AttributionInputError, match="target"):
        A.LeGrad(tiny_vit).attribute(images, target=99)
    model = make_tiny_vit(class_token=False, global_pool="avg")
    del model.head
    with pytest.raises(A.AttributionInputError, match="score_projection"):
        A.LeGrad(model)
