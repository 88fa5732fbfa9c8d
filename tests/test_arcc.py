"""ARCC, Complexity, Coherency and combined ROAD: equal to pytorch-grad-cam
1.5.7's values on the same maps (tiny CNN and tiny ViT, batch of 3 with
different targets)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_cams_more import SETUPS, _reference

import captum_ssl.attr as A
import captum_ssl.metrics as M
from captum_ssl.viz import normalize

gc = pytest.importorskip("pytorch_grad_cam")
from pytorch_grad_cam.metrics import arcc as gc_arcc  # noqa: E402
from pytorch_grad_cam.metrics import road as gc_road  # noqa: E402
from pytorch_grad_cam.utils.model_targets import (  # noqa: E402
    ClassifierOutputSoftmaxTarget,
)

TOL = 1e-4


def _blob_case():
    """A linear model whose class c responds to a bright blob at its own place,
    images showing their target's blob, and the blobs as maps: removing the
    most relevant pixels lowers the score, so ROAD (and ARCC) are not 0."""
    torch.manual_seed(0)
    yy, xx = torch.meshgrid(torch.arange(16.0), torch.arange(16.0), indexing="ij")
    centres = [(4, 4), (11, 5), (7, 12)]
    blobs = torch.stack(
        [torch.exp(-((yy - a) ** 2 + (xx - b) ** 2) / 8) for a, b in centres]
    )
    conv = torch.nn.Conv2d(3, 2, 1, bias=False)
    conv.weight.data.fill_(1 / 3)
    fc = torch.nn.Linear(2 * 256, 3)
    fc.weight.data = 4 * blobs.flatten(1).repeat(1, 2)
    fc.bias.data.zero_()
    model = torch.nn.Sequential(conv, torch.nn.Flatten(), fc).eval()
    t = [0, 2, 1]
    x = blobs[t][:, None].expand(3, 3, 16, 16) + 0.05 * torch.rand(3, 3, 16, 16)
    maps = normalize(blobs[t] + 0.01 * torch.rand(3, 16, 16))  # as CAM libraries
    targets = [ClassifierOutputSoftmaxTarget(c) for c in t]
    base = gc.GradCAMPlusPlus(model, [conv])
    prob = torch.nn.Sequential(model, torch.nn.Softmax(dim=-1)).eval()
    return model, A.LayerGradCamPlusPlus(prob, conv), x, t, targets, maps, base


def _case(where):
    """Maps without ties at the percentiles (pytorch-grad-cam's FullGrad);
    Coherency re-explains with Grad-CAM++ of the softmax probability, the
    score pytorch-grad-cam's ClassifierOutputSoftmaxTarget explains."""
    if where == "blobs":
        return _blob_case()
    model, layer, x, t, reshape = SETUPS[where]
    targets = [ClassifierOutputSoftmaxTarget(c) for c in t]
    maps = _reference(gc.FullGrad, model, [], x, targets, None)
    base = gc.GradCAMPlusPlus(model, [layer], reshape)
    prob = torch.nn.Sequential(model, torch.nn.Softmax(dim=-1)).eval()
    layout = A.TokenLayout(grid=(4, 4), num_prefix_tokens=1) if where == "vit" else None
    cam = A.LayerGradCamPlusPlus(prob, layer, layout=layout)
    return model, cam, x, t, targets, maps, base


def _no_noise(monkeypatch):
    """pytorch-grad-cam's imputation noise comes from torch's global RNG; the
    comparison turns it off on both sides."""
    monkeypatch.setattr(gc_road.torch, "randn_like", torch.zeros_like)


@pytest.mark.parametrize("where", ["cnn", "vit", "blobs"])
def test_arcc_parts_equal_pytorch_grad_cam(where, monkeypatch, record_property):
    model, cam, x, t, targets, maps, base = _case(where)
    _no_noise(monkeypatch)
    try:
        ref_cx = gc_arcc.Complexity()(maps.numpy())
        ref_coh = gc_arcc.Coherency()(x, maps.numpy(), targets, model, base)
        ref_road = gc_road.ROADCombined(percentiles=[20, 40, 60, 80])(
            x, maps.numpy(), targets, model
        )
        ref = gc_arcc.ARCC(base)(x, maps.numpy(), targets, model)
    finally:
        base.activations_and_grads.gradients = []
        base.activations_and_grads.release()
    ours = {
        "complexity": M.complexity(model, x, maps, t),
        "coherency": M.coherency(model, x, maps, t, method=cam),
        "road": M.road_combined(model, x, maps, t, noise=0.0),
        "arcc": M.arcc(model, x, maps, t, method=cam, noise=0.0),
    }
    refs = {"complexity": ref_cx, "coherency": ref_coh, "road": ref_road, "arcc": ref}
    for name, value in ours.items():
        assert value.shape == (3,)
        expected = torch.from_numpy(np.asarray(refs[name], dtype=np.float32))
        diff = float((value - expected).abs().max())
        record_property(f"max_abs_diff_{name}", diff)
        assert diff <= TOL, (name, value, expected)
    assert float(ours["road"].abs().max()) > 0
    if where == "blobs":  # a faithful map: ROAD and ARCC clearly positive
        assert float(ours["road"].min()) > 0.1 and float(ours["arcc"].min()) > 0.1


def test_arcc_directions_and_geometric_mean():
    model, cam, x, t, _, maps, _ = _case("cnn")
    assert not M.higher_is_better(M.complexity)
    assert M.higher_is_better(M.coherency) and M.higher_is_better(M.arcc)
    cx = M.complexity(model, x, maps)
    coh = M.coherency(model, x, maps, t, method=cam)
    road = (2 * M.road_combined(model, x, maps, t)).clamp(0, 1)
    geo = M.arcc(model, x, maps, t, method=cam, mean="geometric")
    torch.testing.assert_close(geo, (coh * (1 - cx) * road) ** (1 / 3))
    # a map that is 1 on 15 of 16 cells (bilinear upsampling blurs the 0)
    flat = torch.ones(3, 1, 4, 4)
    flat[:, :, 0, 0] = 0
    assert float(M.complexity(model, x, flat).min()) > 15 / 16 - 0.01


def test_road_combined_ties_remove_everything():
    """A map that is 0 on more than 20% of the pixels: at percentile 20 every
    pixel is removed; that image scores NaN, with a warning."""
    model, _, x, t, _, maps, _ = _case("cnn")
    tied = maps.clone()
    tied[0, :16] = 0
    with (
        pytest.warns(A.NonFiniteWarning, match="is NaN"),
        pytest.warns(UserWarning, match="removes every pixel"),
    ):
        out = M.road_combined(model, x, tied, t, noise=0.0)
    assert bool(out[0].isnan()) and not bool(out[1:].isnan().any())


def test_arcc_errors():
    model, _, x, t, _, maps, _ = _case("cnn")
    with pytest.raises(M.MetricInputError, match="method"):
        M.coherency(model, x, maps, t)
    with pytest.raises(M.MetricInputError, match="mean"):
        M.arcc(model, x, maps, t, method=lambda i, c: maps, mean="median")
    with pytest.raises(M.MetricInputError, match="percentiles"):
        M.road_combined(model, x, maps, t, percentiles=[0, 50])


def test_complexity_of_a_uniform_map_is_one_as_documented():
    """Before: min-max scaling made a uniform map 0, the best (lowest) score."""
    model, _, x, _, _, _, _ = _case("cnn")
    b = x.shape[0]
    uniform = torch.full((b, 1, 4, 4), 0.7)
    torch.testing.assert_close(M.complexity(model, x, uniform), torch.ones(b))
    torch.testing.assert_close(  # an empty map (all <= 0 after ReLU) stays 0
        M.complexity(model, x, torch.full((b, 1, 4, 4), -1.0)), torch.zeros(b)
    )
    # mean |S| of a map that is 1 on one cell of 16 and 0 elsewhere, no resize
    one = torch.zeros(b, 1, *x.shape[-2:])
    one[:, :, 0, 0] = 1.0
    torch.testing.assert_close(
        M.complexity(model, x, one), torch.full((b,), 1 / one[0, 0].numel())
    )
