"""Attention-method suites: cost relative to a forward (or forward + backward)
pass on DeiT-S, and attention-flow seconds per image.

All models have random weights (timing only; no faithfulness is measured
here, random-weight maps would be meaningless). ``BENCH_ATTN_BATCH`` changes
the batch (default 8, the size of the issue's targets).
"""

from __future__ import annotations

import os
from functools import cache

import torch

import captum_ssl.attr._attention as AT
from benchmarks._families import EVA_BEIT, FAMILIES, FamilySuite
from benchmarks._measure import best_times, default_device
from captum_ssl._outputs import model_output

MODEL = "deit_small_patch16_224"
BATCH = int(os.environ.get("BENCH_ATTN_BATCH", "8"))
CLASS_AGNOSTIC = ["RawAttention", "AttentionRollout"]
GRADIENT = ["GradientAttentionRollout", "GenericAttention"]


@cache
def deit_small(device: str, sharpen: float = 1.0) -> torch.nn.Module:
    """DeiT-S/16 with random weights; ``sharpen`` scales the query/key weights
    so attention is peaked like a trained model's instead of near uniform."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model(MODEL, pretrained=False).eval().to(device)
    if sharpen != 1.0:
        with torch.no_grad():
            for blk in model.blocks:
                blk.attn.qkv.weight[: 2 * blk.attn.attn_dim].mul_(sharpen)
    return model


def _forward_backward(
    model: torch.nn.Module, x: torch.Tensor, target: list, parameters: bool = False
):
    """One forward pass and one backward pass to the input; with
    ``parameters`` also to every parameter, as in training (``loss.backward()``,
    the usual meaning of "a backward pass")."""

    def run() -> None:
        xx = x.detach().requires_grad_()
        logits = model_output(model(xx))  # Hugging Face: the logits
        out = logits[torch.arange(len(target)), torch.tensor(target)]
        params = [p for p in model.parameters() if p.requires_grad and parameters]
        torch.autograd.grad(out.sum(), [xx, *params])

    return run


REPEAT = int(os.environ.get("BENCH_ATTN_REPEAT", "3"))


class _Unfused:
    """The model's attention modules on timm's explicit-softmax path."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.mods = [b.attn for b in model.blocks]

    def __enter__(self) -> None:
        self.saved = [m.fused_attn for m in self.mods]
        for m in self.mods:
            m.fused_attn = False

    def __exit__(self, *exc) -> None:
        for m, f in zip(self.mods, self.saved):
            m.fused_attn = f


class AttentionCost:
    """Time of each attention method relative to one pass of the same batch.

    DeiT-S/16 (random weights), 224 px, the model's default (fused) attention.
    RawAttention (last layer) and AttentionRollout (12 layers) are compared
    with one plain forward pass under ``torch.no_grad`` (target <= 1.1x); the
    gradient methods with one forward pass plus one backward pass to the input
    (target <= 1.2x). Method and baseline run in turns, fastest of
    ``BENCH_ATTN_REPEAT`` (3) each. ``track_unfused_baseline_ratio`` is the
    baseline itself on timm's unfused (explicit softmax) path, which every
    attention capture needs: the floor of ``track_ratio``.
    """

    group = "timing"
    params = [CLASS_AGNOSTIC + GRADIENT, [BATCH]]
    param_names = ["method", "batch"]
    note = "DeiT-S/16 random weights, 224 px (timing only)"
    timeout = 900

    def setup(self, method: str, batch: int) -> None:
        self.device = default_device()
        self.model = deit_small(str(self.device))
        x = torch.randn(batch, 3, 224, 224, device=self.device)
        target = [i % 1000 for i in range(batch)]
        explainer = getattr(AT, method)(self.model)
        if method in GRADIENT:
            run = lambda: explainer.attribute(x, target=target)  # noqa: E731
            base = _forward_backward(self.model, x, target)
        else:
            run = lambda: explainer.attribute(x)  # noqa: E731

            def base() -> None:
                with torch.no_grad():
                    self.model(x)

        def unfused() -> None:
            with _Unfused(self.model):
                base()

        self.fns = {"method": run, "baseline": base, "unfused": unfused}
        self.batch = batch
        self._times = None

    def _measure(self) -> dict:
        if self._times is None:
            self._times = best_times(self.fns, self.device, REPEAT)
        return self._times

    def track_ratio(self, method: str, batch: int) -> float:
        """Method time / baseline (forward for raw & rollout, forward + backward
        for the gradient methods)."""
        t = self._measure()
        return t["method"] / t["baseline"]

    track_ratio.unit = "x baseline"

    def track_seconds_per_image(self, method: str, batch: int) -> float:
        return self._measure()["method"] / batch

    track_seconds_per_image.unit = "s"

    def track_unfused_baseline_ratio(self, method: str, batch: int) -> float:
        """The baseline on the unfused path / the baseline (fused)."""
        t = self._measure()
        return t["unfused"] / t["baseline"]

    track_unfused_baseline_ratio.unit = "x baseline"


class FamilyAttentionCost(FamilySuite):
    """The attention methods on Hugging Face DINOv2-S/14 and torchvision
    ViT-B/16 (random weights, 224 px, batch 8), relative to the same baseline
    as :class:`AttentionCost`: RawAttention (last layer) and AttentionRollout
    against one forward pass under ``torch.no_grad`` (target <= 1.1x),
    GenericAttention against forward + backward (target <= 1.2x). Each
    model runs its default attention kernel (sdpa for both) in the baseline;
    the methods compute attention explicitly (the adapters' forwards).
    """

    params = [FAMILIES, CLASS_AGNOSTIC + ["GenericAttention"], [BATCH]]
    repeat = REPEAT

    def setup(self, model: str, method: str, batch: int) -> None:
        net, x, target = self.inputs(model, batch)
        explainer = getattr(AT, method)(net)
        if method in GRADIENT:
            run = lambda: explainer.attribute(x, target=target)  # noqa: E731
            base = _forward_backward(net, x, target)
        else:
            run = lambda: explainer.attribute(x)  # noqa: E731

            def base() -> None:
                with torch.no_grad():
                    net(x)

        self.fns = {"method": run, "baseline": base}


class EvaBeitAttentionCost(FamilyAttentionCost):
    """:class:`FamilyAttentionCost` on timm EVA02-S/14 (rotary position
    embedding, SwiGLU) and BEiT-B/16 (relative position bias), random weights,
    224 px, batch 8, class-token pooling; the baseline runs timm's fused
    attention."""

    params = [EVA_BEIT, CLASS_AGNOSTIC + ["GenericAttention"], [BATCH]]
    note = "timm EVA02-S/14, BEiT-B/16 (global_pool='token'), random weights, 224 px"


class AttentionFlowCost:
    """Attention flow on DeiT-S/16 (12 layers, 197 tokens): 196 max-flow
    problems per image on CPU (SciPy's Dinic solver).

    Random-init attention is nearly uniform; ``sharpened`` scales the query
    and key weights (x8) so attention is peaked as in a trained model (the
    solver's work depends on the attention; near-uniform was the slower case
    in our runs).
    """

    group = "timing"
    params = [["random-init", "sharpened"], [1]]
    param_names = ["attention", "images"]
    note = "DeiT-S/16 random weights, 224 px, seconds per image"
    timeout = 600

    def setup(self, attention: str, images: int) -> None:
        self.device = default_device()
        model = deit_small(str(self.device), 8.0 if attention == "sharpened" else 1.0)
        self.x = torch.randn(images, 3, 224, 224, device=self.device)
        self.flow = AT.AttentionFlow(model)
        self.images = images

    def track_seconds_per_image(self, attention: str, images: int) -> float:
        """Fastest of two attribute() calls / images (target < 5 s, 2 cores)."""
        run = lambda: self.flow.attribute(self.x)  # noqa: E731
        return best_times({"flow": run}, self.device, 2, warmup=False)["flow"] / images

    track_seconds_per_image.unit = "s"
