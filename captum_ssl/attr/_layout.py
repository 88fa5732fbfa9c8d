"""Token-to-grid layout: the one place that turns a layer's output into a grid.

CNN layers give ``(B, C, H, W)``. Vision Transformers give token sequences
``(B, N, C)`` whose first tokens (class, distillation, register tokens) are not
part of the patch grid. Swin gives channels-last ``(B, H, W, C)``. Every method
of this package works on ``(B, C, h, w)`` grids, and this module is the only
code that knows how to get there and back.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable, Optional, Tuple

import torch
from torch import Tensor, nn

FORMATS = ("NCHW", "NHWC", "NLC")


def root_module(forward_func: Callable) -> Optional[nn.Module]:
    """The ``nn.Module`` behind ``forward_func`` (itself, or a bound method's owner)."""
    if isinstance(forward_func, nn.Module):
        return forward_func
    owner = getattr(forward_func, "__self__", None)
    if isinstance(owner, nn.Module):
        return owner
    return None


def _pair(value) -> Tuple[int, int]:
    if isinstance(value, int):
        return (value, value)
    return (int(value[0]), int(value[1]))


@dataclass(frozen=True)
class TokenLayout:
    r"""How a layer's output maps onto a spatial grid.

    Args:
        fmt (str, optional): ``"NCHW"`` (CNN feature maps), ``"NHWC"``
                    (channels-last, e.g. Swin) or ``"NLC"`` (token sequences
                    ``(B, N, C)``, e.g. ViT). ``None`` infers it from the
                    output's rank and the model.
        grid (tuple[int, int], optional): ``(h, w)`` of the patch grid of an
                    ``NLC`` output. ``None`` takes it from the model.
        num_prefix_tokens (int, optional): tokens before the patch tokens
                    (class, distillation, register tokens). ``None`` derives it
                    from the grid: ``N - h * w``.
        channels_last (bool, optional): with ``fmt=None``, read 4-D outputs as
                    ``(B, H, W, C)`` instead of ``(B, C, H, W)``.
                    Default: False

    Examples::

        >>> # a ViT-B/16 at 224 px: 1 class token then a 14 x 14 grid
        >>> layout = TokenLayout(fmt="NLC", grid=(14, 14), num_prefix_tokens=1)
        >>> layout.to_grid(torch.randn(2, 197, 768)).shape
        torch.Size([2, 768, 14, 14])
    """

    fmt: Optional[str] = None
    grid: Optional[Tuple[int, int]] = None
    num_prefix_tokens: Optional[int] = None
    channels_last: bool = False

    def __post_init__(self) -> None:
        if self.fmt is not None and self.fmt not in FORMATS:
            raise ValueError(f"fmt must be one of {FORMATS} or None, got {self.fmt!r}")
        if self.grid is not None:
            object.__setattr__(self, "grid", _pair(self.grid))

    # ------------------------------------------------------------------ resolve
    def resolve(self, shape: torch.Size) -> TokenLayout:
        """A layout with every field set for an output of ``shape``, or an error."""
        ndim = len(shape)
        if ndim == 4:
            fmt = self.fmt or ("NHWC" if self.channels_last else "NCHW")
            if fmt == "NLC":
                raise ValueError(
                    f"Layer output has shape {tuple(shape)} (4-D) but the layout says "
                    "'NLC' (tokens). Use fmt='NCHW' or fmt='NHWC'."
                )
            hw = tuple(shape[2:]) if fmt == "NCHW" else tuple(shape[1:3])
            return TokenLayout(fmt=fmt, grid=hw, num_prefix_tokens=0)
        if ndim == 3:
            if self.fmt not in (None, "NLC"):
                raise ValueError(
                    f"Layer output has shape {tuple(shape)} (3-D tokens) but the "
                    f"layout says {self.fmt!r}. Use fmt='NLC'."
                )
            return self._resolve_tokens(int(shape[1]), tuple(shape))
        raise ValueError(
            f"Unsupported layer output shape {tuple(shape)}: a spatial map needs a "
            "convolutional feature map (B, C, H, W), channels-last (B, H, W, C) or "
            "a token sequence (B, N, C). Choose a layer before global pooling, e.g. "
            "`model.layer4` for a ResNet or `model.blocks[-1].norm1` for a ViT."
        )

    def _resolve_tokens(self, n: int, shape: tuple) -> TokenLayout:
        k = self.num_prefix_tokens
        if self.grid is not None:
            gh, gw = self.grid
            prefix = n - gh * gw
            if prefix < 0 or (k is not None and prefix not in (0, k)):
                raise ValueError(
                    f"Layer output has {n} tokens, which does not fit a {gh}x{gw} "
                    f"grid with {k if k is not None else 'any number of'} prefix "
                    "tokens. Pass layout=TokenLayout(grid=(h, w), "
                    "num_prefix_tokens=k) matching this layer."
                )
            return TokenLayout(fmt="NLC", grid=(gh, gw), num_prefix_tokens=prefix)
        if k is not None:
            side = math.isqrt(max(n - k, 0))
            if n - k > 0 and side * side == n - k:
                return TokenLayout(fmt="NLC", grid=(side, side), num_prefix_tokens=k)
            raise ValueError(
                f"Layer output {shape} has {n} tokens; after {k} prefix tokens "
                f"{n - k} remain, which is not a square grid. Pass "
                "layout=TokenLayout(grid=(h, w)) for a non-square patch grid."
            )
        raise ValueError(
            f"Layer output {shape} is a token sequence but the patch grid is "
            "unknown: the model exposes neither `patch_embed` nor "
            "`num_prefix_tokens`. Pass layout=TokenLayout(grid=(h, w), "
            "num_prefix_tokens=k) to the method's constructor."
        )

    # ------------------------------------------------------------- conversions
    def to_grid(self, t: Tensor) -> Tensor:
        """``(B, C, h, w)`` view of a layer output laid out as ``self``."""
        lay = self.resolve(t.shape)
        if lay.fmt == "NCHW":
            return t
        if lay.fmt == "NHWC":
            return t.permute(0, 3, 1, 2)
        gh, gw = lay.grid  # type: ignore[misc]
        patches = t[:, lay.num_prefix_tokens :, :]
        return patches.transpose(1, 2).reshape(t.shape[0], t.shape[2], gh, gw)

    def from_grid(self, grid: Tensor, like: Tensor) -> Tensor:
        """Inverse of :meth:`to_grid`; prefix tokens are taken from ``like``."""
        lay = self.resolve(like.shape)
        if lay.fmt == "NCHW":
            return grid
        if lay.fmt == "NHWC":
            return grid.permute(0, 2, 3, 1)
        k = lay.num_prefix_tokens or 0
        tokens = grid.flatten(2).transpose(1, 2)
        prefix = like[:, :k, :].expand(tokens.shape[0], -1, -1)
        return torch.cat([prefix, tokens], dim=1)


def layout_for(
    forward_func: Callable,
    layer: nn.Module,
    input_hw: Optional[Tuple[int, int]],
    user_layout: Optional[TokenLayout] = None,
) -> TokenLayout:
    """Layout hints for ``layer`` of the model behind ``forward_func``.

    Explicit fields of ``user_layout`` win; missing ones come from the model:
    timm's ``output_fmt == "NHWC"`` (Swin), a channels-last ``nn.LayerNorm``
    layer, ``patch_embed`` (grid from the input size and patch size, or its
    ``grid_size``) and ``num_prefix_tokens``.
    """
    layout = user_layout or TokenLayout()
    model = root_module(forward_func)
    grid, k = layout.grid, layout.num_prefix_tokens
    # timm's Swin declares channels-last features; a plain LayerNorm normalises
    # the last dimension, so a 4-D LayerNorm output is channels-last too
    # (timm's LayerNorm2d is a subclass and is excluded by the exact type test).
    channels_last = layout.channels_last or type(layer) is nn.LayerNorm
    if model is not None and getattr(model, "output_fmt", None) == "NHWC":
        channels_last = True
    if model is not None:
        embed = getattr(model, "patch_embed", None)
        if grid is None and embed is not None:
            grid = _grid_from_embed(embed, input_hw)
        if k is None and isinstance(getattr(model, "num_prefix_tokens", None), int):
            k = model.num_prefix_tokens
    return replace(layout, grid=grid, num_prefix_tokens=k, channels_last=channels_last)


def _grid_from_embed(embed: nn.Module, input_hw) -> Optional[Tuple[int, int]]:
    if input_hw is not None:
        if hasattr(embed, "dynamic_feat_size"):
            try:
                return _pair(embed.dynamic_feat_size(tuple(input_hw)))
            except Exception:  # noqa: BLE001 - fall back to the static size below
                pass
        patch = getattr(embed, "patch_size", None)
        if patch is not None:
            ph, pw = _pair(patch)
            return (input_hw[0] // ph, input_hw[1] // pw)
    size = getattr(embed, "grid_size", None)
    return _pair(size) if size is not None else None
