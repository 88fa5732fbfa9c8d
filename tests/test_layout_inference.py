"""Layout inference from a layer's actual output (issue 14.1).

Every layer of real timm architectures (random init) is laid onto a grid as
an independent oracle says: a 4-D output's channel dimension is the one that
is not part of the grid of the input's shape (inputs are non-square, so the
two readings cannot both fit), a token sequence's grid is the input divided by
the model's stride. And the inferred layout gives the same map as the layout
given explicitly.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import pytest
import timm
import torch
from torch import nn

import captum_ssl.attr as A
from captum_ssl.attr._layout import layout_for

torch.manual_seed(0)


def _outputs(
    model: nn.Module, x: torch.Tensor
) -> Dict[str, Tuple[nn.Module, torch.Tensor]]:
    seen: Dict[str, Tuple[nn.Module, torch.Tensor]] = {}
    handles = [
        m.register_forward_hook(
            lambda mod, _i, out, name=name: seen.setdefault(name, (mod, out)) and None
        )
        for name, m in model.named_modules()
        if name
    ]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return seen


def _oracle(out: torch.Tensor, size: Tuple[int, int], prefix: int) -> Optional[tuple]:
    """(fmt, grid, prefix) of ``out`` from the input's aspect ratio alone."""
    s = tuple(out.shape)
    big_h, big_w = size
    if out.dim() == 4:
        for fmt, (h, w), c in (("NCHW", s[2:4], s[1]), ("NHWC", s[1:3], s[3])):
            stride = big_w / w
            if abs(big_h / stride - h) <= 1 and c not in (h, w) and c > 2:
                return fmt, (h, w), 0
        return None
    if out.dim() == 3:
        for stride in (4, 8, 16, 32):
            for grid in (
                (big_h // stride, big_w // stride),
                (-(-big_h // stride), -(-big_w // stride)),
            ):
                if grid[0] * grid[1] + prefix == s[1]:
                    return "NLC", grid, prefix
    return None


@pytest.mark.parametrize(
    "name,size,prefix,kwargs",
    [
        ("convnext_tiny", (64, 96), 0, {}),
        ("swin_tiny_patch4_window7_224", (224, 224), 0, {}),
        ("resnet18", (65, 97), 0, {}),
        (
            "vit_tiny_patch16_224",
            (160, 224),
            5,
            {"reg_tokens": 4, "dynamic_img_size": True},
        ),
        ("efficientformer_l1", (224, 224), 0, {}),
        ("poolformer_s12", (63, 95), 0, {}),
    ],
    ids=[
        "convnext",
        "swin",
        "resnet-odd",
        "vit-registers",
        "efficientformer",
        "poolformer",
    ],
)
def test_every_layer_resolves_as_the_oracle_says(name, size, prefix, kwargs):
    model = timm.create_model(name, pretrained=False, **kwargs).eval()
    checked = 0
    for lname, (module, out) in _outputs(model, torch.randn(1, 3, *size)).items():
        if not isinstance(out, torch.Tensor) or out.shape[0] != 1:
            continue  # windows (Swin attention) or tuples: not one map per image
        truth = _oracle(out, size, prefix)
        if truth is None:
            continue
        lay = layout_for(model, module, size).resolve(out.shape)
        assert (lay.fmt, lay.grid, lay.num_prefix_tokens) == truth, lname
        checked += 1
    assert checked > 20


def _same_map(model, layer, x, target, **explicit):
    got = A.LayerGradCam(model, layer).attribute(x, target=target)
    ref = A.LayerGradCam(model, layer, layout=A.TokenLayout(**explicit))
    torch.testing.assert_close(got, ref.attribute(x, target=target))
    return got


def test_convnext_in_block_norms_and_stages():
    cnx = timm.create_model("convnext_tiny", pretrained=False).eval()
    x = torch.randn(1, 3, 64, 64)
    # the case: timm's LayerNorm subclass runs channels-last
    got = _same_map(cnx, cnx.stages[2].blocks[-1].norm, x, 3, fmt="NHWC")
    assert got.shape == (1, 1, 4, 4)
    for i, side in enumerate((16, 8, 4, 2)):
        got = _same_map(cnx, cnx.stages[i], x, 3, fmt="NCHW")
        assert got.shape == (1, 1, side, side)
    got = _same_map(cnx, cnx.stages[1].downsample[0], x, 3, fmt="NCHW")  # LayerNorm2d
    assert got.shape == (1, 1, 16, 16)


def test_swin_patch_embedding_stages_and_norms():
    swin = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False).eval()
    x = torch.randn(1, 3, 224, 224)
    # the case: a channels-first conv inside a channels-last model
    got = _same_map(swin, swin.patch_embed.proj, x, 1, fmt="NCHW")
    assert got.shape == (1, 1, 56, 56)
    got = _same_map(swin, swin.layers[-1].blocks[-1].norm1, x, 1, fmt="NHWC")
    assert got.shape == (1, 1, 7, 7)
    # the in-block token sequence (B, 196, C) of stage 3 is not the 56 x 56 patch grid
    got = _same_map(swin, swin.layers[2].blocks[-1].mlp, x, 1, grid=(14, 14))
    assert got.shape == (1, 1, 14, 14)
    with pytest.raises(ValueError, match="windows"):
        A.LayerGradCam(swin, swin.layers[2].blocks[-1].attn).attribute(x, target=1)


class _ChannelsLastNet(nn.Module):
    """A LayerNorm model whose 8-channel features sit on an 8 x 8 grid."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 4, stride=4)
        self.norm = nn.LayerNorm(8)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm(self.stem(x).permute(0, 2, 3, 1))  # (B, 8, 8, 8) channels-last
        return self.fc(y.mean(dim=(1, 2)))


def test_channels_equal_to_the_side_is_an_error_naming_layout():
    torch.manual_seed(0)
    net = _ChannelsLastNet().eval()
    x = torch.randn(2, 3, 32, 32)
    with pytest.raises(ValueError, match=r"layout=TokenLayout\(fmt="):
        A.LayerGradCam(net, net.norm).attribute(x, target=1)
    cap = {}
    h = net.norm.register_forward_hook(lambda _m, _i, o: cap.setdefault("t", o))
    out = net(x)
    h.remove()
    (g,) = torch.autograd.grad(out[:, 1].sum(), cap["t"])
    a, g = cap["t"].detach().permute(0, 3, 1, 2), g.permute(0, 3, 1, 2)
    expected = (g.mean((2, 3), keepdim=True) * a).sum(1, keepdim=True)
    lay = A.TokenLayout(fmt="NHWC")
    torch.testing.assert_close(
        A.LayerGradCam(net, net.norm, layout=lay).attribute(x, target=1), expected
    )
    # the convolution's own kind settles the same coincidence
    assert A.LayerGradCam(net, net.stem).attribute(x, target=1).shape == (2, 1, 8, 8)


def test_classic_cnn_with_channels_equal_to_the_side(tiny_cnn):
    x = torch.randn(1, 3, 32, 32)  # features[4] is a ReLU giving (1, 16, 16, 16)
    got = _same_map(tiny_cnn, tiny_cnn.features[4], x, 2, fmt="NCHW")
    assert got.shape == (1, 1, 16, 16)
