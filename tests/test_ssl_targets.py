"""Self-supervised targets on headless ViTs and CNNs (issue 15.3).

``EmbeddingSimilarity`` wraps the backbone; the token layout must still come
from the wrapped ViT, and an image explained against its own embedding
(zero gradient at the maximum of cosine similarity) must warn.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torchvision
from conftest import make_tiny_vit

import captum_ssl.attr as A
from captum_ssl.models import EmbeddingSimilarity, reference_embeddings


@pytest.fixture
def headless_vit():
    return make_tiny_vit(num_classes=0)


def _views(seed: int) -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def test_embedding_similarity_keeps_the_vit_patch_grid(headless_vit):
    x, other = _views(0), _views(1)
    model = EmbeddingSimilarity(headless_vit, reference_embeddings(headless_vit, other))
    layer = headless_vit.blocks[-1].norm1
    got = A.LayerGradCam(model, layer).attribute(x, target=[0, 1])
    assert got.shape == (2, 1, 4, 4)
    layout = A.TokenLayout(grid=(4, 4), num_prefix_tokens=1)
    want = A.LayerGradCam(model, layer, layout=layout).attribute(x, target=[0, 1])
    torch.testing.assert_close(got, want)
    assert got.abs().max() > 0
    # attention methods look through the wrapper too
    rel = A.GenericAttention(model).attribute(x, target=[1, 0])
    assert rel.shape == (2, 1, 4, 4)
    # and so does a wrapper of the wrapper
    seq = torch.nn.Sequential(torch.nn.Identity(), model).eval()
    torch.testing.assert_close(
        A.LayerGradCam(seq, layer).attribute(x, target=[0, 1]), got
    )


def test_own_embedding_warns_and_another_view_does_not(headless_vit):
    x = _views(2)
    layer = headless_vit.blocks[-1].norm1
    own = EmbeddingSimilarity(headless_vit, reference_embeddings(headless_vit, x))
    with pytest.warns(UserWarning, match="its own embedding"):
        maps = A.LayerGradCam(own, layer).attribute(x[:1], target=0)
    other = A.LayerGradCam(
        EmbeddingSimilarity(
            headless_vit, reference_embeddings(headless_vit, _views(3))
        ),
        layer,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        real = other.attribute(x[:1], target=0)
    # the warning is right: the own-embedding map is rounding noise
    assert maps.abs().max() < 1e-3 * real.abs().max()


def test_headless_resnet_similarity_map():
    torch.manual_seed(0)
    resnet = torchvision.models.resnet18().eval()
    resnet.fc = torch.nn.Identity()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    refs = reference_embeddings(resnet, torch.flip(x, dims=[3]))  # mirrored views
    model = EmbeddingSimilarity(resnet, refs).eval()  # the new fc is in train mode
    maps = A.LayerGradCam(model, resnet.layer4).attribute(x, target=[0, 1])
    assert maps.shape == (2, 1, 2, 2) and maps.abs().max() > 0
