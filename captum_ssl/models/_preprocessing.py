"""Per-model image preprocessing: resize, centre crop, interpolation, mean/std."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Tuple, cast

import torch
from torch import Tensor

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INCEPTION_MEAN = (0.5, 0.5, 0.5)
INCEPTION_STD = (0.5, 0.5, 0.5)

if TYPE_CHECKING:
    from PIL import Image


def to_rgb(image: Image.Image) -> Image.Image:
    """A PIL image in 8-bit RGB, converted correctly, or a ``ValueError``.

    Grayscale, palette, CMYK and RGBA convert as PIL does; 16-bit grayscale
    (modes ``I;16*``, and ``I`` as PIL opens 16-bit PNGs) is scaled to 8 bits
    by ``v / 257`` (PIL's own conversion clips it: a 16-bit PNG would become
    all white); floating-point images (mode ``F``) have no defined range and
    are refused.
    """
    if image.mode == "RGB":
        return image
    if image.mode.startswith("I;16") or image.mode == "I":
        import numpy as np
        from PIL import Image

        arr = np.asarray(image).astype(np.float64)
        if arr.size and (arr.min() < 0 or arr.max() > 65535):
            raise ValueError(
                f"{image.mode} image with values outside 0..65535: not a 16-bit "
                "photo; convert it to 8-bit RGB first"
            )
        gray = Image.fromarray(np.round(arr / 257.0).astype(np.uint8), "L")
        return gray.convert("RGB")
    if image.mode == "F":
        raise ValueError(
            "floating-point image (PIL mode F) has no defined pixel range: save "
            "it as 8- or 16-bit first"
        )
    return image.convert("RGB")


@dataclass(frozen=True)
class Preprocessing:
    r"""The evaluation transform a model was trained or evaluated with.

    Shorter side resized to ``resize`` with ``interpolation``, then a centre crop
    of ``crop`` pixels, then ``(x - mean) / std`` on [0, 1] RGB values.

    Args:
        resize (int): length of the shorter side after resizing.
        crop (int): side of the square centre crop.
        interpolation (str): ``"bilinear"`` or ``"bicubic"``.
        mean (tuple[float, float, float]): per-channel mean of [0, 1] RGB values.
        std (tuple[float, float, float]): per-channel standard deviation.

    Examples::

        >>> pre = Preprocessing(256, 224, "bicubic", (0.5,) * 3, (0.5,) * 3)
        >>> x = pre.transform()(pil_image)  # (3, 224, 224), normalised
        >>> raw = pre.raw_transform()(pil_image)  # (3, 224, 224) in [0, 1]
        >>> torch.equal(pre.normalize(raw), x)
        True
    """

    resize: int = 256
    crop: int = 224
    interpolation: str = "bilinear"
    mean: Tuple[float, float, float] = IMAGENET_MEAN
    std: Tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self) -> None:
        if self.interpolation not in ("bilinear", "bicubic"):
            raise ValueError(
                f"interpolation must be 'bilinear' or 'bicubic', "
                f"got {self.interpolation!r}"
            )

    def as_dict(self) -> dict:
        """The settings as plain JSON-ready values (lists for mean and std)."""
        return dict(
            resize=self.resize,
            crop=self.crop,
            interpolation=self.interpolation,
            mean=list(self.mean),
            std=list(self.std),
        )

    @property
    def input_size(self) -> Tuple[int, int, int]:
        """``(3, crop, crop)``: the model's input size."""
        return (3, self.crop, self.crop)

    def raw_transform(self) -> Callable:
        """PIL image -> ``(3, crop, crop)`` float tensor in [0, 1], not normalised."""
        from torchvision import transforms as T

        mode = T.InterpolationMode(self.interpolation)
        return T.Compose(
            [
                T.Lambda(to_rgb),
                T.Resize(self.resize, interpolation=mode),
                T.CenterCrop(self.crop),
                T.ToTensor(),
            ]
        )

    def transform(self) -> Callable:
        """PIL image -> ``(3, crop, crop)`` normalised float tensor (model input)."""
        from torchvision import transforms as T

        return T.Compose(
            [
                *cast(T.Compose, self.raw_transform()).transforms,
                T.Normalize(self.mean, self.std),
            ]
        )

    def normalize(self, images: Tensor) -> Tensor:
        """``(x - mean) / std`` of [0, 1] images ``(..., 3, H, W)`` on their device."""
        mean = torch.tensor(self.mean, dtype=images.dtype, device=images.device)
        std = torch.tensor(self.std, dtype=images.dtype, device=images.device)
        return (images - mean[:, None, None]) / std[:, None, None]

    def denormalize(self, images: Tensor) -> Tensor:
        """Inverse of :meth:`normalize`: model inputs back to [0, 1] images."""
        mean = torch.tensor(self.mean, dtype=images.dtype, device=images.device)
        std = torch.tensor(self.std, dtype=images.dtype, device=images.device)
        return images * std[:, None, None] + mean[:, None, None]
