"""Model zoo suites: load cost, data throughput, and top-1 accuracy of every
model whose official files are in ``storage/pretrained_weights/``."""

from __future__ import annotations

import os
import time
import warnings

import torch

from benchmarks._measure import default_device, forward_time, median_time
from captum_ssl.data import ImageNetSamples, bundled_photos, image_batches
from captum_ssl.models import is_available, list_models, load

MODELS = list_models()


def _require(name: str) -> None:
    if not is_available(name):
        raise NotImplementedError(f"{name}: checkpoint files absent")


class ModelLoad:
    """Time to build a model and load its official file(s), relative to one
    forward pass of a 224 px image (both on the CPU, same process). Only models
    whose files are present run."""

    group = "timing"
    params = [MODELS]
    param_names = ["model"]
    note = "load from storage/pretrained_weights/ (weights-only unpickling)"

    def setup(self, model: str) -> None:
        _require(model)
        self.name = model
        self.device = torch.device("cpu")
        start = time.perf_counter()
        net = load(model)
        self.load_seconds = time.perf_counter() - start
        crop = net.zoo_entry.preprocessing.crop
        self.forward_seconds = forward_time(net, torch.randn(1, 3, crop, crop))

    def time_load(self, model: str) -> None:
        load(model)

    def track_load_over_forward(self, model: str) -> float:
        return self.load_seconds / self.forward_seconds

    track_load_over_forward.unit = "x forward"


class DataThroughput:
    """Images per second read, converted to RGB, resized, cropped and
    normalised (EfficientNet-Lite0 preprocessing), one batch of 32."""

    group = "timing"
    params = [["imagenet_folder", "bundled_photos"]]
    param_names = ["source"]
    note = "PIL decode + bicubic resize 256 + crop 224, batch of 32"

    def setup(self, source: str) -> None:
        self.device = torch.device("cpu")
        if source == "imagenet_folder":
            data = ImageNetSamples(model="efficientnet_lite0", n=32)
            if len(data) == 0:
                raise NotImplementedError("storage/imagenet_1000samples/ is empty")
            self.read = lambda: next(data.batches(batch_size=32))
            self.count = len(data)
        else:
            self.read = lambda: bundled_photos("efficientnet_lite0")
            self.count = len(self.read().names)
        self.seconds = median_time(self.read, self.device, repeat=3)

    def time_batch(self, source: str) -> None:
        self.read()

    def track_images_per_second(self, source: str) -> float:
        return self.count / self.seconds

    track_images_per_second.unit = "images/s"


class ZooAccuracy:
    """Top-1 accuracy of each present model with its own preprocessing.

    Images: ``storage/imagenet_1000samples/`` (first ``BENCH_IMAGES``, default
    16), else the labelled bundled photos (a prediction counts as correct when
    it is one of the photo's accepted classes). A sanity check that the
    official files, the layout conversion and the preprocessing fit together.
    """

    group = "accuracy"
    params = [MODELS]
    param_names = ["model"]
    note = "top-1 on the ImageNet sample photos (or the bundled photos)"

    def setup(self, model: str) -> None:
        _require(model)
        self.device = default_device()
        self.model = load(model).to(self.device)
        self.limit = int(os.environ.get("BENCH_IMAGES", "16"))
        self._acc = None

    def track_top1(self, model: str) -> float:
        if self._acc is None:
            correct = total = 0
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # fallback to the bundled photos
                for batch in image_batches(model=model, n=self.limit, batch_size=16):
                    with torch.no_grad():
                        pred = self.model(batch.images.to(self.device)).argmax(1)
                    for p, ok in zip(pred.tolist(), batch.accepted):
                        if ok:
                            correct += p in ok
                            total += 1
            self._acc = 100.0 * correct / max(total, 1)
        return self._acc

    track_top1.unit = "%"
