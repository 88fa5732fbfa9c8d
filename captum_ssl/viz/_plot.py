"""Matplotlib figures: a map over its image, and image x method grids."""

from __future__ import annotations

from typing import Dict, Optional, Sequence

import numpy as np
from torch import Tensor

from captum_ssl.viz._maps import to_heatmap


def _image_np(image: Tensor) -> np.ndarray:
    img = image.detach().float().cpu()
    if img.dim() == 3 and img.shape[0] in (1, 3):
        img = img.permute(1, 2, 0)
    arr = img.numpy()
    lo, hi = float(arr.min()), float(arr.max())
    if lo < 0 or hi > 1:
        arr = (arr - lo) / (hi - lo + 1e-12)
    return arr.squeeze()


def overlay(
    image: Tensor,
    attribution: Tensor,
    ax=None,
    cmap: str = "jet",
    alpha: float = 0.5,
    title: Optional[str] = None,
):
    r"""Draw one map over its image.

    Args:
        image (Tensor): ``(C, H, W)`` or ``(H, W, C)`` image; any range (it is
                    rescaled to [0, 1] for display only).
        attribution (Tensor): the map, ``(1, h, w)``, ``(h, w)`` or
                    ``(1, 1, h, w)``; it is ReLU'd, upsampled and normalised.
        ax (matplotlib Axes, optional): where to draw; a new figure otherwise.
        cmap (str, optional): colour map. Default: ``"jet"``
        alpha (float, optional): opacity of the map. Default: 0.5
        title (str, optional): axes title.

    Returns:
        matplotlib Axes.
    """
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(3, 3))
    img = _image_np(image)
    attr = attribution.reshape(1, 1, *attribution.shape[-2:])
    heat = to_heatmap(attr.detach().float().cpu(), img.shape[:2])[0, 0].numpy()
    ax.imshow(img, cmap=None if img.ndim == 3 else "gray")
    ax.imshow(heat, cmap=cmap, alpha=alpha, vmin=0.0, vmax=1.0)
    ax.set_axis_off()
    if title:
        ax.set_title(title, fontsize=8)
    return ax


def grid_figure(
    images: Tensor,
    maps: Dict[str, Tensor],
    row_labels: Optional[Sequence[str]] = None,
    cmap: str = "jet",
    alpha: float = 0.5,
    cell: float = 2.0,
):
    r"""Rows = images, columns = the image then one overlay per method.

    Args:
        images (Tensor): ``(B, C, H, W)`` images.
        maps (dict[str, Tensor]): method name -> ``(B, 1, h, w)`` maps.
        row_labels (sequence of str, optional): one label per image.

    Returns:
        matplotlib Figure.
    """
    import matplotlib.pyplot as plt

    n, m = images.shape[0], len(maps) + 1
    fig, axes = plt.subplots(n, m, figsize=(cell * m, cell * n), squeeze=False)
    for i in range(n):
        axes[i, 0].imshow(_image_np(images[i]))
        axes[i, 0].set_axis_off()
        if row_labels is not None:
            axes[i, 0].set_title(str(row_labels[i]), fontsize=8)
        for j, (name, attr) in enumerate(maps.items(), start=1):
            overlay(
                images[i],
                attr[i],
                ax=axes[i, j],
                cmap=cmap,
                alpha=alpha,
                title=name if i == 0 else None,
            )
    fig.tight_layout()
    return fig
