"""Viewing helpers: upsampling, normalisation and figures."""

from __future__ import annotations

import matplotlib
import pytest
import torch
from captum.attr import LayerAttribution

from captum_ssl.viz import as_map, grid_figure, normalize, overlay, to_heatmap, upsample

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


def test_overlay_and_grid_figure_draw():
    images = torch.rand(2, 3, 32, 32)
    maps = {"a": torch.rand(2, 1, 4, 4), "b": torch.rand(2, 1, 8, 8)}
    fig = grid_figure(images, maps, row_labels=["x", "y"])
    assert len(fig.axes) == 2 * 3
    # each overlay axis holds the photo and the map on top of it
    assert all(len(ax.images) == 2 for ax in fig.axes[1::3])
    ax = overlay(images[0], maps["a"][0], title="t")
    assert ax.get_title() == "t" and len(ax.images) == 2
    heat = ax.images[1].get_array()
    assert heat.shape == (32, 32) and float(heat.max()) == pytest.approx(1.0)
