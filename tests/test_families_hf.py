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

from families_models import assert_same as _assert_same  # noqa: E402
from families_models import snapshot as _snapshot  # noqa: E402

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


# ------------------------------------------------- the ViT methods on HF ViTs
def _methods():
    from captum_ssl import attr

    names = [
        "RawAttention",
        "AttentionRollout",
        "GradientAttentionRollout",
        "GenericAttention",
        "AttentionFlow",
        "LeGrad",
        "TransformerAttribution",
        "TransformerLRP",
        "PartialLRP",
        "AttnLRP",
    ]
    return {n: getattr(attr, n) for n in names}


METHODS = list(_methods())


def _configs():
    small = dict(SMALL, layer_norm_eps=1e-6)
    return {
        "dinov2_registers": lambda impl: transformers.Dinov2WithRegistersModel(
            transformers.Dinov2WithRegistersConfig(
                image_size=28,
                patch_size=14,
                num_register_tokens=2,
                use_swiglu_ffn=True,
                attn_implementation=impl,
                **small,
            )
        ),
        "deit_teacher": lambda impl: transformers.DeiTForImageClassificationWithTeacher(
            transformers.DeiTConfig(
                image_size=32,
                patch_size=8,
                num_labels=4,
                attn_implementation=impl,
                **small,
            )
        ),
        "clip_vision": lambda impl: transformers.CLIPVisionModel(
            transformers.CLIPVisionConfig(
                image_size=32,
                patch_size=8,
                hidden_act="quick_gelu",
                attn_implementation=impl,
                **{k: v for k, v in small.items() if "dropout" not in k},
            )
        ),
    }


def _build(name: str, impl: str = "eager") -> nn.Module:
    torch.manual_seed(0)
    return _configs()[name](impl).eval()


SIZES = {"dinov2_registers": 56, "deit_teacher": 32, "clip_vision": 32}
PREFIX = {"dinov2_registers": 3, "deit_teacher": 2, "clip_vision": 1}


def _explained(model: nn.Module, size: int) -> nn.Module:
    """Classifiers as they are; backbones behind EmbeddingSimilarity."""
    if "Classification" in type(model).__name__:
        return model
    refs = reference_embeddings(model, torch.randn(2, 3, size, size))
    return EmbeddingSimilarity(model, refs)


@pytest.mark.parametrize("name", list(SIZES))
def test_raw_attention_equals_probabilities_recomputed_from_q_and_k(name):
    from captum_ssl.attr import RawAttention

    model = _build(name)
    size, k = SIZES[name], PREFIX[name]
    x = torch.randn(2, 3, size, size)
    layers = [
        m for n, m in model.named_modules() if type(m).__name__.endswith("Attention")
    ]
    inputs = []
    handle = layers[-1].register_forward_pre_hook(
        lambda _m, args, kw: inputs.append(
            kw.get("hidden_states", args[0] if args else None)
        ),
        with_kwargs=True,
    )
    try:
        with torch.no_grad():
            model(x)
    finally:
        handle.remove()
    h = inputs[0]
    attn = layers[-1]
    heads = attn.config.num_attention_heads
    q = attn.q_proj(h).unflatten(-1, (heads, -1)).transpose(1, 2)
    kk = attn.k_proj(h).unflatten(-1, (heads, -1)).transpose(1, 2)
    probs = (q @ kk.transpose(-1, -2) * q.shape[-1] ** -0.5).softmax(-1)
    g = size // attn.config.patch_size
    want = probs.mean(1)[:, 0, k:].reshape(2, 1, g, g)
    got = RawAttention(_explained(model, size), layers=-1).attribute(x, target=0)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["dinov2_registers", "deit_teacher"])
def test_eager_and_sdpa_give_the_same_maps_and_the_model_is_left_as_it_was(name):
    size = SIZES[name]
    x = torch.randn(2, 3, size, size)
    eager, sdpa = _build(name, "eager"), _build(name, "sdpa")
    assert sdpa.config._attn_implementation == "sdpa"
    wrapped = {"eager": _explained(eager, size)}
    wrapped["sdpa"] = (
        EmbeddingSimilarity(sdpa, wrapped["eager"].references)
        if isinstance(wrapped["eager"], EmbeddingSimilarity)
        else sdpa
    )
    bare = {"eager": eager, "sdpa": sdpa}  # LRP: the model itself (a backbone:
    # target = an embedding dimension); a wrapper's own operations have no rule
    before = _snapshot(sdpa)
    methods = _methods()
    grid = size // sdpa.config.patch_size
    for mname, models in (
        ("RawAttention", wrapped),
        ("GenericAttention", wrapped),
        ("AttnLRP", bare),
        ("TransformerAttribution", bare),
    ):
        got = methods[mname](models["sdpa"]).attribute(x, target=[1, 0])
        want = methods[mname](models["eager"]).attribute(x, target=[1, 0])
        assert got.shape == (2, 1, grid, grid)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    _assert_same(before, _snapshot(sdpa))
    # also after an error inside the call (a target out of range)
    with pytest.raises(ValueError, match="out of range"):
        methods["AttnLRP"](sdpa).attribute(x, target=99)
    _assert_same(before, _snapshot(sdpa))


def test_every_method_on_a_dinov2_classifier_batched_per_sample_targets():
    """DINOv2's head reads class token and mean patch token; each sample's map
    equals its map explained alone."""
    torch.manual_seed(0)
    model = transformers.Dinov2ForImageClassification(
        transformers.Dinov2Config(image_size=28, patch_size=14, num_labels=4, **SMALL)
    ).eval()
    x = torch.randn(2, 3, 42, 42)  # 3 x 3 patches: position embeddings interpolated
    for name, method in _methods().items():
        both = method(model).attribute(x, target=[3, 1])
        one = method(model).attribute(x[1:], target=1)
        assert both.shape == (
            (2, 1, 42, 42) if name == "TransformerLRP" else (2, 1, 3, 3)
        )
        torch.testing.assert_close(both[1:], one, rtol=1e-4, atol=1e-7, msg=name)


def test_clip_classifier_refuses_the_class_row_methods_and_runs_attnlrp():
    torch.manual_seed(0)
    cfg = transformers.CLIPConfig(
        vision_config=dict(
            image_size=32,
            patch_size=8,
            **{k: v for k, v in SMALL.items() if "dropout" not in k},
        ),
        text_config=dict(
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
        ),
        num_labels=3,
    )
    model = transformers.CLIPForImageClassification(cfg).eval()
    from captum_ssl.attr import LeGrad, RawAttention, TransformerAttribution

    with pytest.raises(ValueError, match="never reads the class token.*LeGrad"):
        RawAttention(model).attribute(torch.randn(1, 3, 32, 32), target=0)
    with pytest.raises(ValueError, match="averages the patch tokens.*AttnLRP"):
        TransformerAttribution(model)
    assert LeGrad(model).attribute(torch.randn(1, 3, 32, 32), target=0).shape == (
        1,
        1,
        4,
        4,
    )
    # the mean of the patch tokens is a fixed linear map: AttnLRP passes it,
    # and its gradient form equals the explicit rules (the mean's z-rule)
    from test_lrp_forms import explicit

    from captum_ssl.attr import AttnLRP

    double, x = model.double(), torch.randn(2, 3, 32, 32, dtype=torch.float64)
    for at in ("patches", "pixels"):
        ours = AttnLRP(double).attribute(x, target=[0, 2], at=at, epsilon=1e-12)
        ref = explicit(double, x, [0, 2], False, at)
        assert ref.abs().amax() > 0
        torch.testing.assert_close(ours, ref, rtol=1e-8, atol=1e-8 * ref.abs().amax())


# ------------------------------------------------------------------ ViT-MAE
def vit_mae(mask_ratio: float = 0.0, dtype=torch.float64) -> nn.Module:
    """A small ViTMAEModel with sharp attention (perturbed weights)."""
    torch.manual_seed(0)
    mae = transformers.ViTMAEModel(
        transformers.ViTMAEConfig(
            image_size=32, patch_size=8, mask_ratio=mask_ratio, **SMALL
        )
    )
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in mae.named_parameters():
            p.add_(0.3 * torch.randn_like(p))
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(3.0)
    return mae.to(dtype).eval()


def mae_to_vit(mae: nn.Module) -> nn.Module:
    """ViTMAEModel -> ViTModel: the same keys (class token, position
    embeddings, patch convolution, layers, final norm); ViTModel adds the
    class token's position before the concatenation, MAE after the shuffle."""
    vit = transformers.ViTModel(
        transformers.ViTConfig(**mae.config.to_dict()), add_pooling_layer=False
    )
    state = mae.state_dict()
    assert set(state) == set(vit.state_dict()), set(state) ^ set(vit.state_dict())
    vit.load_state_dict(state)
    return vit.to(next(mae.parameters()).dtype).eval()


def _ordered(mae: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """MAE's own ``noise`` argument with increasing values: patches in order."""
    n = (x.shape[-1] // mae.config.patch_size) ** 2
    return torch.arange(n, dtype=x.dtype).expand(x.shape[0], n)


def test_vit_mae_raw_attention_equals_probabilities_recomputed_from_q_and_k():
    from captum_ssl.attr import RawAttention

    mae = vit_mae(dtype=torch.float32)
    x = torch.randn(2, 3, 32, 32)
    attn = mae.layers[-1].attention
    inputs = []
    handle = mae.layers[-1].layernorm_before.register_forward_hook(
        lambda _m, _a, out: inputs.append(out)
    )
    try:
        with torch.no_grad():
            mae(x, noise=_ordered(mae, x))
    finally:
        handle.remove()
    h = inputs[0]
    q = attn.q_proj(h).unflatten(-1, (2, -1)).transpose(1, 2)
    k = attn.k_proj(h).unflatten(-1, (2, -1)).transpose(1, 2)
    probs = (q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5).softmax(-1)
    want = probs.mean(1)[:, 0, 1:].reshape(2, 1, 4, 4)
    refs = reference_embeddings(mae, torch.randn(3, 3, 32, 32))
    got = RawAttention(EmbeddingSimilarity(mae, refs)).attribute(x, target=[2, 0])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_every_method_on_vit_mae_equals_the_same_weights_in_vit_model():
    """Batched, per-sample targets; every method explains the backbone in
    EmbeddingSimilarity (LeGrad also with a hand-written projection), LRP
    also the backbone itself (target = an embedding dimension); float64."""
    mae = vit_mae()
    vit = mae_to_vit(mae)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():  # same function (MAE: any patch order, all patches)
        torch.testing.assert_close(model_output(mae(x)), model_output(vit(x)))
    refs = reference_embeddings(vit, torch.randn(3, 3, 32, 32, dtype=x.dtype))
    before = _snapshot(mae)

    def legrad(model):
        project = lambda z: model.layernorm(z.mean(1)) @ refs.t()  # noqa: E731
        return _methods()["LeGrad"](
            EmbeddingSimilarity(model, refs), score_projection=project
        )

    def attention(name):
        return lambda m: _methods()[name](EmbeddingSimilarity(m, refs))

    cases = {n: (attention(n), [2, 0], {}) for n in METHODS[:5]}
    cases["LeGrad"] = (legrad, [1, 2], {})
    cases["LeGrad wrapped"] = (attention("LeGrad"), [1, 2], {})
    for name in ("TransformerAttribution", "TransformerLRP", "PartialLRP"):
        cases[name] = (_methods()[name], [5, 17], {})
        cases[f"{name} wrapped"] = (attention(name), [2, 0], {})
    cases["AttnLRP wrapped"] = (attention("AttnLRP"), [1, 2], {})
    cases["AttnLRP"] = (_methods()["AttnLRP"], [5, 17], {})
    cases["AttnLRP pixels"] = (_methods()["AttnLRP"], [3, 30], {"at": "pixels"})
    cases["CP-LRP"] = (_methods()["AttnLRP"], [3, 30], {"cp": True})
    for name, (make, target, kw) in cases.items():
        got = make(mae).attribute(x, target=target, **kw)
        want = make(vit).attribute(x, target=target, **kw)
        assert got.shape[:2] == (2, 1) and want.abs().max() > 0, name
        torch.testing.assert_close(
            got, want, rtol=1e-6, atol=1e-6 * want.abs().max(), msg=name
        )
    _assert_same(before, _snapshot(mae))
    with pytest.raises(ValueError, match="out of range"):
        _methods()["AttnLRP"](mae).attribute(x, target=99)
    _assert_same(before, _snapshot(mae))
    # another input size: interpolated position embeddings (both signatures:
    # pixel_values, noise / bool_masked_pos, interpolate_pos_encoding)
    big = torch.randn(2, 3, 48, 48, dtype=torch.float64)
    for make in (_methods()["GenericAttention"], _methods()["AttnLRP"]):
        got, want = (
            make(m).attribute(big, target=[5, 17], additional_forward_args=(None, True))
            for m in (mae, vit)
        )
        assert got.shape == (2, 1, 6, 6)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6 * want.abs().max())
    # the CAMs see the patches in order too
    refs32 = refs.float()
    mae32, vit32 = mae.float(), vit.float()
    got = LayerGradCam(
        EmbeddingSimilarity(mae32, refs32), mae32.layers[-1].layernorm_before
    ).attribute(x.float(), target=[1, 0])
    want = LayerGradCam(
        EmbeddingSimilarity(vit32, refs32), vit32.layers[-1].layernorm_before
    ).attribute(x.float(), target=[1, 0])
    torch.testing.assert_close(got, want)


def test_vit_mae_dropping_patches_is_refused_with_the_fix():
    from captum_ssl.attr import AttnLRP, RawAttention

    mae = vit_mae(mask_ratio=0.75, dtype=torch.float32)
    x = torch.randn(1, 3, 32, 32)
    fix = r"mask_ratio=0\.75.*model\.config\.mask_ratio = 0\.0"
    refs = torch.randn(2, 32)
    with pytest.raises(ValueError, match=fix):
        RawAttention(EmbeddingSimilarity(mae, refs)).attribute(x, target=0)
    with pytest.raises(ValueError, match=fix):
        AttnLRP(mae)
    mae.config.mask_ratio = 0.0  # the fix
    assert RawAttention(EmbeddingSimilarity(mae, refs)).attribute(
        x, target=0
    ).shape == (1, 1, 4, 4)
    # the pre-training model reconstructs pixels: its encoder `.vit` is explained
    decoder = dict(
        decoder_hidden_size=16,
        decoder_num_hidden_layers=1,
        decoder_num_attention_heads=2,
        decoder_intermediate_size=32,
    )
    pre = transformers.ViTMAEForPreTraining(
        transformers.ViTMAEConfig(
            image_size=32, patch_size=8, mask_ratio=0.0, **SMALL, **decoder
        )
    ).eval()
    with pytest.raises(ValueError, match=r"reconstruction.*`model\.vit`"):
        RawAttention(pre).attribute(x, target=0)
    maps = RawAttention(EmbeddingSimilarity(pre.vit, refs)).attribute(x, target=1)
    assert maps.shape == (1, 1, 4, 4)


def test_messages_name_layers_that_exist_in_the_hf_model():
    clf = vit_classifier()
    x = torch.randn(1, 3, 32, 32)
    with pytest.raises(ValueError, match=r"model\.vit\.layers\[-1\]\.layernorm_before"):
        LayerGradCam(clf, "vit.layers.1").attribute(x, target=0)
    hint = r"model\.backbone\.encoder\.layer\[-1\]\.norm1"
    backbone = dinov2()
    wrapped = EmbeddingSimilarity(backbone, torch.randn(1, 32))
    never_runs = transformers.Dinov2Model(backbone.config).encoder.layer[0].norm1
    with pytest.raises(ValueError, match=hint):
        LayerGradCam(wrapped, never_runs).attribute(torch.randn(1, 3, 56, 56), target=0)
    # a (B, classes) layer is Captum's (B, 1) map (issue 19), not an error
    assert LayerGradCam(clf, clf.classifier).attribute(x, target=0).shape[1:] == (1,)
    # each hint is a real layer of the model
    assert clf.vit.layers[-1].layernorm_before is not None
    assert wrapped.backbone.encoder.layer[-1].norm1 is not None


def test_quantus_metric_on_an_hf_classifier_equals_its_logits():
    pytest.importorskip("quantus")
    from captum_ssl.metrics import quantus_faithfulness

    clf = vit_classifier()
    logits = Field(clf, lambda o: o.logits)
    x, maps = torch.randn(2, 3, 32, 32), torch.rand(2, 1, 4, 4)
    kw = dict(metrics=["PixelFlipping"], steps=4)
    got = quantus_faithfulness(clf, x, maps, [0, 3], **kw)["PixelFlipping"]
    want = quantus_faithfulness(logits, x, maps, [0, 3], **kw)["PixelFlipping"]
    torch.testing.assert_close(got, want)
