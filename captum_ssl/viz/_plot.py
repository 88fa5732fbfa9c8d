"""Matplotlib figures: a map over its image, and image x method grids.

Every picture is drawn by :func:`blend` (the photo with the ReLU'd, upsampled,
min-max normalised map on top in a colour map), so a figure, a grid and the
main job's HTML report show the same pixels. Defaults are readable as saved:
255 px per map at 150 dpi, a colour bar, method, image and prediction labels.
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence, SupportsInt, Tuple, Union, cast

import numpy as np
from torch import Tensor

from captum_ssl.viz._maps import to_heatmap

#: dots per inch of saved figures (``fig.savefig(path)`` uses the figure's dpi)
DPI = 150
#: inches per map: 1.7 in x 150 dpi = 255 px
CELL = 1.7
CMAP = "jet"
COLORBAR_LABEL = "attribution, each map scaled to [0, 1]"

Prediction = Union[str, Tuple[int, float], None]
TrueClass = Union[int, Sequence[int], None]


def _classes(label: TrueClass) -> Tuple[int, ...]:
    """The known true classes (``-1`` and None: unknown)."""
    if label is None:
        return ()
    if isinstance(label, (int, np.integer)) or getattr(label, "dim", lambda: 1)() == 0:
        label = (int(cast(SupportsInt, label)),)
    return tuple(int(c) for c in label if int(c) >= 0)


def _image_np(image: Tensor) -> np.ndarray:
    img = image.detach().float().cpu()
    if img.dim() == 4 and img.shape[0] == 1:
        img = img[0]
    if img.dim() == 3 and img.shape[0] in (1, 3):
        img = img.permute(1, 2, 0)
    arr = img.numpy()
    lo, hi = float(arr.min()), float(arr.max())
    if lo < 0 or hi > 1:
        arr = (arr - lo) / (hi - lo + 1e-12)
    return arr.squeeze()


def _heat(attribution, hw: Tuple[int, int]) -> np.ndarray:
    import torch

    if isinstance(attribution, Tensor):  # also on a GPU or requiring grad
        a = attribution.detach().float().cpu()
    else:
        a = torch.as_tensor(np.asarray(attribution, dtype=np.float32))
    if a.dim() == 4 and a.shape[0] == 1 and a.shape[1] > 1:
        a = a.sum(1, keepdim=True)  # (1, C, H, W) input-resolution attribution
    elif a.dim() == 3 and a.shape[0] > 1:
        a = a.sum(0, keepdim=True)  # (C, H, W)
    a = a.reshape(1, 1, *a.shape[-2:])
    return to_heatmap(a, hw)[0, 0].numpy()


def blend(
    image: Tensor,
    attribution,
    cmap: str = CMAP,
    alpha: float = 0.5,
) -> np.ndarray:
    r"""The overlay as an RGB array: ``(1 - alpha) * image + alpha * cmap(heat)``.

    ``heat`` is the map ReLU'd, upsampled bilinearly to the image and min-max
    normalised to [0, 1] (:func:`~captum_ssl.viz.to_heatmap`), as
    pytorch-grad-cam's ``show_cam_on_image`` does.

    Args:
        image (Tensor): ``(C, H, W)``, ``(1, C, H, W)`` or ``(H, W, C)``; any
                    range (rescaled to [0, 1] for display only).
        attribution (Tensor or array): the map, ``(h, w)``, ``(1, h, w)``,
                    ``(1, 1, h, w)`` or an input-resolution ``(C, H, W)``
                    attribution (summed over channels).
        cmap (str, optional): matplotlib colour map. Default: ``"jet"``
        alpha (float, optional): opacity of the map. Default: 0.5

    Returns:
        ndarray: ``(H, W, 3)`` float in [0, 1].

    Examples::

        >>> rgb = blend(raw[0], cam[0])   # (224, 224, 3)
    """
    from matplotlib import colormaps

    img = _image_np(image)
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    heat = _heat(attribution, img.shape[:2])
    colour = colormaps[cmap](heat)[..., :3]
    return np.clip((1 - alpha) * img[..., :3] + alpha * colour, 0.0, 1.0)


def prediction_text(
    prediction: Prediction, label: TrueClass = None, width: int = 24
) -> Tuple[str, bool]:
    r"""``("pred: tabby (0.87)", wrong)`` for a predicted ImageNet class.

    Args:
        prediction: ``(class index, probability)``, a ready string, or None.
        label (int or tuple of int, optional): the true class, or the classes
                    accepted as correct; ``wrong`` is True when it is known
                    (``>= 0``) and the predicted class is not among them; the
                    text then names the (first) true class.
        width (int, optional): class names are cut to this many characters.

    Returns:
        (str, bool): the caption and whether the prediction is wrong.
    """
    if prediction is None:
        return "", False
    if isinstance(prediction, str):
        return prediction, False
    from captum_ssl.data import class_name

    def short(index: int) -> str:
        name = class_name(int(index)).split(",")[0]
        return name if len(name) <= width else name[: width - 1] + "…"

    index, prob = int(prediction[0]), float(prediction[1])
    text = f"pred: {short(index)} ({prob:.2f})"
    ok = _classes(label)
    wrong = bool(ok) and index not in ok
    if wrong:
        text = f"✗ {text}\ntrue: {short(ok[0])}"
    return text, wrong


def _colorbar(fig, axes, cmap: str) -> None:
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    bar = fig.colorbar(
        ScalarMappable(Normalize(0.0, 1.0), cmap=cmap), ax=axes, shrink=0.8,
        fraction=0.04, pad=0.02,
    )  # fmt: skip
    bar.set_label(COLORBAR_LABEL, fontsize=7)
    bar.ax.tick_params(labelsize=7)


def _caption(ax, prediction: Prediction, label: TrueClass) -> None:
    text, wrong = prediction_text(prediction, label)
    if text:
        ax.set_xlabel(text, fontsize=8, color="#c00000" if wrong else "black")
    if wrong:  # a red frame marks a wrong prediction
        for side in ax.spines.values():
            side.set_visible(True)
            side.set_edgecolor("#c00000")
            side.set_linewidth(2.5)


def _bare(ax) -> None:
    ax.set_xticks([])
    ax.set_yticks([])
    for side in ax.spines.values():
        side.set_visible(False)


def overlay(
    image: Tensor,
    attribution,
    ax=None,
    cmap: str = CMAP,
    alpha: float = 0.5,
    title: Optional[str] = None,
    label: Optional[str] = None,
    prediction: Prediction = None,
    true_class: TrueClass = None,
    colorbar: Optional[bool] = None,
):
    r"""Draw one map over its image: the one-call picture of an explanation.

    Args:
        image (Tensor): ``(C, H, W)``, ``(1, C, H, W)`` or ``(H, W, C)`` image;
                    any range (it is rescaled to [0, 1] for display only).
        attribution (Tensor): the map, ``(1, h, w)``, ``(h, w)`` or
                    ``(1, 1, h, w)``; it is ReLU'd, upsampled and normalised
                    (:func:`blend`).
        ax (matplotlib Axes, optional): where to draw; a new figure of
                    255 x 255 px per map at 150 dpi (plus its colour bar)
                    otherwise.
        cmap (str, optional): colour map. Default: ``"jet"``
        alpha (float, optional): opacity of the map. Default: 0.5
        title (str, optional): axes title, e.g. the method's name.
        label (str, optional): the image's name, drawn on the y-axis.
        prediction (tuple or str, optional): ``(class index, probability)``
                    of the model, drawn under the picture (ImageNet names).
        true_class (int or tuple of int, optional): the image's class (or the
                    classes accepted as correct); a wrong prediction is framed
                    in red and names the true class.
        colorbar (bool, optional): draw the colour bar. Default: True for a
                    new figure, False when ``ax`` is given.

    Returns:
        matplotlib Axes (its figure: ``ax.figure``).

    Examples::

        >>> cam = LayerGradCam(model, model.layer4).attribute(x, target=281)
        >>> overlay(raw[0], cam[0], title="Grad-CAM").figure.savefig("cam.png")
    """
    import matplotlib.pyplot as plt

    new = ax is None
    if new:
        fig, ax = plt.subplots(
            figsize=(CELL + 1.0, CELL + 0.7), dpi=DPI, layout="constrained"
        )
    ax.imshow(blend(image, attribution, cmap, alpha))
    _bare(ax)
    if title:
        ax.set_title(title, fontsize=9)
    if label:
        ax.set_ylabel(label, fontsize=8)
    _caption(ax, prediction, true_class)
    if colorbar if colorbar is not None else new:
        _colorbar(ax.figure, ax, cmap)
    return ax


def grid_figure(
    images: Union[Tensor, Sequence[Tensor]],
    maps: Dict[str, Union[Tensor, Sequence[Optional[Tensor]]]],
    row_labels: Optional[Sequence[str]] = None,
    predictions: Optional[Sequence[Prediction]] = None,
    true_classes: Optional[Sequence[TrueClass]] = None,
    cmap: str = CMAP,
    alpha: float = 0.5,
    cell: float = CELL,
    title: Optional[str] = None,
    colorbar: bool = True,
):
    r"""Rows = images, columns = the image then one overlay per method.

    Method names head the columns, image labels sit beside each row, the
    prediction (class name and probability) under each image, wrong
    predictions framed in red; one colour bar gives the shared scale (each
    map is ReLU'd and min-max normalised to [0, 1], see :func:`blend`).

    Args:
        images (Tensor or sequence of Tensor): ``(B, C, H, W)`` images, or one
                    ``(C, H, W)`` image per row (sizes may differ).
        maps (dict[str, Tensor or sequence]): method name -> ``(B, 1, h, w)``
                    maps, or one map per row (None: drawn as "n/a").
        row_labels (sequence of str, optional): one label per row.
        predictions (sequence, optional): per row ``(class index,
                    probability)`` or a string.
        true_classes (sequence, optional): per row the true class or the
                    classes accepted as correct (-1 or None: unknown); wrong
                    predictions are marked.
        cmap (str, optional): colour map. Default: ``"jet"``
        alpha (float, optional): opacity of the maps. Default: 0.5
        cell (float, optional): inches per map. Default: 1.7 (255 px at the
                    figure's 150 dpi)
        title (str, optional): figure title.
        colorbar (bool, optional): draw the colour bar. Default: True

    Returns:
        matplotlib Figure (``fig.savefig(path)`` saves it at 150 dpi).

    Examples::

        >>> fig = grid_figure(raw, {"Grad-CAM": cam, "Saliency": sal},
        ...                   row_labels=names, predictions=[(281, 0.91)])
        >>> fig.savefig("maps.png")
    """
    import matplotlib.pyplot as plt

    n = len(images)
    m = len(maps) + 1
    for name, per_row in maps.items():
        if len(per_row) != n:
            raise ValueError(
                f"grid_figure: {name!r} has {len(per_row)} maps for {n} images; "
                "give one map per image (None where a method does not apply)"
            )
    for what, seq in (
        ("row_labels", row_labels),
        ("predictions", predictions),
        ("true_classes", true_classes),
    ):
        if seq is not None and len(seq) != n:
            raise ValueError(
                f"grid_figure: {what} has {len(seq)} entries for {n} images"
            )
    fig, axes = plt.subplots(
        n, m, figsize=(cell * m + (1.0 if colorbar else 0.2),
                       cell * n + 0.5 + (0.3 if title else 0.0)),
        squeeze=False, layout="constrained", dpi=DPI,
    )  # fmt: skip
    for i in range(n):
        ax = axes[i, 0]
        ax.imshow(_image_np(images[i]))
        _bare(ax)
        if i == 0:
            ax.set_title("image", fontsize=9)
        if row_labels is not None:
            ax.set_ylabel(str(row_labels[i]), fontsize=8)
        _caption(
            ax,
            None if predictions is None else predictions[i],
            None if true_classes is None else true_classes[i],
        )
        for j, (name, per_row) in enumerate(maps.items(), start=1):
            ax = axes[i, j]
            attr = per_row[i]
            if attr is None:
                _bare(ax)
                ax.text(0.5, 0.5, "n/a", ha="center", va="center", fontsize=8)
            else:
                overlay(images[i], attr, ax=ax, cmap=cmap, alpha=alpha)
            if i == 0:
                ax.set_title(name, fontsize=9)
    if colorbar:
        _colorbar(fig, axes, cmap)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig
