"""Numerical parity with pytorch-grad-cam 1.5.7 on a CNN and a ViT token layer.

pytorch-grad-cam returns ReLU'd maps, bilinearly resized with OpenCV and
min-max normalised per image; our maps go through the same explicit steps
(``captum_ssl.viz.to_heatmap``) before the comparison.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import TinyCNN, make_tiny_vit

import captum_ssl.attr as A
from captum_ssl.viz import normalize, upsample

gc = pytest.importorskip("pytorch_grad_cam")
from pytorch_grad_cam.ablation_layer import AblationLayerVit  # noqa: E402
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget  # noqa: E402

TOL = 1e-4

# our class, pytorch-grad-cam's class, keyword arguments for our attribute()
PAIRS = [
    (A.LayerGradCam, gc.GradCAM, {}),
    (A.LayerGradCamPlusPlus, gc.GradCAMPlusPlus, {}),
    (A.LayerXGradCam, gc.XGradCAM, {}),
    (A.LayerHiResCam, gc.HiResCAM, {}),
    (A.LayerGradCamElementWise, gc.GradCAMElementWise, {}),
    (A.LayerLayerCam, gc.LayerCAM, {}),
    (A.LayerScoreCam, gc.ScoreCAM, {"perturbations_per_eval": 16}),
    (A.LayerAblationCam, gc.AblationCAM, {"perturbations_per_eval": 16}),
]
EIGEN = [(A.LayerEigenCam, gc.EigenCAM), (A.LayerEigenGradCam, gc.EigenGradCAM)]


def _vit_reshape(grid: int):
    def reshape(t: torch.Tensor) -> torch.Tensor:
        b, _, c = t.shape
        return t[:, 1:, :].reshape(b, grid, grid, c).permute(0, 3, 1, 2)

    return reshape


def _setups():
    torch.manual_seed(0)
    cnn = TinyCNN().eval()
    vit = make_tiny_vit()
    x = torch.randn(3, 3, 32, 32)
    # CNN: the last ReLU (non-negative, so pytorch-grad-cam's ablation zeroes);
    # ViT: the thesis's layer, blocks[-1].norm1, a (B, 17, 32) token output.
    return {
        "cnn": (cnn, cnn.features[4], x, [0, 2, 4], None),
        "vit": (vit, vit.blocks[-1].norm1, x, [1, 5, 6], _vit_reshape(4)),
    }


SETUPS = _setups()


def _reference(gc_cls, model, layer, x, targets, reshape, **kw):
    with gc_cls(
        model=model, target_layers=[layer], reshape_transform=reshape, **kw
    ) as cam:
        if hasattr(cam, "batch_size"):
            cam.batch_size = 16
        out = cam(input_tensor=x, targets=[ClassifierOutputTarget(t) for t in targets])
    return torch.from_numpy(np.asarray(out, dtype=np.float32))


def to_heatmap(attr: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """pytorch-grad-cam's post-processing, in its order, with our helpers:
    ReLU, min-max at layer resolution, bilinear upsampling, min-max."""
    return normalize(upsample(normalize(attr.clamp(min=0)), x))


def _ours(cls, model, layer, x, targets, **kw) -> torch.Tensor:
    attr = cls(model, layer).attribute(x, target=targets, **kw)
    assert attr.shape[:2] == (x.shape[0], 1)
    return to_heatmap(attr, x)[:, 0]


@pytest.mark.parametrize("where", ["cnn", "vit"])
@pytest.mark.parametrize(
    "ours_cls,gc_cls,kw", PAIRS, ids=[p[0].__name__ for p in PAIRS]
)
def test_parity_with_pytorch_grad_cam(where, ours_cls, gc_cls, kw):
    model, layer, x, targets, reshape = SETUPS[where]
    if ours_cls is A.LayerAblationCam and where == "vit":
        pytest.skip("deliberate deviation, see test_ablation_deviation_on_vit")
    extra = {"ablation_layer": AblationLayerVit()} if gc_cls is gc.AblationCAM else {}
    if where == "cnn":
        extra = {}
    ref = _reference(gc_cls, model, layer, x, targets, reshape, **extra)
    ours = _ours(ours_cls, model, layer, x, targets, **kw)
    assert ours.shape == ref.shape
    assert float(ref.std()) > 0  # the reference is not a constant map
    assert (ours - ref).abs().max() <= TOL


@pytest.mark.parametrize("where", ["cnn", "vit"])
@pytest.mark.parametrize("ours_cls,gc_cls", EIGEN, ids=[p[0].__name__ for p in EIGEN])
def test_eigen_parity_up_to_the_svd_sign(where, ours_cls, gc_cls):
    """pytorch-grad-cam keeps LAPACK's arbitrary SVD sign; we orient the map.

    Each of its maps equals ours, or ours computed from the opposite sign."""
    model, layer, x, targets, reshape = SETUPS[where]
    ref = _reference(gc_cls, model, layer, x, targets, reshape)
    attr = ours_cls(model, layer).attribute(x, target=targets)
    same = to_heatmap(attr, x)[:, 0]
    flipped = to_heatmap(-attr, x)[:, 0]
    for i in range(x.shape[0]):
        err = min((same[i] - ref[i]).abs().max(), (flipped[i] - ref[i]).abs().max())
        assert err <= TOL


def test_eigen_cam_orientation_is_fixed(monkeypatch):
    """Deviation shown: our Eigen-CAM correlates positively with the mean
    activation, and does not change when the decomposition returns the
    opposite sign."""
    model, layer, x, _, _ = SETUPS["cnn"]
    attr = A.LayerEigenCam(model, layer).attribute(x)
    acts = layer(model.features[:4](x)).detach()
    mean = acts.mean(1, keepdim=True)
    for a, m in zip(attr, mean):
        a, m = a.flatten() - a.mean(), m.flatten() - m.mean()
        assert float((a * m).sum()) > 0

    eigh = torch.linalg.eigh

    def flipped_eigh(*args, **kwargs):
        evals, evecs = eigh(*args, **kwargs)
        return evals, -evecs

    monkeypatch.setattr(torch.linalg, "eigh", flipped_eigh)
    torch.testing.assert_close(A.LayerEigenCam(model, layer).attribute(x), attr)


def test_ablation_deviation_on_vit():
    """On a ViT LayerNorm output (negative values) pytorch-grad-cam replaces the
    ablated channel with min - 1e7; we zero it, as the paper does."""
    model, layer, x, targets, reshape = SETUPS["vit"]
    ours = A.LayerAblationCam(model, layer).attribute(
        x, target=targets, perturbations_per_eval=32
    )
    # the paper's equation, computed directly: zero channel k at the patch tokens
    with torch.no_grad():
        base = model(x)[torch.arange(3), targets]
        acts = layer(_block_input(model, x))
    grid = acts[:, 1:, :].reshape(3, 4, 4, -1).permute(0, 3, 1, 2)
    weights = torch.zeros(3, grid.shape[1])
    for k in range(grid.shape[1]):

        def zero_k(_m, _i, out, k=k):
            out = out.clone()
            out[:, 1:, k] = 0
            return out

        h = layer.register_forward_hook(zero_k)
        with torch.no_grad():
            ablated = model(x)[torch.arange(3), targets]
        h.remove()
        weights[:, k] = (base - ablated) / base
    expected = (weights[:, :, None, None] * grid).sum(1, keepdim=True)
    torch.testing.assert_close(ours, expected, atol=1e-4, rtol=1e-4)
    ref = _reference(
        gc.AblationCAM,
        model,
        layer,
        x,
        targets,
        reshape,
        ablation_layer=AblationLayerVit(),
    )
    assert (to_heatmap(ours, x)[:, 0] - ref).abs().max() > 1e-2


def _block_input(model, x):
    """Input of the last block's norm1 (the residual stream before the block)."""
    captured = {}
    h = model.blocks[-1].register_forward_pre_hook(
        lambda _m, inp: captured.setdefault("x", inp[0])
    )
    model(x)
    h.remove()
    return captured["x"]
