"""Bad files (issue 12): checkpoints and image files that cannot be read
correctly are named and refused (or skipped), never turned into numbers."""

from __future__ import annotations

import collections
import io
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import captum_ssl.models as zoo
from captum_ssl.data import (
    ImageNetSamples,
    UnreadableImageError,
    UnreadableImageWarning,
    open_image,
)
from captum_ssl.models._registry import _effnet_package_file

# ------------------------------------------------------------- checkpoints


@pytest.fixture(scope="module")
def lite0_state():
    return torch.load(_effnet_package_file(), weights_only=True)


def _save(state, path):
    torch.save(collections.OrderedDict(state), path)
    return {"weights": path}


def test_lite0_is_mapped_by_name_not_by_position(tmp_path, lite0_state, effnet):
    items = list(lite0_state.items())
    keys = [k for k, _ in items]
    i, j = keys.index("_bn0.running_mean"), keys.index("_bn0.running_var")
    items[i], items[j] = items[j], items[i]  # same names, other order
    model = zoo.load("efficientnet_lite0", files=_save(items, tmp_path / "w.pth"))
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(model(x), effnet(x))


def test_swapped_tensor_values_are_refused_naming_them(tmp_path, lite0_state):
    state = dict(lite0_state)
    state["_bn0.running_mean"], state["_bn0.running_var"] = (
        lite0_state["_bn0.running_var"],
        lite0_state["_bn0.running_mean"],
    )
    with pytest.raises(zoo.NonFiniteWeightsError, match=r"bn1\.running_var"):
        zoo.load("efficientnet_lite0", files=_save(state, tmp_path / "w.pth"))


def test_nan_weight_is_refused_naming_the_tensor(tmp_path, lite0_state):
    state = dict(lite0_state)
    state["_blocks.3._bn1.weight"] = state["_blocks.3._bn1.weight"].clone()
    state["_blocks.3._bn1.weight"][2] = float("nan")
    with pytest.raises(zoo.NonFiniteWeightsError, match=r"blocks\.2\.0\.bn2\.weight"):
        zoo.load("efficientnet_lite0", files=_save(state, tmp_path / "w.pth"))


def test_renamed_tensors_are_refused_naming_them(tmp_path, lite0_state):
    state = {k.replace("_blocks.3.", "_blocks.x."): v for k, v in lite0_state.items()}
    with pytest.raises(zoo.CheckpointMismatchError, match=r"_blocks\.x\._expand_conv"):
        zoo.load("efficientnet_lite0", files=_save(state, tmp_path / "w.pth"))


def test_empty_or_partly_downloaded_files_are_not_available(tmp_path):
    name = "resnet50-0676ba61.pth"  # res_50's file
    whole = io.BytesIO()
    torch.save({"w": torch.zeros(64, 64)}, whole)
    legacy = io.BytesIO()
    torch.save({"w": torch.zeros(64, 64)}, legacy, _use_new_zipfile_serialization=False)
    for data, ok in [
        (whole.getvalue(), True),
        (legacy.getvalue(), True),
        (b"", False),
        (whole.getvalue()[:-200], False),
        (legacy.getvalue()[:-200], False),
    ]:
        (tmp_path / name).write_bytes(data)
        assert ("res_50" in zoo.available(tmp_path)) is ok, (len(data), ok)
        problem = zoo.describe("res_50", tmp_path)["files"][0]["problem"]
        assert (problem is None) is ok


@pytest.mark.parametrize(
    "data", [b"<html>404 Not Found</html>", bytes(range(256)) * 20, b"PK\x03\x04xx"]
)
def test_corrupt_file_error_does_not_advise_weights_only_false(tmp_path, data):
    path = tmp_path / "resnet50-0676ba61.pth"
    path.write_bytes(data)
    with pytest.raises(zoo.CorruptCheckpointError, match="truncated or corrupt") as e:
        zoo.load("res_50", tmp_path)
    assert "weights_only" not in str(e.value) and str(path) in str(e.value)


# ------------------------------------------------------------------ images


def _jpeg(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, "JPEG", quality=90)
    return buf.getvalue()


@pytest.fixture(scope="module")
def chelsea() -> np.ndarray:
    import skimage.data

    return skimage.data.chelsea()


def _corrupt_middle(data: bytes) -> bytes:
    b = bytearray(data)
    start = int(len(b) * 0.7)  # inside the compressed scan, not the headers
    for i in range(start, start + 200):
        b[i] = (b[i] * 7 + 13) % 256
    return bytes(b)


def test_damaged_jpegs_are_named(tmp_path, chelsea):
    good = _jpeg(chelsea)
    cases = {"truncated": good[: len(good) // 2], "corrupt": _corrupt_middle(good)}
    for what, data in cases.items():
        path = tmp_path / f"{what}.jpg"
        path.write_bytes(data)
        with pytest.raises(UnreadableImageError, match=str(path)):
            open_image(path)
    (tmp_path / "good.jpg").write_bytes(good)
    assert open_image(tmp_path / "good.jpg").size == (451, 300)


def test_16_bit_png_is_converted_not_white(tmp_path):
    ramp = np.linspace(0, 65535, 48 * 64).reshape(48, 64).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "g16.png")
    got = np.asarray(open_image(tmp_path / "g16.png"))
    expected = np.round(ramp / 257).astype(np.uint8)
    assert got.shape == (48, 64, 3)
    assert np.abs(got[..., 0].astype(int) - expected).max() <= 1


def test_sample_folder_skips_unreadable_files_and_keeps_same_stem_photos(
    tmp_path, chelsea
):
    good = _jpeg(chelsea)
    (tmp_path / "n02123045_cat.JPEG").write_bytes(good)
    (tmp_path / "n02123045_cat.jpg").write_bytes(_jpeg(chelsea[::-1].copy()))
    (tmp_path / "n02123159_cut.JPEG").write_bytes(good[: len(good) // 2])
    (tmp_path / "n02124075_bad.JPEG").write_bytes(_corrupt_middle(good))
    ramp = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "n02127052_deep.png")
    (tmp_path / "n02127052_deep.png").rename(tmp_path / "n02127052_deep.JPEG")

    data = ImageNetSamples(tmp_path, model="efficientnet_lite0")
    assert len(set(data.names)) == len(data.names) == 5
    assert {"n02123045_cat.JPEG", "n02123045_cat.jpg"} <= set(data.names)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        batches = list(data.batches(batch_size=2))
    skipped = [str(w.message) for w in record if w.category is UnreadableImageWarning]
    assert len(skipped) == 2
    assert any("n02123159_cut.JPEG" in s and "truncated" in s for s in skipped)
    assert any("n02124075_bad.JPEG" in s and "damaged" in s for s in skipped)
    names = [n for b in batches for n in b.names]
    assert names == [n for n in data.names if "cut" not in n and "bad" not in n]
    raw = torch.cat([b.raw for b in batches])
    cats = raw[:2]  # the two same-stem photos: distinct rows, distinct pixels
    assert not torch.equal(cats[0], cats[1])
    assert raw[2].max() < 1.0  # the 16-bit photo is a ramp, not all white


def test_pipeline_evaluates_both_same_stem_photos(tmp_path, chelsea):
    from benchmarks.evaluation.pipeline import ImageSource
    from captum_ssl.models import entry

    (tmp_path / "n02123045_cat.JPEG").write_bytes(_jpeg(chelsea))
    (tmp_path / "n02123045_cat.jpg").write_bytes(_jpeg(chelsea[::-1].copy()))
    source = ImageSource(tmp_path, None)
    pre = entry("efficientnet_lite0").preprocessing
    for wanted in (source.names, source.names[1:]):  # all, and a resume
        got = [n for b in source.batches(pre, wanted, 4) for n in b.names]
        assert got == wanted


# ------------------------------------------------------- real model, train mode


def test_real_model_in_train_mode_changes_nothing(effnet, photos):
    from captum_ssl.attr import LayerGradCam, TrainModeWarning
    from captum_ssl.metrics import deletion_auc

    x, y = photos.images[:1], photos.labels[:1]
    cam = LayerGradCam(effnet, effnet.bn2)
    maps = cam.attribute(x, target=y)
    auc = deletion_auc(effnet, x, maps, y, step=224 * 32)
    stats = {k: v.clone() for k, v in effnet.state_dict().items()}
    effnet.train()
    try:
        with pytest.warns(TrainModeWarning, match=r"model\.eval\(\)"):
            train_maps = cam.attribute(x, target=y)
        with pytest.warns(TrainModeWarning):
            train_auc = deletion_auc(effnet, x, train_maps, y, step=224 * 32)
        assert all(m.training for m in effnet.modules())
    finally:
        effnet.eval()
    for k, v in effnet.state_dict().items():
        assert torch.equal(v, stats[k]), k
    torch.testing.assert_close(train_maps, maps)
    torch.testing.assert_close(train_auc, auc)
