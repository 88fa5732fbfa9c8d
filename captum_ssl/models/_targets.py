"""Targets for headless (self-supervised) backbones.

A DINO or MoCo backbone outputs an embedding, not class scores. Wrapping it in
one of these modules gives an output whose columns Captum's ``target`` selects,
so every attribution method of this package runs on it unchanged:

- :class:`EmbeddingSimilarity`: ``(B, R)`` cosine similarities between the
  embedding of each input and ``R`` reference embeddings (another image, a set
  of images, or another view of the same image); ``target=r`` explains the
  similarity to reference ``r``.
- :class:`EmbeddingNorm`: ``(B, 1)`` L2 norm of the embedding; ``target=0``.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _flat(embedding: Tensor) -> Tensor:
    if embedding.dim() > 2:
        embedding = embedding.flatten(1)
    if embedding.dim() != 2:
        raise ValueError(
            f"the backbone must output (B, D) embeddings, got shape "
            f"{tuple(embedding.shape)}"
        )
    return embedding


class EmbeddingSimilarity(nn.Module):
    r"""Cosine similarity of a backbone's embedding to reference embeddings.

    ``forward(x)[b, r] = cos(backbone(x)[b], references[r])``. Used as the model of
    an attribution with ``target=r``, it explains which pixels make image ``b``
    similar to reference ``r``, the usual way self-supervised features are
    probed (e.g. Caron et al., "Emerging Properties in Self-Supervised Vision
    Transformers", ICCV 2021).

    Args:
        backbone (nn.Module): headless model mapping images to ``(B, D)``
                    embeddings (``captum_ssl.models.load(name, head=False)``).
        references (Tensor): ``(R, D)`` or ``(D,)`` reference embeddings, e.g.
                    from :func:`reference_embeddings`. Stored as a buffer, so
                    the module moves with ``.to(device)``.

    The wrapped backbone's token layout (patch grid, class token) is still
    found by the attribution methods: they look through the wrapper for the
    submodule that has ``patch_embed`` / ``num_prefix_tokens``.

    An image compared with its own embedding sits at the maximum of the
    cosine similarity, where the gradient is zero: gradient maps are empty,
    and a warning says so (during forward passes with autograd enabled).

    Examples::

        >>> import captum_ssl.models as zoo
        >>> backbone = zoo.load("dino_xcit_s12_16", head=False)
        >>> refs = zoo.reference_embeddings(backbone, reference_images)  # (R, D)
        >>> model = zoo.EmbeddingSimilarity(backbone, refs)
        >>> model(images).shape  # (B, R); explain with target=r
    """

    def __init__(self, backbone: nn.Module, references: Tensor) -> None:
        super().__init__()
        if references.dim() == 1:
            references = references[None]
        if references.dim() != 2 or references.shape[0] == 0:
            raise ValueError(
                f"references must be (R, D) embeddings with R >= 1, got shape "
                f"{tuple(references.shape)}"
            )
        self.backbone = backbone
        # the wrapper has no layers of its own: it follows the backbone's mode
        # (a new module is in training mode, which would warn on every call)
        self.training = backbone.training
        self.register_buffer(
            "references", F.normalize(references.detach().float(), dim=1)
        )

    def forward(self, x: Tensor) -> Tensor:
        embedding = _flat(self.backbone(x))
        if embedding.shape[1] != self.references.shape[1]:
            raise ValueError(
                f"backbone embeddings have {embedding.shape[1]} dims but the "
                f"references have {self.references.shape[1]}: compute them with the "
                f"same backbone (reference_embeddings(backbone, images))"
            )
        refs = self.references.to(embedding.dtype)
        sims = F.normalize(embedding, dim=1) @ refs.T
        if torch.is_grad_enabled():
            _warn_if_own_embedding(sims)
        return sims


#: cosine similarities this close to 1 mean "the same embedding"
SAME_EMBEDDING = 1e-5


def _warn_if_own_embedding(sims: Tensor) -> None:
    same = (sims.detach() > 1 - SAME_EMBEDDING).nonzero()
    if len(same):
        b, r = (int(i) for i in same[0])
        warnings.warn(
            f"EmbeddingSimilarity: sample {b} has cosine similarity 1 to reference "
            f"{r}: it is explained against its own embedding. Cosine similarity is "
            "at its maximum there and its gradient is zero, so gradient-based "
            f"maps for target={r} are all zero (up to rounding) and draw as a "
            "blank overlay. Use another view of the image (a crop, flip or "
            "augmentation: reference_embeddings(backbone, views)) or another "
            "image as the reference, or EmbeddingNorm.",
            stacklevel=3,
        )


class EmbeddingNorm(nn.Module):
    r"""L2 norm of a backbone's embedding as a ``(B, 1)`` score (``target=0``).

    Args:
        backbone (nn.Module): headless model mapping images to ``(B, D)``.

    Examples::

        >>> model = EmbeddingNorm(zoo.load("dino_res_50", head=False))
        >>> model(images).shape  # (B, 1)
    """

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.training = backbone.training  # follows the backbone's mode

    def forward(self, x: Tensor) -> Tensor:
        return _flat(self.backbone(x)).norm(dim=1, keepdim=True)


@torch.no_grad()
def reference_embeddings(
    backbone: nn.Module,
    images: Tensor,
    batch_size: int = 32,
    mean: bool = False,
) -> Tensor:
    r"""Embeddings of reference images for :class:`EmbeddingSimilarity`.

    Args:
        backbone (nn.Module): headless model mapping images to ``(B, D)``.
        images (Tensor): ``(R, 3, H, W)`` preprocessed reference images (e.g. other
                    photos, or another view/augmentation of the explained image).
        batch_size (int, optional): images per forward pass. Default: 32
        mean (bool, optional): return the normalised mean embedding ``(1, D)`` (a
                    class prototype from a set of images) instead of ``(R, D)``.
                    Default: False

    Returns:
        Tensor: ``(R, D)`` (or ``(1, D)``) embeddings on the images' device.

    Examples::

        >>> refs = reference_embeddings(backbone, photos.images[:2])
    """
    if images.dim() != 4 or images.shape[0] == 0:
        raise ValueError(
            f"images must be a non-empty (R, 3, H, W) batch, got shape "
            f"{tuple(images.shape)}"
        )
    out = torch.cat(
        [
            _flat(backbone(images[i : i + batch_size]))
            for i in range(0, len(images), batch_size)
        ]
    )
    if mean:
        out = F.normalize(F.normalize(out, dim=1).mean(0, keepdim=True), dim=1)
    return out


def headless(model: nn.Module) -> nn.Module:
    """Remove the classifier in place: timm's ``reset_classifier(0)`` or ``fc``."""
    if hasattr(model, "reset_classifier"):
        model.reset_classifier(0)
    elif isinstance(getattr(model, "fc", None), nn.Linear):
        model.fc = nn.Identity()
    else:
        raise ValueError(
            f"cannot find the classifier of {type(model).__name__} to remove"
        )
    return model


__all__ = [
    "EmbeddingNorm",
    "EmbeddingSimilarity",
    "headless",
    "reference_embeddings",
]
