"""Figures (matplotlib, Agg): overlay grids, ViT per-layer attention, bar charts.

Grids and bar charts are drawn from the store (the maps are kept there at low
resolution); the per-layer attention figure and ``--saliency`` overlays are
drawn while the model is loaded.
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Any, Dict, List, Sequence

import numpy as np
import torch

from benchmarks.evaluation.store import ResultStore


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def save_saliency(folder: Path, batch, idx: Sequence[int], maps: torch.Tensor) -> None:
    """One overlay PNG per image (the thesis's ``--saliency``)."""
    from captum_ssl.viz import overlay

    plt = _plt()
    folder.mkdir(parents=True, exist_ok=True)
    for k, i in enumerate(idx):
        fig, ax = plt.subplots(figsize=(3, 3))
        overlay(batch.raw[i], maps[k].detach().float().cpu(), ax=ax)
        fig.savefig(folder / f"{_safe(batch.names[i])}.png", dpi=80)
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
        axes[i, 0].set_title(name[:14], fontsize=6)
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
    path = folder / f"{_safe(spec.name)}_attention_layers.png"
    fig.savefig(path, dpi=70)
    plt.close(fig)
    return path


def overlay_grids(
    store: ResultStore, plan, folder: Path, n_images: int = 4
) -> List[Path]:
    """Image x method overlay grid per model, from the stored maps."""
    from captum_ssl.viz import grid_figure

    plt = _plt()
    folder.mkdir(parents=True, exist_ok=True)
    by_key = {k: mm for mm, k in plan.map_keys.items()}
    maps: Dict[str, Dict[str, Dict[str, np.ndarray]]] = defaultdict(
        lambda: defaultdict(dict)
    )
    for r in store.maps(list(by_key)):
        model, method = by_key[r["key"]]
        maps[model][method][r["image"]] = r["map"]
    paths = []
    specs = {s.name: s for s in plan.model_specs}
    for model, per_method in maps.items():
        spec = specs.get(model)
        if spec is None or spec.weights != "pretrained":
            continue
        names = [
            n for n in plan.source.names if all(n in m for m in per_method.values())
        ][:n_images]
        if not names:
            continue
        batch = next(plan.source.batches(spec.preprocessing, names, len(names)))
        order = [batch.names.index(n) for n in names]
        grid = {
            method: torch.from_numpy(np.stack([m[n] for n in names]))[:, None]
            for method, m in per_method.items()
        }
        fig = grid_figure(batch.raw[order], grid, row_labels=names, cell=1.3)
        fig.suptitle(model, fontsize=9)
        fig.tight_layout(rect=(0, 0, 1, 0.96))
        path = folder / f"{_safe(model)}_overlays.png"
        fig.savefig(path, dpi=60)
        plt.close(fig)
        paths.append(path)
    return paths


def bar_charts(tables: Dict[str, Any], folder: Path) -> List[Path]:
    """One bar chart per metric: methods on the x-axis, one bar per model
    (supervised and self-supervised of a family side by side), 95% CIs."""
    plt = _plt()
    folder.mkdir(parents=True, exist_ok=True)
    rows = tables["per_model"]
    by_metric: Dict[str, List[Dict[str, Any]]] = defaultdict(list)
    for r in rows:
        by_metric[r["metric"]].append(r)
    paths = []
    for metric, rs in by_metric.items():
        models = sorted(
            {(r["architecture"], r["training"] != "supervised", r["model"]) for r in rs}
        )
        methods = list(dict.fromkeys(r["method"] for r in rs))
        cell = {(r["model"], r["method"]): r for r in rs}
        width = 0.8 / max(1, len(models))
        fig, ax = plt.subplots(figsize=(max(4, 0.9 * len(methods) + 1.5), 3))
        for k, (_, ssl, model) in enumerate(models):
            xs, ys, es = [], [], []
            for j, method in enumerate(methods):
                r = cell.get((model, method))
                if r is None:
                    continue
                xs.append(j + (k - (len(models) - 1) / 2) * width)
                ys.append(r["mean"])
                es.append(0.0 if math.isnan(r["ci95"]) else r["ci95"])
            label = f"{model} ({'SSL' if ssl else 'sup.'})"
            ax.bar(xs, ys, width, yerr=es, capsize=2, label=label,
                   hatch="//" if ssl else None)  # fmt: skip
        ax.set_xticks(range(len(methods)))
        ax.set_xticklabels(methods, rotation=30, ha="right", fontsize=7)
        ax.set_title(f"{metric} ({rs[0]['direction']}), mean ± 95% CI", fontsize=8)
        ax.legend(fontsize=6)
        fig.tight_layout()
        path = folder / f"bar_{_safe(metric)}.png"
        fig.savefig(path, dpi=80)
        plt.close(fig)
        paths.append(path)
    return paths
