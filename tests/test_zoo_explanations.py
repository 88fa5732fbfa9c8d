"""Every zoo model, loaded from a checkpoint in its official layout, is
explained by a CAM on its registry layer and, for transformers with attention
layers, by the attention methods (DeiT, MoCo v3 ViT, DINO and DINOv2 ViTs
through their linear-probe wrapper, registers included, CaiT and XCiT class
attention)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_models import CASES, write_official

import captum_ssl.attr as A
import captum_ssl.models as zoo

ATTENTION = [
    A.RawAttention,
    A.AttentionRollout,
    A.GradientAttentionRollout,
    A.GenericAttention,
]


@pytest.mark.parametrize("name", [n for n in CASES if n != "efficientnet_lite0"])
def test_zoo_model_explained(name: str, tmp_path: Path) -> None:
    _, kwargs, size = write_official(name, tmp_path)
    model = zoo.load(name, weights_dir=tmp_path, **kwargs)
    entry = zoo.entry(name)
    x = torch.randn(2, 3, size, size)
    layer = zoo.get_layer(model, entry.cam_layer)
    layout = A.TokenLayout(**entry.cam_layout)
    cam = A.LayerGradCam(model, layer, layout=layout).attribute(x, target=[1, 7])
    assert cam.dim() == 4 and cam.shape[:2] == (2, 1)
    assert bool(cam.abs().sum() > 0)
    if not entry.attention_layers:
        return
    for cls in ATTENTION:
        maps = cls(model).attribute(x, target=[1, 7])
        # a TokenLinearProbe (DINO ViTs, DINOv2) keeps the timm ViT at .backbone
        patch = getattr(model, "backbone", model).patch_embed.patch_size
        grid = size // (patch[0] if isinstance(patch, tuple) else patch)
        assert maps.shape == (2, 1, grid, grid), cls.__name__
        assert torch.isfinite(maps).all()
