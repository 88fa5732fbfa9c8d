"""Hugging Face Vision Transformers, their ModelOutputs, and headless backbones
of torchvision and open_clip (issue 18, part B).

Every model is built from a small config with random weights (nothing is
downloaded). A Hugging Face model passed as it is must give the same maps and
metric values as the same model behind a wrapper that returns the tensor the
library documents it reads (``logits``; ``pooler_output``; the class token).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

from captum_ssl._outputs import model_output  # noqa: E402
from captum_ssl.attr import LayerGradCam, LayerScoreCam, TokenLayout  # noqa: E402
from captum_ssl.metrics import deletion_auc  # noqa: E402
from captum_ssl.models import (  # noqa: E402
    EmbeddingSimilarity,
    headless,
    reference_embeddings,
)

SMALL = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=64,
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
)


def vit_classifier(num_labels: int = 5) -> nn.Module:
    torch.manual_seed(0)
    cfg = transformers.ViTConfig(
        image_size=32, patch_size=8, num_labels=num_labels, **SMALL
    )
    return transformers.ViTForImageClassification(cfg).eval()


def dinov2(**kw) -> nn.Module:
    torch.manual_seed(0)
    cfg = transformers.Dinov2Config(image_size=56, patch_size=14, **SMALL, **kw)
    return transformers.Dinov2Model(cfg).eval()


class Field(nn.Module):
    """The model behind a forward that returns one tensor of its output."""

    def __init__(self, model: nn.Module, read) -> None:
        super().__init__()
        self.model, self.read = model, read
        self.training = model.training

    def forward(self, x):
        return self.read(self.model(x))


GRID4 = TokenLayout(fmt="NLC", grid=(4, 4), num_prefix_tokens=1)


# ------------------------------------------------------------- ModelOutputs
def test_model_output_reads_logits_pooler_or_class_token():
    x = torch.randn(2, 3, 32, 32)
    clf = vit_classifier()
    with torch.no_grad():
        out = clf(x)
        assert torch.equal(model_output(out), out.logits)
        base = transformers.ViTModel(clf.config, add_pooling_layer=False).eval()
        hidden = base(x)
        assert hidden.pooler_output is None
        assert torch.equal(model_output(hidden), hidden.last_hidden_state[:, 0])
        d = dinov2()
        out = d(torch.randn(2, 3, 56, 56))
        assert torch.equal(model_output(out), out.pooler_output)
    plain = torch.randn(2, 3)
    assert model_output(plain) is plain


def test_model_output_without_a_known_field_names_the_fields():
    out = transformers.modeling_outputs.BaseModelOutput(
        hidden_states=(torch.randn(1, 3, 4),)
    )
    with pytest.raises(ValueError, match=r"hidden_states.*lambda x: model\(x\)"):
        model_output(out)


def test_hf_classifier_as_it_is_equals_its_logits():
    """The issue's failure: Captum said "Target not provided when necessary"."""
    clf = vit_classifier()
    logits = Field(clf, lambda o: o.logits)
    layer = clf.vit.layers[-1].layernorm_before
    x = torch.randn(3, 3, 32, 32)
    target = [0, 4, 2]
    for method in (LayerGradCam, LayerScoreCam):
        got = method(clf, layer, layout=GRID4).attribute(x, target=target)
        want = method(logits, layer, layout=GRID4).attribute(x, target=target)
        assert got.shape == (3, 1, 4, 4)
        torch.testing.assert_close(got, want)
    maps = torch.rand(3, 1, 4, 4)
    got = deletion_auc(clf, x, maps, target, step=256)
    torch.testing.assert_close(got, deletion_auc(logits, x, maps, target, step=256))


def test_embedding_similarity_on_dinov2_reads_pooler_output():
    """The issue's failure: 'BaseModelOutputWithPooling' has no attribute 'dim'."""
    backbone = dinov2()
    x, other = torch.randn(2, 3, 56, 56), torch.randn(2, 3, 56, 56)
    refs = reference_embeddings(backbone, other)
    with torch.no_grad():
        pooled = backbone(other).pooler_output
    torch.testing.assert_close(refs, pooled)
    model = EmbeddingSimilarity(backbone, refs)
    wrapped = EmbeddingSimilarity(Field(backbone, lambda o: o.pooler_output), refs)
    layer = backbone.encoder.layer[-1].norm1
    got = LayerGradCam(model, layer, layout=GRID4).attribute(x, target=[0, 1])
    want = LayerGradCam(wrapped, layer, layout=GRID4).attribute(x, target=[0, 1])
    assert got.shape == (2, 1, 4, 4) and got.abs().sum() > 0
    torch.testing.assert_close(got, want)


# ------------------------------------------------------------------ headless
def test_headless_torchvision_vit_returns_the_normed_class_token():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    vit = torchvision.models.VisionTransformer(
        image_size=32,
        patch_size=8,
        num_layers=1,
        num_heads=2,
        hidden_dim=16,
        mlp_dim=32,
        num_classes=5,
    ).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens = vit.encoder(
            torch.cat([vit.class_token.expand(2, -1, -1), vit._process_input(x)], 1)
        )
        assert headless(vit) is vit
        emb = reference_embeddings(vit, x)
    assert isinstance(vit.heads, nn.Identity)
    torch.testing.assert_close(emb, tokens[:, 0])


def test_headless_open_clip_gives_the_image_tower():
    open_clip = pytest.importorskip("open_clip")
    torch.manual_seed(0)
    clip = open_clip.CLIP(
        embed_dim=16,
        vision_cfg=dict(image_size=32, layers=1, width=32, head_width=16, patch_size=8),
        text_cfg=dict(context_length=8, vocab_size=50, width=16, heads=2, layers=1),
    ).eval()
    x = torch.randn(2, 3, 32, 32)
    tower = headless(clip)
    assert tower is clip.visual and headless(tower) is tower
    with torch.no_grad():
        torch.testing.assert_close(reference_embeddings(tower, x), clip.encode_image(x))


def test_headless_hf_classifier_keeps_what_the_classifier_read():
    clf = vit_classifier()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        cls = clf.vit(x).last_hidden_state[:, 0]
        assert headless(clf) is clf
        torch.testing.assert_close(reference_embeddings(clf, x), cls)


def test_headless_refusal_names_the_layer_to_replace():
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 3))
    with pytest.raises(ValueError, match=r"`model\[3\] = torch.nn.Identity\(\)`"):
        headless(model)
