"""Data: the ImageNet sample folder and real photos bundled with installed packages.

Examples::

    >>> from captum_ssl.data import bundled_photos, image_batches
    >>> photos = bundled_photos("efficientnet_lite0")  # always available
    >>> for batch in image_batches(model="res_50", batch_size=16, progress=True):
    ...     ...  # storage/imagenet_1000samples/, or the bundled photos if empty
"""

from ._files import UnreadableImageError, UnreadableImageWarning, open_image
from ._imagenet import (
    IMAGENET_ENV,
    ImageNetSamples,
    class_index,
    class_name,
    default_imagenet_dir,
    image_batches,
    imagenet_wnids,
    sample_files,
)
from ._photos import Photos, bundled_photos, photo_names

__all__ = [
    "IMAGENET_ENV",
    "ImageNetSamples",
    "Photos",
    "UnreadableImageError",
    "UnreadableImageWarning",
    "bundled_photos",
    "class_index",
    "class_name",
    "default_imagenet_dir",
    "image_batches",
    "imagenet_wnids",
    "open_image",
    "photo_names",
    "sample_files",
]
