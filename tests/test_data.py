"""Data: bundled real photos and the ImageNet sample folder loader."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from captum_ssl.data import (
    ImageNetSamples,
    bundled_photos,
    class_index,
    class_name,
    image_batches,
    imagenet_wnids,
    photo_names,
    sample_files,
)
from captum_ssl.models import Preprocessing, entry

SAMPLES = Path(os.environ.get("CAPTUM_SSL_SHARED_DATA", "/work/shared/data")) / (
    "imagenet-samples"
)
HAS_SAMPLES = SAMPLES.is_dir() and any(SAMPLES.glob("n*_*.JPEG"))


def _imagenet_info():
    from timm.data import ImageNetInfo

    return ImageNetInfo()


# ------------------------------------------------------------ bundled photos
def test_bundled_photos_batch(photos) -> None:
    n = len(photos.names)
    assert n >= 5
    assert photos.images.shape == (n, 3, 224, 224)
    assert photos.raw.shape == photos.images.shape
    assert photos.labels.dtype == torch.long and photos.labels.shape == (n,)
    assert 0.0 <= photos.raw.min() and photos.raw.max() <= 1.0
    # EfficientNet-Lite0 preprocessing: (x - 0.5) / 0.5, written out
    assert torch.allclose(photos.images, (photos.raw - 0.5) / 0.5, atol=1e-6)
    assert photos.names[:3] == ["coffee", "chelsea", "grace_hopper"]
    for label, ok in zip(photos.labels.tolist(), photos.accepted):
        assert label == -1 or label in ok


def test_bundled_photo_labels_agree_with_imagenet_info(photos) -> None:
    info = _imagenet_info()
    described = {
        name: info.index_to_description(int(label))
        for name, label in zip(photos.names, photos.labels)
        if label >= 0
    }
    assert "espresso" in described["coffee"]
    assert "tabby" in described["chelsea"]
    assert "military uniform" in described["grace_hopper"]
    assert "tiger cat" in info.index_to_description(282)  # accepted for chelsea


def test_bundled_photos_subset_and_preprocessing() -> None:
    pre = Preprocessing(40, 32, "bilinear")
    sub = bundled_photos(pre, n=2)
    assert sub.names == ["coffee", "chelsea"]
    assert sub.images.shape == (2, 3, 32, 32)
    mean = torch.tensor(pre.mean)[:, None, None]
    std = torch.tensor(pre.std)[:, None, None]
    assert torch.allclose(sub.images, (sub.raw - mean) / std, atol=1e-6)
    picked = bundled_photos("res_50", names=["chelsea"])
    assert picked.names == ["chelsea"] and picked.labels.tolist() == [281]
    assert picked.images.shape == (1, 3, 224, 224)
    with pytest.raises(ValueError, match="unknown photos"):
        bundled_photos(names=["mona_lisa"])
    assert set(photo_names()) >= {"coffee", "chelsea", "astronaut"}


def test_grayscale_photo_becomes_rgb() -> None:
    cam = bundled_photos(None, names=["camera"])  # a grayscale photo
    assert cam.raw.shape == (1, 3, 224, 224)
    assert torch.equal(cam.raw[0, 0], cam.raw[0, 1])


# ------------------------------------------------------- sample folder
WNIDS = {
    "n07920052_espresso.JPEG": "n07920052",
    "n01440764_tench.JPEG": "n01440764",
    "n03126707_crane.JPEG": "n03126707",  # the machine
    "n02012849_crane.jpeg": "n02012849",  # the bird: same synonym
}


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    for i, name in enumerate(WNIDS):
        array = rng.integers(0, 256, size=(60 + 10 * i, 80, 3), dtype=np.uint8)
        image = Image.fromarray(array)
        if i == 1:
            image = image.convert("L")  # grayscale file
        image.save(tmp_path / name)
    (tmp_path / "README.md").write_text("not an image")
    return tmp_path


def test_folder_labels_are_sorted_wnid_positions(folder: Path) -> None:
    names = _imagenet_info().label_names()
    files = sample_files(folder)
    assert len(files) == 4
    expected = sorted(names.index(w) for w in WNIDS.values())
    assert [label for _, label in files] == expected
    for path, label in files:
        assert names[label] == path.name.split("_")[0]
    assert class_index("n07920052") == 967
    assert imagenet_wnids() == tuple(sorted(names))
    assert class_name(967) == "espresso"


def test_folder_dataset_items_and_batches(folder: Path) -> None:
    data = ImageNetSamples(folder, model="res_50")
    assert len(data) == 4
    image, label = data[0]
    assert image.shape == (3, 224, 224) and label == data.labels[0]
    pre = entry("res_50").preprocessing
    assert torch.allclose(image, pre.normalize(data.read_raw(0)))
    gray = data.names.index("n01440764_tench")
    raw = data.read_raw(gray)
    assert raw.shape == (3, 224, 224) and torch.equal(raw[0], raw[2])

    batches = list(data.batches(batch_size=3))
    assert [len(b.names) for b in batches] == [3, 1]
    assert torch.equal(torch.cat([b.labels for b in batches]), data.labels)
    assert torch.allclose(batches[0].images[0], image)
    assert batches[1].accepted == [(int(data.labels[3]),)]

    assert len(ImageNetSamples(folder, n=2)) == 2
    assert ImageNetSamples(folder, raw=True)[0][0].min() >= 0
    with pytest.raises(ValueError, match="batch_size"):
        next(data.batches(0))


def test_unknown_wnid_names_the_file(folder: Path) -> None:
    Image.new("RGB", (8, 8)).save(folder / "n99999999_unicorn.JPEG")
    with pytest.raises(ValueError, match="n99999999_unicorn.JPEG"):
        sample_files(folder)


def test_empty_folder_falls_back_to_bundled_photos(tmp_path: Path) -> None:
    with pytest.warns(UserWarning, match="bundled photos"):
        batches = list(image_batches(tmp_path, n=3, batch_size=2))
    assert [b.names for b in batches] == [["coffee", "chelsea"], ["grace_hopper"]]
    with pytest.raises(FileNotFoundError, match="CAPTUM_SSL_IMAGENET_DIR"):
        next(image_batches(tmp_path / "absent", fallback=False))


def test_image_batches_reads_the_folder(folder: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        batches = list(image_batches(folder, batch_size=4, progress=True))
    assert len(batches) == 1 and batches[0].images.shape == (4, 3, 224, 224)


# ------------------------------------------------ the real sample photos
@pytest.mark.skipif(not HAS_SAMPLES, reason="ImageNet sample folder absent")
def test_real_sample_folder_labels() -> None:
    files = sample_files(SAMPLES)
    assert len(files) == 1000
    assert [label for _, label in files] == list(range(1000))
    info = _imagenet_info()
    for path, label in files:
        assert info.index_to_label_name(label) == path.name.split("_")[0]


@pytest.mark.skipif(not HAS_SAMPLES, reason="ImageNet sample folder absent")
def test_real_samples_are_classified_by_their_labels(effnet) -> None:
    # 16 classes spread over the label range: an off-by-one or wrong order of
    # labels would make the real model disagree with nearly all of them
    data = ImageNetSamples(SAMPLES, model="efficientnet_lite0")
    data.files = data.files[::63][:16]
    batch = next(data.batches(batch_size=16))
    with torch.no_grad():
        predicted = effnet(batch.images).argmax(1)
    assert (predicted == batch.labels).float().mean() >= 0.75
