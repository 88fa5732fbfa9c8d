"""Linear probes that read a ViT's tokens as the official evaluations do.

Self-supervised ViT releases come with a linear classifier trained on frozen
features, and the features are not timm's pooled output: DINO ViT-S/16
concatenates the class token of the last four blocks, DINO ViT-B/16 the class
token and the mean of the patch tokens, DINOv2 the class token and the mean of
the patch tokens. :class:`TokenLinearProbe` is that computation as a module
around the unchanged timm backbone, so that the CAMs, the attention methods
and the embedding targets explain the real classifier.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Protocol, Sized, Tuple, cast

import torch
from torch import Tensor, nn


class ViTBackbone(Protocol):
    """The attributes of a timm ViT backbone (``VisionTransformer``, ``Eva``)
    that the probes read: a typing view (``nn.Module.__getattr__`` is typed
    ``Tensor | Module``)."""

    blocks: Sized
    embed_dim: int


def vit_backbone(backbone: nn.Module) -> ViTBackbone:
    """``backbone`` seen as a timm ViT (the zoo's probes wrap only those)."""
    return cast(ViTBackbone, backbone)


def patch_grid(model: nn.Module) -> Tuple[int, int]:
    """The patch grid ``(gh, gw)`` of a timm ViT's ``patch_embed``."""
    embed = model.get_submodule("patch_embed")
    gh, gw = cast(Tuple[int, int], embed.grid_size)
    return (gh, gw)


@dataclass(frozen=True)
class TokenProbe:
    r"""Which tokens the official linear probe of a ViT reads.

    Args:
        n_last_blocks (int, optional): class tokens of this many last blocks,
                    each after the backbone's final norm, concatenated (oldest
                    first). Default: 1
        patch_mean (bool, optional): also the mean of the last block's patch
                    tokens after the final norm (class and register tokens
                    excluded). Default: False
        interleave (bool, optional): with ``patch_mean``, interleave class
                    token and patch mean channel by channel
                    (``[c_0, m_0, c_1, m_1, ...]``), as DINO's ``eval_linear.py``
                    reshapes them; otherwise ``[c, m]`` (DINOv2). Default: False
    """

    n_last_blocks: int = 1
    patch_mean: bool = False
    interleave: bool = False

    def __post_init__(self) -> None:
        if self.interleave and (self.n_last_blocks != 1 or not self.patch_mean):
            raise ValueError(
                "interleave pairs one class token with the patch mean: it needs "
                "n_last_blocks=1 and patch_mean=True"
            )

    def in_features(self, embed_dim: int) -> int:
        """Width of the probe's input for a backbone of ``embed_dim``."""
        return embed_dim * (self.n_last_blocks + int(self.patch_mean))

    def describe(self) -> str:
        parts = [
            "class token"
            if self.n_last_blocks == 1
            else f"class tokens of the last {self.n_last_blocks} blocks"
        ]
        if self.patch_mean:
            parts.append("mean of the patch tokens")
        how = " (interleaved)" if self.interleave else ""
        return " + ".join(parts) + f" after the final norm{how}"


class TokenLinearProbe(nn.Module):
    r"""A timm ViT backbone and the linear probe of its self-supervised release.

    ``forward(x) = head(features(x))`` where ``features`` are the tokens the
    official evaluation feeds its linear classifier (see :class:`TokenProbe`):

    - DINO ViT-S/16 (``eval_linear.py``, ``n_last_blocks=4``,
      ``avgpool_patchtokens=False``): ``cat(norm(z_9)[:, 0], ..., norm(z_12)[:, 0])``;
    - DINO ViT-B/16 (``n_last_blocks=1``, ``avgpool_patchtokens=True``): class
      token and patch-token mean interleaved channel by channel;
    - DINOv2 (``dinov2/hub/classifiers.py``, one layer):
      ``cat(x_norm_clstoken, x_norm_patchtokens.mean(1))``.

    The backbone is the unchanged timm ``VisionTransformer`` (``num_classes=0``)
    at ``.backbone``; its blocks, norms and attention modules run as modules,
    so layer hooks, attention capture and token layouts see them.

    Args:
        backbone (nn.Module): timm ``VisionTransformer`` without classifier.
        head (nn.Linear): the linear probe.
        probe (TokenProbe): which tokens the probe reads.

    Examples::

        >>> import captum_ssl.models as zoo
        >>> model = zoo.load("dinov2_vit_small")  # a TokenLinearProbe
        >>> layer = zoo.get_layer(model, "backbone.blocks.-1.norm1")
        >>> model.backbone  # the timm ViT-S/14 (zoo.load(..., head=False))
    """

    def __init__(self, backbone: nn.Module, head: nn.Linear, probe: TokenProbe):
        super().__init__()
        depth = len(vit_backbone(backbone).blocks)
        if not 1 <= probe.n_last_blocks <= depth:
            raise ValueError(
                f"the probe reads the last {probe.n_last_blocks} blocks but the "
                f"backbone has {depth}"
            )
        want = probe.in_features(vit_backbone(backbone).embed_dim)
        if head.in_features != want:
            raise ValueError(
                f"the linear head takes {head.in_features} features; this probe "
                f"gives {want} ({probe.describe()})"
            )
        self.backbone = backbone
        self.head = head
        self.probe = probe

    def features(
        self, x: Tensor, mean: Optional[Callable[[Tensor], Tensor]] = None
    ) -> Tensor:
        """The probe's input ``(B, in_features)``.

        ``mean`` averages the patch tokens ``(B, N, C) -> (B, C)`` (default:
        ``tokens.mean(dim=1)``; LRP passes the same average routed through
        its rules)."""
        b: Any = self.backbone  # a timm VisionTransformer
        p = self.probe
        if p.n_last_blocks == 1:
            outs = [b.forward_features(x)]
        else:
            x = b.norm_pre(b.patch_drop(b._pos_embed(b.patch_embed(x))))
            outs = []
            first = len(b.blocks) - p.n_last_blocks
            for i, blk in enumerate(b.blocks):
                x = blk(x)
                if i >= first:
                    outs.append(b.norm(x))
        if not p.patch_mean:
            return self.combine([o[:, 0] for o in outs])
        patches = outs[-1][:, b.num_prefix_tokens :]
        pooled = patches.mean(dim=1) if mean is None else mean(patches)
        return self.combine([o[:, 0] for o in outs], pooled)

    def combine(
        self, cls_tokens: List[Tensor], mean: Optional[Tensor] = None
    ) -> Tensor:
        """The probe's input from the class tokens it reads (oldest block
        first, each ``(B, C)``) and, with ``patch_mean``, the patch mean."""
        feats = torch.cat(cls_tokens, dim=-1)
        if not self.probe.patch_mean:
            return feats
        if mean is None:
            raise ValueError("this probe also reads the mean of the patch tokens")
        if self.probe.interleave:
            return torch.stack((feats, mean), dim=-1).flatten(1)
        return torch.cat((feats, mean), dim=-1)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


__all__ = ["TokenLinearProbe", "TokenProbe"]
