"""The ImageNet sample folder: ``<wnid>_<name>.JPEG``, one photo per class."""

from __future__ import annotations

import os
import re
import warnings
from functools import lru_cache
from pathlib import Path
from typing import Iterator, List, Optional, Tuple, Union

import torch
from torch import Tensor
from torch.utils.data import Dataset

from .._progress import progress_bar
from ..models._preprocessing import Preprocessing
from ._files import UnreadableImageError, image_ids, open_image, skip_warning
from ._photos import Photos, _preprocessing, bundled_photos

#: environment variable overriding the default sample folder
IMAGENET_ENV = "CAPTUM_SSL_IMAGENET_DIR"
PROJECT_ROOT = Path(__file__).resolve().parents[2]
_FILE = re.compile(r"^(n\d{8})_(.+)\.jpe?g$", re.IGNORECASE)


def default_imagenet_dir() -> Path:
    """``$CAPTUM_SSL_IMAGENET_DIR``, else ``<project>/storage/imagenet_1000samples``."""
    env = os.environ.get(IMAGENET_ENV)
    if env:
        return Path(env).expanduser()
    return PROJECT_ROOT / "storage" / "imagenet_1000samples"


@lru_cache(maxsize=1)
def imagenet_wnids() -> Tuple[str, ...]:
    """The 1000 ImageNet-1k wnids in class-index order (timm's ``ImageNetInfo``)."""
    from timm.data import ImageNetInfo

    return tuple(ImageNetInfo().label_names())


@lru_cache(maxsize=1)
def _wnid_index() -> dict:
    return {w: i for i, w in enumerate(imagenet_wnids())}


def class_index(wnid: str) -> int:
    """ImageNet-1k class index of a wnid (its position among the sorted wnids)."""
    try:
        return _wnid_index()[wnid]
    except KeyError:
        raise ValueError(f"{wnid!r} is not an ImageNet-1k wnid") from None


def class_name(index: int, detailed: bool = False) -> str:
    """Human-readable name of an ImageNet-1k class index (e.g. 967 -> 'espresso')."""
    from timm.data import ImageNetInfo

    return ImageNetInfo().index_to_description(int(index), detailed=detailed)


def sample_files(root: Union[str, Path, None] = None) -> List[Tuple[Path, int]]:
    """``(path, class index)`` of every ``<wnid>_<name>.JPEG`` in ``root``, by class.

    Files whose name does not follow the pattern are ignored; a wnid that is not an
    ImageNet-1k class is an error naming the file.
    """
    root = Path(root) if root is not None else default_imagenet_dir()
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = _FILE.match(path.name)
        if match is None or not path.is_file():
            continue
        try:
            found.append((path, class_index(match.group(1))))
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from None
    return sorted(found, key=lambda item: (item[1], item[0].name))


class ImageNetSamples(Dataset):
    r"""The ImageNet sample folder as a dataset of ``(image, label)`` pairs.

    Each file ``<wnid>_<name>.JPEG`` is read with PIL, converted to RGB (23 of the
    1000 sample photos are grayscale) and preprocessed for the chosen model. The
    label is the wnid's position in sorted-wnid order, which is the order of
    timm's ``ImageNetInfo`` (the synonym in the file name is not unique and is not
    used). A file that cannot be read correctly (truncated, damaged JPEG data,
    an unsupported pixel format) is skipped by :meth:`batches` with an
    :class:`UnreadableImageWarning` naming it; indexing it raises
    :class:`UnreadableImageError`. Each photo's id (:attr:`names`) is its file
    stem, or its whole file name where two files share a stem.

    Args:
        root (path, optional): the folder. Default: :func:`default_imagenet_dir`
        model (str or Preprocessing, optional): registry name whose
                    preprocessing to apply, or a :class:`Preprocessing`.
                    Default: ``"efficientnet_lite0"``
        n (int, optional): keep the first ``n`` files (by class index).
        raw (bool, optional): return unnormalised [0, 1] crops. Default: False

    Examples::

        >>> from captum_ssl.data import ImageNetSamples
        >>> data = ImageNetSamples(model="res_50", n=64)
        >>> for batch in data.batches(batch_size=16, progress=True):
        ...     logits = model(batch.images)
    """

    def __init__(
        self,
        root: Union[str, Path, None] = None,
        model: Union[str, Preprocessing, None] = "efficientnet_lite0",
        n: Optional[int] = None,
        raw: bool = False,
    ) -> None:
        self.root = Path(root) if root is not None else default_imagenet_dir()
        self.preprocessing = _preprocessing(model)
        files = sample_files(self.root)
        # ids over the whole folder: a photo's id never depends on n
        self._ids = dict(zip((p for p, _ in files), image_ids([p for p, _ in files])))
        self.files = files[:n] if n is not None else files
        self.raw = raw
        self._raw_tf = self.preprocessing.raw_transform()

    def __len__(self) -> int:
        return len(self.files)

    @property
    def labels(self) -> Tensor:
        """``(N,)`` class indices of all files."""
        return torch.tensor([label for _, label in self.files], dtype=torch.long)

    @property
    def names(self) -> List[str]:
        """One distinct id per photo: the file stem, or the whole file name
        where several files share a stem (``x.JPEG`` and ``x.jpg``)."""
        return [self.image_id(path) for path, _ in self.files]

    def image_id(self, path: Path) -> str:
        """The id of the photo in ``path`` (see :attr:`names`)."""
        return self._ids.get(path, path.stem)

    def select(self, names: List[str]) -> None:
        """Keep only the photos whose id is in ``names`` (in folder order)."""
        wanted = set(names)
        self.files = [f for f in self.files if self.image_id(f[0]) in wanted]

    def read_raw(self, index: int) -> Tensor:
        """The ``index``-th photo as an unnormalised [0, 1] ``(3, H, W)`` crop.

        Raises:
            UnreadableImageError: the file cannot be read correctly (message:
                its path and the reason).
        """
        return self._raw_tf(open_image(self.files[index][0]))

    def __getitem__(self, index: int) -> Tuple[Tensor, int]:
        image = self.read_raw(index)
        if not self.raw:
            image = self.preprocessing.normalize(image)
        return image, self.files[index][1]

    def batches(self, batch_size: int = 32, progress: bool = False) -> Iterator[Photos]:
        """Consecutive batches as :class:`Photos` (images, labels, names, raw)."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        chunks = range(0, len(self), batch_size)
        starts = progress_bar(
            chunks, "ImageNet samples", len(chunks), progress, unit="batch"
        )
        for start in starts:
            raws, idx = [], []
            for i in range(start, min(start + batch_size, len(self))):
                try:
                    raws.append(self.read_raw(i))
                    idx.append(i)
                except UnreadableImageError as err:  # named, skipped, run goes on
                    skip_warning(err)
            if not idx:
                continue
            raw = torch.stack(raws)
            labels = [self.files[i][1] for i in idx]
            yield Photos(
                images=self.preprocessing.normalize(raw),
                labels=torch.tensor(labels, dtype=torch.long),
                names=[self.image_id(self.files[i][0]) for i in idx],
                raw=raw,
                accepted=[(label,) for label in labels],
            )


def image_batches(
    root: Union[str, Path, None] = None,
    model: Union[str, Preprocessing, None] = "efficientnet_lite0",
    n: Optional[int] = None,
    batch_size: int = 32,
    progress: bool = False,
    fallback: bool = True,
) -> Iterator[Photos]:
    r"""Batches of the ImageNet sample photos, or of the bundled photos if none.

    Args:
        root (path, optional): the sample folder. Default: :func:`default_imagenet_dir`
        model (str or Preprocessing, optional): whose preprocessing to apply.
        n (int, optional): at most ``n`` photos.
        batch_size (int, optional): photos per batch. Default: 32
        progress (bool, optional): show a progress bar. Default: False
        fallback (bool, optional): when the folder is missing or has no
                    ``<wnid>_<name>.JPEG`` file, warn and use
                    :func:`bundled_photos` instead of failing. Default: True

    Yields:
        Photos: ``images``, ``labels``, ``names``, ``raw``, ``accepted``.

    Examples::

        >>> for batch in image_batches(model="efficientnet_lite0", n=100):
        ...     maps = cam.attribute(batch.images, target=batch.labels)
    """
    data = ImageNetSamples(root, model, n)
    if len(data):
        yield from data.batches(batch_size, progress)
        return
    if not fallback:
        raise FileNotFoundError(
            f"no <wnid>_<name>.JPEG photos in {data.root}: link or copy the ImageNet "
            f"sample images there (or set ${IMAGENET_ENV})"
        )
    warnings.warn(
        f"no ImageNet sample photos in {data.root}; using the bundled photos",
        stacklevel=2,
    )
    photos = bundled_photos(model, n)
    for start in range(0, len(photos.names), batch_size):
        sl = slice(start, start + batch_size)
        yield Photos(
            photos.images[sl],
            photos.labels[sl],
            photos.names[sl],
            photos.raw[sl],
            photos.accepted[sl],
        )


__all__: List[str] = [
    "IMAGENET_ENV",
    "ImageNetSamples",
    "class_index",
    "class_name",
    "default_imagenet_dir",
    "image_batches",
    "imagenet_wnids",
    "sample_files",
]
