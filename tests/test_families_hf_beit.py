"""Hugging Face BEiT (``BeitModel`` / ``BeitForImageClassification``): its
attention with the relative position bias, layer scale, mean or class-token
pooling, compared with equations written here and with timm's ``Beit`` given
the same weights (the two share the design; :func:`hf_to_timm` converts).

Every model is built from a tiny config with random weights (nothing is
downloaded).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")
timm = pytest.importorskip("timm")

from families_models import assert_same, snapshot  # noqa: E402

from captum_ssl import attr  # noqa: E402
from captum_ssl.attr import AttributionInputError  # noqa: E402

TINY = dict(
    hidden_size=16,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=32,
    image_size=32,
    patch_size=8,
    num_labels=5,
    layer_norm_eps=1e-6,
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
    layer_scale_init_value=0.1,
)


def hf_beit(
    mean: bool = True, shared: bool = False, impl: str = "eager", absolute=False
) -> nn.Module:
    """A float64 BEiT classifier whose parameters are all random (the HF init
    zeros the bias tables, class token and positions)."""
    torch.manual_seed(0)
    cfg = transformers.BeitConfig(
        use_mean_pooling=mean,
        use_relative_position_bias=not shared,
        use_shared_relative_position_bias=shared,
        use_absolute_position_embeddings=absolute,
        attn_implementation=impl,
        **TINY,
    )
    model = transformers.BeitForImageClassification(cfg).eval().double()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return model


def hf_to_timm(hf: nn.Module) -> nn.Module:
    """timm's ``Beit`` with ``hf``'s weights (names mapped one to one; the
    query / key / value projections concatenated into ``qkv``)."""
    cfg = hf.config
    mean = cfg.use_mean_pooling
    model = timm.models.beit.Beit(
        img_size=cfg.image_size,
        patch_size=cfg.patch_size,
        num_classes=cfg.num_labels,
        embed_dim=cfg.hidden_size,
        depth=cfg.num_hidden_layers,
        num_heads=cfg.num_attention_heads,
        mlp_ratio=cfg.intermediate_size / cfg.hidden_size,
        qkv_bias=True,
        use_abs_pos_emb=cfg.use_absolute_position_embeddings,
        use_rel_pos_bias=cfg.use_relative_position_bias,
        use_shared_rel_pos_bias=cfg.use_shared_relative_position_bias,
        init_values=cfg.layer_scale_init_value,
        global_pool="avg" if mean else "token",
        use_fc_norm=mean,
    ).double()  # before loading: float64 weights stay unrounded
    src = hf.state_dict()
    state = {
        "cls_token": src["beit.embeddings.cls_token"],
        "patch_embed.proj.weight": src[
            "beit.embeddings.patch_embeddings.projection.weight"
        ],
        "patch_embed.proj.bias": src[
            "beit.embeddings.patch_embeddings.projection.bias"
        ],
        "head.weight": src["classifier.weight"],
        "head.bias": src["classifier.bias"],
    }
    if cfg.use_absolute_position_embeddings:
        state["pos_embed"] = src["beit.embeddings.position_embeddings"]
    if cfg.use_shared_relative_position_bias:
        state["rel_pos_bias.relative_position_bias_table"] = src[
            "beit.shared_position_bias.relative_position_bias_table"
        ]
    final = "fc_norm" if mean else "norm"
    pooled = "beit.pooler.layernorm" if mean else "beit.layernorm"
    for p in ("weight", "bias"):
        state[f"{final}.{p}"] = src[f"{pooled}.{p}"]
    for i in range(cfg.num_hidden_layers):
        h, t = f"beit.layers.{i}.", f"blocks.{i}."
        a = h + "attention."
        state[t + "attn.qkv.weight"] = torch.cat(
            [src[a + f"{n}_proj.weight"] for n in "qkv"]
        )
        state[t + "attn.q_bias"] = src[a + "q_proj.bias"]
        state[t + "attn.v_bias"] = src[a + "v_proj.bias"]
        state[t + "attn.proj.weight"] = src[a + "o_proj.weight"]
        state[t + "attn.proj.bias"] = src[a + "o_proj.bias"]
        if cfg.use_relative_position_bias:
            state[t + "attn.relative_position_bias_table"] = src[
                h + "relative_position_bias.relative_position_bias_table"
            ]
        for hn, tn in (
            ("layernorm_before", "norm1"),
            ("layernorm_after", "norm2"),
            ("mlp.fc1", "mlp.fc1"),
            ("mlp.fc2", "mlp.fc2"),
        ):
            for p in ("weight", "bias"):
                state[f"{t}{tn}.{p}"] = src[f"{h}{hn}.{p}"]
        state[t + "gamma_1"] = src[h + "lambda_1"]
        state[t + "gamma_2"] = src[h + "lambda_2"]
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected
    assert all("relative_position_index" in k or "k_bias" in k for k in missing)
    return model.eval()


def relative_bias(table: torch.Tensor, wh: int, ww: int) -> torch.Tensor:
    """BEiT's relative position bias (heads, N, N) for a ``wh x ww`` grid
    and a class token: ``table[index]``, the index of the HF code
    (``BeitRelativePositionBias.generate_relative_position_index``)."""
    num = (2 * wh - 1) * (2 * ww - 1) + 3
    ys, xs = torch.meshgrid(torch.arange(wh), torch.arange(ww), indexing="ij")
    ys, xs = ys.flatten(), xs.flatten()
    dy = ys[:, None] - ys[None, :] + wh - 1
    dx = xs[:, None] - xs[None, :] + ww - 1
    n = wh * ww + 1
    index = torch.zeros(n, n, dtype=torch.long)
    index[1:, 1:] = dy * (2 * ww - 1) + dx
    index[0, :] = num - 3  # class token to patches
    index[:, 0] = num - 2  # patches to class token
    index[0, 0] = num - 1
    return table[index].permute(2, 0, 1)


def images(b: int = 2, size: int = 32) -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(b, 3, size, size, dtype=torch.float64)


def class_row_of_last_layer(model: nn.Module, x, bias, **forward_kw):
    """The class token's row of the last layer's attention, head mean, as
    ``(B, 1, g, g)``: ``softmax(q k^T / sqrt(d) + bias)`` from the layer's own
    query and key projections of the input it received."""
    layer = model.beit.layers[-1]
    inputs = []
    handle = layer.attention.register_forward_pre_hook(
        lambda _m, args, kw: inputs.append(kw.get("hidden_states", args[0])),
        with_kwargs=True,
    )
    try:
        with torch.no_grad():
            model(x, **forward_kw)
    finally:
        handle.remove()
    h, attn = inputs[0], layer.attention
    q = attn.q_proj(h).unflatten(-1, (2, -1)).transpose(1, 2)
    k = attn.k_proj(h).unflatten(-1, (2, -1)).transpose(1, 2)
    probs = (q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5 + bias).softmax(-1)
    g = int(round((h.shape[1] - 1) ** 0.5))
    return probs.mean(1)[:, 0, 1:].reshape(x.shape[0], 1, g, g)


@pytest.mark.parametrize("shared", [False, True], ids=["per_layer", "shared"])
def test_raw_attention_equals_softmax_with_the_relative_position_bias(shared):
    model = hf_beit(mean=False, shared=shared, absolute=True)
    x = images()
    layer = model.beit.layers[-1]
    rel = model.beit.shared_position_bias if shared else layer.relative_position_bias
    bias = relative_bias(rel.relative_position_bias_table, 4, 4)
    want = class_row_of_last_layer(model, x, bias)
    got = attr.RawAttention(model, layers=-1).attribute(x, target=0)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


def _runs(mean: bool):
    """(name, build method, attribute kwargs) of every method that applies."""
    runs = [
        ("LeGrad", attr.LeGrad, {}),
        ("AttnLRP", attr.AttnLRP, {}),
        ("AttnLRP_pixels", attr.AttnLRP, {"at": "pixels"}),
        ("CP-LRP", attr.AttnLRP, {"cp": True}),
        ("CP-LRP_pixels", attr.AttnLRP, {"cp": True, "at": "pixels"}),
        ("TransformerLRP", attr.TransformerLRP, {}),
    ]
    rows = [
        ("RawAttention", attr.RawAttention),
        ("AttentionRollout", attr.AttentionRollout),
        ("GradientAttentionRollout", attr.GradientAttentionRollout),
        ("GenericAttention", attr.GenericAttention),
    ]
    if mean:  # a token's row read on purpose
        runs += [(n, m, {"query": 3}) for n, m in rows if n == "RawAttention"]
    else:
        runs += [(n, m, {}) for n, m in rows]
        runs += [
            ("TransformerAttribution", attr.TransformerAttribution, {}),
            ("PartialLRP", attr.PartialLRP, {}),
        ]
    return runs


@pytest.mark.parametrize(
    "mean, shared",
    [(True, False), (False, True)],
    ids=["mean_pooled_per_layer_bias", "class_token_shared_bias"],
)
def test_every_method_equals_timm_beit_with_the_same_weights(mean, shared):
    """Batched with per-sample targets: equal to timm's ``Beit`` given the
    same weights, and each sample equal to its batch-1 call."""
    model = hf_beit(mean=mean, shared=shared, absolute=not mean)
    twin = hf_to_timm(model)
    x = images()
    with torch.no_grad():  # HF's eager softmax runs in float32
        torch.testing.assert_close(model(x).logits, twin(x), rtol=1e-6, atol=1e-7)
    for name, method, kw in _runs(mean):
        got = method(model).attribute(x, target=[3, 1], **kw)
        want = method(twin).attribute(x, target=[3, 1], **kw)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-12, msg=name)
        one = method(model).attribute(x[1:], target=1, **kw)
        torch.testing.assert_close(got[1:], one, rtol=1e-6, atol=1e-12, msg=name)
        assert got.abs().amax() > 0, name


def test_mean_pooling_refuses_the_class_rows_naming_attnlrp():
    model = hf_beit(mean=True)
    x = images()
    for cls in (attr.TransformerAttribution, attr.PartialLRP):
        with pytest.raises(
            AttributionInputError, match="averages the patch tokens.*AttnLRP"
        ):
            cls(model)
    with pytest.raises(AttributionInputError, match="never reads the class.*LeGrad"):
        attr.RawAttention(model).attribute(x, target=0)


def test_eager_and_sdpa_give_the_same_maps_and_the_model_is_left_as_it_was():
    eager, sdpa = hf_beit(mean=False), hf_beit(mean=False, impl="sdpa")
    assert sdpa.config._attn_implementation == "sdpa"
    x = images()
    before = snapshot(sdpa)
    for method in (attr.RawAttention, attr.AttnLRP, attr.TransformerAttribution):
        got = method(sdpa).attribute(x, target=[1, 0])
        want = method(eager).attribute(x, target=[1, 0])
        # RawAttention reads the last layer: the eager layers before it round
        # their softmax to float32 (HF's eager kernel), the sdpa ones do not
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-8)
    assert_same(before, snapshot(sdpa))
    with pytest.raises(ValueError, match="out of range"):
        attr.AttnLRP(sdpa).attribute(x, target=99)
    assert_same(before, snapshot(sdpa))


def test_backbone_explains_its_pooled_embedding_as_timm_headless():
    """A bare ``BeitModel`` (read by its ``pooler_output``: the normed patch
    mean) equals timm's ``Beit`` with ``num_classes=0`` and the same weights;
    target = an embedding dimension."""
    model = hf_beit(mean=True)
    twin = hf_to_timm(model)
    twin.reset_classifier(0)
    x = images()
    for method in (attr.AttnLRP, attr.TransformerLRP, attr.LeGrad):
        got = method(model.beit).attribute(x, target=[0, 5])
        want = method(twin).attribute(x, target=[0, 5])
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-12)


def test_another_input_size_with_interpolate_pos_encoding():
    """At 40 px (5 x 5 patches; ``interpolate_pos_encoding=True``: the
    absolute and relative position tables are resampled in the forward pass)
    the maps have the 5 x 5 grid, each sample equals its batch-1 call, and
    RawAttention equals the softmax with the bias the model's own module
    gives for that window."""
    model = hf_beit(mean=False, absolute=True)
    x = images(2, 40)
    args = (None, True)  # labels, interpolate_pos_encoding
    for name, method, kw in _runs(mean=False):
        got = method(model).attribute(
            x, target=[3, 1], additional_forward_args=args, **kw
        )
        one = method(model).attribute(
            x[1:], target=1, additional_forward_args=args, **kw
        )
        side = 40 if name in ("TransformerLRP",) or kw.get("at") == "pixels" else 5
        assert got.shape == (2, 1, side, side), name
        torch.testing.assert_close(got[1:], one, rtol=1e-6, atol=1e-12, msg=name)
    rel = model.beit.layers[-1].relative_position_bias
    with torch.no_grad():
        bias = rel((5, 5), True, dim_size=26)
    want = class_row_of_last_layer(model, x, bias, interpolate_pos_encoding=True)
    got = attr.RawAttention(model, layers=-1).attribute(
        x, target=0, additional_forward_args=args
    )
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


def d2v_to_beit(d2v: nn.Module, **kw) -> nn.Module:
    """``BeitForImageClassification`` (config ``kw``) with a
    ``Data2VecVisionForImageClassification``'s weights (the same design,
    other module names)."""
    cfg = transformers.BeitConfig(**kw)
    beit = transformers.BeitForImageClassification(cfg).eval().double()
    names = [
        ("data2vec_vision.", "beit."),
        ("encoder.layer.", "layers."),
        ("encoder.relative_position_bias.", "shared_position_bias."),
        ("attention.attention.relative_position_bias", "relative_position_bias"),
        ("attention.attention.query", "attention.q_proj"),
        ("attention.attention.key", "attention.k_proj"),
        ("attention.attention.value", "attention.v_proj"),
        ("attention.output.dense", "attention.o_proj"),
        ("intermediate.dense", "mlp.fc1"),
        ("output.dense", "mlp.fc2"),
    ]
    state = {}
    for k, v in d2v.state_dict().items():
        for a, b in names:
            k = k.replace(a, b)
        state[k] = v
    missing, unexpected = beit.load_state_dict(state, strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    return beit


@pytest.mark.parametrize(
    "mean, shared, impl", [(True, False, "eager"), (False, True, "sdpa")]
)
def test_data2vec_vision_equals_beit_with_the_same_weights(mean, shared, impl):
    """Every method on ``Data2VecVisionForImageClassification`` (its eager and
    its sdpa self-attention class) equals BEiT with the same weights; the
    model is left as it was."""
    torch.manual_seed(0)
    kw = dict(
        TINY,
        use_mean_pooling=mean,
        use_relative_position_bias=not shared,
        use_shared_relative_position_bias=shared,
        use_absolute_position_embeddings=not mean,
    )
    cfg = transformers.Data2VecVisionConfig(**kw, attn_implementation=impl)
    d2v = transformers.Data2VecVisionForImageClassification(cfg).eval().double()
    with torch.no_grad():
        for p in d2v.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    assert type(d2v.data2vec_vision.encoder.layer[0].attention.attention).__name__ == (
        "Data2VecVisionSdpaSelfAttention"
        if impl == "sdpa"
        else "Data2VecVisionSelfAttention"
    )
    beit = d2v_to_beit(d2v, **kw)
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(d2v(x).logits, beit(x).logits, rtol=1e-6, atol=1e-7)
    for name, method, kw in _runs(mean):
        got = method(d2v).attribute(x, target=[3, 1], **kw)
        want = method(beit).attribute(x, target=[3, 1], **kw)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-12, msg=name)
    before = snapshot(d2v)
    attr.AttnLRP(d2v).attribute(x, target=[3, 1])
    assert_same(before, snapshot(d2v))
