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
