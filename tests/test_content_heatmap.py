"""Content Heatmap on boxes written as ImageNet / VOC XML in the test."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from captum_ssl.metrics import (
    MetricInputError,
    content_heatmap,
    higher_is_better,
    read_boxes,
    scale_boxes,
)

XML = """<annotation>
  <folder>val</folder><filename>img</filename>
  <size><width>40</width><height>20</height><depth>3</depth></size>
  <object><name>n01440764</name>
    <bndbox><xmin>3</xmin><ymin>5</ymin><xmax>12</xmax><ymax>10</ymax></bndbox>
  </object>
  <object><name>n02102040</name>
    <bndbox><xmin>21</xmin><ymin>1</ymin><xmax>40</xmax><ymax>4</ymax></bndbox>
  </object>
</annotation>"""


def test_read_boxes_converts_voc_corners(tmp_path):
    path = tmp_path / "a.xml"
    path.write_text(XML)
    boxes, hw = read_boxes(path)
    assert hw == (20, 40)
    assert boxes == [(2.0, 4.0, 12.0, 10.0), (20.0, 0.0, 40.0, 4.0)]
    assert read_boxes(path, names=["n02102040"])[0] == [(20.0, 0.0, 40.0, 4.0)]
    assert scale_boxes(boxes[:1], hw, (10, 20)) == [(1.0, 2.0, 6.0, 5.0)]
    bad = tmp_path / "bad.xml"
    bad.write_text("<annotation><size>")
    with pytest.raises(MetricInputError, match="annotation file"):
        read_boxes(bad)


def test_content_heatmap_is_energy_fraction_inside_boxes(tmp_path):
    path = tmp_path / "a.xml"
    path.write_text(XML)
    boxes, hw = read_boxes(path)
    torch.manual_seed(0)
    x = torch.rand(2, 3, *hw)
    maps = torch.randn(2, 1, 5, 10)
    got = content_heatmap(x, maps, [boxes, boxes[:1]])
    # independently: relu, bilinear upsample, min-max, sum inside / total
    up = F.interpolate(maps.clamp(min=0), size=hw, mode="bilinear",
                       align_corners=False)  # fmt: skip
    for i, bxs in enumerate([boxes, boxes[:1]]):
        m = up[i, 0]
        m = (m - m.min()) / (m.max() - m.min())
        inside = torch.zeros(hw, dtype=torch.bool)
        for x0, y0, x1, y1 in bxs:
            inside[int(y0) : int(y1), int(x0) : int(x1)] = True
        assert got[i].item() == pytest.approx((m[inside].sum() / m.sum()).item())
    assert higher_is_better(content_heatmap)


def test_content_heatmap_extremes():
    x = torch.rand(1, 3, 8, 8)
    box = [(2.0, 2.0, 6.0, 6.0)]
    inside = torch.zeros(1, 1, 8, 8)
    inside[..., 2:6, 2:6] = 1
    assert content_heatmap(x, inside, [box]).item() == pytest.approx(1.0)
    assert content_heatmap(x, 1 - inside, [box]).item() == pytest.approx(0.0)
    flat = content_heatmap(x, torch.zeros(1, 1, 8, 8), [box]).item()
    assert flat == pytest.approx(16 / 64)
    with pytest.raises(MetricInputError, match="boxes per image"):
        content_heatmap(x, inside, [box, box])
