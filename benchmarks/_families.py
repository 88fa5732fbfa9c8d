"""The other ViT implementations of the timing suites (issue 18): Hugging
Face DINOv2-S/14, torchvision ViT-B/16, timm EVA02-S/14 and BEiT-B/16, random
weights, 224 px."""

from __future__ import annotations

from functools import cache
from typing import List, Tuple

import torch

from benchmarks._measure import RatioSuite, default_device

#: other implementations timed like DeiT-S (issue 18): Hugging Face DINOv2-S/14
#: (its default sdpa attention) and torchvision's ViT-B/16, random weights
FAMILIES = ["hf-dinov2-s14", "torchvision-vit-b16"]
#: timm's EVA02-S/14 (rotary position embedding, SwiGLU) and BEiT-B/16
#: (relative position bias), timed in suites of their own (``--filter EvaBeit``)
#: so that the suites above keep their run time
EVA_BEIT = ["timm-eva02-s14", "timm-beit-b16"]
#: timm model names; ``global_pool="token"``: their default average pooling
#: never reads the class token, and the class-token methods refuse it
TIMM = {
    "timm-eva02-s14": "eva02_small_patch14_224",
    "timm-beit-b16": "beit_base_patch16_224",
}


@cache
def family_model(name: str, device: str) -> torch.nn.Module:
    """A 1000-class ViT of another implementation, random weights, 224 px."""
    torch.manual_seed(0)
    if name == "hf-dinov2-s14":
        from transformers import Dinov2Config, Dinov2ForImageClassification

        config = Dinov2Config(
            hidden_size=384,
            num_hidden_layers=12,
            num_attention_heads=6,
            patch_size=14,
            image_size=224,
            num_labels=1000,
        )
        model = Dinov2ForImageClassification(config)
    elif name in TIMM:
        import timm

        model = timm.create_model(
            TIMM[name], pretrained=False, num_classes=1000, global_pool="token"
        )
    else:
        import torchvision

        model = torchvision.models.vit_b_16()
    return model.eval().to(device)


class FamilySuite(RatioSuite):
    """A method on each of :data:`FAMILIES` against a baseline (``setup``
    sets ``self.fns``; :meth:`inputs` gives the model, a batch and targets)."""

    group = "timing"
    param_names = ["model", "method", "batch"]
    note = "HF DINOv2-S/14, torchvision ViT-B/16, random weights, 224 px"
    timeout = 900

    def inputs(
        self, model: str, batch: int
    ) -> Tuple[torch.nn.Module, torch.Tensor, List[int]]:
        self.device = default_device()
        net = family_model(model, str(self.device))
        x = torch.randn(batch, 3, 224, 224, device=self.device)
        return net, x, [i % 1000 for i in range(batch)]
