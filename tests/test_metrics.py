"""captum_ssl.metrics: each metric against a direct per-image computation of its
paper's definition written here, agreement with Quantus where both measure the
same thing, and behaviour on the real EfficientNet-Lite0 and real photos."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import captum_ssl.metrics as M

# ------------------------------------------------------------------ helpers


def _up(maps: torch.Tensor, hw) -> torch.Tensor:
    """(B,1,h,w) -> (B,1,H,W), bilinear half-pixel (the metrics' convention)."""
    return F.interpolate(maps, size=hw, mode="bilinear", align_corners=False)


def _prob(model, x1: torch.Tensor, t: int) -> float:
    """Softmax probability of class t for one image (C,H,W)."""
    with torch.no_grad():
        return float(torch.softmax(model(x1[None]), dim=1)[0, t])


def _correct(model, x1: torch.Tensor, t: int) -> float:
    with torch.no_grad():
        return float(model(x1[None]).argmax(1)[0] == t)


def _order(map1: torch.Tensor, descending=True) -> np.ndarray:
    """Pixel indices of one (1,H,W) map, most salient first (stable)."""
    v = map1.flatten().numpy().astype(np.float64)
    return np.argsort(-v if descending else v, kind="stable")


def _remove(x1: torch.Tensor, idx: np.ndarray, fill: torch.Tensor) -> torch.Tensor:
    """Copy of image x1 (C,H,W) with pixels idx taken from fill (C,H,W)."""
    c, h, w = x1.shape
    out = x1.clone().reshape(c, -1)
    out[:, torch.as_tensor(idx, dtype=torch.long)] = fill.reshape(c, -1)[
        :, torch.as_tensor(idx, dtype=torch.long)
    ]
    return out.reshape(c, h, w)


def _rise_auc(ys) -> float:
    """RISE's auc(): (sum - first/2 - last/2) / (n - 1)."""
    ys = np.asarray(ys)
    return float((ys.sum() - ys[0] / 2 - ys[-1] / 2) / (len(ys) - 1))


def _blur_rise(x: torch.Tensor) -> torch.Tensor:
    """RISE's blur: its gkern (SciPy's gaussian_filter of an impulse in an
    11x11 window, sigma 5), zero padding, per channel."""
    from scipy.ndimage import gaussian_filter

    impulse = np.zeros((11, 11))
    impulse[5, 5] = 1
    k = torch.tensor(gaussian_filter(impulse, 5).astype("float32"), dtype=x.dtype)
    c = x.shape[1]
    return F.conv2d(x, k.expand(c, 1, 11, 11), padding=5, groups=c)


@pytest.fixture
def setup_cnn(tiny_cnn, images):
    torch.manual_seed(3)
    maps = torch.rand(images.shape[0], 1, 8, 8)
    with torch.no_grad():
        target = tiny_cnn(images).argmax(1)
    return tiny_cnn, images, maps, target


# ------------------------------------------------- deletion / insertion (RISE)
@pytest.mark.parametrize("step", [100, 256])
def test_deletion_matches_per_image_rise(setup_cnn, step):
    model, x, maps, target = setup_cnn
    got = M.deletion_auc(model, x, maps, target, step=step, batch_size=5)
    up = _up(maps, (32, 32))
    n = math.ceil(32 * 32 / step)
    for b in range(x.shape[0]):
        order = _order(up[b])
        ys = [
            _prob(
                model,
                _remove(x[b], order[: i * step], torch.zeros_like(x[b])),
                int(target[b]),
            )
            for i in range(n + 1)
        ]
        assert got[b].item() == pytest.approx(_rise_auc(ys), abs=1e-5)


def test_insertion_matches_per_image_rise(setup_cnn):
    model, x, maps, target = setup_cnn
    step = 128
    got = M.insertion_auc(model, x, maps, target, step=step, batch_size=7)
    curve = M.insertion_auc(model, x, maps, target, step=step, return_curve=True)
    up = _up(maps, (32, 32))
    blurred = _blur_rise(x)
    for b in range(x.shape[0]):
        order = _order(up[b])
        ys = [
            _prob(model, _remove(blurred[b], order[: i * step], x[b]), int(target[b]))
            for i in range(32 * 32 // step + 1)
        ]
        assert curve[b].tolist() == pytest.approx(ys, abs=1e-5)
        assert got[b].item() == pytest.approx(_rise_auc(ys), abs=1e-5)
    # the curve ends on the intact image
    probs = torch.softmax(model(x), 1)[torch.arange(3), target]
    assert curve[:, -1] == pytest.approx(probs.tolist(), abs=1e-5)


def test_input_resolution_maps_are_summed_over_channels(setup_cnn):
    model, x, _, target = setup_cnn
    rgb = torch.randn_like(x)
    a = M.deletion_auc(model, x, rgb, target, step=256)
    b = M.deletion_auc(model, x, rgb.sum(1, keepdim=True), target, step=256)
    assert torch.equal(a, b)


class _Counting(torch.nn.Module):
    """Records the batch size of every forward call."""

    def __init__(self, model):
        super().__init__()
        self.model, self.calls = model, []

    def forward(self, x):
        self.calls.append(x.shape[0])
        return self.model(x)


@pytest.mark.parametrize(
    "metric, kwargs, per_image",
    [
        (M.deletion_auc, {"step": 100}, 12),  # ceil(1024 / 100) + 1
        (M.insertion_auc, {"step": 256}, 5),
        (M.perturbation_auc, {"mode": "negative"}, 10),
        (M.average_drop, {}, 2),
    ],
)
def test_cost_is_the_protocols_forward_passes_in_full_chunks(
    setup_cnn, metric, kwargs, per_image
):
    model, x, maps, target = setup_cnn
    counting = _Counting(model).eval()
    metric(counting, x, maps, target, batch_size=8, **kwargs)
    total = x.shape[0] * per_image
    assert sum(counting.calls) == total
    # images and steps share chunks: every pass but the last is full
    assert counting.calls == [8] * (total // 8) + ([total % 8] if total % 8 else [])


# ------------------------------------------------- perturbation AUC (Chefer)
@pytest.mark.parametrize("mode", ["positive", "negative"])
@pytest.mark.parametrize("score", ["accuracy", "probability"])
def test_perturbation_auc_matches_chefer_protocol(setup_cnn, mode, score):
    model, x, maps, _ = setup_cnn
    labels = torch.tensor([0, 1, 2])
    fractions = [0.1, 0.3, 0.5, 0.7, 0.9]
    got = M.perturbation_auc(
        model, x, maps, labels, mode=mode, fractions=fractions, score=score
    )
    up = _up(maps, (32, 32))
    f = _correct if score == "accuracy" else _prob
    for b in range(x.shape[0]):
        order = _order(up[b], descending=(mode == "positive"))
        ys = [f(model, x[b], int(labels[b]))]
        for fr in fractions:
            k = int(fr * 32 * 32)  # Chefer: int(base_size * step)
            ys.append(
                f(
                    model,
                    _remove(x[b], order[:k], torch.zeros_like(x[b])),
                    int(labels[b]),
                )
            )
        want = np.trapezoid(ys, x=[0.0] + fractions)
        assert got[b].item() == pytest.approx(want, abs=1e-5)


def test_directions():
    assert M.higher_is_better(M.deletion_auc) is False
    assert M.higher_is_better(M.insertion_auc) is True
    assert M.higher_is_better(M.perturbation_auc) is False  # default positive
    assert M.higher_is_better(M.perturbation_auc, mode="negative") is True
    assert M.higher_is_better(M.road, order="lerf") is True
    assert M.higher_is_better(M.average_drop) is False
    assert M.higher_is_better(M.average_increase) is True
    assert M.higher_is_better(M.randomization_sanity) is False
    with pytest.raises(ValueError, match="mode"):
        M.higher_is_better(M.perturbation_auc, mode="sideways")


# ------------------------------------------------------ thesis: drop/increase
def test_average_drop_increase_and_confidence_match_definitions(setup_cnn):
    model, x, maps, target = setup_cnn
    drop = M.average_drop(model, x, maps, target, batch_size=4)
    inc = M.average_increase(model, x, maps, target)
    p_img = M.class_probability(model, x, None, target)
    p_exp = M.class_probability(model, x, maps, target)
    acc_exp = M.accuracy(model, x, maps, target)
    up = _up(maps, (32, 32))
    for b in range(x.shape[0]):
        s = up[b]
        s = (s - s.min()) / (s.max() - s.min())  # saliency in [0, 1]
        y = _prob(model, x[b], int(target[b]))
        o = _prob(model, x[b] * s, int(target[b]))
        assert drop[b].item() == pytest.approx(max(0.0, y - o) / y, abs=1e-5)
        assert inc[b].item() == float(o > y)
        assert p_img[b].item() == pytest.approx(y, abs=1e-6)
        assert p_exp[b].item() == pytest.approx(o, abs=1e-5)
        assert acc_exp[b].item() == _correct(model, x[b] * s, int(target[b]))
    assert torch.equal(M.accuracy(model, x, None, None), torch.ones(3))


# ------------------------------------------------------------------- ROAD
def _dense_linear_imputation(img: np.ndarray, removed: np.ndarray) -> np.ndarray:
    """ROAD's equations solved densely: for every removed pixel p,
    sum_n w_n (v_p - v_n) = 0 over its in-image 8 neighbours n."""
    c, h, w = img.shape
    weights = {(dy, dx): (1 / 12 if dy and dx else 1 / 6)
               for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx}  # fmt: skip
    unknown = [(i, j) for i in range(h) for j in range(w) if removed[i, j]]
    pos = {p: k for k, p in enumerate(unknown)}
    a = np.zeros((len(unknown), len(unknown)))
    rhs = np.zeros((len(unknown), c))
    for k, (i, j) in enumerate(unknown):
        for (dy, dx), wt in weights.items():
            ni, nj = i + dy, j + dx
            if not (0 <= ni < h and 0 <= nj < w):
                continue
            a[k, k] += wt
            if (ni, nj) in pos:
                a[k, pos[(ni, nj)]] -= wt
            else:
                rhs[k] += wt * img[:, ni, nj]
    sol = np.linalg.solve(a, rhs)
    out = img.copy()
    for k, (i, j) in enumerate(unknown):
        out[:, i, j] = sol[k]
    return out


def test_noisy_linear_imputation_solves_road_equations():
    torch.manual_seed(0)
    x = torch.rand(2, 3, 12, 12)
    removed = torch.rand(2, 1, 12, 12) < 0.6
    out = M.noisy_linear_imputation(x, removed, noise=0.0)
    for b in range(2):
        want = _dense_linear_imputation(x[b].double().numpy(), removed[b, 0].numpy())
        np.testing.assert_allclose(out[b].numpy(), want, atol=1e-5)
    # kept pixels unchanged; each removed pixel is the weighted mean of its
    # neighbours (checked on an interior pixel)
    keep = ~removed.expand_as(x)
    assert torch.equal(out[keep], x[keep])
    i, j = [(i, j) for i in range(1, 11) for j in range(1, 11) if removed[0, 0, i, j]][
        0
    ]
    nb = out[0, :, i - 1 : i + 2, j - 1 : j + 2]
    w = torch.tensor([[1, 2, 1], [2, 0, 2], [1, 2, 1]], dtype=x.dtype) / 12
    assert out[0, :, i, j] == pytest.approx((nb * w).sum((1, 2)).tolist(), abs=1e-5)
    # noise: seeded, only on removed pixels, of the requested size
    g1 = M.noisy_linear_imputation(x, removed, 0.05, torch.Generator().manual_seed(1))
    g2 = M.noisy_linear_imputation(x, removed, 0.05, torch.Generator().manual_seed(1))
    assert torch.equal(g1, g2)
    resid = (g1 - out)[removed.expand_as(x)]
    assert resid.std().item() == pytest.approx(0.05, rel=0.15)
    assert torch.equal(g1[keep], x[keep])


@pytest.mark.parametrize("order", ["morf", "lerf"])
def test_road_matches_per_image_imputation(tiny_cnn, order):
    torch.manual_seed(5)
    x = torch.randn(2, 3, 16, 16)
    maps = torch.rand(2, 1, 4, 4)
    target = torch.tensor([1, 3])
    pct = [0.2, 0.5, 0.8]
    curve = M.road(tiny_cnn, x, maps, target, order=order, percentages=pct,
                   score="probability", noise=0.0, return_curve=True)  # fmt: skip
    score = M.road(tiny_cnn, x, maps, target, order=order, percentages=pct,
                   score="probability", noise=0.0)  # fmt: skip
    up = _up(maps, (16, 16))
    for b in range(2):
        idx = _order(up[b], descending=(order == "morf"))
        ys = []
        for p in pct:
            removed = np.zeros(256, dtype=bool)
            removed[idx[: int(p * 256)]] = True
            img = _dense_linear_imputation(
                x[b].double().numpy(), removed.reshape(16, 16)
            )
            ys.append(
                _prob(tiny_cnn, torch.tensor(img, dtype=torch.float32), int(target[b]))
            )
        assert curve[b].tolist() == pytest.approx(ys, abs=1e-5)
        assert score[b].item() == pytest.approx(np.trapezoid(ys, x=pct) / 0.6, abs=1e-5)


def test_road_is_seeded(tiny_cnn, images):
    maps = torch.rand(3, 1, 8, 8)
    a = M.road(tiny_cnn, images, maps, None, percentages=[0.5], score="logit", seed=3)
    b = M.road(tiny_cnn, images, maps, None, percentages=[0.5], score="logit", seed=3)
    c = M.road(tiny_cnn, images, maps, None, percentages=[0.5], score="logit", seed=4)
    assert torch.equal(a, b) and not torch.equal(a, c)


# ------------------------------------------------------------ consistency
def _image_map(x, target):
    """An explanation that follows the image exactly: its channel sum."""
    return x.sum(1, keepdim=True)


@pytest.mark.parametrize("transform", ["hflip", "resized_crop", "rotation"])
def test_consistency_is_one_for_an_equivariant_explanation(tiny_cnn, images, transform):
    r = M.explanation_consistency(tiny_cnn, images, _image_map, 0, transform=transform)
    assert r == pytest.approx([1.0] * 3, abs=1e-4)
    iou = M.explanation_consistency(
        tiny_cnn, images, _image_map, 0, transform=transform, measure="iou", top_k=0.2
    )
    assert iou.min().item() > 0.95


def test_consistency_matches_direct_flip_computation(tiny_cnn, images):
    from captum_ssl.attr import LayerGradCam

    gc = LayerGradCam(tiny_cnn, tiny_cnn.features[3])
    target = torch.tensor([0, 1, 2])
    got = M.explanation_consistency(tiny_cnn, images, gc, target, measure="pearson")
    got_s = M.explanation_consistency(tiny_cnn, images, gc, target, measure="spearman")
    got_iou = M.explanation_consistency(
        tiny_cnn, images, gc, target, measure="iou", top_k=0.25
    )
    from scipy.stats import spearmanr

    for b in range(3):
        m = _up(gc.attribute(images[b : b + 1], target=int(target[b])), (32, 32))[0, 0]
        flipped = images[b : b + 1].flip(-1)
        mf = _up(gc.attribute(flipped, target=int(target[b])), (32, 32))[0, 0]
        u, v = mf.detach().flatten().numpy(), m.flip(-1).detach().flatten().numpy()
        assert got[b].item() == pytest.approx(np.corrcoef(u, v)[0, 1], abs=1e-4)
        assert got_s[b].item() == pytest.approx(spearmanr(u, v).statistic, abs=1e-4)
        k = 256
        su, sv = set(np.argsort(-u)[:k]), set(np.argsort(-v)[:k])
        assert got_iou[b].item() == pytest.approx(len(su & sv) / len(su | sv), abs=1e-6)


def test_consistency_is_low_for_a_map_that_ignores_the_image(tiny_cnn, images):
    def fixed_left_blob(x, target):
        m = torch.zeros(x.shape[0], 1, 32, 32)
        m[..., 8:24, 2:12] = 1.0
        return m + 0.01 * torch.arange(32.0)  # no ties, still image-blind

    r = M.explanation_consistency(tiny_cnn, images, fixed_left_blob, 0)
    assert r.max().item() < 0.0


# ------------------------------------------------------------------ sanity
def test_randomization_sanity_leaves_model_and_rng_alone(tiny_cnn, images):
    from captum_ssl.attr import LayerGradCam

    before = copy.deepcopy(tiny_cnn.state_dict())
    rng = torch.get_rng_state()
    curve = M.randomization_sanity(
        tiny_cnn, images, lambda m: LayerGradCam(m, m.features[3]), None,
        return_curve=True,
    )  # fmt: skip
    assert curve.shape == (3, 3)  # three parameterised layers, top first
    assert torch.equal(torch.get_rng_state(), rng)
    for k, v in tiny_cnn.state_dict().items():
        assert torch.equal(v, before[k])
    again = M.randomization_sanity(
        tiny_cnn, images, lambda m: LayerGradCam(m, m.features[3]), None
    )
    assert torch.allclose(again, curve[:, -1])


def test_randomization_sanity_spearman_matches_scipy(tiny_cnn, images):
    from scipy.stats import spearmanr

    from captum_ssl.attr import LayerGradCam

    def method(m):
        return LayerGradCam(m, m.features[3])

    got = M.randomization_sanity(tiny_cnn, images, method, 1, layers=["fc"], seed=7)
    rand = copy.deepcopy(tiny_cnn)
    torch.manual_seed(7)
    rand.fc.reset_parameters()
    for b in range(3):
        a = _up(method(tiny_cnn).attribute(images[b : b + 1], target=1), (32, 32))
        r = _up(method(rand).attribute(images[b : b + 1], target=1), (32, 32))
        want = spearmanr(a.abs().flatten().detach(), r.abs().flatten().detach())
        assert got[b].item() == pytest.approx(want.statistic, abs=1e-4)


def test_ssim_matches_scikit_image():
    from skimage.metrics import structural_similarity

    torch.manual_seed(2)
    a = torch.rand(2, 1, 40, 40).double()
    b = (a + 0.3 * torch.rand(2, 1, 40, 40)).double()
    got = M.ssim(a, b)
    for i in range(2):
        u, v = (t[i, 0].numpy() for t in (a, b))
        u = (u - u.min()) / (u.max() - u.min())
        v = (v - v.min()) / (v.max() - v.min())
        want = structural_similarity(
            u, v, gaussian_weights=True, sigma=1.5,
            use_sample_covariance=False, data_range=1.0,
        )  # fmt: skip
        assert got[i].item() == pytest.approx(want, abs=1e-6)


# ------------------------------------------------------------ ViT and errors
def test_patch_maps_on_a_vit(tiny_vit):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    patch_maps = torch.rand(2, 1, 4, 4)
    d = M.deletion_auc(tiny_vit, x, patch_maps, None, step=64)
    p = M.perturbation_auc(tiny_vit, x, patch_maps, None, mode="negative")
    r = M.road(tiny_vit, x, patch_maps, None, percentages=[0.3, 0.6])
    drop = M.average_drop(tiny_vit, x, patch_maps, None)
    assert d.shape == p.shape == r.shape == drop.shape == (2,)
    assert ((d >= 0) & (d <= 1)).all() and ((p >= 0) & (p <= 0.9)).all()
    assert ((r >= 0) & (r <= 1)).all() and ((drop >= 0) & (drop <= 1)).all()
    # the metrics that re-explain run the token-layer Grad-CAM of a ViT
    from captum_ssl.attr import LayerGradCam

    c = M.explanation_consistency(
        tiny_vit, x, LayerGradCam(tiny_vit, tiny_vit.blocks[-1].norm1), None
    )
    s = M.randomization_sanity(
        tiny_vit, x, lambda m: LayerGradCam(m, m.blocks[-1].norm1), None, layers=2
    )
    assert c.shape == s.shape == (2,)
    assert torch.isfinite(c).all() and torch.isfinite(s).all()


def test_bad_input_errors_name_the_fix(setup_cnn):
    model, x, maps, target = setup_cnn
    with pytest.raises(ValueError, match="unsqueeze"):
        M.deletion_auc(model, x[0], maps[0], 0)
    with pytest.raises(ValueError, match="one map per image"):
        M.deletion_auc(model, x, maps[:2], target)
    with pytest.raises(ValueError, match="out of range"):
        M.deletion_auc(model, x, maps, 99, step=512)
    with pytest.raises(ValueError, match="score="):
        M.deletion_auc(model, x, maps, target, score="f1")
    with pytest.raises(ValueError, match="substrate="):
        M.insertion_auc(model, x, maps, target, substrate="noise")
    with pytest.raises(ValueError, match="fractions"):
        M.perturbation_auc(model, x, maps, target, fractions=[0.5, 1.0])
    with pytest.raises(ValueError, match="attribution object"):
        M.explanation_consistency(model, x, "gradcam", target)
    with pytest.raises(ValueError, match="normalize_maps=True"):
        M.explanation_masked(x, maps * 5, normalize_maps=False)


# ------------------------------------------------------------------ Quantus
def test_numpy_compat_is_scoped():
    had = hasattr(np, "trapz")
    with M.numpy_compat():
        assert np.trapz([0.0, 1.0]) == 0.5
        assert np.isnan(np.NaN)
    assert hasattr(np, "trapz") == had
    with pytest.raises(RuntimeError), M.numpy_compat():
        raise RuntimeError("inside")
    assert hasattr(np, "trapz") == had


def test_pixel_flipping_agrees_with_deletion_curve(tiny_cnn):
    import quantus

    torch.manual_seed(0)
    x = torch.randn(3, 3, 24, 24)
    maps = torch.rand(3, 1, 24, 24)  # distinct values: one well-defined order
    target = torch.tensor([0, 2, 4])
    step = 48  # pixels per step; Quantus counts channel-pixels: 3 * 48
    with M.numpy_compat():
        curves = quantus.PixelFlipping(
            features_in_step=3 * step, perturb_baseline=0.0, disable_warnings=True
        )(model=tiny_cnn, x_batch=x.numpy(), y_batch=target.numpy(),
          a_batch=maps.numpy(), device="cpu")  # fmt: skip
    ours = M.deletion_auc(tiny_cnn, x, maps, target, step=step, return_curve=True)
    # Quantus' curve starts after the first step
    np.testing.assert_allclose(np.asarray(curves), ours[:, 1:].numpy(), atol=1e-5)
    scores = M.quantus_faithfulness(
        tiny_cnn, x, maps, target, metrics=["PixelFlipping"],
        metric_kwargs={"PixelFlipping": {"features_in_step": 3 * step,
                                         "perturb_baseline": 0.0}},
    )  # fmt: skip
    np.testing.assert_allclose(
        scores["PixelFlipping"].numpy(),
        np.trapezoid(ours[:, 1:].numpy(), axis=1),
        atol=1e-4,
    )


def test_region_perturbation_agrees_with_patch_deletion(tiny_cnn):
    import quantus

    torch.manual_seed(1)
    x = torch.randn(2, 3, 32, 32)
    patch_scores = torch.rand(2, 1, 4, 4)
    maps = F.interpolate(patch_scores, size=(32, 32), mode="nearest")
    target = torch.tensor([1, 3])
    with M.numpy_compat():
        drops = quantus.RegionPerturbation(
            patch_size=8, regions_evaluation=16, perturb_baseline=0.0,
            disable_warnings=True,
        )(model=tiny_cnn, x_batch=x.numpy(), y_batch=target.numpy(),
          a_batch=maps.numpy(), device="cpu")  # fmt: skip
    curve = M.perturbation_curve(
        tiny_cnn, x, maps, target, counts=[64 * k for k in range(17)]
    )
    # RegionPerturbation records y(x) - y(x with the k most relevant patches removed)
    want = (curve[:, :1] - curve[:, 1:]).numpy()
    np.testing.assert_allclose(np.asarray(drops), want, atol=1e-5)


def test_quantus_adapter_runs_every_default_metric(tiny_cnn, images):
    from captum_ssl.attr import LayerGradCam

    gc = LayerGradCam(tiny_cnn, tiny_cnn.features[3])
    target = torch.tensor([0, 1, 2])
    had = hasattr(np, "trapz")
    out = M.quantus_faithfulness(tiny_cnn, images, gc, target, steps=8)
    assert set(out) == set(M.DEFAULT_METRICS)
    for name, v in out.items():
        if name != "SensitivityN":
            assert v.shape == (3,), name
        assert torch.isfinite(v).all(), name
    assert hasattr(np, "trapz") == had
    # maps given as the attribution object or as tensors give the same scores
    maps = gc.attribute(images, target=target)
    again = M.quantus_faithfulness(
        tiny_cnn, images, maps, target, metrics=["PixelFlipping", "IROF"], steps=8
    )
    for name in again:
        assert torch.allclose(again[name], out[name], atol=1e-5)


def test_quantus_explain_func_runs_inside_quantus(tiny_cnn, images):
    import quantus

    from captum_ssl.attr import LayerGradCam

    ef = M.quantus_explain_func(LayerGradCam(tiny_cnn, tiny_cnn.features[3]))
    a = ef(tiny_cnn, images.numpy(), np.array([0, 1, 2]))
    assert a.shape == (3, 1, 32, 32) and isinstance(a, np.ndarray)
    with M.numpy_compat():
        s = quantus.PixelFlipping(features_in_step=256, disable_warnings=True)(
            model=tiny_cnn, x_batch=images.numpy(), y_batch=np.array([0, 1, 2]),
            a_batch=None, explain_func=ef, device="cpu",
        )  # fmt: skip
    assert np.asarray(s).shape == (3, 12)  # 3 * 1024 channel-pixels / 256


# ----------------------------------------------- real model, real photos
@pytest.fixture(scope="module")
def real_setup(effnet, photos):
    from captum_ssl.attr import LayerGradCam

    x = photos.images[:4]
    with torch.no_grad():
        target = effnet(x).argmax(1)
    cam = LayerGradCam(effnet, effnet.conv_head).attribute(x, target=target)
    cam = cam.detach().clamp(min=0)
    rand = torch.rand(cam.shape, generator=torch.Generator().manual_seed(0))
    return effnet, x, target, {"gradcam": cam, "random": rand, "inverted": -cam}


@pytest.mark.parametrize(
    "metric, kwargs",
    [
        (M.deletion_auc, {"step": 224 * 28}),
        (M.insertion_auc, {"step": 224 * 28}),
        (M.perturbation_auc, {"mode": "positive", "score": "probability"}),
        (M.perturbation_auc, {"mode": "negative", "score": "probability"}),
    ],
)
def test_gradcam_beats_random_and_inverted_maps_on_the_real_model(
    real_setup, metric, kwargs
):
    model, x, target, maps = real_setup
    kw = dict(kwargs)
    if metric is M.perturbation_auc:
        kw["fractions"] = (0.1, 0.3, 0.5, 0.7, 0.9)
    scores = {
        k: metric(model, x, m, target, **kw).mean().item() for k, m in maps.items()
    }
    sign = 1 if M.higher_is_better(metric, **kw) else -1
    assert sign * scores["gradcam"] > sign * scores["random"], scores
    assert sign * scores["gradcam"] > sign * scores["inverted"], scores


def test_sanity_check_separates_trained_and_randomised_real_model(real_setup):
    from captum_ssl.attr import LayerGradCam

    model, x, target, maps = real_setup
    sim = M.randomization_sanity(
        model, x, lambda m: LayerGradCam(m, m.conv_head), target,
        layers=["classifier", "bn2", "conv_head"],
    )  # fmt: skip
    # the trained model against itself: identical maps
    same = M.spearman(maps["gradcam"], maps["gradcam"])
    assert same == pytest.approx([1.0] * 4)
    assert sim.mean().item() < 0.5, sim


# ------------------------------------------- the Quantus adapter's bad inputs
class _Saturating(torch.nn.Module):
    """Class 0 takes all the probability for an image whose first channel is
    bright; a dark image's scores are about uniform."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(3, 5)
        with torch.no_grad():
            self.fc.weight.zero_()
            self.fc.bias.zero_()
            self.fc.weight[0, 0] = 5.0
            self.fc.weight[2, 1] = 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.mean((2, 3)))


def test_quantus_monotonicity_correlation_with_a_near_zero_score():
    """Quantus 0.6.0 raised a NumPy boolean-indexing error when some but not
    all target probabilities are below its eps (1e-5); per-image batches give
    its values."""
    import quantus

    model = _Saturating().eval()
    torch.manual_seed(3)
    x = torch.randn(2, 3, 12, 12)
    x[0, 0] = 10.0  # image 0: p(class 1) ~ 1e-22
    maps = torch.rand(2, 1, 12, 12)
    got = M.quantus_faithfulness(
        model, x, maps, [1, 1], metrics=["MonotonicityCorrelation"]
    )["MonotonicityCorrelation"]
    kw = M._quantus.default_kwargs("MonotonicityCorrelation", x.shape)
    ref = []
    for i in range(2):  # Quantus itself, one image at a time
        np.random.seed(0)
        with M.numpy_compat():
            ref += quantus.MonotonicityCorrelation(**kw)(
                model=model,
                x_batch=x[i : i + 1].numpy(),
                y_batch=np.array([1]),
                a_batch=maps[i : i + 1].numpy(),
                device="cpu",
                batch_size=1,
            )
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got[0], torch.tensor(ref[0], dtype=got.dtype))


def test_quantus_targets_are_checked_and_names_suggested(tiny_cnn, images):
    maps = torch.rand(3, 1, 8, 8)
    with pytest.raises(M.MetricInputError.__mro__[1], match="out of range"):
        M.quantus_faithfulness(tiny_cnn, images, maps, [1, 2, 7])
    with pytest.raises(M.MetricInputError, match="did you mean 'PixelFlipping'"):
        M.quantus_faithfulness(tiny_cnn, images, maps, 1, metrics=["PixelFliping"])
    one = M.quantus_faithfulness(
        tiny_cnn, images, maps, 4, metrics=["PixelFlipping"], steps=4
    )["PixelFlipping"]
    last = M.quantus_faithfulness(
        tiny_cnn, images, maps, -1, metrics=["PixelFlipping"], steps=4
    )["PixelFlipping"]
    torch.testing.assert_close(one, last)
