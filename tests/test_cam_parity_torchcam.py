"""IS-CAM, SS-CAM and Smooth Grad-CAM++ against torchcam 0.5.0, on a CNN layer
and a ViT token layer, batch of 3 with different targets.

torchcam returns ReLU'd maps at layer resolution, min-max normalised per image
(``(c - min) / (max - min + 1e-8)``); our raw maps go through the same steps
before the comparison. The random noise of SS-CAM and Smooth Grad-CAM++ is
drawn once in the test and given to both implementations.
"""

from __future__ import annotations

import pytest
import torch
from conftest import TinyCNN, make_tiny_vit

import captum_ssl.attr as A

tc = pytest.importorskip("torchcam.methods")

TOL = 1e-4
TARGETS = [0, 2, 4]


def _vit_reshape(t: torch.Tensor) -> torch.Tensor:
    b, _, c = t.shape
    return t[:, 1:, :].reshape(b, 4, 4, c).permute(0, 3, 1, 2)


def _setups():
    torch.manual_seed(0)
    cnn, vit = TinyCNN().eval(), make_tiny_vit()
    x = torch.randn(3, 3, 32, 32)
    return {
        "cnn": (cnn, cnn.features[4], x, None, 16),
        "vit": (vit, vit.blocks[-1].norm1, x, _vit_reshape, 32),
    }


SETUPS = _setups()


def torchcam_post(attr: torch.Tensor) -> torch.Tensor:
    """torchcam's post-processing: ReLU, min-max per map (eps 1e-8)."""
    c = attr.clamp(min=0)[:, 0]
    c = c - c.amin(dim=(-2, -1), keepdim=True)
    return c / (c.amax(dim=(-2, -1), keepdim=True) + 1e-8)


class _Sequence:
    """Stands in for torchcam's noise distribution: the test's noise, in order."""

    def __init__(self, noise: torch.Tensor) -> None:
        self.it = iter(noise)

    def sample(self, size):
        out = next(self.it)
        assert tuple(out.shape) == tuple(size)
        return out


def _torchcam(cls, model, layer, x, reshape, noise=None, grad=False, **kw):
    with cls(
        model, layer, input_shape=(3, 32, 32), reshape_transform=reshape, **kw
    ) as cam:
        if noise is not None:
            cam._distrib = _Sequence(noise)
        with torch.set_grad_enabled(grad):
            model(x)
        return cam(class_idx=TARGETS)[0].detach()


@pytest.mark.parametrize("where", ["cnn", "vit"])
@pytest.mark.parametrize("method", ["iscam", "sscam"])
def test_score_cam_variants_match_torchcam(where, method):
    model, layer, x, reshape, channels = SETUPS[where]
    n = 3
    if method == "iscam":
        ref = _torchcam(
            tc.ISCAM, model, layer, x, reshape, batch_size=16, num_samples=n
        )
        ours = A.LayerISCam(model, layer, num_samples=n).attribute(
            x, target=TARGETS, perturbations_per_eval=16
        )
    else:
        noise = 0.5 * torch.randn(n, 3, channels, 32, 32)
        ref = _torchcam(
            tc.SSCAM, model, layer, x, reshape, noise, batch_size=16, num_samples=n
        )
        ours = A.LayerSSCam(model, layer, num_samples=n).attribute(
            x, target=TARGETS, perturbations_per_eval=16, noise=noise
        )
    assert ours.shape == (
        3,
        1,
        4 if where == "vit" else 16,
        4 if where == "vit" else 16,
    )
    assert float(ref.std()) > 0
    assert (torchcam_post(ours) - ref).abs().max() <= TOL


def test_sscam_generator_is_reproducible_and_noise_is_checked():
    model, layer, x, _, _ = SETUPS["cnn"]
    cam = A.LayerSSCam(model, layer, num_samples=2)

    def run(seed):
        g = torch.Generator().manual_seed(seed)
        return cam.attribute(x, target=TARGETS, perturbations_per_eval=32, generator=g)

    torch.testing.assert_close(run(0), run(0))
    assert (run(0) - run(1)).abs().max() > 0
    with pytest.raises(A.AttributionInputError, match="noise must have shape"):
        cam.attribute(x, target=TARGETS, noise=torch.zeros(3, 1, 1, 32, 32))


def _grads(model, layer, x, reshape):
    """Layer activations and target gradients, written out with one hook."""
    store = {}
    h = layer.register_forward_hook(lambda _m, _i, o: store.setdefault("a", o))
    try:
        out = model(x)
    finally:
        h.remove()
    score = out[torch.arange(len(TARGETS)), TARGETS].sum()
    (g,) = torch.autograd.grad(score, store["a"])
    a = store["a"].detach()
    return (a, g) if reshape is None else (reshape(a), reshape(g))


@pytest.mark.parametrize("where", ["cnn", "vit"])
def test_smooth_grad_cam_pp_paper_and_torchcam_deviation(where):
    """Ours is the paper's equation (averaged gradient powers, clean
    activations); torchcam's differs in three documented places, each written
    out below, and its map is reproduced exactly by that variant."""
    model, layer, x, reshape, _ = SETUPS[where]
    n, eps = 3, 1e-8
    noise = 0.3 * torch.randn(n, *x.shape)
    ours = A.LayerSmoothGradCamPlusPlus(model, layer, num_samples=n).attribute(
        x, target=TARGETS, noise=noise
    )
    clean, _ = _grads(model, layer, x, reshape)
    runs = [_grads(model, layer, x + noise[i], reshape) for i in range(n)]
    d1, d2, d3 = (sum(g**p for _, g in runs) / n for p in (1, 2, 3))
    alpha = d2 / (2 * d2 + clean.sum(dim=(2, 3), keepdim=True) * d3 + eps)
    w = (alpha * d1.clamp(min=0)).sum(dim=(2, 3), keepdim=True)
    paper = (w * clean).sum(dim=1, keepdim=True)
    torch.testing.assert_close(ours, paper, rtol=1e-4, atol=1e-6)

    ref = _torchcam(
        tc.SmoothGradCAMpp, model, layer, x, reshape, noise, grad=True, num_samples=n
    )
    last_a, last_g = runs[-1]
    # torchcam: sum_ab A_ab D3_ab per channel; ReLU of the last sample's
    # gradient; the last noisy sample's activations
    alpha_tc = d2 / (2 * d2 + (d3 * clean).sum(dim=(2, 3), keepdim=True) + eps)
    w_tc = (alpha_tc * last_g.clamp(min=0)).sum(dim=(2, 3), keepdim=True)
    variant = (w_tc * last_a).sum(dim=1, keepdim=True)
    assert (torchcam_post(variant) - ref).abs().max() <= TOL
    assert (torchcam_post(ours) - ref).abs().max() > 1e-2
