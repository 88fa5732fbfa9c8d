"""Training protocols that use explanations.

* :class:`CGCLoss`, :class:`CropFlip` and :func:`train`: Contrastive Grad-CAM
  Consistency training (Pillai et al., CVPR 2022) with differentiable CAMs and
  a resumable training loop.
* :func:`roar_kar`: Remove-And-Retrain / Keep-And-Retrain (Hooker et al.,
  NeurIPS 2019), resumable and ``torchrun``-aware, with the scikit-learn digits
  setting (:func:`digits`, :class:`DigitsCNN`, :func:`standard_explainers`).
"""

from captum_ssl.training.augment import CropFlip, Views
from captum_ssl.training.cgc import CGCLoss, captured_output, info_nce
from captum_ssl.training.digits import DigitsCNN, digits, standard_explainers
from captum_ssl.training.loop import train
from captum_ssl.training.roar import (
    RoarResult,
    RoarStore,
    importance_order,
    random_maps,
    remove_pixels,
    roar_kar,
    summarize,
    tensors_of,
)

__all__ = [
    "CGCLoss",
    "CropFlip",
    "DigitsCNN",
    "RoarResult",
    "RoarStore",
    "Views",
    "captured_output",
    "digits",
    "importance_order",
    "info_nce",
    "random_maps",
    "remove_pixels",
    "roar_kar",
    "standard_explainers",
    "summarize",
    "tensors_of",
    "train",
]
