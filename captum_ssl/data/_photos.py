"""Real photos that ship with installed packages (no download)."""

from __future__ import annotations

from typing import BinaryIO, Callable, List, NamedTuple, Optional, Tuple, Union, cast

import numpy as np
import torch
from torch import Tensor

from ..models._preprocessing import Preprocessing


class Photos(NamedTuple):
    """A batch of photos: model inputs, ImageNet labels, names, display images.

    Attributes:
        images (Tensor): ``(B, 3, H, W)`` preprocessed for the model.
        labels (Tensor): ``(B,)`` long ImageNet class index, -1 where no class fits.
        names (list[str]): photo names.
        raw (Tensor): ``(B, 3, H, W)`` the same crops in [0, 1], not normalised.
        accepted (list[tuple[int, ...]]): ImageNet classes that describe each photo
                    correctly (e.g. tabby and tiger cat); empty where none does.
    """

    images: Tensor
    labels: Tensor
    names: List[str]
    raw: Tensor
    accepted: List[Tuple[int, ...]]


def _skimage(name: str) -> Callable[[], np.ndarray]:
    def read() -> np.ndarray:
        import skimage.data

        return getattr(skimage.data, name)()

    return read


def _sklearn(index: int) -> Callable[[], np.ndarray]:
    def read() -> np.ndarray:
        from sklearn.datasets import load_sample_images

        return load_sample_images().images[index]

    return read


def _grace_hopper() -> np.ndarray:
    from matplotlib import cbook
    from PIL import Image

    with cast(BinaryIO, cbook.get_sample_data("grace_hopper.jpg")) as f:
        return np.asarray(Image.open(f).convert("RGB"))


# name, reader, label (-1: no ImageNet class fits), accepted ImageNet classes.
# Labels only where the class is clear: 967 espresso, 281 tabby cat (282 tiger
# cat accepted: the two are hard to tell apart), 652 military uniform.
PHOTOS: Tuple[Tuple[str, Callable[[], np.ndarray], int, Tuple[int, ...]], ...] = (
    ("coffee", _skimage("coffee"), 967, (967,)),
    ("chelsea", _skimage("chelsea"), 281, (281, 282)),
    ("grace_hopper", _grace_hopper, 652, (652,)),
    ("astronaut", _skimage("astronaut"), -1, ()),
    ("rocket", _skimage("rocket"), -1, (657, 744)),
    ("camera", _skimage("camera"), -1, ()),
    ("china", _sklearn(0), -1, ()),
    ("flower", _sklearn(1), -1, ()),
    ("motorcycle", lambda: _skimage("stereo_motorcycle")()[0], -1, (665, 670)),
)


def photo_names() -> List[str]:
    """Names of the bundled photos, in order."""
    return [p[0] for p in PHOTOS]


def _preprocessing(model: Union[str, Preprocessing, None]) -> Preprocessing:
    if isinstance(model, Preprocessing):
        return model
    if model is None:
        return Preprocessing()
    from ..models import entry

    return entry(model).preprocessing


def bundled_photos(
    model: Union[str, Preprocessing, None] = "efficientnet_lite0",
    n: Optional[int] = None,
    names: Optional[List[str]] = None,
) -> Photos:
    r"""Real photos from scikit-image, scikit-learn and matplotlib, ready for a model.

    Photos that cannot be read offline are skipped. The labelled ones come first:
    coffee (espresso, 967), chelsea (tabby cat, 281), grace_hopper (military
    uniform, 652); the others have label -1.

    Args:
        model (str or Preprocessing, optional): registry name whose preprocessing
                    to apply, a :class:`Preprocessing`, or None for the torchvision
                    ImageNet default. Default: ``"efficientnet_lite0"``
        n (int, optional): keep the first ``n`` photos. Default: all
        names (list[str], optional): keep these photos, in this order.

    Returns:
        Photos: ``images``, ``labels``, ``names``, ``raw``, ``accepted``.

    Examples::

        >>> from captum_ssl.data import bundled_photos
        >>> photos = bundled_photos("efficientnet_lite0", n=2)
        >>> photos.names, photos.labels
        (['coffee', 'chelsea'], tensor([967, 281]))
    """
    from PIL import Image

    pre = _preprocessing(model)
    raw_tf = pre.raw_transform()
    table = PHOTOS
    if names is not None:
        known = {p[0]: p for p in PHOTOS}
        unknown = [x for x in names if x not in known]
        if unknown:
            raise ValueError(f"unknown photos {unknown}; known: {photo_names()}")
        table = tuple(known[x] for x in names)
    raws, labels, accepted = [], [], []
    kept: List[str] = []
    for name, read, label, ok in table:
        if n is not None and len(kept) >= n:
            break
        try:
            array = read()
        except Exception:  # noqa: BLE001 - some images need a download: skip
            continue
        raws.append(raw_tf(Image.fromarray(np.asarray(array))))
        labels.append(label)
        kept.append(name)
        accepted.append(ok)
    if not kept:
        raise RuntimeError(
            "no bundled photo could be read: install scikit-image, scikit-learn "
            "or matplotlib"
        )
    raw = torch.stack(raws)
    return Photos(
        images=pre.normalize(raw),
        labels=torch.tensor(labels, dtype=torch.long),
        names=kept,
        raw=raw,
        accepted=accepted,
    )
