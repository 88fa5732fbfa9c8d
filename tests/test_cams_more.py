"""FullGrad, FEM, Finer-CAM, KPCA-CAM, ShapleyCAM, SESS, RefineCAM, Sobel-CAM,
Random-CAM and Deep Feature Factorization: parity with pytorch-grad-cam 1.5.7
after its post-processing (ReLU, min-max, bilinear resize, min-max), batch of
3 with different targets, on a CNN layer and a ViT token layer; documented
deviations shown."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import TinyCNN, make_tiny_vit
from test_cam_parity import to_heatmap

import captum_ssl.attr as A
from captum_ssl.attr import AttributionInputError
from captum_ssl.viz import normalize, upsample

gc = pytest.importorskip("pytorch_grad_cam")
from pytorch_grad_cam.utils.model_targets import (  # noqa: E402
    ClassifierOutputTarget,
    FinerWeightedTarget,
)

TOL = 1e-4


def _vit_reshape(t: torch.Tensor) -> torch.Tensor:
    b, _, c = t.shape
    return t[:, 1:, :].reshape(b, 4, 4, c).permute(0, 3, 1, 2)


def _setups():
    torch.manual_seed(0)
    cnn = TinyCNN().eval()
    vit = make_tiny_vit()
    x = torch.randn(3, 3, 32, 32)
    return {
        "cnn": (cnn, cnn.features[4], x, [0, 2, 4], None),
        "vit": (vit, vit.blocks[-1].norm1, x, [1, 5, 6], _vit_reshape),
    }


SETUPS = _setups()
WHERE = ["cnn", "vit"]


def _targets(targets):
    return [ClassifierOutputTarget(t) for t in targets]


def _release(cam) -> None:
    """Remove pytorch-grad-cam's hooks. Its own release() fails on ViT
    gradients that are views (``detach_``), so the lists are emptied first."""
    for obj in getattr(cam, "base_cam_per_layer", None) or [
        getattr(cam, "base_cam", cam)
    ]:
        ag = obj.activations_and_grads
        ag.gradients, ag.activations = [], []
        ag.release()


def _reference(gc_cls, model, layers, x, targets, reshape, **kw):
    cam = gc_cls(model=model, target_layers=layers, reshape_transform=reshape, **kw)
    try:
        out = cam(input_tensor=x, targets=targets)
    finally:
        _release(cam)
    return torch.from_numpy(np.asarray(out, dtype=np.float32))


def _heat(attr, x):
    return to_heatmap(attr, x)[:, 0]


def _check(ours, ref, record):
    assert ours.shape == ref.shape
    assert float(ref.std()) > 0
    diff = float((ours - ref).abs().max())
    record(diff)
    assert diff <= TOL


@pytest.fixture
def record(record_property):
    return lambda d: record_property("max_abs_diff", d)


def _unfuse(model, monkeypatch):
    """Fused attention has no double backward (pytorch-grad-cam needs it)."""
    for m in model.modules():
        if hasattr(m, "fused_attn"):
            monkeypatch.setattr(m, "fused_attn", False)


# ------------------------------------------------------------ gradient CAMs
@pytest.mark.parametrize("where", WHERE)
def test_fem_parity(where, record):
    model, layer, x, t, reshape = SETUPS[where]
    ref = _reference(gc.FEM, model, [layer], x, _targets(t), reshape)
    _check(_heat(A.LayerFEM(model, layer).attribute(x, target=t), x), ref, record)


def test_fem_equation():
    """w_k = fraction of positions above mean + k * std (population std)."""
    model, layer, x, _, _ = SETUPS["cnn"]
    acts = model.features[:5](x).detach()
    mu = acts.mean((2, 3), keepdim=True)
    sd = ((acts - mu) ** 2).mean((2, 3), keepdim=True).sqrt()
    w = (acts > mu + 1.5 * sd).float().mean((2, 3), keepdim=True)
    expected = (w * acts).sum(1, keepdim=True)
    ours = A.LayerFEM(model, layer).attribute(x, k=1.5)
    torch.testing.assert_close(ours, expected)


def _smooth_cnn():
    """TinyCNN with SiLU: the second derivative after the layer is not zero."""
    torch.manual_seed(0)
    cnn = TinyCNN().eval()
    cnn.features[1] = torch.nn.SiLU()
    cnn.features[4] = torch.nn.SiLU()
    return cnn


def test_shapley_cam_parity_cnn(record):
    """On a CNN with SiLU (non-zero Hessian at conv2's output)."""
    model, (_, _, x, t, _) = _smooth_cnn(), SETUPS["cnn"]
    layer = model.features[3]
    ref = _reference(gc.ShapleyCAM, model, [layer], x, _targets(t), None)
    ours = A.LayerShapleyCam(model, layer).attribute(x, target=t)
    _check(_heat(ours, x), ref, record)
    gradcam = A.LayerGradCam(model, layer).attribute(x, target=t)
    assert (ours - gradcam).abs().max() > 1e-4


def test_shapley_cam_vit_where_pytorch_grad_cam_fails(monkeypatch):
    """pytorch-grad-cam's ShapleyCAM reshapes the tokens for its weights but
    then combines them with the un-reshaped (B, N, C) activations and raises;
    ours works on token layers (its value: test_shapley_cam_hessian_term),
    also with fused attention (turned off during the call and restored)."""
    model, layer, x, t, reshape = SETUPS["vit"]
    fused = A.LayerShapleyCam(model, layer).attribute(x, target=t)
    assert all(m.fused_attn for m in model.modules() if hasattr(m, "fused_attn"))
    _unfuse(model, monkeypatch)
    with pytest.raises(ValueError, match="activation shape"):
        _reference(gc.ShapleyCAM, model, [layer], x, _targets(t), reshape)
    unfused = A.LayerShapleyCam(model, layer).attribute(x, target=t)
    torch.testing.assert_close(fused, unfused, atol=1e-5, rtol=1e-4)


def test_shapley_cam_hessian_term(monkeypatch):
    """On a ViT (non-linear after the layer) the Hessian term is not zero:
    ShapleyCAM's weights are mean(g - H A / 2), H A from torch's hvp."""
    model, layer, x, t, _ = SETUPS["vit"]
    _unfuse(model, monkeypatch)
    acts = {}
    h = layer.register_forward_hook(lambda m, i, o: acts.setdefault("a", o.detach()))
    model(x)
    h.remove()
    a0 = acts["a"]

    def score(a):
        hook = layer.register_forward_hook(lambda m, i, o: a)
        try:
            return model(x)[torch.arange(3), t].sum()
        finally:
            hook.remove()

    g = torch.autograd.grad(score(a0.requires_grad_()), a0)[0]
    _, hvp = torch.autograd.functional.hvp(score, a0.detach(), a0.detach())
    a0 = a0.detach()
    grid = lambda v: _vit_reshape(v)  # noqa: E731
    w = (grid(g) - 0.5 * grid(hvp)).mean((2, 3), keepdim=True)
    expected = (w * grid(a0)).sum(1, keepdim=True)
    ours = A.LayerShapleyCam(model, layer).attribute(x, target=t)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-4)
    gradcam = A.LayerGradCam(model, layer).attribute(x, target=t)
    assert (ours - gradcam).abs().max() > 1e-4


@pytest.mark.parametrize("where", WHERE)
def test_finer_cam_parity(where, record):
    """Our per-sample targets against pytorch-grad-cam's FinerWeightedTarget
    built with the comparison classes chosen in the test (closest logits)."""
    model, layer, x, t, reshape = SETUPS[where]
    with torch.no_grad():
        out = model(x)
    refs = []
    for i, c in enumerate(t):
        order = torch.argsort((out[i] - out[i, c]).abs()).tolist()
        assert order[0] == c
        refs.append(FinerWeightedTarget(c, order[1:4], 0.8))
    ref = _reference(gc.FinerCAM, model, [layer], x, refs, reshape)
    ours = A.LayerFinerCam(model, layer).attribute(x, target=t, alpha=0.8)
    _check(_heat(ours, x), ref, record)


def test_finer_cam_needs_target():
    model, layer, x, _, _ = SETUPS["cnn"]
    with pytest.raises(AttributionInputError, match="target"):
        A.LayerFinerCam(model, layer).attribute(x)


@pytest.mark.parametrize("where", WHERE)
def test_random_cam_parity(where, record, monkeypatch):
    """Same weights -> same map: pytorch-grad-cam's numpy draw is replaced by
    the weights our generator draws."""
    import pytorch_grad_cam.random_cam as rc

    model, layer, x, t, reshape = SETUPS[where]
    ours = A.LayerRandomCam(model, layer).attribute(
        x, generator=torch.Generator().manual_seed(3)
    )
    channels = 16 if where == "cnn" else 32
    w = 2 * torch.rand(3, channels, generator=torch.Generator().manual_seed(3)) - 1
    monkeypatch.setattr(rc.np.random, "uniform", lambda *a, **k: w.numpy())
    ref = _reference(gc.RandomCAM, model, [layer], x, _targets(t), reshape)
    _check(_heat(ours, x), ref, record)


# ----------------------------------------------------------------- KPCA-CAM
@pytest.mark.parametrize("where", WHERE)
@pytest.mark.parametrize("kernel", ["sigmoid", "rbf"])
def test_kpca_cam_parity_up_to_sign(where, kernel, record):
    """scikit-learn keeps an arbitrary eigenvector sign; we orient the map."""
    model, layer, x, t, reshape = SETUPS[where]
    ref = _reference(
        gc.KPCA_CAM, model, [layer], x, _targets(t), reshape, kernel=kernel
    )
    attr = A.LayerKPCACam(model, layer).attribute(x, kernel=kernel)
    same, flipped = _heat(attr, x), _heat(-attr, x)
    errs = [
        min(
            float((same[i] - ref[i]).abs().max()),
            float((flipped[i] - ref[i]).abs().max()),
        )
        for i in range(3)
    ]
    record(max(errs))
    assert max(errs) <= TOL


def test_kpca_cam_orientation():
    """Deviation shown: the map correlates positively with the mean activation."""
    model, layer, x, _, _ = SETUPS["cnn"]
    attr = A.LayerKPCACam(model, layer).attribute(x)
    mean = model.features[:5](x).detach().mean(1, keepdim=True)
    for a, m in zip(attr, mean):
        a, m = a.flatten() - a.mean(), m.flatten() - m.mean()
        assert float((a * m).sum()) > 0


# ----------------------------------------------------------------- FullGrad
@pytest.mark.parametrize("where", WHERE)
def test_fullgrad_parity(where, record):
    """pytorch-grad-cam ignores target_layers and uses every Conv2d /
    BatchNorm2d with a bias (the ViT's patch embedding), no reshape."""
    model, _, x, t, _ = SETUPS[where]
    ref = _reference(gc.FullGrad, model, [], x, _targets(t), None)
    ours = A.FullGrad(model).attribute(x, target=t)
    assert ours.shape == (3, 1, 32, 32)
    _check(_heat(ours, x), ref, record)


def test_fullgrad_folds_batch_norm():
    """The paper's equation on a conv-BN net: the BN bias is beta - mu gamma/sigma."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, padding=1, bias=False),
        torch.nn.BatchNorm2d(4),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(4, 3),
    ).eval()
    bn = net[1]
    bn.running_mean.uniform_(-1, 1)
    bn.running_var.uniform_(0.5, 2)
    bn.bias.data.uniform_(-1, 1)
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    z = net[:2](x)
    y = net[2:](z)[torch.arange(2), [0, 2]].sum()
    gx, gz = torch.autograd.grad(y, [x, z])
    bias = bn.bias - bn.running_mean * bn.weight / (bn.running_var + bn.eps).sqrt()
    expected = normalize((gx * x).abs().reshape(6, 1, 8, 8)).reshape(2, 3, 8, 8).sum(1)
    bterm = (gz * bias.view(1, -1, 1, 1)).abs().reshape(8, 1, 8, 8)
    expected = expected + normalize(bterm).reshape(2, 4, 8, 8).sum(1)
    ours = A.FullGrad(net).attribute(x.detach(), target=[0, 2])
    torch.testing.assert_close(ours[:, 0], expected.detach(), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- RefineCAM
@pytest.mark.parametrize("where", WHERE)
def test_refine_cam_parity(where, record):
    model, _, x, t, reshape = SETUPS[where]
    if where == "cnn":
        layers = [model.features[1], model.features[4]]
    else:
        layers = [model.blocks[0].norm1, model.blocks[-1].norm1]
    ref = _reference(gc.RefineCAM, model, layers, x, _targets(t), reshape)
    ours = A.LayerRefineCam(model, layers).attribute(x, target=t)
    assert ours.shape == (3, 1, 32, 32)
    _check(_heat(ours, x), ref, record)


# --------------------------------------------------------------------- SESS
@pytest.mark.parametrize("where", WHERE)
def test_sess_parity(where, record):
    model, layer, x, t, reshape = SETUPS[where]
    kw = dict(num_scales=3, step_size=16, pre_filter_ratio=0.2, batch_size=8)
    ref = _reference(gc.SESS, model, [layer], x, _targets(t), reshape, **kw)
    sess = A.SESS(A.LayerGradCam(model, layer))
    ours = sess.attribute(x, target=t, **kw)
    assert ours.shape == (3, 1, 32, 32)
    _check(_heat(ours, x), ref, record)


def test_sess_bad_options():
    model, layer, x, t, _ = SETUPS["cnn"]
    sess = A.SESS(A.LayerGradCam(model, layer))
    with pytest.raises(AttributionInputError, match="pool"):
        sess.attribute(x, target=t, pool="median")
    with pytest.raises(AttributionInputError, match="window"):
        sess.attribute(x, target=t, scales=[16])


# ---------------------------------------------------------------- Sobel-CAM
def test_sobel_cam_parity_and_deviation(record):
    """Equal to pytorch-grad-cam's sobel_cam on an 8-bit gray image whose
    steps need no rounding; on strong edges it saturates at 255, we do not."""
    from pytorch_grad_cam.sobel_cam import sobel_cam

    g = torch.Generator().manual_seed(0)
    gray = 2 * torch.randint(0, 16, (2, 1, 24, 20), generator=g).float()
    x = gray.expand(2, 3, 24, 20)
    ours = A.SobelCam().attribute(x)
    for i in range(2):
        img = x[i].permute(1, 2, 0).numpy().astype(np.uint8)
        ref = torch.from_numpy(sobel_cam(img).astype(np.float32))
        diff = float((ours[i, 0] - ref).abs().max())
        record(diff)
        assert diff <= TOL
    strong = 8 * x
    img = strong[0].permute(1, 2, 0).numpy().astype(np.uint8)
    assert sobel_cam(img).max() == 255
    assert float(A.SobelCam().attribute(strong).max()) > 255


# ------------------------------------------------------------------------ DFF
def _sklearn_init(x: np.ndarray, k: int):
    """scikit-learn's init='random', random_state=0 (what pytorch-grad-cam uses)."""
    rng = np.random.RandomState(0)
    avg = np.sqrt(x.mean() / k)
    h = np.abs(avg * rng.standard_normal(size=(k, x.shape[1])).astype(x.dtype))
    w = np.abs(avg * rng.standard_normal(size=(x.shape[0], k)).astype(x.dtype))
    return torch.from_numpy(w), torch.from_numpy(h)


@pytest.mark.parametrize("where", WHERE)
def test_dff_parity(where, record):
    from pytorch_grad_cam import DeepFeatureFactorization as GcDFF

    model, layer, x, _, reshape = SETUPS[where]
    head = model.fc if where == "cnn" else model.head
    k = 4
    gc_dff = GcDFF(model, layer, reshape, computation_on_concepts=head)
    try:
        concepts, maps, scores = gc_dff(x, n_components=k)
    finally:
        _release(gc_dff)
    ref = torch.from_numpy(np.stack(maps))  # (B, k, H, W), each scaled

    dff = A.DeepFeatureFactorization(model, layer)
    (acts,) = dff._activations((x,), None, False)
    c = acts.shape[1]
    flat = acts.transpose(0, 1).reshape(c, -1)
    init = _sklearn_init((flat - flat.min(1, keepdim=True).values).numpy(), k)
    fact = dff.factorize(x, n_components=k, init=init)
    assert fact.maps.shape == (
        3,
        k,
        4 if where == "vit" else 16,
        4 if where == "vit" else 16,
    )
    # pytorch-grad-cam: min-max per concept map, then resize (no final min-max)
    ours = upsample(normalize(fact.maps.reshape(3 * k, 1, *fact.maps.shape[2:])), x)
    ours = ours.reshape(3, k, 32, 32)
    _check(ours, ref, record)
    torch.testing.assert_close(
        fact.concepts, torch.from_numpy(concepts).float(), atol=1e-3, rtol=1e-3
    )
    torch.testing.assert_close(
        fact.scores, torch.from_numpy(scores), atol=1e-3, rtol=1e-3
    )


def test_dff_attribute_picks_the_target_concept():
    model, layer, x, t, _ = SETUPS["cnn"]
    dff = A.DeepFeatureFactorization(model, layer)
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    fact = dff.factorize(x, n_components=3, generator=g())
    attr = dff.attribute(x, target=t, n_components=3, generator=g())
    best = torch.softmax(fact.scores, 1)[:, t].argmax(0)
    torch.testing.assert_close(attr[:, 0], fact.maps[torch.arange(3), best])
    # the factorisation reconstructs the shifted activations
    acts = model.features[:5](x).detach().transpose(0, 1).reshape(16, -1)
    recon = fact.concepts - acts.min(1, keepdim=True).values
    approx = recon @ fact.maps.transpose(0, 1).reshape(3, -1)
    shifted = acts - acts.min(1, keepdim=True).values
    assert (approx - shifted).norm() < 0.5 * shifted.norm()


# ---------------------------------------------------------- the main job
NEW_METHODS = ["fullgrad", "fem", "finercam", "kpcacam", "shapleycam", "sess"]
NEW_METHODS += ["refinecam", "sobelcam", "randomcam", "dff"]


@pytest.mark.parametrize("where", WHERE)
def test_main_job_knows_the_new_methods(where):
    from benchmarks.evaluation import methods as M

    model, _, x, t, _ = SETUPS[where]
    spec = M.ModelSpec(
        name="tiny",
        build=lambda: model,
        architecture="tiny",
        training="supervised",
        weights="random",
        cam_layer="features.4" if where == "cnn" else "blocks.-1.norm1",
    )
    for name in NEW_METHODS:
        assert name in M.method_names()
        assert M.COST_CLASS[name] in (
            "gradient",
            "forward per channel",
            "forward per mask",
            "none",
        )
        opts = {"num_scales": 2} if name == "sess" else {}
        maps = M.build_method(name, opts, model, spec)(x, torch.tensor(t))
        assert maps.shape[:2] == (3, 1) and bool(torch.isfinite(maps).all()), name


def test_noise_tunnel_and_layer_input_on_single_layer_cams():
    """Captum's NoiseTunnel composes with the single-layer CAMs (per-sample
    targets are expanded with the noisy copies)."""
    from captum.attr import NoiseTunnel

    model, layer, x, t, _ = SETUPS["vit"]
    for cls in (A.LayerFinerCam, A.LayerShapleyCam, A.LayerFEM, A.LayerKPCACam):
        nt = NoiseTunnel(cls(model, layer))
        out = nt.attribute(x, nt_type="smoothgrad", nt_samples=2, target=t)
        assert out.shape == (3, 1, 4, 4) and bool(torch.isfinite(out).all())
    cnn, layer, x, t, _ = SETUPS["cnn"]
    ours = A.LayerShapleyCam(cnn, layer).attribute(
        x, target=t, attribute_to_layer_input=True
    )
    ref = A.LayerGradCam(cnn, layer).attribute(
        x, target=t, attribute_to_layer_input=True
    )
    torch.testing.assert_close(ours, ref)  # piecewise linear after the layer
