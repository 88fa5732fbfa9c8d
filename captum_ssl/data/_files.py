"""Reading image files so that a damaged file is named, never read as pixels.

PIL decodes some damaged files without a word: a JPEG whose compressed data
was altered decodes to wrong pixels (libjpeg only prints "Corrupt JPEG data"
to the C stderr), and ``convert("RGB")`` turns a 16-bit PNG into an all-white
image. :func:`open_image` checks for both and for truncation, and raises
:class:`UnreadableImageError` naming the file and the reason; the dataset
readers skip such a file with an :class:`UnreadableImageWarning`.
"""

from __future__ import annotations

import os
import sys
import tempfile
import warnings
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, List, Optional, Sequence, Union

import torch

from ..models._preprocessing import to_rgb

if TYPE_CHECKING:
    from PIL import Image


class UnreadableImageError(OSError):
    """An image file that cannot be read correctly; the message names the
    file and the reason."""


class UnreadableImageWarning(UserWarning):
    """An image file was skipped because it cannot be read correctly.

    The message is self-contained: ``skipped <path>: <reason>``."""


def _libjpeg_complaint(data: bytes) -> Optional[str]:
    """What libjpeg reports while decoding ``data``, or ``None`` if nothing.

    libjpeg reports corrupt compressed data as a warning written to the C
    stderr, which PIL never surfaces; torchvision's decoder uses the same
    library, so its stderr (file descriptor 2) is read for the duration of
    one decode. Returns ``None`` when torchvision cannot decode here.
    """
    try:
        from torchvision.io import decode_jpeg
    except ImportError:  # pragma: no cover - torchvision is a dependency
        return None
    buffer = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    error = None
    sys.stderr.flush()
    with tempfile.TemporaryFile() as tmp:
        saved = os.dup(2)
        os.dup2(tmp.fileno(), 2)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # its deprecation notice
                decode_jpeg(buffer)
        except RuntimeError as err:
            error = str(err).strip().splitlines()[-1]
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        tmp.seek(0)
        text = tmp.read().decode("utf-8", "replace")
    ours = [ln for ln in text.splitlines() if "JPEG" in ln or "jpeg" in ln]
    others = [ln for ln in text.splitlines() if ln not in ours]
    if others:  # not libjpeg's: give it back
        sys.stderr.write("\n".join(others) + "\n")
    if ours:
        return ours[0].strip()
    return error


def open_image(path: Union[str, Path]) -> Image.Image:
    """Open an image file fully decoded, in RGB, or raise naming what is wrong.

    Raises:
        UnreadableImageError: the file is missing, not an image, truncated,
            or (JPEG) its compressed data is corrupt; the message is
            ``"<path>: <reason>"``.
    """
    from PIL import Image, ImageFile

    path = Path(path)
    if ImageFile.LOAD_TRUNCATED_IMAGES:  # someone turned PIL's check off
        raise UnreadableImageError(
            f"{path}: PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True, so truncated "
            "files would be padded with grey; set it to False"
        )
    try:
        data = path.read_bytes()
        with Image.open(path) as image:
            image.load()
            fmt = image.format
            rgb = to_rgb(image)
            rgb.load()
    except ValueError as err:  # to_rgb: a pixel format it refuses
        raise UnreadableImageError(f"{path}: {err}") from None
    except Exception as err:  # noqa: BLE001 - PIL raises many types
        raise UnreadableImageError(f"{path}: {type(err).__name__}: {err}") from None
    if fmt in ("JPEG", "MPO"):
        complaint = _libjpeg_complaint(data)
        if complaint:
            raise UnreadableImageError(
                f"{path}: the JPEG data is damaged ({complaint}); its pixels would "
                "be wrong"
            )
    return rgb


def skip_warning(err: UnreadableImageError) -> None:
    """Warn that the file of ``err`` is skipped (self-contained message)."""
    warnings.warn(f"skipped {err}", UnreadableImageWarning, stacklevel=3)


def image_ids(paths: Sequence[Path]) -> List[str]:
    """One distinct id per file: its stem (``n01440764_tench``), or its whole
    name where several files share a stem (``x.JPEG`` and ``x.jpg``)."""
    ids = [p.stem for p in paths]
    while True:
        counts = Counter(ids)
        if all(c == 1 for c in counts.values()):
            return ids
        ids = [p.name if counts[i] > 1 else i for p, i in zip(paths, ids)]
