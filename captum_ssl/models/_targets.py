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
from typing import Any, Callable, List, Protocol, Tuple, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from captum_ssl._outputs import model_output
from captum_ssl.models._layers import layer_expression


def _flat(embedding: Any) -> Tensor:
    """The backbone's output as ``(B, D)`` embeddings: a Hugging Face
    ``ModelOutput`` by its ``pooler_output``, else its class token
    (:func:`~captum_ssl._outputs.model_output`)."""
    embedding = model_output(embedding)
    if not isinstance(embedding, Tensor):
        raise ValueError(
            f"the backbone must output (B, D) embeddings as a tensor, got "
            f"{type(embedding).__name__}: wrap it so that it returns one, e.g. "
            "`lambda x: backbone(x)[0]`"
        )
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
                    embeddings (``captum_ssl.models.load(name, head=False)``,
                    :func:`headless`). A Hugging Face backbone is read by its
                    ``pooler_output`` where it has one (``Dinov2Model``,
                    ``CLIPVisionModel``: the normed class token; ``ViTModel``:
                    its tanh pooler), else by the class token of
                    ``last_hidden_state`` (``ViTMAEModel``).
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

    references: Tensor  # (R, D) buffer, unit norm

    def __init__(self, backbone: nn.Module, references: Tensor) -> None:
        super().__init__()
        self.backbone = backbone
        # the wrapper has no layers of its own: it follows the backbone's mode
        # (a new module is in training mode, which would warn on every call)
        self.training = backbone.training
        self.register_buffer("references", torch.empty(0))
        self.set_references(references)

    def set_references(self, references: Tensor) -> None:
        r"""Replace the reference embeddings (in place: attribution methods and
        metrics already built on this module use the new ones).

        Args:
            references (Tensor): ``(R, D)`` or ``(D,)`` embeddings; ``R`` may
                        differ from before (targets index the new ones).

        Examples::

            >>> model.set_references(reference_embeddings(backbone, x.flip(-1)))
        """
        if references.dim() == 1:
            references = references[None]
        if references.dim() != 2 or references.shape[0] == 0:
            raise ValueError(
                f"references must be (R, D) embeddings with R >= 1, got shape "
                f"{tuple(references.shape)}"
            )
        self.references = F.normalize(references.detach().float(), dim=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.score(_flat(self.backbone(x)))

    def check(self, embedding: Tensor) -> None:
        """Refuse embeddings of another size than the references'."""
        if embedding.shape[1] != self.references.shape[1]:
            raise ValueError(
                f"backbone embeddings have {embedding.shape[1]} dims but the "
                f"references have {self.references.shape[1]}: compute them with the "
                f"same backbone (reference_embeddings(backbone, images))"
            )

    def score(self, embedding: Tensor) -> Tensor:
        """``(B, R)`` cosine similarities of ``(B, D)`` embeddings to the
        references (what :meth:`forward` computes after the backbone)."""
        self.check(embedding)
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
        return self.score(_flat(self.backbone(x)))

    def score(self, embedding: Tensor) -> Tensor:
        """``(B, 1)`` norms of ``(B, D)`` embeddings."""
        return embedding.norm(dim=1, keepdim=True)


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


def _identity(*names: str) -> Callable[[nn.Module], nn.Module]:
    def remove(model: nn.Module) -> nn.Module:
        for name in names:
            setattr(model, name, nn.Identity())
        return model

    return remove


class _Resettable(Protocol):
    def reset_classifier(self, num_classes: int) -> None: ...


def _reset_classifier(model: nn.Module) -> nn.Module:
    # a typing view: only models with a ``reset_classifier`` come here (timm's)
    cast(_Resettable, model).reset_classifier(0)
    return model


def _is_open_clip(model: nn.Module, cls: str) -> bool:
    return type(model).__module__.startswith("open_clip") and any(
        c.__name__ == cls for c in type(model).__mro__
    )


#: (does the model have this head, remove it), tried in order
_HEADS: List[Tuple[Callable[[nn.Module], bool], Callable[[nn.Module], nn.Module]]] = [
    # timm
    (lambda m: hasattr(m, "reset_classifier"), _reset_classifier),
    # open_clip: the image tower of a CLIP model; the tower itself is headless
    (
        lambda m: _is_open_clip(m, "CLIP") and hasattr(m, "visual"),
        lambda m: cast(nn.Module, m.visual),
    ),
    (lambda m: _is_open_clip(m, "VisionTransformer"), lambda m: m),
    # torchvision ResNet / ViT
    (lambda m: isinstance(getattr(m, "fc", None), nn.Linear), _identity("fc")),
    (lambda m: isinstance(getattr(m, "heads", None), nn.Module), _identity("heads")),
    # Hugging Face: DeiT with teacher, then every *ForImageClassification
    (
        lambda m: isinstance(getattr(m, "distillation_classifier", None), nn.Module),
        _identity("cls_classifier", "distillation_classifier"),
    ),
    (
        lambda m: isinstance(getattr(m, "classifier", None), nn.Linear),
        _identity("classifier"),
    ),
]


def headless(model: nn.Module) -> nn.Module:
    r"""The model without its classifier: it returns ``(B, D)`` embeddings.

    The classifier is removed in place (replaced by ``nn.Identity``), so the
    embedding is what the classifier read:

    - timm: ``reset_classifier(0)`` (the pooled features);
    - torchvision: ResNet's ``fc``, ViT's ``heads`` (the normed class token);
    - Hugging Face ``*ForImageClassification``: ``classifier`` (ViT: the class
      token; DINOv2: class token and mean patch token, concatenated), DeiT with
      teacher: both classifiers (the mean of class and distillation token).
      The output stays an ``ImageClassifierOutput`` whose ``logits`` hold the
      embedding;
    - open_clip: a ``CLIP`` model gives its image tower ``model.visual`` (the
      returned module, not ``model``), whose output is the projected image
      embedding; the tower itself is returned as it is.

    Args:
        model (nn.Module): a classifier of one of the families above.

    Returns:
        nn.Module: the headless model (``model`` itself, or open_clip's tower).

    Raises:
        ValueError: no known classifier; the message names the model's last
            linear layer to replace.

    Examples::

        >>> import torchvision
        >>> backbone = headless(torchvision.models.vit_b_16())
        >>> backbone(torch.randn(1, 3, 224, 224)).shape
        torch.Size([1, 768])
    """
    for has_head, remove in _HEADS:
        if has_head(model):
            return remove(model)
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    fix = (
        f"replace its classifier yourself, e.g. `{layer_expression(linears[-1])} = "
        "torch.nn.Identity()` (its last linear layer), "
        if linears
        else ""
    )
    raise ValueError(
        f"cannot find the classifier of {type(model).__name__} to remove (known: "
        "timm's reset_classifier, torchvision's `fc` / `heads`, Hugging Face's "
        "`classifier`, open_clip's CLIP): "
        f"{fix}or pass a backbone whose forward returns (B, D) embeddings."
    )


__all__ = [
    "EmbeddingNorm",
    "EmbeddingSimilarity",
    "headless",
    "reference_embeddings",
]
