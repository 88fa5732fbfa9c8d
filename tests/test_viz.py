"""Viewing helpers: upsampling, normalisation and figures."""

from __future__ import annotations

import matplotlib
import numpy as np
import pytest
import torch
from captum.attr import LayerAttribution
from PIL import Image

from captum_ssl.viz import (
    as_map,
    blend,
    grid_figure,
    normalize,
    overlay,
    prediction_text,
    to_heatmap,
    upsample,
)

matplotlib.use("Agg")


def test_upsample_matches_captum_interpolate():
    maps = torch.randn(2, 1, 7, 7)
    ours = upsample(maps, (224, 224))
    ref = LayerAttribution.interpolate(maps, (224, 224), interpolate_mode="bilinear")
    torch.testing.assert_close(ours, ref)
    assert upsample(maps, torch.zeros(2, 3, 32, 48)).shape == (2, 1, 32, 48)
    assert upsample(maps[:, 0], 14).shape == (2, 1, 14, 14)


def test_normalize_each_image_to_unit_range():
    maps = torch.stack([torch.arange(16.0), -5 * torch.arange(16.0)]).reshape(
        2, 1, 4, 4
    )
    out = normalize(maps)
    for img in out:
        assert float(img.min()) == 0.0 and float(img.max()) == pytest.approx(1.0)
    # a constant map stays finite (0)
    assert float(normalize(torch.ones(1, 1, 3, 3)).abs().max()) == 0.0


def test_to_heatmap_relu_then_upsample_then_normalize():
    maps = torch.tensor([[[[-1.0, 2.0], [0.5, 4.0]]]])
    heat = to_heatmap(maps, (4, 4))
    assert heat.shape == (1, 1, 4, 4)
    expected = normalize(upsample(maps.clamp(min=0), (4, 4)))
    torch.testing.assert_close(heat, expected)


def test_as_map_sums_channels_and_rejects_bad_shapes():
    rgb = torch.randn(2, 3, 5, 5)
    torch.testing.assert_close(as_map(rgb), rgb.sum(1, keepdim=True))
    with pytest.raises(ValueError, match="A map must be"):
        as_map(torch.randn(5))


def test_blend_is_the_weighted_sum_of_image_and_coloured_heatmap():
    from matplotlib import colormaps

    image = torch.rand(3, 16, 16)
    cam = torch.rand(1, 1, 4, 4) - 0.3
    rgb = blend(image, cam[0], cmap="viridis", alpha=0.4)
    heat = to_heatmap(cam, (16, 16))[0, 0].numpy()  # ReLU, upsample, [0, 1]
    expected = (
        0.6 * image.permute(1, 2, 0).numpy() + 0.4 * colormaps["viridis"](heat)[..., :3]
    )
    np.testing.assert_allclose(rgb, expected, atol=1e-6)
    # an input-resolution RGB attribution is summed over its channels
    attr = torch.rand(3, 16, 16)
    np.testing.assert_allclose(blend(image, attr), blend(image, attr.sum(0)))
    # a map that requires grad (straight from an attribution) or a numpy map
    grad_map = cam[0].clone().requires_grad_()
    np.testing.assert_allclose(blend(image, grad_map, "viridis", 0.4), rgb)
    np.testing.assert_allclose(blend(image, cam[0].numpy(), "viridis", 0.4), rgb)


def test_prediction_text_marks_wrong_predictions():
    text, wrong = prediction_text((281, 0.873))
    assert (text, wrong) == ("pred: tabby (0.87)", False)
    assert prediction_text((281, 0.5), label=(281, 282)) == (
        "pred: tabby (0.50)",
        False,
    )
    text, wrong = prediction_text((281, 0.5), label=967)
    assert wrong and text.startswith("✗ pred: tabby") and "true: espresso" in text
    assert prediction_text((281, 0.5), label=-1)[1] is False  # unknown


def test_overlay_one_call_figure_is_readable(tmp_path):
    image, cam = torch.rand(3, 224, 224), torch.rand(1, 7, 7)
    ax = overlay(image, cam, title="Grad-CAM", label="cat",
                 prediction=(281, 0.9), true_class=285)  # fmt: skip
    fig = ax.figure
    assert ax.get_title() == "Grad-CAM" and ax.get_ylabel() == "cat"
    assert "✗ pred: tabby (0.90)" in ax.get_xlabel()
    assert len(fig.axes) == 2  # the picture and its colour bar
    assert "scaled to [0, 1]" in fig.axes[1].get_ylabel()
    fig.savefig(tmp_path / "one.png")  # default dpi: 150
    with Image.open(tmp_path / "one.png") as im:
        assert min(im.size) >= 160
    # the drawn picture is the blend
    np.testing.assert_allclose(ax.images[0].get_array(), blend(image, cam))


def test_grid_figure_labels_colour_bar_and_size(tmp_path):
    images = torch.rand(2, 3, 64, 64)
    maps = {"a": torch.rand(2, 1, 4, 4), "b": [torch.rand(8, 8), None]}
    preds = [(1, 0.5), (2, 0.25)]
    fig = grid_figure(
        images, maps, row_labels=["x", "y"], predictions=preds, true_classes=[1, 3]
    )
    grid, bar = fig.axes[:6], fig.axes[6:]
    assert len(bar) == 1 and "scaled to [0, 1]" in bar[0].get_ylabel()
    assert [ax.get_title() for ax in grid[:3]] == ["image", "a", "b"]
    assert grid[0].get_ylabel() == "x" and grid[3].get_ylabel() == "y"
    assert grid[0].get_xlabel() == "pred: goldfish (0.50)"  # right
    assert grid[3].get_xlabel().startswith("✗ pred: great white shark (0.25)")
    assert grid[3].spines["left"].get_edgecolor()[0] > 0.7  # red frame
    assert len(grid[5].images) == 0 and grid[5].texts[0].get_text() == "n/a"
    fig.savefig(tmp_path / "grid.png")
    with Image.open(tmp_path / "grid.png") as im:  # >= 160 px per map
        assert im.size[0] >= 3 * 160 and im.size[1] >= 2 * 160
    with pytest.raises(ValueError, match="one map per image"):
        grid_figure(images, {"a": torch.rand(1, 1, 4, 4)})
