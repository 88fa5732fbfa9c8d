"""Differentiable CAMs, the CGC loss, the geometry-recording augmentation and
the resumable training loop (captum_ssl.training)."""

from __future__ import annotations

import pytest
import torch
from conftest import TinyCNN
from torch.utils.data import DataLoader, TensorDataset

from captum_ssl.attr import (
    LayerGradCam,
    LayerGradCamPlusPlus,
    LayerHiResCam,
    LayerLayerCam,
    LayerXGradCam,
)
from captum_ssl.metrics import explanation_consistency
from captum_ssl.training import CGCLoss, CropFlip, info_nce, train

GRADIENT_CAMS = [
    LayerGradCam,
    LayerGradCamPlusPlus,
    LayerXGradCam,
    LayerHiResCam,
    LayerLayerCam,
]


@pytest.mark.parametrize("cls", GRADIENT_CAMS, ids=lambda c: c.__name__)
def test_create_graph_gradient_matches_finite_differences(cls):
    torch.manual_seed(0)
    model = TinyCNN(width=4).double().eval()
    x = torch.rand(2, 3, 8, 8, dtype=torch.float64)
    target = [1, 3]
    cam = cls(model, model.features[-1])

    def loss() -> torch.Tensor:
        m = cam.attribute(x, target=target, create_graph=True)
        return (m**2).sum() + m.sum()

    params = [model.features[0].weight, model.fc.weight]
    grads = torch.autograd.grad(loss(), params)
    eps = 1e-6
    g = torch.Generator().manual_seed(1)
    for p, grad in zip(params, grads):
        for i in torch.randint(0, p.numel(), (4,), generator=g).tolist():
            flat = p.data.view(-1)
            orig = flat[i].item()
            with torch.no_grad():
                flat[i] = orig + eps
                up = loss().item()
                flat[i] = orig - eps
                down = loss().item()
                flat[i] = orig
            fd = (up - down) / (2 * eps)
            assert grad.view(-1)[i].item() == pytest.approx(fd, rel=1e-4, abs=1e-8)


def test_default_path_unchanged_and_detached(tiny_cnn):
    x = torch.rand(2, 3, 16, 16)
    cam = LayerGradCam(tiny_cnn, tiny_cnn.features[-1])
    plain = cam.attribute(x, target=[0, 1])
    graph = cam.attribute(x, target=[0, 1], create_graph=True)
    assert plain.grad_fn is None and graph.grad_fn is not None
    torch.testing.assert_close(plain, graph.detach())
    assert all(p.requires_grad for p in tiny_cnn.parameters())


def test_cropflip_maps_follow_the_images():
    # a map equal to the image, moved with the recorded geometry, equals the
    # map of the view (here: the view itself)
    x = torch.rand(4, 1, 12, 12)
    views = CropFlip(scale=(0.5, 0.9), flip_p=0.5, seed=0)(x)
    torch.testing.assert_close(views.apply(x), views.images)
    flips = (views.theta[:, 0, 0] < 0).tolist()
    assert any(flips) and not all(flips)
    full = CropFlip(scale=(1.0, 1.0), flip_p=1.0, seed=0)(x)
    torch.testing.assert_close(full.images, torch.flip(x, [-1]))
    with pytest.raises(ValueError, match="scale"):
        CropFlip(scale=(0.0, 1.0))


def test_info_nce_matches_equation():
    torch.manual_seed(0)
    q, k = torch.randn(5, 1, 3, 3), torch.randn(5, 1, 3, 3)
    tau = 0.3
    qn = q.flatten(1) / q.flatten(1).norm(dim=1, keepdim=True)
    kn = k.flatten(1) / k.flatten(1).norm(dim=1, keepdim=True)
    sim = torch.exp(qn @ kn.T / tau)
    expected = -torch.log(sim.diagonal() / sim.sum(dim=1)).mean()
    torch.testing.assert_close(info_nce(q, k, tau), expected)
    with pytest.raises(ValueError, match="batch of at least 2"):
        info_nce(q[:1], k[:1])


def _toy(n: int = 32):
    """Images with one bright square per class position on a noisy background."""
    g = torch.Generator().manual_seed(0)
    x = 0.3 * torch.rand(n, 3, 16, 16, generator=g)
    y = torch.arange(n) % 4
    for i in range(n):
        r, c = divmod(int(y[i]), 2)
        x[i, :, 2 + 8 * r : 6 + 8 * r, 2 + 8 * c : 6 + 8 * c] += 1.0
    return x, y


def _consistency(model, x, y):
    cam = LayerGradCam(model, model.features[-1])
    model.eval()
    return float(
        explanation_consistency(
            model, x, cam, y, transform="resized_crop", relu_attributions=True
        ).mean()
    )


def _train_toy(lam: float):
    x, y = _toy()
    torch.manual_seed(0)
    model = TinyCNN(num_classes=4, width=8)
    before = _consistency(model, x, y)
    loss_fn = CGCLoss(model, model.features[-1], lam=lam, tau=0.5,
                      augment=CropFlip(seed=0))  # fmt: skip
    loader = DataLoader(TensorDataset(x, y), batch_size=16, shuffle=False)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    history = train(model, loader, loss_fn, epochs=15, optimizer=opt, progress=False)
    return before, _consistency(model, x, y), history


def test_cgc_loss_makes_explanations_consistent():
    before, after, history = _train_toy(lam=1.0)
    _, after_ce, _ = _train_toy(lam=0.0)  # same steps, cross-entropy only
    assert history[-1]["cgc"] < history[0]["cgc"]
    assert after > before + 0.1, (before, after)
    assert after > after_ce + 0.05, (after_ce, after)


def test_cgc_unlabelled_uses_predictions():
    x, _ = _toy(8)
    torch.manual_seed(0)
    model = TinyCNN(num_classes=4)
    loss, parts = CGCLoss(model, model.features[-1], augment=CropFlip(seed=0))(x)
    assert parts["ce"] == 0.0 and parts["cgc"] > 0
    loss.backward()
    assert model.features[0].weight.grad.abs().sum() > 0


def test_train_resumes_from_checkpoint(tmp_path):
    x, y = _toy(16)
    loader = DataLoader(TensorDataset(x, y), batch_size=8, shuffle=False)

    def run(epochs, ckpt):
        torch.manual_seed(0)
        model = TinyCNN(num_classes=4)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        loss = torch.nn.CrossEntropyLoss()
        hist = train(model, loader, lambda a, b: loss(model(a), b), epochs,
                     optimizer=opt, checkpoint=ckpt, progress=False)  # fmt: skip
        return model, hist

    straight, h_straight = run(3, None)
    run(2, tmp_path / "ck.pt")  # "killed" after two epochs
    resumed, h_resumed = run(3, tmp_path / "ck.pt")
    assert len(h_resumed) == 3
    assert [h["loss"] for h in h_resumed] == pytest.approx(
        [h["loss"] for h in h_straight]
    )
    for a, b in zip(straight.parameters(), resumed.parameters()):
        torch.testing.assert_close(a, b)
