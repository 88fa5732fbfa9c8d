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


def _xml(tmp_path, size="<width>40</width><height>20</height>", box=None, name="a"):
    box = box or "<xmin>3</xmin><ymin>5</ymin><xmax>12</xmax><ymax>10</ymax>"
    path = tmp_path / f"{name}.xml"
    path.write_text(
        f"<annotation><size>{size}<depth>3</depth></size><object>"
        f"<name>n01440764</name><bndbox>{box}</bndbox></object></annotation>"
    )
    return path


BAD_BOXES = {
    "no xmin": (
        "<ymin>5</ymin><xmax>12</xmax><ymax>10</ymax>",
        r"object> 0 \('n01440764'\).*no <xmin>",
    ),
    "inverted": (
        "<xmin>30</xmin><ymin>5</ymin><xmax>12</xmax><ymax>10</ymax>",
        r"object> 0 .*inverted box \(xmin 30, xmax 12",
    ),
    "not a number": (
        "<xmin>3</xmin><ymin>five</ymin><xmax>12</xmax><ymax>10</ymax>",
        r"bad <ymin> \('five'\)",
    ),
}


@pytest.mark.parametrize("what", list(BAD_BOXES))
def test_bad_box_is_refused_naming_file_and_object(tmp_path, what):
    """Before: a box without <xmin> was read as NaN, an inverted one as an
    empty box, and the content heatmap of a perfect map was 0 without a word."""
    box, message = BAD_BOXES[what]
    path = _xml(tmp_path, box=box)
    with pytest.raises(MetricInputError, match=message) as err:
        read_boxes(path)
    assert str(path) in str(err.value)


@pytest.mark.parametrize(
    "size, message",
    [
        ("<width>40</width><height>0</height>", r"<height> is '0'.*whole number"),
        ("<width>4.5</width><height>20</height>", r"<width> is '4.5'"),
        ("<width>40</width>", r"<height> is ''"),
    ],
)
def test_bad_size_is_refused_naming_the_field(tmp_path, size, message):
    with pytest.raises(MetricInputError, match=message):
        read_boxes(_xml(tmp_path, size=size))
    # a whole number written as a float is that number
    ok = "<width>40.0</width><height>375.0</height>"
    assert read_boxes(_xml(tmp_path, size=ok, name="ok"))[1] == (375, 40)


def test_image_without_a_box_of_the_class_scores_nan_with_a_warning(tmp_path):
    from captum_ssl.attr import NonFiniteWarning

    boxes, _ = read_boxes(_xml(tmp_path), names=["n02102040"])  # another class
    assert boxes == []
    x = torch.zeros(2, 3, 20, 40)
    maps = torch.rand(2, 1, 20, 40)
    with pytest.warns(NonFiniteWarning, match=r"\[1\] is NaN: they have no box"):
        got = content_heatmap(x, maps, [[(0.0, 0.0, 20.0, 10.0)], boxes])
    assert torch.isfinite(got[0]) and torch.isnan(got[1])


def test_empty_batch_is_refused():
    with pytest.raises(MetricInputError, match="empty batch"):
        content_heatmap(torch.zeros(0, 3, 8, 8), torch.zeros(0, 1, 8, 8), [])
