"""CAM suites: cost relative to a forward pass, Score-CAM against
pytorch-grad-cam, and deletion AUC on the real EfficientNet-Lite0."""

from __future__ import annotations

import os
from typing import Optional

import torch

import captum_ssl.attr as A
from benchmarks._fixtures import effnet_data, resnet50
from benchmarks._measure import best_times, default_device, no_grad_forward

GRADIENT_CAMS = [
    "LayerGradCam",
    "LayerGradCamPlusPlus",
    "LayerXGradCam",
    "LayerHiResCam",
    "LayerGradCamElementWise",
    "LayerLayerCam",
    "LayerEigenGradCam",
]
FAST_CAMS = GRADIENT_CAMS + ["LayerEigenCam", "LayerClassActivationMap"]
PERTURBATION_CAMS = ["LayerScoreCam", "LayerAblationCam"]
QUICK = os.environ.get("BENCH_FULL", "") == ""


class CamCost:
    """Time of each CAM relative to one plain forward pass of the same batch.

    ResNet-50 (random weights), ``layer4``, 224 px. The forward pass (under
    ``torch.no_grad``) and the attribution are timed alternately in the same
    process. pytorch-grad-cam's GradCAM is timed too when installed (it
    backpropagates to the input).
    """

    group = "timing"
    params = [FAST_CAMS + ["pytorch_grad_cam.GradCAM"], [8]]
    param_names = ["method", "batch"]
    note = "ResNet-50 random weights, layer4, 224 px"

    def setup(self, method: str, batch: int) -> None:
        self.device = default_device()
        dev = str(self.device)
        self.model = resnet50(dev)
        self.x = torch.randn(batch, 3, 224, 224, device=self.device)
        self.target = list(range(batch))
        if method.startswith("pytorch_grad_cam"):
            try:
                from pytorch_grad_cam import GradCAM
                from pytorch_grad_cam.utils.model_targets import (
                    ClassifierOutputTarget,
                )
            except ImportError as err:
                raise NotImplementedError("pytorch-grad-cam not installed") from err
            cam = GradCAM(self.model, [self.model.layer4])
            targets = [ClassifierOutputTarget(t) for t in self.target]
            self.run = lambda: cam(input_tensor=self.x, targets=targets)
        else:
            cam = getattr(A, method)(self.model, self.model.layer4)
            self.run = lambda: cam.attribute(self.x, target=self.target)
        self.forward = no_grad_forward(self.model, self.x)
        self._times = None

    def _measure(self) -> tuple:
        if self._times is None:
            self._times = tuple(best_times([self.run, self.forward], self.device))
        return self._times

    def track_forward_ratio(self, method: str, batch: int) -> float:
        """Attribution time / one forward pass (target: <= 1.15 for gradient CAMs)."""
        attr, fwd = self._measure()
        return attr / fwd

    track_forward_ratio.unit = "x forward"

    def track_seconds_per_image(self, method: str, batch: int) -> float:
        return self._measure()[0] / batch

    track_seconds_per_image.unit = "s"


class ScoreCamVsPytorchGradCam:
    """Score-CAM: ours against pytorch-grad-cam's at the same channels.

    Both score the same masked inputs, 16 per forward pass (pytorch-grad-cam's
    batch size), and are timed in turns (one warm-up each, then the fastest of
    three runs at 64 px, of one at 224 px) next
    to the bare forward passes Score-CAM needs (one per channel). ResNet-50
    ``layer4`` (2048 channels); the default input is 64 px to stay quick,
    ``BENCH_FULL=1`` uses 224 px. Peak memory is
    measured in a fresh process (CPU) above the memory in use before the call.
    Targets: time ratio <= 1, peak memory ratio <= 0.5.
    """

    group = "timing"
    layer, size = "layer4", 64 if QUICK else 224
    note = f"ResNet-50 random weights, {layer}, {size} px, 1 image"

    def setup(self) -> None:
        try:
            from pytorch_grad_cam import ScoreCAM
            from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
        except ImportError as err:
            raise NotImplementedError("pytorch-grad-cam not installed") from err
        self.device = default_device()
        self.model = resnet50(str(self.device))
        layer = getattr(self.model, self.layer)
        self.x = torch.randn(1, 3, self.size, self.size, device=self.device)
        batch = self.x.expand(16, -1, -1, -1).contiguous()
        channels = layer[-1].conv3.out_channels
        reference = ScoreCAM(self.model, [layer])
        reference.batch_size = 16
        ours = A.LayerScoreCam(self.model, layer)
        forward = no_grad_forward(self.model, batch)
        self.runs = {
            "captum_ssl": lambda: ours.attribute(
                self.x, target=1, perturbations_per_eval=16
            ),
            "pytorch_grad_cam": lambda: reference(
                self.x, targets=[ClassifierOutputTarget(1)]
            ),
            "forward_passes": lambda: [forward() for _ in range(channels // 16)],
        }
        self._times = None

    def _measure(self) -> dict:
        if self._times is None:
            # one timed run each is at the mercy of one slow call on a shared
            # machine; at 64 px the fastest of three is cheap
            self._times = best_times(self.runs, self.device, repeat=3 if QUICK else 1)
        return self._times

    def track_seconds_captum_ssl(self) -> float:
        return self._measure()["captum_ssl"]

    track_seconds_captum_ssl.unit = "s"

    def track_seconds_pytorch_grad_cam(self) -> float:
        return self._measure()["pytorch_grad_cam"]

    track_seconds_pytorch_grad_cam.unit = "s"

    def track_time_ratio(self) -> float:
        """captum_ssl / pytorch-grad-cam (target <= 1)."""
        t = self._measure()
        return t["captum_ssl"] / t["pytorch_grad_cam"]

    track_time_ratio.unit = "x pytorch-grad-cam"

    def track_over_forward_passes(self) -> float:
        """captum_ssl / the bare forward passes it needs."""
        t = self._measure()
        return t["captum_ssl"] / t["forward_passes"]

    track_over_forward_passes.unit = "x forward passes"

    def peakmem_captum_ssl(self) -> None:
        self.runs["captum_ssl"]()

    def peakmem_pytorch_grad_cam(self) -> None:
        self.runs["pytorch_grad_cam"]()


class CamDeletion:
    """Deletion AUC and cost of each CAM on the real EfficientNet-Lite0.

    Images: ``storage/imagenet_1000samples/`` when present (first
    ``BENCH_IMAGES``, default 16), else the bundled real photos; target = the
    label where known, else the model's prediction. Deletion: zero substrate
    (in normalised space), ``BENCH_STEP`` pixels per step (quick default 1792
    = 8 rows; the thesis used 224). Lower AUC is better.
    """

    group = "accuracy"
    params = [FAST_CAMS + ([] if QUICK else PERTURBATION_CAMS) + ["Random"]]
    param_names = ["method"]
    step = int(os.environ.get("BENCH_STEP", "1792" if QUICK else "224"))
    note = f"EfficientNet-Lite0 (real weights), deletion step {step} px"

    def setup(self, method: str) -> None:
        self.device = default_device()
        self.model, self.images, self.target, self.layer = effnet_data(str(self.device))
        if method == "Random":
            gen = torch.Generator().manual_seed(0)

            def explain(x, target):
                return torch.rand(x.shape[0], 1, 7, 7, generator=gen).to(x.device)

        else:
            cam = getattr(A, method)(self.model, self.layer)
            kw = {"perturbations_per_eval": 64} if method in PERTURBATION_CAMS else {}

            def explain(x, target):
                return cam.attribute(x, target=target, **kw)

        self.explain = explain
        self._result = None

    def _run(self) -> dict:
        if self._result is None:
            from captum_ssl.metrics import deletion_auc

            batches = list(zip(self.images.split(8), self.target.split(8)))
            maps = torch.cat([self.explain(x, t) for x, t in batches])
            seconds, fwd = best_times(
                [
                    lambda: [self.explain(x, t) for x, t in batches],
                    lambda: [no_grad_forward(self.model, x)() for x, _ in batches],
                ],
                self.device,
                repeat=1,
            )
            auc = deletion_auc(
                self.model, self.images, maps, self.target, step=self.step
            )
            n = len(self.images)
            self._result = {
                "auc": float(auc.mean()),
                "seconds": seconds / n,
                "passes": seconds / fwd,
                "n": n,
            }
        return self._result

    def track_deletion_auc(self, method: str) -> float:
        return self._run()["auc"]

    track_deletion_auc.unit = "AUC (lower is better)"

    def track_seconds_per_image(self, method: str) -> float:
        return self._run()["seconds"]

    track_seconds_per_image.unit = "s"

    def track_forward_passes(self, method: str) -> float:
        return self._run()["passes"]

    track_forward_passes.unit = "forward passes"

    def track_images(self, method: str) -> float:
        return self._run()["n"]


class AblationCamPrefixCache:
    """Ablation-CAM with prefix caching, relative to one forward pass.

    The network up to the layer runs once per image; each ablated channel
    re-runs only what follows the layer. ResNet-50 ``layer4`` (2048 channels;
    target: <= 3x one plain forward pass of the batch) and DeiT-S
    ``blocks[-2].norm1`` (384 channels; reported). pytorch-grad-cam's
    AblationCAM, which re-runs the whole network per channel, is timed in the
    same run on ResNet-50: on the first image with every channel in the quick
    setting; with ``BENCH_FULL=1`` on CPU on the first image with 1/16 of the
    channels (its ``ratio_channels_to_ablate``), the time scaled to all
    channels. Quick default: 64 px (DeiT-S 112 px), batch 2;
    ``BENCH_FULL=1``: 224 px, batch 8.
    """

    group = "timing"
    params = [["resnet50", "deit_small"]]
    param_names = ["model"]
    size, batch = (64, 2) if QUICK else (224, 8)
    note = (
        f"random weights, {size} px (DeiT-S {112 if QUICK else 224} px), batch {batch}"
    )

    def setup(self, model: str) -> None:
        self.device = default_device()
        dev = str(self.device)
        if model == "resnet50":
            self.model = resnet50(dev)
            layer, size = self.model.layer4, self.size
        else:
            import timm

            torch.manual_seed(0)
            size = 112 if QUICK else 224
            self.model = (
                timm.create_model(
                    "deit_small_patch16_224", pretrained=False, img_size=size
                )
                .eval()
                .to(dev)
            )
            layer = self.model.blocks[-2].norm1
        self.x = torch.randn(self.batch, 3, size, size, device=self.device)
        self.target = list(range(self.batch))
        cam = A.LayerAblationCam(self.model, layer)
        self.runs = {
            "captum_ssl": lambda: cam.attribute(
                self.x, target=self.target, perturbations_per_eval=64
            ),
            "forward": no_grad_forward(self.model, self.x),
        }
        self.reference = None
        if model == "resnet50":
            self._reference(layer)
        self._times = None

    def _reference(self, layer) -> None:
        try:
            from pytorch_grad_cam import AblationCAM
            from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
        except ImportError:
            return
        share = 1.0 if QUICK or self.device.type == "cuda" else 1 / 16
        targets = [ClassifierOutputTarget(self.target[0])]
        self.ref_scale = 1 / share

        def reference() -> None:
            # built per call: its hooks on the layer (which keep every
            # activation they see) must not be active while ours is timed
            with AblationCAM(
                self.model, [layer], batch_size=64, ratio_channels_to_ablate=share
            ) as ref:
                ref(input_tensor=self.x[:1], targets=targets)

        self.reference = reference

    def _measure(self) -> dict:
        if self._times is None:
            import contextlib
            import io

            t = best_times(self.runs, self.device, repeat=2)
            if self.reference is not None:
                with contextlib.redirect_stderr(io.StringIO()):  # its progress bar
                    (ref,) = best_times([self.reference], self.device, 1, False)
                t["pytorch_grad_cam_per_image"] = ref * self.ref_scale
            self._times = t
        return self._times

    def track_forward_ratio(self, model: str) -> float:
        """Ablation-CAM time / one plain forward pass (target <= 3 on ResNet-50)."""
        t = self._measure()
        return t["captum_ssl"] / t["forward"]

    track_forward_ratio.unit = "x forward"

    def track_seconds_per_image(self, model: str) -> float:
        return self._measure()["captum_ssl"] / self.batch

    track_seconds_per_image.unit = "s"

    def track_pytorch_grad_cam_seconds_per_image(self, model: str) -> Optional[float]:
        """pytorch-grad-cam's AblationCAM per image (ResNet-50 only)."""
        return self._measure().get("pytorch_grad_cam_per_image")

    track_pytorch_grad_cam_seconds_per_image.unit = "s"

    def track_speedup_over_pytorch_grad_cam(self, model: str) -> Optional[float]:
        t = self._measure()
        if "pytorch_grad_cam_per_image" not in t:
            return None
        return t["pytorch_grad_cam_per_image"] / (t["captum_ssl"] / self.batch)

    track_speedup_over_pytorch_grad_cam.unit = "x"
