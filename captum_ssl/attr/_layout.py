"""Token-to-grid layout: the one place that turns a layer's output into a grid.

CNN layers give channels-first maps ``(B, C, *spatial)``: ``(B, C)`` after
pooling or a linear layer, ``(B, C, L)`` for 1-D convolutions (time series,
audio), ``(B, C, H, W)`` for images, ``(B, C, D, H, W)`` for volumes and
video. Vision Transformers give token sequences ``(B, N, C)`` whose first
tokens (class, distillation, register tokens) are not part of the patch grid.
Swin gives channels-last ``(B, H, W, C)``. Every method of this package works
on channels-first grids ``(B, C, *spatial)``, and this module is the only code
that knows how to get there and back.

A 3-D output is read as tokens only where the model declares a token layout
(:func:`declared_layout`) or the call passes ``layout=``; otherwise it is a
channels-first ``(B, C, L)`` map, as in Captum.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import (
    Any,
    Callable,
    Iterable,
    Iterator,
    List,
    Optional,
    Sequence,
    Tuple,
    cast,
)

import torch
from torch import Tensor, nn

FORMATS = ("NC", "NCL", "NCHW", "NCDHW", "NHWC", "NLC")
#: channels-first formats by the rank of the output (Captum's convention)
CHANNELS_FIRST = {2: "NC", 3: "NCL", 4: "NCHW", 5: "NCDHW"}
#: most prefix tokens (class, distillation, register tokens) tried when a
#: token output's prefix count is not known
MAX_PREFIX = 8


def root_module(forward_func: Callable) -> Optional[nn.Module]:
    """The ``nn.Module`` behind ``forward_func`` (itself, or a bound method's owner)."""
    if isinstance(forward_func, nn.Module):
        return forward_func
    owner = getattr(forward_func, "__self__", None)
    if isinstance(owner, nn.Module):
        return owner
    return None


#: attributes that mark the model a token layout is read from
MODEL_MARKERS = ("patch_embed", "num_prefix_tokens")
#: packages whose model classes are known: their 3-D outputs other than
#: those of convolution and pooling layers are token sequences (timm: ViTs,
#: hybrid CNN-transformers such as EfficientFormer, attention in CNN blocks)
TOKEN_PACKAGES = ("timm.models.",)


def _declares_tokens(module: nn.Module) -> bool:
    if any(hasattr(module, a) for a in MODEL_MARKERS):
        return True
    # a whole timm model (its blocks are timm classes too, without a head)
    known = type(module).__module__.startswith(TOKEN_PACKAGES)
    return known and hasattr(module, "forward_head")


def declared_layout(
    model: Optional[nn.Module], input_hw: Optional[Tuple[int, int]] = None
) -> Optional[TokenLayout]:
    """The token layout ``model`` declares, or ``None`` where it declares none.

    The one place that decides whether a model's 3-D layer outputs are token
    sequences ``(B, N, C)``: only then are they laid onto a patch grid; every
    other 3-D output is a channels-first ``(B, C, L)`` map, as in Captum.
    Today a model declares a token layout by being a timm model (a class of
    :data:`TOKEN_PACKAGES`: its ViT families, ViT, DeiT, CaiT, XCiT, EVA,
    BEiT, Swin, register-token ViTs, and hybrids such as EfficientFormer) or
    by timm's convention, which any other model can adopt: a ``patch_embed``
    module (its ``patch_size`` / ``grid_size`` / ``dynamic_feat_size`` give
    the patch grid) or an int ``num_prefix_tokens``. Other families declare
    theirs through their adapter in :mod:`captum_ssl.attr._families`
    (torchvision, open_clip, Hugging Face ViTs), asked here and nowhere else.

    Returns:
        TokenLayout or None: ``fmt`` unset (3-D outputs are tokens, 4-D ones
        inferred), ``tokens=True``, ``patch_grid`` for an input of
        ``input_hw`` (``None`` where the model does not state it) and
        ``num_prefix_tokens`` (``None`` where not stated).
    """
    if model is None:
        return None
    if not _declares_tokens(model):
        # a ViT family adapter (torchvision, open_clip, Hugging Face, ...;
        # captum_ssl/attr/_families), also inside a wrapper
        from captum_ssl.attr._families import declared_layout as family_layout

        family = family_layout(model, input_hw)
        if family is None:
            return None
        return replace(family, tokens=True)
    embed = getattr(model, "patch_embed", None)
    grid = _grid_from_embed(embed, input_hw) if embed is not None else None
    k = getattr(model, "num_prefix_tokens", None)
    return TokenLayout(
        patch_grid=grid,
        num_prefix_tokens=k if isinstance(k, int) else None,
        tokens=True,
    )


def explained_model(
    forward_func: Callable, layer: Optional[nn.Module] = None
) -> Optional[nn.Module]:
    """The model whose patch grid and prefix tokens describe ``layer``.

    ``forward_func``'s module itself, or, when it wraps the model (for example
    :class:`~captum_ssl.models.EmbeddingSimilarity` around a headless ViT, an
    ``nn.Sequential(normalize, vit)``, DataParallel), the innermost submodule
    that declares a token layout (:func:`declared_layout`: a timm model, or a
    ``patch_embed`` or ``num_prefix_tokens`` attribute, timm's convention,
    also the documented way for any other model to expose its layout) and
    contains ``layer``. ``None`` for a plain function.
    """
    root = root_module(forward_func)
    if root is None or _declares_tokens(root):
        return root
    found = root
    for module in root.modules():
        if module is root or not _declares_tokens(module):
            continue
        if layer is None or any(sub is layer for sub in module.modules()):
            found = module  # pre-order: a later hit is nested deeper
    return found


def _pair(value) -> Tuple[int, int]:
    if isinstance(value, int):
        return (value, value)
    return (int(value[0]), int(value[1]))


@dataclass(frozen=True)
class TokenLayout:
    r"""How a layer's output maps onto a spatial grid.

    Any field left ``None`` is inferred from the layer's actual output: an
    output of 2 or 5 dimensions is channels-first ``(B, C)`` or ``(B, C, D,
    H, W)``; a 3-D output is a token sequence ``(B, N, C)`` where the model
    declares tokens (``tokens``, see :func:`declared_layout`) or the layout
    names a token field (``fmt="NLC"``, ``grid``, ``num_prefix_tokens``),
    else channels-first ``(B, C, L)``; a 4-D output is read as
    ``(B, C, H, W)`` or ``(B, H, W, C)`` according to where
    the layer's channel count sits and which pair of dimensions is a grid of
    the input image's shape; a token sequence ``(B, N, C)`` is laid onto the
    model's patch grid, or onto the grid of the input's shape that ``N``
    factors into. Where that stays ambiguous (for example a ``(B, 8, 8, 8)``
    output of a layer with 8 channels) the methods raise an error asking for
    ``layout=``.

    Args:
        fmt (str, optional): ``"NCHW"`` (CNN feature maps), ``"NHWC"``
                    (channels-last, e.g. Swin, ConvNeXt's in-block norms),
                    ``"NLC"`` (token sequences ``(B, N, C)``, e.g. ViT), or
                    the other channels-first formats ``"NC"``, ``"NCL"``,
                    ``"NCDHW"``. ``None`` infers it. Default: None
        grid (tuple[int, int], optional): ``(h, w)`` of the patch grid of an
                    ``NLC`` output. ``None`` takes it from the model or the
                    input size. Default: None
        num_prefix_tokens (int, optional): tokens before the patch tokens
                    (class, distillation, register tokens). ``None`` takes it
                    from the model, else from the grid: ``N - h * w``.
        channels_last (bool, optional): with ``fmt=None``, ``True`` reads 4-D
                    outputs as ``(B, H, W, C)``, ``False`` as ``(B, C, H, W)``;
                    ``None`` infers. Default: None
        channels (int, optional): hint filled in by the library: the layer's
                    channel count (its ``out_channels``, ``normalized_shape``
                    ...). Default: None
        input_size (tuple[int, int], optional): hint filled in by the
                    library: the input image's ``(H, W)``. Default: None
        patch_grid (tuple[int, int], optional): hint filled in by the
                    library: the model's patch grid (timm ``patch_embed``);
                    used for token outputs that fit it. Default: None
        tie_break (str, optional): hint filled in by the library: the 4-D
                    format to take when both readings fit the channels and the
                    input (see :func:`layout_for`). Default: None
        tokens (bool, optional): hint filled in by the library: whether a
                    3-D output is a token sequence (the model declares a
                    token layout, :func:`declared_layout`) or a
                    channels-first ``(B, C, L)`` map. ``None`` reads tokens
                    exactly when ``grid``, ``num_prefix_tokens`` or
                    ``patch_grid`` is set. Default: None

    Examples::

        >>> # a ViT-B/16 at 224 px: 1 class token then a 14 x 14 grid
        >>> layout = TokenLayout(fmt="NLC", grid=(14, 14), num_prefix_tokens=1)
        >>> layout.to_grid(torch.randn(2, 197, 768)).shape
        torch.Size([2, 768, 14, 14])
    """

    fmt: Optional[str] = None
    grid: Optional[Tuple[int, int]] = None
    num_prefix_tokens: Optional[int] = None
    channels_last: Optional[bool] = None
    channels: Optional[int] = None
    input_size: Optional[Tuple[int, int]] = None
    patch_grid: Optional[Tuple[int, int]] = None
    tie_break: Optional[str] = None
    tokens: Optional[bool] = None

    def __post_init__(self) -> None:
        if self.fmt is not None and self.fmt not in FORMATS:
            raise ValueError(f"fmt must be one of {FORMATS} or None, got {self.fmt!r}")
        for name in ("grid", "input_size", "patch_grid"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, _pair(getattr(self, name)))

    # ------------------------------------------------------------------ resolve
    @property
    def grid_hw(self) -> Tuple[int, int]:
        """The token grid ``(gh, gw)`` of a resolved token layout."""
        if self.grid is None:
            raise ValueError(
                "This token layout has no grid yet: resolve it on the layer's "
                "output first (TokenLayout.resolve(shape))."
            )
        return self.grid

    @property
    def channels_first(self) -> bool:
        """Whether this (resolved) layout is channels-first ``(B, C, *spatial)``."""
        return self.fmt in CHANNELS_FIRST.values()

    def _reads_tokens(self) -> bool:
        if self.fmt is not None:
            return self.fmt == "NLC"
        if self.tokens is not None:
            return self.tokens
        fields = (self.grid, self.num_prefix_tokens, self.patch_grid)
        return any(f is not None for f in fields)

    def resolve(self, shape: Sequence[int]) -> TokenLayout:
        """A layout with every field set for an output of ``shape``, or an error."""
        ndim = len(shape)
        if ndim in (2, 5) or (ndim == 3 and not self._reads_tokens()):
            first = CHANNELS_FIRST[ndim]
            if self.fmt not in (None, first):
                raise ValueError(
                    f"Layer output has shape {tuple(shape)} ({ndim}-D) but the "
                    f"layout says {self.fmt!r}: a {ndim}-D output is read as "
                    f"{first!r} (channels first)"
                    + (" or 'NLC' (tokens)." if ndim == 3 else ".")
                )
            return TokenLayout(fmt=first, grid=None, num_prefix_tokens=0)
        if ndim == 4:
            fmt: Optional[str] = self.fmt
            if fmt is None and self.channels_last is not None:
                fmt = "NHWC" if self.channels_last else "NCHW"
            if fmt is None:
                fmt = self._infer_4d(tuple(shape))
            if fmt not in ("NCHW", "NHWC"):
                raise ValueError(
                    f"Layer output has shape {tuple(shape)} (4-D) but the layout says "
                    f"{fmt!r}. Use fmt='NCHW' or fmt='NHWC'."
                )
            sides = shape[2:4] if fmt == "NCHW" else shape[1:3]
            hw = (int(sides[0]), int(sides[1]))
            return TokenLayout(fmt=fmt, grid=hw, num_prefix_tokens=0)
        if ndim == 3:
            return self._resolve_tokens(int(shape[1]), tuple(shape))
        raise ValueError(
            f"Unsupported layer output shape {tuple(shape)}: the methods read "
            "channels-first maps (B, C), (B, C, L), (B, C, H, W), (B, C, D, H, W), "
            "channels-last (B, H, W, C) or token sequences (B, N, C). Choose a "
            "layer with one of these outputs, e.g. `model.layer4` for a ResNet or "
            "`model.blocks[-1].norm1` for a ViT."
        )

    def _infer_4d(self, shape: tuple) -> str:
        """``"NCHW"`` or ``"NHWC"`` from where the channels and the grid sit."""
        grids = {"NCHW": shape[2:4], "NHWC": shape[1:3]}
        chans = {"NCHW": shape[1], "NHWC": shape[3]}
        by_channels = [f for f in grids if self.channels in (None, chans[f])]
        by_grid = [
            f
            for f in grids
            if self.input_size is None or _fits_loosely(grids[f], self.input_size)
        ]
        for found in (
            [f for f in by_channels if f in by_grid],
            by_grid if self.channels is not None else [],
            by_channels if self.input_size is not None else [],
        ):
            if len(found) == 1:
                return found[0]
        if self.tie_break is not None:
            return self.tie_break
        if self.channels is None and self.input_size is None:
            return "NCHW"  # nothing to go by: Captum's convention
        raise ValueError(
            f"Cannot tell whether the layer output {shape} is channels-first "
            "(B, C, H, W) or channels-last (B, H, W, C): "
            + (f"the layer has {self.channels} channels and " if self.channels else "")
            + f"both readings fit the input size {self.input_size}. Pass "
            "layout=TokenLayout(fmt='NCHW') or layout=TokenLayout(fmt='NHWC') to "
            "the method's constructor."
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
        if self.patch_grid is not None:
            gh, gw = self.patch_grid
            prefix = n - gh * gw
            if prefix >= 0 and (prefix == 0 if k is None else prefix in (0, k)):
                return TokenLayout(fmt="NLC", grid=(gh, gw), num_prefix_tokens=prefix)
            if k is None and 0 < prefix <= MAX_PREFIX:
                return TokenLayout(fmt="NLC", grid=(gh, gw), num_prefix_tokens=prefix)
        found = _token_grids(n, k, self.input_size)
        if len(found) == 1:
            prefix, grid = found[0]
            return TokenLayout(fmt="NLC", grid=grid, num_prefix_tokens=prefix)
        what = (
            f"after {k} prefix tokens {n - k} remain, which fit"
            if k is not None
            else "it fits"
        )
        fits = ", ".join(f"{g[0]}x{g[1]} + {p} prefix" for p, g in found) or "none"
        raise ValueError(
            f"Layer output {shape} is a token sequence whose patch grid is unknown: "
            f"{what} these grids of the input {self.input_size}: {fits}. Pass "
            "layout=TokenLayout(grid=(h, w), num_prefix_tokens=k) to the "
            "method's constructor."
        )

    # ------------------------------------------------------------- conversions
    def to_grid(self, t: Tensor) -> Tensor:
        """``(B, C, *spatial)`` view of a layer output laid out as ``self``
        (``(B, C, h, w)`` for tokens and channels-last maps)."""
        lay = self.resolve(t.shape)
        if lay.channels_first:
            return t
        if lay.fmt == "NHWC":
            return t.permute(0, 3, 1, 2)
        gh, gw = lay.grid_hw
        patches = t[:, lay.num_prefix_tokens :, :]
        return patches.transpose(1, 2).reshape(t.shape[0], t.shape[2], gh, gw)

    def from_grid(self, grid: Tensor, like: Tensor) -> Tensor:
        """Inverse of :meth:`to_grid`; prefix tokens are taken from ``like``."""
        lay = self.resolve(like.shape)
        if lay.channels_first:
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
    layer_input: bool = False,
) -> TokenLayout:
    """Layout hints for ``layer`` of the model behind ``forward_func``.

    Explicit fields of ``user_layout`` win; the hints :meth:`TokenLayout.resolve`
    reads the actual output with come from the layer (its channel count), the
    input (its size) and the model (:func:`explained_model`, whose
    :func:`declared_layout` says whether 3-D outputs are tokens and gives the
    patch grid and prefix tokens). With ``layer_input=True`` (Captum's
    ``attribute_to_layer_input``) the hints describe the layer's input: its
    channel count is the layer's ``in_channels`` / ``in_features``, not the
    output's. A 3-D output of a convolution or pooling layer is channels-first
    ``(B, C, L)`` in any model. Nothing else is decided from the layer's type
    or a model-wide flag such as timm's ``output_fmt``: a Swin's
    patch-embedding convolution is channels-first while its stages are
    channels-last, and timm's channels-first ``LayerNorm2d`` and channels-last
    ``LayerNorm`` are both ``nn.LayerNorm``.

    Only when both readings of a 4-D output fit (its channel count equals its
    side, e.g. ``(B, 16, 16, 16)``) is a tie broken: by the layer's own kind
    where that fixes the layout (a convolution, batch / group / instance norm
    or pooling layer is channels-first, a linear layer channels-last), else as
    channels-first when the model has no ``nn.LayerNorm`` at all (a classic
    CNN; channels-last feature maps come from LayerNorm-based models such as
    ConvNeXt, Swin, MaxViT). Otherwise the methods raise an error asking for
    ``layout=``.
    """
    layout = user_layout or TokenLayout()
    model = explained_model(forward_func, layer)
    declared = declared_layout(model, input_hw)
    tokens = layout.tokens
    if tokens is None:
        tokens = layout._reads_tokens() or (
            declared is not None and not isinstance(layer, _CONV_OR_POOL)
        )
    channels = layout.channels or (
        layer_in_channels(layer) if layer_input else layer_channels(layer)
    )
    tie = layout.tie_break or _tie_break(layer, model)
    if tie is None and not any(
        isinstance(m, nn.LayerNorm) for m in _scope(model, layer)
    ):
        tie = "NCHW"
    return replace(
        layout,
        num_prefix_tokens=layout.num_prefix_tokens
        if layout.num_prefix_tokens is not None
        else (declared.num_prefix_tokens if declared else None),
        patch_grid=layout.patch_grid or (declared.patch_grid if declared else None),
        channels=channels,
        input_size=layout.input_size or input_hw,
        tie_break=tie,
        tokens=tokens,
    )


def _scope(model: Optional[nn.Module], layer: nn.Module) -> Iterator[nn.Module]:
    return (model if model is not None else layer).modules()


def layer_in_channels(layer: nn.Module) -> Optional[int]:
    """The channel count of ``layer``'s input, where its parameters state it:
    the ``in_channels`` / ``in_features`` / ``num_features`` /
    ``num_channels`` / ``normalized_shape`` of its first such submodule in
    definition order; ``None`` when none is found."""
    attrs = ("in_channels", "in_features", "num_features", "num_channels")
    return _stated_channels(layer.modules(), attrs)


def _stated_channels(
    modules: Iterable[nn.Module], attrs: Sequence[str]
) -> Optional[int]:
    """The first channel count one of ``modules`` states: an int attribute of
    ``attrs`` or a one-element ``normalized_shape``."""
    for module in modules:
        for attr in attrs:
            value = getattr(module, attr, None)
            if isinstance(value, int) and value > 0:
                return value
        shape = getattr(module, "normalized_shape", None)
        if isinstance(shape, (tuple, list)) and len(shape) == 1:
            return int(shape[0])
    return None


_CHANNELS_FIRST = (
    nn.modules.conv._ConvNd,
    nn.modules.batchnorm._BatchNorm,
    nn.modules.instancenorm._InstanceNorm,
    nn.GroupNorm,
    nn.modules.pooling._MaxPoolNd,
    nn.modules.pooling._AvgPoolNd,
    nn.modules.pooling._AdaptiveAvgPoolNd,
    nn.modules.pooling._AdaptiveMaxPoolNd,
)


_CONV_OR_POOL = (
    nn.modules.conv._ConvNd,
    nn.modules.pooling._MaxPoolNd,
    nn.modules.pooling._AvgPoolNd,
    nn.modules.pooling._AdaptiveAvgPoolNd,
    nn.modules.pooling._AdaptiveMaxPoolNd,
)


def _tie_break(layer: nn.Module, model: Optional[nn.Module]) -> Optional[str]:
    """The 4-D format the layer's own kind fixes, else ``None``."""
    if isinstance(layer, _CHANNELS_FIRST):
        return "NCHW"
    if isinstance(layer, nn.Linear):
        return "NHWC"
    return None


def layer_channels(layer: nn.Module) -> Optional[int]:
    """The channel count of ``layer``'s output, where its parameters state it.

    A convolution's ``out_channels``, a norm's ``num_features`` /
    ``num_channels`` / last ``normalized_shape``, a linear layer's
    ``out_features``; for a container (a block, a stage) that of its last such
    submodule in definition order. ``None`` when none is found.
    """
    attrs = ("out_channels", "num_features", "num_channels", "out_features")
    return _stated_channels(reversed(list(layer.modules())), attrs)


def _fits_loosely(grid: Tuple[int, int], size: Tuple[int, int], tol=1.5) -> bool:
    """Whether ``grid`` can be a feature map of an image of ``size``: one stride
    ``s >= 1`` with both sides within ``tol`` cells of ``size / s`` (padding,
    rounding and unpadded convolutions shift a side by a cell or two)."""
    (h, w), (big_h, big_w) = grid, size
    if not (1 <= h <= big_h and 1 <= w <= big_w):
        return False
    lo = max((h - tol) / big_h, (w - tol) / big_w, 0.0)
    hi = min((h + tol) / big_h, (w + tol) / big_w, 1.0)
    return lo <= hi


def _fits_exactly(grid: Tuple[int, int], size: Tuple[int, int]) -> bool:
    """Whether ``grid`` is ``size`` divided by one integer stride, both sides
    rounded down or both rounded up (a patch embedding, a strided stem)."""
    (h, w), (big_h, big_w) = grid, size
    for s in range(1, max(big_h, big_w) + 1):
        if (big_h // s, big_w // s) == (h, w):
            return True
        if (-(-big_h // s), -(-big_w // s)) == (h, w):
            return True
    return False


def _token_grids(
    n: int, k: Optional[int], size: Optional[Tuple[int, int]]
) -> List[Tuple[int, Tuple[int, int]]]:
    """``(prefix, grid)`` pairs an ``n``-token sequence can be: ``k`` prefix
    tokens (any of 0..MAX_PREFIX when unknown) and a grid of the input's shape
    (a square one when the input size is unknown)."""
    found = []
    for prefix in [k] if k is not None else range(MAX_PREFIX + 1):
        m = n - prefix
        if m <= 0:
            continue
        if size is None:
            side = math.isqrt(m)
            if side * side == m:
                found.append((prefix, (side, side)))
            continue
        for h in range(1, m + 1):
            if m % h == 0 and _fits_exactly((h, m // h), size):
                found.append((prefix, (h, m // h)))
    return found


def _grid_from_embed(embed: nn.Module, input_hw) -> Optional[Tuple[int, int]]:
    if input_hw is not None:
        if hasattr(embed, "dynamic_feat_size"):
            try:
                feat_size = cast(Callable[..., Any], embed.dynamic_feat_size)
                return _pair(feat_size(tuple(input_hw)))
            except Exception:  # noqa: BLE001 - fall back to the static size below
                pass
        patch = getattr(embed, "patch_size", None)
        if patch is not None:
            ph, pw = _pair(patch)
            return (input_hw[0] // ph, input_hw[1] // pw)
    size = getattr(embed, "grid_size", None)
    return _pair(size) if size is not None else None


def spatial_reduce(t: Tensor, op: str = "mean") -> Tensor:
    """``t`` ``(B, C, *spatial)`` reduced over its spatial dimensions (2 on),
    dimensions kept: ``op`` is ``"mean"``, ``"sum"``, ``"amin"``, ``"amax"`` or
    ``"std"`` (population). A ``(B, C)`` tensor has one position, so it is
    returned as it is (``"std"``: zeros), as Captum's LayerGradCam does; a
    plain ``t.mean(dim=())`` would reduce over every dimension instead."""
    dims = tuple(range(2, t.dim()))
    if not dims:
        return torch.zeros_like(t) if op == "std" else t
    if op == "std":
        return t.std(dim=dims, keepdim=True, unbiased=False)
    return getattr(t, op)(dim=dims, keepdim=True)


def spatial_shape(t: Tensor) -> Tuple[int, ...]:
    """The spatial size of a channels-first grid ``(B, C, *spatial)``."""
    return tuple(int(s) for s in t.shape[2:])
