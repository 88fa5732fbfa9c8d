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


def test_main_job_leaves_out_a_partial_checkpoint_and_says_why(tmp_path, monkeypatch):
    from benchmarks.evaluation.cli import select_models

    monkeypatch.setenv(zoo.WEIGHTS_ENV, str(tmp_path))
    (tmp_path / "resnet50-0676ba61.pth").write_bytes(b"PK\x03\x04" + bytes(100))
    specs, notes, absent = select_models(None, [])
    assert [s.name for s in specs] == ["efficientnet_lite0"] and "res_50" in absent
    assert "res_50" in notes[0] and "cut short" in notes[0]


class _Planted:
    """A pickle that would create a file if it were unpickled for real."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_availability_check_runs_nothing_from_the_file(tmp_path):
    import pickle

    marker = tmp_path / "ran"
    path = tmp_path / "resnet50-0676ba61.pth"
    path.write_bytes(pickle.dumps(_Planted(marker), protocol=2))
    assert "res_50" not in zoo.available(tmp_path)
    assert not marker.exists()


def _declaring(path, declared: int, legacy: bool = False):
    """A small checkpoint whose pickle declares ``declared`` float32 elements
    for its 123456-element tensor 'features.weight' (nothing of that size is
    ever allocated here)."""
    import zipfile

    numel = 123456
    buf = io.BytesIO()
    state = {"features.weight": torch.zeros(numel), "fc.bias": torch.ones(3)}
    torch.save(state, buf, _use_new_zipfile_serialization=not legacy)
    old, new = b"J" + numel.to_bytes(4, "little"), b"J" + declared.to_bytes(4, "little")
    if legacy:
        path.write_bytes(buf.getvalue().replace(old, new, 1))
        return path
    src = zipfile.ZipFile(io.BytesIO(buf.getvalue()))
    with zipfile.ZipFile(path, "w") as dst:
        for info in src.infolist():
            data = src.read(info.filename)
            if info.filename.endswith("data.pkl"):
                data = data.replace(old, new)
            dst.writestr(info, data)
    return path


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_declared_tensor_larger_than_the_file_is_refused_before_loading(
    tmp_path, legacy, monkeypatch
):
    """A 0.5 MB file declaring an 8 GiB tensor: refused naming the tensor,
    without torch.load (which would allocate the declared size first)."""
    from captum_ssl.models._checkpoint import CorruptCheckpointError, read_checkpoint

    path = _declaring(tmp_path / "w.pth", 2**31 - 1, legacy)

    def no_load(*a, **k):
        raise AssertionError("torch.load ran on a file declaring 8 GiB")

    monkeypatch.setattr(torch, "load", no_load)
    with pytest.raises(
        CorruptCheckpointError, match=r"'features\.weight' declares 8,589,934,588"
    ):
        read_checkpoint(path)
    monkeypatch.undo()
    ok = read_checkpoint(_declaring(tmp_path / "ok.pth", 123456, legacy))
    assert ok["features.weight"].shape == (123456,)


def test_renamed_tensor_is_refused_even_when_its_init_coincides(tmp_path):
    """One tensor renamed to a name the model lacks, the real one missing: its
    value (a fresh BatchNorm variance, all ones) equals the model's own."""
    model = zoo.entry("res_50").build()
    state = {
        ("layer1.0.bn1.running_vars" if k == "layer1.0.bn1.running_var" else k): v
        for k, v in model.state_dict().items()
    }
    assert torch.equal(state["layer1.0.bn1.running_vars"], torch.ones(64))
    with pytest.raises(
        zoo.CheckpointMismatchError,
        match=r"missing keys \(layer1\.0\.bn1\.running_var\)",
    ):
        zoo.load("res_50", files=_save(state, tmp_path / "w.pth"))
