"""Contrastive Grad-CAM Consistency (CGC): the loss.

Reference: Pillai et al., "Consistent Explanations by Contrastive Learning",
CVPR 2022. https://arxiv.org/abs/2110.00527
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple, Type

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from captum_ssl.attr import LayerGradCam
from captum_ssl.training.augment import CropFlip


def info_nce(queries: Tensor, keys: Tensor, tau: float = 0.5) -> Tensor:
    r"""InfoNCE over a batch: query ``i``'s positive is key ``i``.

    .. math:: \mathcal{L} = -\frac{1}{B}\sum_i \log
              \frac{\exp(\cos(q_i, k_i)/\tau)}{\sum_j \exp(\cos(q_i, k_j)/\tau)}

    ``queries`` and ``keys`` are ``(B, ...)`` and are flattened per sample;
    the other samples of the batch are the negatives.
    """
    if queries.shape != keys.shape or queries.shape[0] < 2:
        raise ValueError(
            "queries and keys need the same shape and a batch of at least 2 "
            f"(negatives come from the batch), got {tuple(queries.shape)} and "
            f"{tuple(keys.shape)}."
        )
    q = F.normalize(queries.flatten(1), dim=1)
    k = F.normalize(keys.flatten(1), dim=1)
    logits = q @ k.T / tau
    return F.cross_entropy(logits, torch.arange(q.shape[0], device=q.device))


@contextlib.contextmanager
def captured_output(model: nn.Module) -> Iterator[List[Tensor]]:
    """The outputs of ``model``'s forward calls inside the block (hook removed
    on exit)."""
    outputs: List[Tensor] = []
    handle = model.register_forward_hook(lambda _m, _i, out: outputs.append(out))
    try:
        yield outputs
    finally:
        handle.remove()


class CGCLoss:
    r"""Cross-entropy plus the contrastive Grad-CAM consistency loss.

    For a batch ``x`` the loss draws an augmented view ``T(x)`` (random
    resized crop and flip, :class:`~captum_ssl.training.CropFlip`), computes
    the differentiable maps of both in one forward pass, moves the original's
    map into the view's geometry with the same ``T`` and contrasts
    (:func:`info_nce`): the positive of view ``i`` is ``T(map(x_i))``, the
    negatives are the moved maps of the other images of the batch.

    .. math:: \mathcal{L} = \tfrac12\big[\mathrm{CE}(x) + \mathrm{CE}(T(x))\big]
              + \lambda\,\mathrm{InfoNCE}_\tau\big(\mathrm{map}(T(x)),
              T(\mathrm{map}(x))\big)

    The maps are Grad-CAM (or any gradient CAM of this library) with a ReLU,
    explaining the label when given, else the model's own prediction (for
    unlabelled data, where the cross-entropy is left out). The paper
    transforms the first view's map into the second view's geometry, as here.
    ``lam=0`` gives the plain cross-entropy baseline on the same views
    without computing maps.

    Reference: Pillai et al., "Consistent Explanations by Contrastive
    Learning", CVPR 2022. https://arxiv.org/abs/2110.00527

    Args:
        model (nn.Module): the classifier being trained.
        layer (nn.Module): the layer explained (e.g. the last conv block).
        method (type, optional): a gradient CAM class. Default: LayerGradCam
        tau (float, optional): temperature. Default: 0.5 (paper)
        lam (float, optional): weight of the contrastive term. Default: 0.5
        augment (Callable, optional): ``images -> Views``. Default:
                    ``CropFlip()``

    Examples::

        >>> loss_fn = CGCLoss(model, model.layer4, lam=0.5, tau=0.5)
        >>> loss, parts = loss_fn(images, labels)     # parts: ce, cgc
        >>> loss.backward()
    """

    def __init__(
        self,
        model: nn.Module,
        layer: nn.Module,
        method: Type[LayerGradCam] = LayerGradCam,
        tau: float = 0.5,
        lam: float = 0.5,
        augment: Optional[Callable[[Tensor], Any]] = None,
    ) -> None:
        if tau <= 0 or lam < 0:
            raise ValueError(f"tau={tau}, lam={lam}: use tau > 0 and lam >= 0.")
        self.model = model
        self.cam = method(model, layer)
        self.tau = tau
        self.lam = lam
        self.augment = augment if augment is not None else CropFlip()

    def __call__(
        self, images: Tensor, labels: Optional[Tensor] = None
    ) -> Tuple[Tensor, Dict[str, float]]:
        b = images.shape[0]
        if labels is None:
            with torch.no_grad():
                targets = self.model(images).argmax(dim=1)
        else:
            targets = labels
        views = self.augment(images)
        both = torch.cat([images, views.images])
        both_targets = torch.cat([targets, targets])
        if self.lam == 0:
            logits = self.model(both)
            nce = logits.new_zeros(())
        else:
            with captured_output(self.model) as outputs:
                maps = self.cam.attribute(
                    both, target=both_targets, relu_attributions=True,
                    create_graph=True,
                )  # fmt: skip
            logits = outputs[-1]
            nce = info_nce(maps[b:], views.apply(maps[:b]), self.tau)
        if labels is None:
            ce = logits.new_zeros(())
        else:
            ce = F.cross_entropy(logits, both_targets)
        total = ce + self.lam * nce
        return total, {"ce": ce.item(), "cgc": nce.item()}
