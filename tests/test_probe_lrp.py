"""LRP (and the other ViT methods) on the zoo's linear-probe wrapper
:class:`~captum_ssl.models.TokenLinearProbe`, small random-init timm ViTs.

* With one block and no patch mean the wrapper computes what a timm ViT with
  ``global_pool='token'`` and the same head computes: every method must give
  the same map on both.
* With the official probe rules (DINOv2: class token + patch mean, register
  tokens, layer scale; DINO ViT-S: class tokens of the last 4 blocks; DINO
  ViT-B: class token and patch mean interleaved) AttnLRP / CP-LRP are
  compared with the gradient x input form of Achtibat et al. (2024, Sec.
  3.3) written here on a hand-written forward pass of backbone and probe (the
  final norm with its own 1/sigma constant at each of its calls; the patch
  mean, token selection, concatenation and the head plain linear maps), and
  CP-LRP without biases must conserve the target logit.
"""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from test_lrp import (
    SMALL,
    TARGETS,
    _rel_err,
    _snapshot,
    gradient_form_block,
    images,
    ln_const_sigma,
    raise_mid_forward,
    randomize,
)

from captum_ssl.attr import (
    AttnLRP,
    GenericAttention,
    LeGrad,
    PartialLRP,
    TransformerAttribution,
    TransformerLRP,
)
from captum_ssl.attr._core import AttributionInputError
from captum_ssl.models import TokenLinearProbe, TokenProbe

#: (method, attribute keyword arguments)
LRP_CALLS = [
    (TransformerAttribution, {}),
    (TransformerAttribution, {"start_layer": 1}),
    (PartialLRP, {}),
    (TransformerLRP, {}),
    (AttnLRP, {}),
    (AttnLRP, {"cp": True}),
    (AttnLRP, {"at": "pixels"}),
]
#: one call of each method (batching, model left untouched)
EACH = [LRP_CALLS[i] for i in (0, 2, 3, 4, 5)]

#: the official probe rules on small backbones (timm keyword arguments)
RULES = {
    "dinov2_registers": (
        TokenProbe(patch_mean=True),
        dict(reg_tokens=4, no_embed_class=True, init_values=1.0),
    ),
    "dino_vit_s_4_blocks": (TokenProbe(n_last_blocks=4), dict(depth=4)),
    "dino_vit_b_interleaved": (TokenProbe(patch_mean=True, interleave=True), {}),
}


def probe(rule: str, biases: bool = True) -> TokenLinearProbe:
    probe_rule, kw = RULES[rule]
    torch.manual_seed(0)
    backbone = timm.create_model(
        "vit_small_patch16_224", **{**SMALL, "num_classes": 0, **kw}
    )
    head = torch.nn.Linear(probe_rule.in_features(backbone.embed_dim), 10)
    model = randomize(TokenLinearProbe(backbone, head, probe_rule))
    if not biases:  # nothing but the patch tokens carries relevance
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("bias") or "token" in name or "pos_embed" in name:
                    p.zero_()
    return model.eval()


# ------------------------------------------- one block, no patch mean = timm
def plain_and_probe():
    torch.manual_seed(0)
    plain = randomize(
        timm.create_model("vit_tiny_patch16_224", num_classes=10, **SMALL)
    )
    backbone = copy.deepcopy(plain)
    backbone.reset_classifier(0)
    wrapped = TokenLinearProbe(backbone, copy.deepcopy(plain.head), TokenProbe())
    return plain, wrapped.eval()


@pytest.mark.parametrize(
    "cls, kw",
    LRP_CALLS + [(LeGrad, {}), (GenericAttention, {})],
    ids=lambda v: getattr(v, "__name__", str(v)),
)
def test_one_block_probe_equals_timm_class_token_vit(cls, kw):
    plain, wrapped = plain_and_probe()
    x = images()
    torch.testing.assert_close(wrapped(x), plain(x))
    ours = cls(wrapped).attribute(x, target=TARGETS, **kw)
    ref = cls(plain).attribute(x, target=TARGETS, **kw)
    assert ref.abs().max() > 0
    assert _rel_err(ours, ref) <= 1e-5


# ----------------------------------------------- AttnLRP, gradient x input form
def probe_gradient_form(model, x, target, cp=False):
    """Relevance of the patch tokens as input x gradient of a forward pass of
    backbone and probe whose gradient is the AttnLRP rules' (blocks: see
    ``gradient_form_block``; the final norm with its own constant 1/sigma at
    each call; token reads, patch mean, concatenation, head: plain gradient)."""
    bb, rule = model.backbone, model.probe
    with torch.enable_grad():
        tok = bb.patch_embed(x).detach().requires_grad_()
        b = len(x)
        prefix = [bb.cls_token.expand(b, -1, -1)]
        if bb.reg_token is not None:
            prefix.append(bb.reg_token.expand(b, -1, -1))
        if bb.no_embed_class:  # DINOv2 with registers: positions on patches only
            h = torch.cat(prefix + [tok + bb.pos_embed], 1)
        else:
            h = torch.cat(prefix + [tok], 1) + bb.pos_embed
        outs = []
        for i, blk in enumerate(bb.blocks):
            h = gradient_form_block(blk, h, cp)
            if i >= len(bb.blocks) - rule.n_last_blocks:
                outs.append(ln_const_sigma(bb.norm, h))  # once per block read
        feats = torch.cat([o[:, 0] for o in outs], -1)
        if rule.patch_mean:
            mean = outs[-1][:, sum(t.shape[1] for t in prefix) :].mean(1)
            if rule.interleave:  # DINO eval_linear.py, avgpool_patchtokens
                feats = torch.cat((feats.unsqueeze(-1), mean.unsqueeze(-1)), -1)
                feats = feats.reshape(b, -1)
            else:  # DINOv2 hub/classifiers.py
                feats = torch.cat([feats, mean], -1)
        out = model.head(feats)
        logit = out[torch.arange(b), torch.tensor(target)]
        (g,) = torch.autograd.grad(logit.sum(), tok)
    return (tok * g).sum(-1).reshape(b, 1, 4, 4), logit.detach()


@pytest.mark.parametrize("rule", list(RULES))
def test_attnlrp_on_probe_equals_gradient_form(rule):
    """The gradient form has no stabiliser: compare with a tiny epsilon
    (epsilon=1e-9 moves the interleaved probe's map by 1.6e-5 of its maximum,
    also in float64)."""
    model, x = probe(rule), images()
    for cp in (False, True):
        ours = AttnLRP(model).attribute(x, target=TARGETS, cp=cp, epsilon=1e-12)
        ref, logit = probe_gradient_form(model, x, TARGETS, cp=cp)
        torch.testing.assert_close(
            logit, model(x)[torch.arange(3), torch.tensor(TARGETS)]
        )
        assert _rel_err(ours, ref) <= 1e-5, (rule, cp)


@pytest.mark.parametrize("rule", list(RULES))
def test_cp_lrp_on_probe_conserves_without_biases(rule):
    """No biases, zero class / register tokens and position embedding: CP-LRP
    passes the whole target logit to the pixels (every rule on the path,
    including the final norm at each of its calls and the patch mean,
    conserves), and the patch tokens carry the same total."""
    model, x = probe(rule, biases=False), images()
    logits = model(x)[torch.arange(3), torch.tensor(TARGETS)].detach()
    kw = dict(target=TARGETS, cp=True, epsilon=1e-12)
    total = AttnLRP(model).attribute(x, at="pixels", **kw).sum((1, 2, 3))
    patches = AttnLRP(model).attribute(x, **kw).sum((1, 2, 3))
    torch.testing.assert_close(total, logits, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(patches, logits, rtol=1e-4, atol=1e-6)


# --------------------------------------------- batches, model left untouched
@pytest.mark.parametrize("rule", list(RULES))
def test_probe_batched_targets_equal_single_calls(rule):
    model, x = probe(rule), images()
    for cls, kw in EACH + [(LeGrad, {})]:
        maps = cls(model).attribute(x, target=TARGETS, **kw)
        assert torch.isfinite(maps).all() and maps.abs().sum() > 0
        one = cls(model).attribute(x[1:2], target=TARGETS[1], **kw)
        torch.testing.assert_close(maps[1:2], one, rtol=1e-4, atol=1e-7)


def test_probe_untouched_also_after_error():
    model, x = probe("dinov2_registers"), images()
    before = _snapshot(model)
    for cls, kw in EACH:
        cls(model).attribute(x, target=TARGETS, **kw)
    raise_mid_forward(model, model.backbone.blocks[2], x)
    after = _snapshot(model)
    for a, b in zip(before[0].values(), after[0].values()):
        assert torch.equal(a, b)
    assert before[1:] == after[1:]
    assert model(x).shape == (3, 10)


def test_probe_errors_name_the_layer_in_the_wrapper():
    model = probe("dino_vit_s_4_blocks")
    model.backbone.blocks[1].mlp.act = torch.nn.Hardswish().eval()
    with pytest.raises(AttributionInputError, match=r"`backbone\.blocks\.1\.mlp\.act`"):
        AttnLRP(model).attribute(images(), target=TARGETS)
    assert all("forward" not in m.__dict__ for m in model.modules())
    with pytest.raises(AttributionInputError, match="wraps the TokenLinearProbe"):
        AttnLRP(torch.nn.Sequential(torch.nn.Identity(), probe("dinov2_registers")))


def test_legrad_projects_through_the_probe():
    """LeGrad's block score on a probe is the mean token through the final
    norm, read wherever the probe reads a token, then the head."""
    model, x = probe("dino_vit_b_interleaved"), images()
    norm, head = model.backbone.norm, model.head

    def projection(z):
        t = norm(z.mean(dim=1))
        return head(torch.stack((t, t), dim=-1).flatten(1))

    ours = LeGrad(model).attribute(x, target=TARGETS)
    ref = LeGrad(model, score_projection=projection).attribute(x, target=TARGETS)
    torch.testing.assert_close(ours, ref)
