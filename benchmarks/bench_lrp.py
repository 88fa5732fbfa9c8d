"""LRP suites: cost of each relevance-propagation method relative to one
forward + backward pass on DeiT-S.

Random weights (timing only). ``BENCH_LRP_BATCH`` changes the batch (default
8, the size of the issue's targets).
"""

from __future__ import annotations

import os

import torch

import captum_ssl.attr._lrp as L
from benchmarks._families import EVA_BEIT, FAMILIES, FamilySuite
from benchmarks._measure import best_times, default_device
from benchmarks.bench_attention import _forward_backward, deit_small

BATCH = int(os.environ.get("BENCH_LRP_BATCH", "8"))
REPEAT = int(os.environ.get("BENCH_LRP_REPEAT", "3"))
#: (method class, attribute() options) per suite parameter
METHODS = {
    "TransformerAttribution": ("TransformerAttribution", {}),
    "AttnLRP": ("AttnLRP", {}),
    "AttnLRP-CP": ("AttnLRP", {"cp": True}),
    "AttnLRP-pixels": ("AttnLRP", {"at": "pixels"}),
    "PartialLRP": ("PartialLRP", {}),
    "TransformerLRP": ("TransformerLRP", {}),
}


class LRPCost:
    """Time of each LRP method relative to one pass of the same batch.

    DeiT-S/16 (random weights), 224 px, batch 8, eight different targets.
    The baseline is one forward pass plus one backward pass to the input (the
    model's default fused attention). Target: <= 1.5x for AttnLRP, <= 2.0x
    for TransformerAttribution. ``track_ratio_training_step`` is the same
    method against a training step's forward + backward (input and parameter
    gradients: three matrix products per linear layer instead of two). Method
    and baselines run in turns, fastest of ``BENCH_LRP_REPEAT`` (3) each.
    """

    group = "timing"
    params = [list(METHODS), [BATCH]]
    param_names = ["method", "batch"]
    note = "DeiT-S/16 random weights, 224 px (timing only)"
    timeout = 900

    def setup(self, method: str, batch: int) -> None:
        self.device = default_device()
        model = deit_small(str(self.device))
        x = torch.randn(batch, 3, 224, 224, device=self.device)
        target = [i % 1000 for i in range(batch)]
        name, kw = METHODS[method]
        explainer = getattr(L, name)(model)
        self.fns = {
            "method": lambda: explainer.attribute(x, target=target, **kw),
            "baseline": _forward_backward(model, x, target),
            "training": _forward_backward(model, x, target, parameters=True),
        }
        self._times = None

    def _measure(self) -> dict:
        if self._times is None:
            self._times = best_times(self.fns, self.device, REPEAT)
        return self._times

    def track_ratio(self, method: str, batch: int) -> float:
        """Method time / (forward + backward) time."""
        t = self._measure()
        return t["method"] / t["baseline"]

    track_ratio.unit = "x baseline"

    def track_ratio_training_step(self, method: str, batch: int) -> float:
        """Method time / (forward + backward with parameter gradients) time."""
        t = self._measure()
        return t["method"] / t["training"]

    track_ratio_training_step.unit = "x training step"

    def track_seconds_per_image(self, method: str, batch: int) -> float:
        return self._measure()["method"] / batch

    track_seconds_per_image.unit = "s"


class FamilyLRPCost(FamilySuite):
    """AttnLRP (at the patch tokens) on Hugging Face DINOv2-S/14 and
    torchvision ViT-B/16 (random weights, 224 px, batch 8, eight targets)
    relative to one forward + backward pass of the model with its default
    (sdpa) attention. Target: <= 1.5x."""

    params = [FAMILIES, ["AttnLRP"], [BATCH]]
    repeat = REPEAT

    def setup(self, model: str, method: str, batch: int) -> None:
        net, x, target = self.inputs(model, batch)
        name, kw = METHODS[method]
        explainer = getattr(L, name)(net)
        self.fns = {
            "method": lambda: explainer.attribute(x, target=target, **kw),
            "baseline": _forward_backward(net, x, target),
        }


class EvaBeitLRPCost(FamilyLRPCost):
    """:class:`FamilyLRPCost` on timm EVA02-S/14 (the rotary embedding is a
    fixed linear map of q and k: the z-rule of a linear map) and BEiT-B/16
    (relative position bias: the constant add rule), random weights, 224 px,
    batch 8, class-token pooling; the baseline runs timm's fused attention."""

    params = [EVA_BEIT, ["AttnLRP"], [BATCH]]
    note = "timm EVA02-S/14, BEiT-B/16 (global_pool='token'), random weights, 224 px"
