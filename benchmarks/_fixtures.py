"""Models and data shared by the suites (built once per process)."""

from __future__ import annotations

import os
from functools import cache

import torch


@cache
def resnet50(device: str) -> torch.nn.Module:
    """torchvision ResNet-50 with random weights (timing only)."""
    import torchvision

    torch.manual_seed(0)
    return torchvision.models.resnet50(weights=None).eval().to(device)


@cache
def effnet_data(device: str):
    """The real EfficientNet-Lite0, up to ``BENCH_IMAGES`` photos (the ImageNet
    samples when present, else the bundled photos), targets (label, else the
    prediction) and its registry CAM layer."""
    import warnings

    from captum_ssl.data import image_batches
    from captum_ssl.models import entry, get_layer, load

    model = load("efficientnet_lite0").to(device)
    limit = int(os.environ.get("BENCH_IMAGES", "16"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the fallback to bundled photos is expected
        batch = next(
            iter(image_batches(model="efficientnet_lite0", n=limit, batch_size=limit))
        )
    x = batch.images.to(device)
    with torch.no_grad():
        pred = model(x).argmax(1).cpu()
    target = torch.where(batch.labels >= 0, batch.labels, pred).to(device)
    return model, x, target, get_layer(model, entry("efficientnet_lite0").cam_layer)
