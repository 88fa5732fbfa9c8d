"""Prefix caching of layer-output perturbations (Ablation-CAM, Recipro-CAM):
same scores as full forward passes on models with residuals around the layer,
shared modules, concatenations of earlier features and extra forward
arguments; the network before the layer runs a fixed number of times; models
that cannot be replayed fall back to full passes with a warning; every patch
and hook is undone. Recipro-CAM is checked against its paper's equation."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
import torchvision
from conftest import TinyCNN, make_tiny_vit
from torch import nn

import captum_ssl.attr as A

TARGETS = [0, 2, 4]


class DenseLike(nn.Module):
    """Features from before the layer are concatenated after it (DenseNet)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.act = nn.ReLU()  # called before and after the layer
        self.mid = nn.Conv2d(6, 6, 3, padding=1)
        self.fc = nn.Linear(12, 5)

    def forward(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        s = self.act(self.stem(x))
        m = self.act(self.mid(s))
        feats = torch.cat([s, m], dim=1) * scale[:, None, None, None]
        return self.fc(feats.mean(dim=(2, 3)))


class TwiceCalled(nn.Module):
    """The explained layer runs twice per forward pass."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.fc = nn.Linear(3, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(self.conv(x)).mean(dim=(2, 3)))


class _TokensFirst(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(2).permute(2, 0, 1)  # (16, B, 4)


class SequenceFirst(nn.Module):
    """A module before the layer returns (tokens, batch, channels), and the
    part after the layer reads it: its rows cannot be told apart."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Sequential(nn.Conv2d(3, 4, 8, stride=8), _TokensFirst())
        self.mix = nn.Linear(4, 4)
        self.fc = nn.Linear(4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.embed(x)
        return self.fc(self.mix(t.transpose(0, 1)).mean(dim=1) + t.mean(dim=0))


def _models():
    torch.manual_seed(0)
    cnn, vit = TinyCNN().eval(), make_tiny_vit()
    r18 = torchvision.models.resnet18(num_classes=5).eval()
    dense = DenseLike().eval()
    return {
        "cnn": (cnn, cnn.features[4], None),
        # the block's residual reads the block input, computed before norm1
        "vit_mid_block": (vit, vit.blocks[1].norm1, None),
        # inside a BasicBlock: its ReLU runs once before conv2 and once after
        "resnet_inner": (r18, r18.layer3[0].conv2, None),
        "dense_args": (dense, dense.mid, (torch.tensor([1.0, 2.0, 0.5]),)),
    }


MODELS = _models()
X = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def _both(cls, model, layer, args, **kw):
    cam = cls(model, layer)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the cache must be used, no fallback
        cached = cam.attribute(X, target=TARGETS, additional_forward_args=args, **kw)
    cam.prefix_cache = False
    full = cam.attribute(X, target=TARGETS, additional_forward_args=args, **kw)
    return cached, full


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("cls", [A.LayerAblationCam, A.LayerReciproCam])
def test_cached_equals_full_forward_passes(name, cls):
    model, layer, args = MODELS[name]
    cached, full = _both(cls, model, layer, args, perturbations_per_eval=40)
    assert float(full.abs().max()) > 0
    torch.testing.assert_close(cached, full, rtol=1e-4, atol=1e-6)
    _assert_restored(model)


def test_the_prefix_runs_a_fixed_number_of_times():
    """conv1 computes for the recording (which gives the activations too) and
    the proof's two full evaluations, never for the 3 x 256 ablations (hooks
    would still fire on a replayed call, so the computation is counted)."""
    model, layer, _ = MODELS["resnet_inner"]
    calls = []
    conv1 = model.conv1

    def counting(x):
        calls.append(len(x))
        return type(conv1).forward(conv1, x)

    conv1.forward = counting
    try:
        A.LayerAblationCam(model, layer).attribute(
            X, target=TARGETS, perturbations_per_eval=16
        )
    finally:
        del conv1.forward
    assert calls == [3, 2]


@pytest.mark.parametrize("model_cls", [TwiceCalled, SequenceFirst])
def test_unprovable_models_fall_back_with_a_warning(model_cls):
    torch.manual_seed(0)
    model = model_cls().eval()
    layer = model.conv if model_cls is TwiceCalled else model.mix
    cam = A.LayerAblationCam(model, layer)
    if model_cls is SequenceFirst:
        cam.layout = A.TokenLayout(fmt="NLC", grid=(4, 4), num_prefix_tokens=0)
    with pytest.warns(UserWarning, match="Prefix caching is off"):
        cached = cam.attribute(X, target=TARGETS, perturbations_per_eval=8)
    cam.prefix_cache = False
    torch.testing.assert_close(
        cached, cam.attribute(X, target=TARGETS, perturbations_per_eval=8)
    )
    _assert_restored(model)


def _assert_restored(model: nn.Module) -> None:
    from torch.nn.modules import module as torch_module

    for m in model.modules():
        assert "forward" not in m.__dict__
        assert not m._forward_hooks and not m._forward_pre_hooks
    assert not torch_module._global_forward_hooks
    assert not torch_module._global_forward_pre_hooks


# ------------------------------------------------------------- Recipro-CAM
def _paper_masks(h: int, w: int) -> torch.Tensor:
    """M_p for every position p: 1/4 at p, 1/8 at its 4 neighbours, 1/16 at
    the diagonal ones, cut at the border. (h*w, h, w)."""
    masks = torch.zeros(h * w, h, w)
    for i in range(h):
        for j in range(w):
            for di in (-1, 0, 1):
                for dj in (-1, 0, 1):
                    if 0 <= i + di < h and 0 <= j + dj < w:
                        masks[i * w + j, i + di, j + dj] = 0.25 / 2 ** (
                            abs(di) + abs(dj)
                        )
    return masks


def test_recipro_cam_is_the_papers_equation_on_a_cnn():
    model, layer, _ = MODELS["cnn"]
    attr = A.LayerReciproCam(model, layer).attribute(
        X, target=TARGETS, perturbations_per_eval=256
    )
    with torch.no_grad():
        feats = model.features(X)  # (3, 16, 16, 16), features[4] is the last
        masks = _paper_masks(16, 16)
        for b, c in enumerate(TARGETS):
            masked = feats[b] * masks[:, None]  # (256, 16, 16, 16)
            probs = F.softmax(model.fc(model.pool(masked).flatten(1)), dim=1)
            torch.testing.assert_close(attr[b, 0].flatten(), probs[:, c])


def test_recipro_cam_masks_patch_tokens_of_a_vit():
    """On a token layer the mask multiplies the patch tokens; the class token
    is kept. One position, one sample, written out with a hook."""
    model, layer, _ = MODELS["vit_mid_block"]
    attr = A.LayerReciproCam(model, layer, gaussian=False).attribute(
        X, target=TARGETS, perturbations_per_eval=16
    )
    b, pos = 1, 6

    def keep_one(_m, _i, out):
        out = out.clone()
        patches = out[:, 1:]
        keep = torch.zeros(patches.shape[1])
        keep[pos] = 1
        out[:, 1:] = patches * keep[:, None]
        return out

    h = layer.register_forward_hook(keep_one)
    try:
        with torch.no_grad():
            p = F.softmax(model(X[b : b + 1]), dim=1)[0, TARGETS[b]]
    finally:
        h.remove()
    assert attr.shape == (3, 1, 4, 4)
    torch.testing.assert_close(attr[b, 0].flatten()[pos], p)


@pytest.mark.parametrize("copy_first", [True, False], ids=["deepcopy", "fresh"])
def test_float64_model_replays(copy_first, monkeypatch):
    """Issue 22: a float64 model (``copy.deepcopy(model).double()`` of one
    explained before, or a fresh one) fell back to full passes: the replayed
    scores were kept in float32 and comparing them with the float64 recorded
    ones raised inside the proof. (The fallback warns once per process, which
    hid it for the second model.)"""
    import copy

    from captum_ssl.attr import _prefix

    monkeypatch.setattr(_prefix, "_WARNED", set())
    torch.manual_seed(0)
    model = TinyCNN().eval()
    if copy_first:
        A.LayerAblationCam(model, model.features[3]).attribute(X, target=TARGETS)
        model = copy.deepcopy(model).double()
    else:
        model = model.double()
    cam = A.LayerAblationCam(model, model.features[3])
    x = X.double()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning
        cached = cam.attribute(x, target=TARGETS, perturbations_per_eval=8)
    cam.prefix_cache = False
    full = cam.attribute(x, target=TARGETS, perturbations_per_eval=8)
    assert cached.dtype == torch.float64
    torch.testing.assert_close(cached, full, rtol=1e-9, atol=1e-12)
