"""Behaviour on a real model: the pretrained EfficientNet-Lite0 and real photos.

A class-discriminative map must make the predicted class's probability drop
faster than the inverted map when the most salient pixels are removed first.
The deletion curve is computed here directly, independent of
``captum_ssl.metrics``.
"""

from __future__ import annotations

import pytest
import torch

import captum_ssl.attr as A
from captum_ssl.models import entry, get_layer
from captum_ssl.viz import upsample

FRACTIONS = (0.0, 0.05, 0.1, 0.2, 0.3, 0.5)
GRADIENT = [
    A.LayerGradCam,
    A.LayerGradCamPlusPlus,
    A.LayerXGradCam,
    A.LayerHiResCam,
    A.LayerGradCamElementWise,
    A.LayerLayerCam,
    A.LayerEigenGradCam,
    A.LayerClassActivationMap,
]


def deletion_curve(model, x, maps, target) -> torch.Tensor:
    """Probability of ``target`` after zeroing the top fraction of pixels.

    Returns ``(B, len(FRACTIONS))``; pixels are ranked by the upsampled map."""
    b, _, h, w = x.shape
    order = upsample(maps, x).reshape(b, -1).argsort(dim=1, descending=True)
    curves = []
    for frac in FRACTIONS:
        keep = torch.ones(b, h * w)
        k = int(frac * h * w)
        keep.scatter_(1, order[:, :k], 0.0)
        with torch.no_grad():
            probs = model(x * keep.reshape(b, 1, h, w)).softmax(1)
        curves.append(probs[torch.arange(b), target])
    return torch.stack(curves, dim=1)


def _auc(curve: torch.Tensor) -> torch.Tensor:
    return torch.trapezoid(curve, torch.tensor(FRACTIONS), dim=1)


@pytest.fixture(scope="module")
def real(effnet, photos):
    x = photos.images[:4]
    with torch.no_grad():
        pred = effnet(x).argmax(1)
    return effnet, x, pred


def _check(model, x, target, maps) -> None:
    auc = _auc(deletion_curve(model, x, maps, target))
    inverted = _auc(deletion_curve(model, x, -maps, target))
    # on average, and on most images, the map deletes the evidence faster
    assert float(auc.mean()) < float(inverted.mean())
    assert int((auc < inverted).sum()) >= (len(auc) + 1) // 2 + 1 or len(auc) < 3


@pytest.mark.parametrize("cls", GRADIENT, ids=lambda c: c.__name__)
def test_maps_beat_inverted_maps_on_deletion(real, cls):
    model, x, pred = real
    layer = get_layer(model, entry("efficientnet_lite0").cam_layer)
    maps = cls(model, layer).attribute(x, target=pred)
    assert maps.shape == (4, 1, 7, 7)
    _check(model, x, pred, maps)


@pytest.mark.parametrize(
    "cls,block,side",
    [(A.LayerScoreCam, 3, 14), (A.LayerAblationCam, 5, 7)],
    ids=["LayerScoreCam", "LayerAblationCam"],
)
def test_perturbation_maps_beat_inverted_maps(real, cls, block, side):
    """Score-CAM on an 80-channel block (14 x 14), Ablation-CAM on a
    192-channel block (7 x 7): fewer channels than the head keep the test quick
    (one forward pass per channel and image)."""
    model, x, pred = real
    x, pred = x[:3], pred[:3]
    maps = cls(model, model.blocks[block]).attribute(
        x, target=pred, perturbations_per_eval=96
    )
    assert maps.shape == (3, 1, side, side)
    _check(model, x, pred, maps)


def test_bundled_coffee_photo_is_espresso(real, photos):
    _, _, pred = real
    assert photos.names[0] == "coffee"
    assert int(pred[0]) == 967
