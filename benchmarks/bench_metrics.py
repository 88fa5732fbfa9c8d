"""Metric suites: cost of the perturbation metrics relative to the forward
passes they need, the Quantus adapter's overhead over calling Quantus
directly, and the metrics' values for Grad-CAM on the real EfficientNet-Lite0."""

from __future__ import annotations

import os
import warnings
from functools import cache

import numpy as np
import torch

import captum_ssl.metrics as M
from benchmarks._fixtures import effnet_data
from benchmarks._measure import best_times, default_device

QUICK = os.environ.get("BENCH_FULL", "") == ""


@cache
def resnet18(device: str) -> torch.nn.Module:
    """torchvision ResNet-18 with random weights (timing only)."""
    import torchvision

    torch.manual_seed(0)
    return torchvision.models.resnet18(weights=None).eval().to(device)


def _images(batch: int, size: int, device: torch.device):
    """Smooth random images (so superpixels exist), maps and targets."""
    g = torch.Generator().manual_seed(0)
    x = M.gaussian_blur(torch.randn(batch, 3, size, size, generator=g), 7, 2.0)
    x = (x / x.std()).to(device)
    maps = torch.rand(batch, 1, 7, 7, generator=g).to(device)
    target = torch.arange(batch, device=device)
    return x, maps, target


# metric -> (function, options, number of evaluations per image)
def _cost_cases(size: int) -> dict:
    step = size * size // 16
    fractions = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
    return {
        "deletion_auc": (M.deletion_auc, {"step": step}, 17),
        "insertion_auc": (M.insertion_auc, {"step": step}, 17),
        "perturbation_auc_positive": (
            M.perturbation_auc, {"mode": "positive", "fractions": fractions}, 10,
        ),
        "perturbation_auc_negative": (
            M.perturbation_auc, {"mode": "negative", "fractions": fractions}, 10,
        ),
    }  # fmt: skip


class MetricCost:
    """Time of a perturbation metric / time of the forward passes it needs.

    The reference forwards the same number of images (``steps + 1`` per image)
    in the same chunks (``batch_size`` = 64) under ``torch.no_grad``; the ratio
    is the metric's overhead (building the perturbed copies, sorting, scoring).
    Target: <= 1.1. ResNet-18 (random weights), 8 images of 112 px (224 px
    with ``BENCH_FULL=1``), 16 deletion / insertion steps, 9 fractions.
    """

    group = "timing"
    params = [list(_cost_cases(112)), [8]]
    param_names = ["metric", "batch"]
    size = 112 if QUICK else 224
    note = f"ResNet-18 random weights, {size} px, batch_size 64"
    timeout = 300

    def setup(self, metric: str, batch: int) -> None:
        self.device = default_device()
        self.model = resnet18(str(self.device))
        self.x, self.maps, self.target = _images(batch, self.size, self.device)
        fn, kw, per_image = _cost_cases(self.size)[metric]
        self.run = lambda: fn(self.model, self.x, self.maps, self.target, **kw)
        total = batch * per_image
        chunks = [min(64, total - s) for s in range(0, total, 64)]
        pool = self.x.repeat((64 + batch - 1) // batch, 1, 1, 1)[:64]

        def reference() -> None:
            with torch.no_grad():
                for n in chunks:
                    torch.softmax(self.model(pool[:n]), dim=1)

        self.reference = reference
        self.forwards = total
        self._ratio = None

    def _measure(self) -> float:
        if self._ratio is None:
            got, ref = best_times([self.run, self.reference], self.device)
            self._ratio = (got, ref)
        return self._ratio

    def track_forward_ratio(self, metric: str, batch: int) -> float:
        """Metric time / time of its (steps + 1) forward passes (target <= 1.1)."""
        got, ref = self._measure()
        return got / ref

    track_forward_ratio.unit = "x forward passes"

    def track_seconds(self, metric: str, batch: int) -> float:
        return self._measure()[0]

    track_seconds.unit = "s"

    def track_forward_passes_per_image(self, metric: str, batch: int) -> float:
        return self.forwards / batch

    track_forward_passes_per_image.unit = "forward passes"


class QuantusOverhead:
    """Time of ``quantus_faithfulness`` / time of calling Quantus directly.

    Both run the same Quantus metric with the same constructor arguments on
    the same numpy arrays (the direct call inside ``numpy_compat``, without
    which Quantus 0.6.0 fails on numpy >= 2.4); the adapter adds the tensor
    conversions and its checks. Target: <= 1.10. ResNet-18 (random weights),
    8 images of 64 px. (IROF is left out: SLIC and one pass per superpixel make
    it take tens of seconds per call even here.)
    """

    group = "timing"
    params = [
        ["PixelFlipping", "RegionPerturbation", "FaithfulnessEstimate", "Selectivity"]
    ]
    param_names = ["metric"]
    note = "ResNet-18 random weights, 8 images, 64 px"
    timeout = 300

    def setup(self, metric: str) -> None:
        import quantus

        self.device = default_device()
        model = resnet18(str(self.device))
        x, maps, target = _images(8, 64, self.device)
        kw = M._quantus.default_kwargs(metric, x.shape, steps=16)
        up = M._common.prepare_maps(maps, x)
        x_np, y_np, a_np = x.cpu().numpy(), target.cpu().numpy(), up.cpu().numpy()
        dev = str(self.device)

        def direct() -> None:
            np.random.seed(0)
            with M.numpy_compat(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                getattr(quantus, metric)(**kw)(
                    model=model, x_batch=x_np, y_batch=y_np, a_batch=a_np,
                    device=dev, batch_size=64,
                )  # fmt: skip

        def adapter() -> None:
            M.quantus_faithfulness(model, x, maps, target, metrics=[metric], steps=16)

        self.direct, self.adapter = direct, adapter
        self._times = None

    def _measure(self):
        if self._times is None:
            a, d = best_times([self.adapter, self.direct], self.device, repeat=3)
            self._times = (a, d)
        return self._times

    def track_overhead_ratio(self, metric: str) -> float:
        """Adapter time / direct Quantus time (target <= 1.10)."""
        a, d = self._measure()
        return a / d

    track_overhead_ratio.unit = "x direct Quantus"

    def track_direct_seconds(self, metric: str) -> float:
        return self._measure()[1]

    track_direct_seconds.unit = "s"


def _gradcam_and_random(model, layer, x, target):
    from captum_ssl.attr import LayerGradCam

    cam = LayerGradCam(model, layer)
    maps = torch.cat(
        [cam.attribute(a, target=t) for a, t in zip(x.split(8), target.split(8))]
    ).detach()
    g = torch.Generator().manual_seed(0)
    return {"LayerGradCam": maps, "Random": torch.rand(maps.shape, generator=g)}


class MetricValues:
    """Grad-CAM against a random map on the real EfficientNet-Lite0.

    Images: as ``bench_cams.CamDeletion`` (ImageNet samples when present,
    else the bundled photos). Deletion / insertion with ``BENCH_STEP`` pixels
    per step (quick default 1792; the thesis used 224); perturbation AUC over
    10%..90% with class probability; the thesis's Average Drop / Increase.
    Each unit says which direction is better.
    """

    group = "accuracy"
    params = [["LayerGradCam", "Random"]]
    param_names = ["method"]
    step = int(os.environ.get("BENCH_STEP", "1792" if QUICK else "224"))
    note = f"EfficientNet-Lite0 (real weights), step {step} px"
    timeout = 600

    def setup(self, method: str) -> None:

        self.device = default_device()
        self.model, self.x, self.target, layer = effnet_data(str(self.device))
        self.maps = _maps_for(str(self.device))[method].to(self.device)

    def _m(self, fn, **kw) -> float:
        return float(fn(self.model, self.x, self.maps, self.target, **kw).mean())

    def track_deletion_auc(self, method: str) -> float:
        return self._m(M.deletion_auc, step=self.step)

    track_deletion_auc.unit = "AUC (lower is better)"

    def track_insertion_auc(self, method: str) -> float:
        return self._m(M.insertion_auc, step=self.step)

    track_insertion_auc.unit = "AUC (higher is better)"

    def track_positive_perturbation_auc(self, method: str) -> float:
        return self._m(M.perturbation_auc, mode="positive", score="probability")

    track_positive_perturbation_auc.unit = "AUC (lower is better)"

    def track_negative_perturbation_auc(self, method: str) -> float:
        return self._m(M.perturbation_auc, mode="negative", score="probability")

    track_negative_perturbation_auc.unit = "AUC (higher is better)"

    def track_average_drop(self, method: str) -> float:
        return 100 * self._m(M.average_drop)

    track_average_drop.unit = "% (lower is better)"

    def track_average_increase(self, method: str) -> float:
        return 100 * self._m(M.average_increase)

    track_average_increase.unit = "% (higher is better)"


@cache
def _maps_for(device: str) -> dict:

    model, x, target, layer = effnet_data(device)
    return _gradcam_and_random(model, layer, x, target)
