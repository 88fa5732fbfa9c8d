"""The main job knows the new CAMs by name, and every method has a cost class."""

from __future__ import annotations

import torch

from benchmarks.evaluation import methods as M

NEW = ["iscam", "sscam", "smoothgradcampp", "reciprocam", "legrad"]
CLASSES = {"gradient", "forward per channel", "forward per mask", "none"}


def test_every_method_has_a_cost_class():
    names = M.method_names()
    assert set(NEW) <= set(names)
    assert {M.cost_class(n) for n in names} <= CLASSES
    assert M.cost_class("reciprocam") == "forward per mask"
    assert M.cost_class("ablationcam") == "forward per channel"
    assert M.cost_class("saliency+vargrad") == "gradient"


def test_new_methods_build_and_run(tiny_vit):
    spec = M.ModelSpec(
        "vit", lambda: tiny_vit, "ViT", "supervised", "random", "blocks.-1.norm1",
        attention_layers="blocks.*.attn",
    )  # fmt: skip
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([1, 2])
    small = {"iscam": 2, "sscam": 2}
    for name in NEW:
        opts = {"num_samples": small[name]} if name in small else {}
        explain = M.build_method(name, opts, tiny_vit, spec)
        maps = explain(x, t)
        assert maps.shape == (2, 1, 4, 4), name
        assert torch.isfinite(maps).all()


# ------------------------------------------- the new CAMs as Captum methods
def _new_cams():
    import captum_ssl.attr as A

    n = 2
    fixed = torch.randn(n, 1, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    return [
        (A.LayerISCam, {"num_samples": n}),
        (A.LayerSSCam, {"num_samples": n, "noise": fixed}),
        (A.LayerSmoothGradCamPlusPlus, {"noise": fixed.repeat(2, 1, 3, 1, 1)}),
        (A.LayerReciproCam, {}),
    ]


def test_new_cams_per_sample_targets_errors_and_cleanup(tiny_cnn, images):
    import pytest

    import captum_ssl.attr as A

    layer = tiny_cnn.features[4]
    for cls, kw in _new_cams():
        cam = cls(tiny_cnn, layer)
        ppe = (
            {}
            if cls is A.LayerSmoothGradCamPlusPlus
            else {"perturbations_per_eval": 64}
        )
        batch = cam.attribute(images, target=torch.tensor([3, 0, 1]), **kw, **ppe)
        assert batch.shape == (3, 1, 16, 16)
        for i, t in enumerate([3, 0, 1]):
            single = cam.attribute(images[i : i + 1], target=t, **kw, **ppe)
            torch.testing.assert_close(batch[i : i + 1], single, atol=1e-5, rtol=1e-4)
        with pytest.raises(ValueError, match="out of range"):
            cam.attribute(images, target=5, **kw)

    class Boom(Exception):
        pass

    def explode(_m, _i, _o):
        raise Boom

    h = tiny_cnn.fc.register_forward_hook(explode)
    try:
        for cls, kw in _new_cams():
            with pytest.raises(Boom):
                cls(tiny_cnn, layer).attribute(images, target=0, **kw)
    finally:
        h.remove()
    for m in tiny_cnn.modules():
        assert "forward" not in m.__dict__
        assert not m._forward_hooks and not m._forward_pre_hooks
