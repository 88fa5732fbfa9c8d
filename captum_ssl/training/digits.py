"""The embedded ROAR / KAR setting: scikit-learn's handwritten digits.

The 1797 real 8x8 digit images of ``sklearn.datasets.load_digits`` (bundled
with scikit-learn, offline), a small CNN, and the explainers of the White Box
project's ROAR / KAR study: Grad-CAM, Guided Grad-CAM, Integrated Gradients,
Saliency, SmoothGrad, and random maps.
"""

from __future__ import annotations

from typing import Dict, Tuple

import torch
from torch import Tensor, nn

from captum_ssl.training.roar import Explainer, random_maps


def digits(
    test_fraction: float = 0.3, seed: int = 0
) -> Tuple[Tuple[Tensor, Tensor], Tuple[Tensor, Tensor]]:
    """``((x_train, y_train), (x_test, y_test))``: images ``(N, 1, 8, 8)`` in
    [0, 1] and labels, split per class (stratified) with a fixed seed."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    idx = torch.arange(len(y)).numpy()
    tr, te = train_test_split(
        idx, test_size=test_fraction, random_state=seed, stratify=d.target
    )
    tr, te = torch.as_tensor(tr), torch.as_tensor(te)
    return (x[tr], y[tr]), (x[te], y[te])


class DigitsCNN(nn.Module):
    """Three 3x3 convolutions, a max-pool and a linear classifier on a 4 x 4
    average-pooled grid (any image size >= 8; 8x8 digits by default).

    ``features[-1]`` (the last ReLU, 64 channels at half the input size) is
    the Grad-CAM layer. ``in_channels=3`` serves ``ImageFolder`` data such as
    CIFAR-10."""

    def __init__(self, classes: int = 10, in_channels: int = 1) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 32, 3, padding=1), nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(),
        )  # fmt: skip
        self.pool = nn.AdaptiveAvgPool2d(4)
        self.classifier = nn.Linear(64 * 4 * 4, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.pool(self.features(x)).flatten(1))


def standard_explainers(nt_samples: int = 16) -> Dict[str, Explainer]:
    """The White Box study's methods as ``(model, images, labels) -> maps``.

    Grad-CAM (this library's ``LayerGradCam`` with ReLU, on ``features[-1]``),
    Guided Grad-CAM, Integrated Gradients (|IG|), Saliency (|grad|),
    SmoothGrad (mean of |grad| over ``nt_samples`` noisy copies, sigma 0.15)
    and random maps; Captum's implementations for the input-level methods."""
    from captum.attr import (
        GuidedGradCam,
        IntegratedGradients,
        NoiseTunnel,
        Saliency,
    )

    from captum_ssl.attr import LayerGradCam

    def gradcam(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        cam = LayerGradCam(model, model.features[-1])
        return cam.attribute(x, target=y, relu_attributions=True)

    def guided(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        x = x.detach().requires_grad_()  # Captum warns when it has to set it
        return GuidedGradCam(model, model.features[-1]).attribute(x, target=y)

    def ig(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        return IntegratedGradients(model).attribute(x, target=y, n_steps=32).abs()

    def saliency(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        return Saliency(model).attribute(x.detach().requires_grad_(), target=y)

    def smoothgrad(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        torch.manual_seed(0)
        return NoiseTunnel(Saliency(model)).attribute(
            x, nt_type="smoothgrad", nt_samples=nt_samples, stdevs=0.15, target=y
        )

    return {
        "Grad-CAM": gradcam,
        "Guided Grad-CAM": guided,
        "Integrated Gradients": ig,
        "Saliency": saliency,
        "SmoothGrad": smoothgrad,
        "random": random_maps,
    }
