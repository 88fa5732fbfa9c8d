"""Figures (matplotlib, Agg): overlay grids, ViT per-layer attention, bar charts.

Grids and bar charts are drawn from the store (the maps are kept there at low
resolution); the per-layer attention figure and ``--saliency`` overlays are
drawn while the model is loaded.
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from benchmarks.evaluation.store import ResultStore


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def safe_name(name: str) -> str:
    """A file or folder name: letters, digits, ``-``, ``_`` and ``.`` only
    (``rollout:discard_ratio=0.9`` -> ``rollout_discard_ratio_0.9``)."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


DPI = 150
CELL = 1.7  # inches per map: 255 px at 150 dpi
CMAP = "jet"


def save_figure(fig, path: Path, dpi: int = DPI) -> List[Path]:
    """``path`` (PNG) and an SVG beside it; the figure is closed."""
    plt = _plt()
    fig.savefig(path, dpi=dpi)
    svg = path.with_suffix(".svg")
    fig.savefig(svg)
    plt.close(fig)
    return [path, svg]


def caption(pred: Optional[Tuple[int, float]]) -> str:
    """``"pred: tench (0.87)"`` for a predicted class index and probability."""
    if pred is None:
        return ""
    from captum_ssl.data import class_name

    name = class_name(int(pred[0])).split(",")[0]
    if len(name) > 24:
        name = name[:23] + "…"
    return f"pred: {name} ({pred[1]:.2f})"


def overlay_figure(
    rows: Sequence[Tuple[torch.Tensor, str, str]],
    columns: Sequence[str],
    maps: Sequence[Dict[str, Any]],
    title: str = "",
):
    r"""Rows of (image, row label, caption) x one overlay per column (method).

    Args:
        rows: per row the raw ``(3, H, W)`` image in [0, 1], the label drawn on
                    its y-axis (image / model) and the caption under the image
                    (the prediction).
        columns: method names, drawn above the first row.
        maps: per row, ``{method: (h, w) map}``; a missing method is drawn as
                    an empty cell marked "n/a".
        title (str): figure title.

    Every map is ReLU'd, upsampled and min-max normalised to [0, 1], drawn with
    one colour map and one colour bar (the shared scale).

    Returns:
        matplotlib Figure.
    """
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    from captum_ssl.viz import to_heatmap
    from captum_ssl.viz._plot import _image_np

    plt = _plt()
    n, m = len(rows), len(columns) + 1
    fig, axes = plt.subplots(
        n, m, figsize=(CELL * m + 0.9, CELL * n + 0.5 + (0.3 if title else 0)),
        squeeze=False, layout="constrained",
    )  # fmt: skip
    for i, (image, label, text) in enumerate(rows):
        img = _image_np(image)
        ax = axes[i, 0]
        ax.imshow(img)
        ax.set_ylabel(label, fontsize=8)
        ax.set_xlabel(text, fontsize=8)
        if i == 0:
            ax.set_title("image", fontsize=9)
        for j, method in enumerate(columns, start=1):
            ax = axes[i, j]
            a = maps[i].get(method)
            if a is None:
                ax.text(0.5, 0.5, "n/a", ha="center", va="center", fontsize=8)
            else:
                t = torch.as_tensor(np.asarray(a, dtype=np.float32))
                t = t.reshape(1, 1, *t.shape[-2:])
                heat = to_heatmap(t, img.shape[:2])[0, 0].numpy()
                ax.imshow(img)
                ax.imshow(heat, cmap=CMAP, alpha=0.5, vmin=0.0, vmax=1.0)
            if i == 0:
                ax.set_title(method, fontsize=9)
        for ax in axes[i]:
            ax.set_xticks([])
            ax.set_yticks([])
    bar = fig.colorbar(
        ScalarMappable(Normalize(0.0, 1.0), cmap=CMAP), ax=axes, shrink=0.8,
        fraction=0.03, pad=0.01,
    )  # fmt: skip
    bar.set_label("attribution, each map scaled to [0, 1]", fontsize=8)
    bar.ax.tick_params(labelsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def save_saliency(folder: Path, batch, idx: Sequence[int], maps: torch.Tensor) -> None:
    """One overlay PNG per image (the thesis's ``--saliency``)."""
    from captum_ssl.viz import overlay

    plt = _plt()
    folder.mkdir(parents=True, exist_ok=True)
    for k, i in enumerate(idx):
        fig, ax = plt.subplots(figsize=(3, 3))
        overlay(batch.raw[i], maps[k].detach().float().cpu(), ax=ax)
        fig.savefig(folder / f"{safe_name(batch.names[i])}.png", dpi=80)
        plt.close(fig)


def vit_layer_figure(model, batch, spec, folder: Path, device) -> Path:
    """Raw class-token attention of every layer side by side, then rollout."""
    import captum_ssl.attr as A
    from captum_ssl.models import get_layers
    from captum_ssl.viz import overlay

    plt = _plt()
    folder.mkdir(parents=True, exist_ok=True)
    x = batch.images.to(device)
    n_layers = len(get_layers(model, spec.attention_layers))
    raw = A.RawAttention(model, layers=list(range(n_layers))).attribute(x)
    roll = A.AttentionRollout(model).attribute(x)
    cols = n_layers + 2
    fig, axes = plt.subplots(
        len(batch.names), cols, figsize=(1.4 * cols, 1.5 * len(batch.names)),
        squeeze=False,
    )  # fmt: skip
    for i, name in enumerate(batch.names):
        axes[i, 0].imshow(batch.raw[i].permute(1, 2, 0).numpy())
        axes[i, 0].set_axis_off()
        axes[i, 0].set_title(name[:14], fontsize=7)
        for j in range(n_layers):
            overlay(
                batch.raw[i], raw[j][i].cpu(), ax=axes[i, j + 1],
                title=f"layer {j}" if i == 0 else None,
            )  # fmt: skip
        overlay(
            batch.raw[i], roll[i].cpu(), ax=axes[i, -1],
            title="rollout" if i == 0 else None,
        )  # fmt: skip
    fig.suptitle(f"{spec.name}: raw attention per layer and rollout", fontsize=8)
    fig.tight_layout()
    path = folder / f"{safe_name(spec.name)}_attention_layers.png"
    return save_figure(fig, path, dpi=120)[0]


def overlay_grids(
    store: ResultStore, plan, folder: Path, n_images: int = 4
) -> List[Path]:
    """Image x method overlays per model, from the stored maps (methods in the
    order of the command line); PNG and SVG."""
    folder.mkdir(parents=True, exist_ok=True)
    by_key = {k: mm for mm, k in plan.map_keys.items()}
    maps: Dict[str, Dict[str, Dict[str, np.ndarray]]] = defaultdict(
        lambda: defaultdict(dict)
    )
    for r in store.maps(list(by_key)):
        model, method = by_key[r["key"]]
        maps[model][method][r["image"]] = r["map"]
    paths: List[Path] = []
    for spec in plan.model_specs:
        per_method = maps.get(spec.name)
        if not per_method or spec.weights != "pretrained":
            continue
        methods = [m for m in plan.methods if m in per_method]
        names = [
            n for n in plan.source.names if all(n in m for m in per_method.values())
        ][:n_images]
        if not names:
            continue
        pred = {
            r["image"]: (r["target"], r["value"])
            for r in store.results([plan.model_keys[spec.name] + ":pred"])
        }
        batch = next(plan.source.batches(spec.preprocessing, names, len(names)))
        rows = [
            (batch.raw[batch.names.index(n)], n, caption(pred.get(n))) for n in names
        ]
        fig = overlay_figure(
            rows,
            methods,
            [{m: per_method[m][n] for m in methods} for n in names],
            f"{spec.name} ({spec.architecture}, {spec.training})",
        )
        paths += save_figure(fig, folder / f"{safe_name(spec.name)}_overlays.png")
    return paths


def bar_charts(
    tables: Dict[str, Any], folder: Path, order: Sequence[str] = ()
) -> List[Path]:
    """One bar chart per metric: methods on the x-axis (in ``order``), one bar
    per model (supervised and self-supervised of a family side by side), 95%
    CIs; PNG and SVG."""
    plt = _plt()
    folder.mkdir(parents=True, exist_ok=True)
    rows = tables["per_model"]
    by_metric: Dict[str, List[Dict[str, Any]]] = defaultdict(list)
    for r in rows:
        by_metric[r["metric"]].append(r)
    paths: List[Path] = []
    for metric, rs in by_metric.items():
        models = sorted(
            {(r["architecture"], r["training"] != "supervised", r["model"]) for r in rs}
        )
        present = {r["method"] for r in rs}
        methods = [m for m in order if m in present]
        rest = dict.fromkeys(r["method"] for r in rs)
        methods += [m for m in rest if m not in methods]
        cell = {(r["model"], r["method"]): r for r in rs}
        width = 0.8 / max(1, len(models))
        fig, ax = plt.subplots(
            figsize=(max(6.0, 0.9 * len(methods) + 2.5) + 2.5, 4.2),
            layout="constrained",
        )
        for k, (_, ssl, model) in enumerate(models):
            xs, ys, es = [], [], []
            for j, method in enumerate(methods):
                r = cell.get((model, method))
                if r is None:
                    continue
                xs.append(j + (k - (len(models) - 1) / 2) * width)
                ys.append(r["mean"])
                es.append(0.0 if math.isnan(r["ci95"]) else r["ci95"])
            label = f"{model} ({'self-supervised' if ssl else 'supervised'})"
            ax.bar(xs, ys, width, yerr=es, capsize=3, label=label,
                   hatch="//" if ssl else None)  # fmt: skip
        ax.set_xticks(range(len(methods)))
        ax.set_xticklabels(methods, rotation=30, ha="right", fontsize=10)
        ax.tick_params(axis="y", labelsize=9)
        ax.set_ylabel(f"{metric} ({rs[0]['direction']})", fontsize=10)
        n = max(r["n"] for r in rs)
        ax.set_title(f"{metric}: mean and 95% CI over {n} images", fontsize=11)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=9, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        paths += save_figure(fig, folder / f"bar_{safe_name(metric)}.png")
    return paths
