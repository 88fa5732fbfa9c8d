"""CAM mechanics: equations, token layouts, Captum composition, errors, hooks."""

from __future__ import annotations

import gc
import warnings

import pytest
import timm
import torch
from captum.attr import LayerGradCam as CaptumLayerGradCam
from captum.attr import NoiseTunnel
from conftest import make_tiny_vit
from torch import nn

import captum_ssl.attr as A

ALL_CAMS = [
    A.LayerGradCam,
    A.LayerGradCamPlusPlus,
    A.LayerXGradCam,
    A.LayerHiResCam,
    A.LayerGradCamElementWise,
    A.LayerLayerCam,
    A.LayerEigenCam,
    A.LayerEigenGradCam,
    A.LayerScoreCam,
    A.LayerAblationCam,
    A.LayerClassActivationMap,
]
GRADIENT_CAMS = [c for c in ALL_CAMS if issubclass(c, A.LayerGradCam)]


def _no_hooks(model: nn.Module) -> bool:
    return all(
        not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks
        for m in model.modules()
    )


# ----------------------------------------------------------------- equations
def test_grad_cam_equals_captum_on_cnn(tiny_cnn, images):
    ours = A.LayerGradCam(tiny_cnn, tiny_cnn.features[3]).attribute(
        images, target=[0, 1, 2]
    )
    ref = CaptumLayerGradCam(tiny_cnn, tiny_cnn.features[3]).attribute(
        images, target=[0, 1, 2]
    )
    torch.testing.assert_close(ours, ref)


def test_class_activation_map_equation(tiny_cnn, images):
    """Zhou et al.: L^c = sum_k w^c_k A^k; on GAP + linear, Grad-CAM = CAM / hw."""
    targets = [4, 0, 2]
    cam = A.LayerClassActivationMap(tiny_cnn, tiny_cnn.features[4]).attribute(
        images, target=targets
    )
    acts = tiny_cnn.features(images).detach()
    w = tiny_cnn.fc.weight.detach()[targets]
    expected = (w[:, :, None, None] * acts).sum(1, keepdim=True)
    torch.testing.assert_close(cam, expected)
    grad_cam = A.LayerGradCam(tiny_cnn, tiny_cnn.features[4]).attribute(
        images, target=targets
    )
    hw = acts.shape[2] * acts.shape[3]
    torch.testing.assert_close(grad_cam * hw, cam, atol=1e-5, rtol=1e-4)


def test_score_cam_and_ablation_cam_equations(tiny_cnn, images):
    """Score-CAM: softmax_k y(x * norm(up(A_k))); Ablation-CAM: (y - y_k) / y."""
    layer, targets = tiny_cnn.features[4], [1, 3, 0]
    acts = tiny_cnn.features(images).detach()
    rows = torch.arange(3)
    with torch.no_grad():
        y = tiny_cnn(images)[rows, targets]
        score, drop = torch.zeros(3, acts.shape[1]), torch.zeros(3, acts.shape[1])
        for k in range(acts.shape[1]):
            up = nn.functional.interpolate(
                acts[:, k : k + 1], size=(32, 32), mode="bilinear", align_corners=True
            )
            lo = up.amin((2, 3), keepdim=True)
            hi = up.amax((2, 3), keepdim=True)
            score[:, k] = tiny_cnn(images * (up - lo) / (hi - lo + 1e-8))[rows, targets]
            zeroed = acts.clone()
            zeroed[:, k] = 0
            y_k = tiny_cnn.fc(tiny_cnn.pool(zeroed).flatten(1))[rows, targets]
            drop[:, k] = (y - y_k) / y
    for cls, weights in [
        (A.LayerScoreCam, score.softmax(1)),
        (A.LayerAblationCam, drop),
    ]:
        expected = (weights[:, :, None, None] * acts).sum(1, keepdim=True)
        for ppe in (1, 7, 64):  # chunking across images and channels
            out = cls(tiny_cnn, layer).attribute(
                images, target=targets, perturbations_per_eval=ppe
            )
            torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-4)


def test_gradient_cam_equations(tiny_cnn, images):
    """Each gradient CAM's weighting, written from its paper."""
    layer, targets = tiny_cnn.features[4], [2, 2, 1]
    x = images.clone()
    acts = tiny_cnn.features(x)
    out = tiny_cnn.fc(tiny_cnn.pool(acts).flatten(1))
    (g,) = torch.autograd.grad(out[torch.arange(3), targets].sum(), acts)
    a = acts.detach()
    s = a.sum((2, 3), keepdim=True)
    alpha = torch.where(
        g != 0, g**2 / (2 * g**2 + s * g**3 + 1e-6), torch.zeros_like(g)
    )
    expected = {
        A.LayerGradCamPlusPlus: ((alpha * g.relu()).sum((2, 3), keepdim=True) * a),
        A.LayerXGradCam: ((g * a / (s + 1e-7)).sum((2, 3), keepdim=True) * a),
        A.LayerHiResCam: g * a,
        A.LayerGradCamElementWise: (g * a).relu(),
        A.LayerLayerCam: g.relu() * a,
    }
    for cls, ref in expected.items():
        got = cls(tiny_cnn, layer).attribute(images, target=targets)
        torch.testing.assert_close(got, ref.sum(1, keepdim=True), atol=1e-6, rtol=1e-4)
        per_channel = cls(tiny_cnn, layer).attribute(
            images, target=targets, attr_dim_summation=False
        )
        torch.testing.assert_close(per_channel, ref, atol=1e-6, rtol=1e-4)


# ------------------------------------------------------------- token layouts
def _manual_grid(tokens: torch.Tensor, k: int, gh: int, gw: int) -> torch.Tensor:
    b, _, c = tokens.shape
    return tokens[:, k:].reshape(b, gh, gw, c).permute(0, 3, 1, 2)


@pytest.mark.parametrize(
    "name,kwargs,layer_of,prefix",
    [
        ("vit_tiny_patch16_224", {}, lambda m: m.blocks[-1].norm1, 1),
        (
            "deit_tiny_distilled_patch16_224",
            {},
            lambda m: m.blocks[-1].norm1,
            2,
        ),
        ("vit_tiny_patch16_224", {"reg_tokens": 4}, lambda m: m.blocks[-1].norm1, 5),
        (
            "vit_tiny_patch16_224",
            {"class_token": False, "global_pool": "avg"},
            lambda m: m.blocks[-1].norm1,
            0,
        ),
    ],
    ids=["vit", "deit-distilled", "registers", "no-class-token"],
)
def test_vit_token_layers_give_patch_grids(name, kwargs, layer_of, prefix):
    torch.manual_seed(0)
    model = timm.create_model(
        name,
        pretrained=False,
        img_size=32,
        patch_size=8,
        embed_dim=32,
        depth=2,
        num_heads=2,
        num_classes=6,
        **kwargs,
    ).eval()
    x = torch.randn(2, 3, 32, 32)
    layer = layer_of(model)
    got = A.LayerGradCam(model, layer).attribute(x, target=[1, 4])
    assert got.shape == (2, 1, 4, 4)
    # reference: Grad-CAM computed by hand on the reshaped tokens
    cap = {}
    h = layer.register_forward_hook(lambda _m, _i, o: cap.setdefault("t", o))
    out = model(x)
    h.remove()
    assert cap["t"].shape[1] == prefix + 16
    (g,) = torch.autograd.grad(out[[0, 1], [1, 4]].sum(), cap["t"])
    a = _manual_grid(cap["t"].detach(), prefix, 4, 4)
    g = _manual_grid(g, prefix, 4, 4)
    expected = (g.mean((2, 3), keepdim=True) * a).sum(1, keepdim=True)
    torch.testing.assert_close(got, expected)


def test_non_square_input_grid_follows_the_input():
    model = make_tiny_vit(dynamic_img_size=True)
    x = torch.randn(2, 3, 32, 48)
    got = A.LayerHiResCam(model, model.blocks[-1].norm1).attribute(x, target=0)
    assert got.shape == (2, 1, 4, 6)


def test_cait_xcit_and_swin_layers():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    cait = timm.create_model(
        "cait_xxs24_224",
        pretrained=False,
        img_size=32,
        patch_size=8,
        depth=2,
        embed_dim=32,
        num_heads=2,
        num_classes=5,
    ).eval()
    xcit = timm.create_model(
        "xcit_nano_12_p16_224",
        pretrained=False,
        img_size=32,
        depth=2,
        num_classes=5,
    ).eval()
    swin = timm.create_model(
        "swin_tiny_patch4_window7_224",
        pretrained=False,
        img_size=56,
        depths=(1, 1),
        num_heads=(2, 2),
        embed_dim=16,
        window_size=7,
        num_classes=5,
    ).eval()
    assert A.LayerGradCam(cait, cait.blocks[-1].norm1).attribute(
        x, target=[0, 1]
    ).shape == (2, 1, 4, 4)
    # XCiT: patch tokens in its XCA blocks (no prefix), grid from patch_size 16
    assert A.LayerGradCam(xcit, xcit.blocks[-1].norm1).attribute(
        x, target=[0, 1]
    ).shape == (2, 1, 2, 2)
    # Swin: channels-last (B, H, W, C) features
    xs = torch.randn(2, 3, 56, 56)
    layer = swin.layers[-1].blocks[-1].norm1
    got = A.LayerGradCam(swin, layer).attribute(xs, target=[2, 3])
    assert got.shape == (2, 1, 7, 7)
    cap = {}
    h = layer.register_forward_hook(lambda _m, _i, o: cap.setdefault("t", o))
    out = swin(xs)
    h.remove()
    (g,) = torch.autograd.grad(out[[0, 1], [2, 3]].sum(), cap["t"])
    a, g = cap["t"].detach().permute(0, 3, 1, 2), g.permute(0, 3, 1, 2)
    expected = (g.mean((2, 3), keepdim=True) * a).sum(1, keepdim=True)
    torch.testing.assert_close(got, expected)


def test_explicit_layout_for_a_plain_forward_function(tiny_vit):
    x = torch.randn(2, 3, 32, 32)

    def forward(inp):  # a function: the model's grid is not visible
        return tiny_vit(inp)

    layer = tiny_vit.blocks[-1].norm1
    # no model declares tokens: the (B, N, C) output is read as Captum reads
    # it, channels-first (B, C, L), never guessed to be a token grid
    from captum.attr import LayerGradCam as CaptumLayerGradCam

    torch.testing.assert_close(
        A.LayerGradCam(forward, layer).attribute(x, target=0),
        CaptumLayerGradCam(forward, layer).attribute(x, target=0),
    )
    layout = A.TokenLayout(grid=(4, 4), num_prefix_tokens=1)
    got = A.LayerGradCam(forward, layer, layout=layout).attribute(x, target=0)
    torch.testing.assert_close(
        got, A.LayerGradCam(tiny_vit, layer).attribute(x, target=0)
    )
    with pytest.raises(ValueError, match="does not fit"):
        A.LayerGradCam(forward, layer, layout=A.TokenLayout(grid=(5, 5))).attribute(
            x, target=0
        )


# ------------------------------------------------------- Captum composition
@pytest.mark.parametrize("cls", ALL_CAMS, ids=lambda c: c.__name__)
def test_per_sample_targets_match_single_calls(cls, tiny_cnn, images):
    layer = tiny_cnn.features[4]
    batch = cls(tiny_cnn, layer).attribute(images, target=torch.tensor([3, 0, 1]))
    for i, t in enumerate([3, 0, 1]):
        single = cls(tiny_cnn, layer).attribute(images[i : i + 1], target=t)
        torch.testing.assert_close(batch[i : i + 1], single, atol=1e-5, rtol=1e-4)
    assert batch.device == images.device


def test_noise_tunnel_and_additional_forward_args(tiny_cnn, images):
    class Scaled(nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, x, scale):
            return self.net(x) * scale

    model = Scaled(tiny_cnn).eval()
    scale = torch.tensor([[1.0], [2.0], [3.0]])
    layer = tiny_cnn.features[4]
    for cls in (A.LayerGradCam, A.LayerScoreCam, A.LayerAblationCam):
        got = cls(model, layer).attribute(
            images, target=1, additional_forward_args=(scale,)
        )
        assert got.shape == (3, 1, 16, 16)
    # Score-CAM weights are a softmax over channels, so a per-sample scale of
    # the logits changes them; chunks must carry the right rows of `scale`
    chunked = A.LayerScoreCam(model, layer).attribute(
        images, target=1, additional_forward_args=(scale,), perturbations_per_eval=5
    )
    single = A.LayerScoreCam(model, layer).attribute(
        images[2:], target=1, additional_forward_args=(scale[2:],)
    )
    torch.testing.assert_close(chunked[2:], single, atol=1e-5, rtol=1e-4)

    nt = NoiseTunnel(A.LayerGradCam(tiny_cnn, layer))
    smooth = nt.attribute(
        images, nt_type="smoothgrad", nt_samples=4, stdevs=0.1, target=[0, 1, 2]
    )
    assert smooth.shape == (3, 1, 16, 16)


# --------------------------------------------------------------- bad input
def test_layer_never_reached(tiny_cnn, images):
    stray = nn.Conv2d(3, 3, 1)
    for cls in (A.LayerGradCam, A.LayerEigenCam, A.LayerScoreCam):
        with pytest.raises(ValueError, match="never ran in the forward pass"):
            cls(tiny_cnn, stray).attribute(images, target=0)
    assert _no_hooks(tiny_cnn) and not stray._forward_hooks


def test_unsupported_layer_shape(tiny_cnn, images):
    # a (B, C) layer is Captum's (B, 1) map (tests/test_captum_dropin.py);
    # a 6-D output has no reading
    model = nn.Sequential(
        tiny_cnn, nn.Unflatten(1, (1, 1, 1, 1, 5)), nn.Flatten()
    ).eval()
    assert A.LayerGradCam(model, tiny_cnn.fc).attribute(images, 0).shape == (3, 1)
    with pytest.raises(ValueError, match="Unsupported layer output shape"):
        A.LayerGradCam(model, model[1]).attribute(images, target=0)
    assert _no_hooks(model)


@pytest.mark.parametrize("cls", ALL_CAMS, ids=lambda c: c.__name__)
def test_target_out_of_range(cls, tiny_cnn, images):
    layer = tiny_cnn.features[4]
    with pytest.raises(ValueError, match="out of range"):
        cls(tiny_cnn, layer).attribute(images, target=5)
    with pytest.raises(ValueError, match="out of range"):
        cls(tiny_cnn, layer).attribute(images, target=[0, 1, -9])
    assert _no_hooks(tiny_cnn)


def test_target_count_and_missing_target(tiny_cnn, images):
    layer = tiny_cnn.features[4]
    with pytest.raises(ValueError, match="one target per sample"):
        A.LayerGradCam(tiny_cnn, layer).attribute(images, target=[0, 1])
    with pytest.raises(ValueError, match="pass target="):
        A.LayerGradCam(tiny_cnn, layer).attribute(images)
    with pytest.raises(ValueError, match="needs target"):
        A.LayerClassActivationMap(tiny_cnn, layer).attribute(images)


def test_empty_batch_and_inference_mode(tiny_cnn):
    layer = tiny_cnn.features[4]
    with pytest.raises(ValueError, match="empty batch"):
        A.LayerGradCam(tiny_cnn, layer).attribute(torch.zeros(0, 3, 32, 32), target=0)
    with torch.inference_mode():
        x = torch.randn(2, 3, 32, 32)
    with pytest.raises(ValueError, match="inference_mode"):
        A.LayerGradCam(tiny_cnn, layer).attribute(x, target=0)


def test_no_gradient_path(tiny_cnn, images):
    class FrozenFeatures(nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, x):
            with torch.no_grad():
                f = self.net.features(x)
            return self.net.fc(self.net.pool(f).flatten(1))

    model = FrozenFeatures(tiny_cnn).eval()
    with pytest.raises(ValueError, match="No gradient path"):
        A.LayerGradCam(model, tiny_cnn.features[4]).attribute(images, target=0)
    assert _no_hooks(model)
    # the gradient-free methods still work there
    out = A.LayerScoreCam(model, tiny_cnn.features[4]).attribute(images, target=0)
    assert out.shape == (3, 1, 16, 16)
    # and torch.no_grad() around the call is fine: the method enables autograd
    with torch.no_grad():
        assert A.LayerGradCam(tiny_cnn, tiny_cnn.features[4]).attribute(
            images, target=0
        ).shape == (3, 1, 16, 16)


def test_zero_gradient_warning_on_last_vit_block(tiny_vit, images):
    with pytest.warns(UserWarning, match="blocks\\[-1\\].norm1"):
        A.LayerGradCam(tiny_vit, tiny_vit.blocks[-1]).attribute(images, target=0)


def test_hooks_removed_when_the_forward_raises(tiny_cnn, images):
    class Boom(Exception):
        pass

    def explode(_m, _i, _o):
        raise Boom

    h = tiny_cnn.fc.register_forward_hook(explode)
    for cls in ALL_CAMS:
        with pytest.raises(Boom):
            cls(tiny_cnn, tiny_cnn.features[4]).attribute(images, target=0)
        assert not tiny_cnn.features[4]._forward_hooks
    h.remove()
    assert _no_hooks(tiny_cnn)


def test_thousand_calls_do_not_grow_memory(tiny_cnn):
    layer = tiny_cnn.features[4]
    cam = A.LayerGradCamPlusPlus(tiny_cnn, layer)
    x = torch.randn(2, 3, 8, 8)

    def live_tensors() -> int:
        gc.collect()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return sum(1 for o in gc.get_objects() if torch.is_tensor(o))

    for _ in range(50):
        cam.attribute(x, target=1)
    before = live_tensors()
    for _ in range(1000):
        cam.attribute(x, target=1)
    assert live_tensors() <= before + 2
    assert _no_hooks(tiny_cnn)


def test_model_left_unchanged(tiny_cnn, images):
    state = {k: v.clone() for k, v in tiny_cnn.state_dict().items()}
    grads_before = [p.grad for p in tiny_cnn.parameters()]
    for cls in ALL_CAMS:
        cls(tiny_cnn, tiny_cnn.features[4]).attribute(images, target=1)
    for k, v in tiny_cnn.state_dict().items():
        torch.testing.assert_close(v, state[k])
    assert [p.grad for p in tiny_cnn.parameters()] == grads_before
    assert not tiny_cnn.training


def test_ablation_cam_refuses_layer_input(tiny_cnn, images):
    with pytest.raises(ValueError, match="attribute_to_layer_input=False"):
        A.LayerAblationCam(tiny_cnn, tiny_cnn.features[4]).attribute(
            images, target=0, attribute_to_layer_input=True
        )
    # Score-CAM masks with the layer's input just as well
    out = A.LayerScoreCam(tiny_cnn, tiny_cnn.features[4]).attribute(
        images, target=0, attribute_to_layer_input=True, perturbations_per_eval=16
    )
    assert out.shape == (3, 1, 16, 16)


def test_requires_grad_flags_restored_also_after_errors(tiny_cnn, images):
    """Gradient CAMs freeze parameters during the call (autograd then records
    only what follows the layer); each flag comes back, also on error."""
    tiny_cnn.features[0].weight.requires_grad_(False)  # a partially frozen model
    before = [p.requires_grad for p in tiny_cnn.parameters()]
    seen = []
    h = tiny_cnn.fc.register_forward_hook(
        lambda m, i, o: seen.append(m.weight.requires_grad)
    )
    A.LayerGradCam(tiny_cnn, tiny_cnn.features[4]).attribute(images, target=0)
    assert seen == [False]  # frozen during the call
    assert [p.requires_grad for p in tiny_cnn.parameters()] == before
    with pytest.raises(ValueError, match="out of range"):
        A.LayerGradCam(tiny_cnn, tiny_cnn.features[4]).attribute(images, target=9)
    h.remove()
    assert [p.requires_grad for p in tiny_cnn.parameters()] == before
