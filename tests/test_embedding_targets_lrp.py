"""LRP and LeGrad explain what ``EmbeddingSimilarity`` / ``EmbeddingNorm``
compute after a headless backbone of any family (the cosine similarity to a
reference, the norm), not one embedding dimension.

The rules (docs/lrp.md): ``e / |e|`` takes the identity rule (``|e|``
constant, as LayerNorm's standard deviation), the dot product with the
references is a linear layer; the norm is ``e . u`` with the unit vector ``u``
constant. So for one image the wrapper's relevance equals that of the same
backbone with a linear head of weight ``refs / |e|`` (or ``u``), and, AttnLRP
being linear in the output gradient, the weighted sum of the backbone's
per-dimension relevances.
"""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F
from families_models import images, jitter, open_clip_vit, torchvision_vit
from torch import nn

from captum_ssl.attr import (
    AttnLRP,
    LeGrad,
    PartialLRP,
    TransformerAttribution,
    TransformerLRP,
)
from captum_ssl.attr._core import AttributionInputError
from captum_ssl.models import EmbeddingNorm, EmbeddingSimilarity, reference_embeddings
from captum_ssl.models._targets import _flat

SMALL = dict(
    hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32
)


def _timm_headless(classes: int = 0) -> nn.Module:
    torch.manual_seed(0)
    return jitter(
        timm.create_model(
            "vit_tiny_patch16_224",
            img_size=32,
            patch_size=8,
            embed_dim=16,
            depth=2,
            num_heads=2,
            num_classes=classes,
        )
    )


def _hf(name: str) -> nn.Module:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    if name == "hf_dinov2":
        cfg = transformers.Dinov2Config(image_size=32, patch_size=8, **SMALL)
        return jitter(transformers.Dinov2Model(cfg))
    if name == "hf_vit":  # pooler: dense + tanh
        return jitter(
            transformers.ViTModel(
                transformers.ViTConfig(image_size=32, patch_size=8, **SMALL)
            )
        )
    cfg = transformers.CLIPVisionConfig(image_size=32, patch_size=8, **SMALL)
    return jitter(transformers.CLIPVisionModel(cfg))


def _torchvision() -> nn.Module:
    model = torchvision_vit()
    model.heads = nn.Identity()
    return model.eval()


BACKBONES = {
    "timm": _timm_headless,
    "hf_dinov2": lambda: _hf("hf_dinov2"),
    "hf_vit": lambda: _hf("hf_vit"),
    "hf_clip": lambda: _hf("hf_clip"),
    "torchvision": _torchvision,
    "open_clip": open_clip_vit,
}


def _wrapped(backbone: nn.Module, x: torch.Tensor, kind: str) -> nn.Module:
    if kind == "norm":
        return EmbeddingNorm(backbone)
    return EmbeddingSimilarity(backbone, reference_embeddings(backbone, x.flip(-1)))


def _weights(model: nn.Module, x: torch.Tensor, target: int) -> torch.Tensor:
    """The constant linear head the wrapper is for one image ``x``."""
    with torch.no_grad():
        e = _flat(model.backbone(x))[0]
    if isinstance(model, EmbeddingNorm):
        return e / e.norm()
    return model.references[target].to(e.dtype) / e.norm()


@pytest.mark.parametrize("kind", ["similarity", "norm"])
@pytest.mark.parametrize("name", list(BACKBONES))
def test_attnlrp_of_the_wrapper_is_the_weighted_sum_over_dimensions(name, kind):
    backbone = BACKBONES[name]().double()
    x = images(2, 32).double()
    model = _wrapped(backbone, x, kind)
    target = 1 if kind == "similarity" else 0
    ours = AttnLRP(model).attribute(x, target=[target] * 2)
    for b in range(2):
        w = _weights(model, x[b : b + 1], target)
        per_dim = torch.cat(
            [
                AttnLRP(backbone).attribute(x[b : b + 1], target=d)
                for d in range(w.numel())
            ]
        )
        ref = (w.reshape(-1, 1, 1, 1) * per_dim).sum(0, keepdim=True)
        torch.testing.assert_close(ours[b : b + 1], ref, rtol=1e-7, atol=1e-10)
    assert ours.abs().amax() > 0


@pytest.mark.parametrize("kind", ["similarity", "norm"])
@pytest.mark.parametrize(
    "cls", [AttnLRP, TransformerAttribution, PartialLRP, TransformerLRP]
)
def test_every_lrp_method_equals_the_backbone_with_that_linear_head(cls, kind):
    backbone = _timm_headless()
    model = _wrapped(backbone, images(2, 32), kind)  # two references
    x = images(2, 32)[:1]
    target = 1 if kind == "similarity" else 0
    clone = _timm_headless(classes=1)
    clone.load_state_dict(
        {
            **backbone.state_dict(),
            "head.weight": _weights(model, x, target)[None],
            "head.bias": torch.zeros(1),
        }
    )
    ours = cls(model).attribute(x, target=target)
    ref = cls(clone).attribute(x, target=0)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-7)


def test_legrad_scores_the_similarity_not_an_embedding_dimension():
    backbone = _timm_headless()
    x = images(2, 32)
    model = _wrapped(backbone, x, "similarity")
    refs = model.references

    def by_hand(z: torch.Tensor) -> torch.Tensor:  # timm: norm, token mean, no head
        return F.normalize(backbone.norm(z.mean(dim=1)), dim=1) @ refs.T

    ours = LeGrad(model).attribute(x, target=[1, 0])
    ref = LeGrad(backbone, score_projection=by_hand).attribute(x, target=[1, 0])
    torch.testing.assert_close(ours, ref)
    dim = LeGrad(backbone).attribute(x, target=[1, 0])  # embedding dims 1 and 0
    assert not torch.allclose(ours, dim)


def test_wrapped_backbone_inside_another_module_is_refused_for_lrp():
    backbone = nn.Sequential(_timm_headless())
    x = images(1, 32)
    model = _wrapped(backbone, x, "norm")
    with pytest.raises(AttributionInputError, match="Pass the model itself"):
        AttnLRP(model).attribute(x, target=0)


@pytest.mark.parametrize("name", list(BACKBONES))
def test_legrad_on_the_wrapper_runs_on_every_family(name):
    """The backbone's embedding of intermediate tokens, scored by the
    wrapper: finite maps that differ between references."""
    backbone = BACKBONES[name]()
    x = images(2, 32)
    model = _wrapped(backbone, x, "similarity")
    maps = LeGrad(model).attribute(x, target=[0, 1])
    assert maps.shape == (2, 1, 4, 4) and torch.isfinite(maps).all()
    other = LeGrad(model).attribute(x, target=[1, 0])
    assert not torch.allclose(maps, other)
