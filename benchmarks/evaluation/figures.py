"""Figures (matplotlib, Agg): overlay grids, ViT per-layer attention, bar
charts, deletion / insertion curves.

Grids, curves and bar charts are drawn from the store (maps at their native
resolution, curves per image) with ``captum_ssl.viz``, the library's own
figure functions; the per-layer attention figure and ``--saliency`` overlays
are drawn while the model is loaded.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from benchmarks.evaluation.methods import BACKBONE_TARGETS
from benchmarks.evaluation.store import ResultStore
from captum_ssl.viz._plot import DPI


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def safe_name(name: str) -> str:
    """A file or folder name: letters, digits, ``-``, ``_`` and ``.`` only
    (``rollout:discard_ratio=0.9`` -> ``rollout_discard_ratio_0.9``)."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def save_figure(fig, path: Path, dpi: int = DPI) -> List[Path]:
    """``path`` (PNG) and an SVG beside it; the figure is closed."""
    plt = _plt()
    fig.savefig(path, dpi=dpi)
    svg = path.with_suffix(".svg")
    fig.savefig(svg)
    plt.close(fig)
    return [path, svg]


def save_saliency(
    folder: Path, batch, idx: Sequence[int], maps: torch.Tensor, title: str = ""
) -> None:
    """One overlay PNG per image (the thesis's ``--saliency``), drawn by
    ``captum_ssl.viz.overlay``: the method as title, the image's name, the
    colour bar; 150 dpi."""
    from captum_ssl.viz import overlay

    plt = _plt()
    folder.mkdir(parents=True, exist_ok=True)
    for k, i in enumerate(idx):
        ax = overlay(
            batch.raw[i], maps[k].detach().float().cpu(), title=title or None,
            label=batch.names[i],
        )  # fmt: skip
        ax.figure.savefig(folder / f"{safe_name(batch.names[i])}.png")
        plt.close(ax.figure)


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


@dataclass
class OverlayRow:
    """One row of an overlay grid: an image with its maps of every method."""

    label: str  # the image's name (main job) or the model's (--explain)
    image: torch.Tensor  # (3, H, W) in [0, 1], as the model saw it
    #: predicted class and probability, or a ready caption (a backbone's score)
    prediction: Union[str, Tuple[int, float], None]
    true_classes: Tuple[int, ...]  # classes counted as correct; () unknown
    maps: Dict[str, Optional[np.ndarray]]  # method -> native map (None: n/a)


@dataclass
class OverlaySection:
    """The overlays of one model (main job) or one photo (``--explain``)."""

    title: str
    methods: List[str]
    rows: List[OverlayRow]
    #: a headless backbone's score (``methods.BACKBONE_TARGETS``), shown
    #: under each image instead of a predicted class; "" for a classifier
    scored: str = ""


def stored_overlays(store: ResultStore, plan) -> List[OverlaySection]:
    """Every image x method map of each pretrained model, at its native
    resolution, with the model's prediction and the image's classes."""
    by_key = {k: mm for mm, k in plan.native_keys.items()}
    maps: Dict[str, Dict[str, Dict[str, np.ndarray]]] = defaultdict(
        lambda: defaultdict(dict)
    )
    for r in store.maps(list(by_key)):
        model, method = by_key[r["key"]]
        maps[model][method][r["image"]] = r["map"]
    sections: List[OverlaySection] = []
    for spec in plan.model_specs:
        per_method = maps.get(spec.name)
        if not per_method or spec.weights != "pretrained":
            continue
        methods = [m for m in plan.methods if m in per_method]
        have = set().union(*(set(m) for m in per_method.values()))
        names = [n for n in plan.source.names if n in have]
        pred: Dict[str, Any] = {
            r["image"]: (r["target"], r["value"])
            for r in store.results([plan.model_keys[spec.name] + ":pred"])
        }
        if spec.target:  # a backbone: its score (similarity, norm), no class
            from benchmarks.evaluation.methods import backbone_caption

            pred = {
                r["image"]: backbone_caption(spec.target, r["value"])
                for r in store.results([plan.model_keys[spec.name]])
            }
        rows: List[OverlayRow] = []
        for batch in plan.source.batches(spec.preprocessing, names, 16):
            accepted = batch.accepted or [
                (int(v),) if v >= 0 else () for v in batch.labels
            ]
            for k, name in enumerate(batch.names):
                rows.append(
                    OverlayRow(
                        name, batch.raw[k], pred.get(name), tuple(accepted[k]),
                        {m: per_method[m].get(name) for m in methods},
                    )
                )  # fmt: skip
        title = f"{spec.name} ({spec.architecture}, {spec.training})"
        scored = BACKBONE_TARGETS.get(spec.target, "")
        sections.append(OverlaySection(title, methods, rows, scored))
    return sections


def overlay_figure(section: OverlaySection, n_rows: Optional[int] = None):
    """``captum_ssl.viz.grid_figure`` of a section (its first ``n_rows``
    rows; the title says when rows are left out)."""
    from captum_ssl.viz import grid_figure

    rows = section.rows[:n_rows] if n_rows else section.rows
    title = section.title
    if len(rows) < len(section.rows):
        title += (
            f": first {len(rows)} of {len(section.rows)} images "
            "(all of them in report.html)"
        )
    return grid_figure(
        [r.image for r in rows],
        {m: [r.maps.get(m) for r in rows] for m in section.methods},
        row_labels=[r.label for r in rows],
        predictions=[r.prediction for r in rows],
        true_classes=[r.true_classes for r in rows],
        title=title,
    )


def overlay_grids(
    sections: Sequence[OverlaySection], folder: Path, n_images: int = 4
) -> List[Path]:
    """Image x method overlays per model (the first ``n_images`` images;
    methods in the order of the command line); PNG and SVG."""
    folder.mkdir(parents=True, exist_ok=True)
    paths: List[Path] = []
    for section in sections:
        if not section.rows:
            continue
        name = safe_name(section.title.split(" (")[0])
        fig = overlay_figure(section, n_images)
        paths += save_figure(fig, folder / f"{name}_overlays.png")
    return paths


def stored_curves(
    store: ResultStore, plan
) -> Dict[Tuple[str, str], Dict[str, np.ndarray]]:
    """(model, metric) -> {method: (images, points) curves} of the deletion /
    insertion metrics, pretrained models only."""
    by_key = {k: mmx for mmx, k in plan.result_keys.items()}
    pretrained = {s.name for s in plan.model_specs if s.weights == "pretrained"}
    acc: Dict[Tuple[str, str], Dict[str, List[np.ndarray]]] = defaultdict(
        lambda: defaultdict(list)
    )
    for r in store.curves(list(by_key)):
        model, method, metric = by_key[r["key"]]
        if model in pretrained and np.all(np.isfinite(r["curve"])):
            acc[model, metric][method].append(r["curve"])
    out: Dict[Tuple[str, str], Dict[str, np.ndarray]] = {}
    for key, per_method in acc.items():
        out[key] = {
            m: np.stack(c)
            for m, c in per_method.items()
            if len({len(x) for x in c}) == 1
        }
    return out


def curve_figure(
    title: str,
    curves: Dict[str, np.ndarray],
    order: Sequence[str] = (),
    moved: str = "deleted",
    score: str = "class probability",
):
    """Mean curve per method with its 95% CI band (Student t over images);
    x: fraction of pixels ``moved`` (deleted / inserted), y: the ``score``
    (its axis label)."""
    from benchmarks.evaluation.tables import mean_ci

    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 3.8), dpi=DPI, layout="constrained")
    methods = [m for m in order if m in curves] + [m for m in curves if m not in order]
    for method in methods:
        c = curves[method]
        xs = np.linspace(0.0, 1.0, c.shape[1])
        stats = [mean_ci(c[:, j]) for j in range(c.shape[1])]
        mean = np.array([s[0] for s in stats])
        half = np.nan_to_num(np.array([s[1] for s in stats]))
        (line,) = ax.plot(xs, mean, label=f"{method} (n={c.shape[0]})")
        ax.fill_between(xs, mean - half, mean + half, alpha=0.2,
                        color=line.get_color(), linewidth=0)  # fmt: skip
    ax.set_xlabel(f"fraction of pixels {moved} (most relevant first)", fontsize=9)
    ax.set_ylabel(score, fontsize=9)
    ax.set_title(f"{title}: mean and 95% CI band over images", fontsize=10)
    ax.set_xlim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def curve_charts(
    curves: Dict[Tuple[str, str], Dict[str, np.ndarray]], folder: Path, plan
) -> List[Path]:
    """One curve figure per (model, deletion / insertion metric); PNG + SVG."""
    folder.mkdir(parents=True, exist_ok=True)
    paths: List[Path] = []
    for (model, metric), per_method in curves.items():
        name, opts = plan.metrics[metric]
        moved = "inserted" if name == "insertion_auc" else "deleted"
        spec = next(s for s in plan.model_specs if s.name == model)
        score = f"class {opts.get('score', 'probability')}"
        if spec.target:  # a backbone's score, read raw
            score = BACKBONE_TARGETS[spec.target]
        fig = curve_figure(
            f"{model}, {metric}", per_method, list(plan.methods), moved, score
        )
        name = f"curve_{safe_name(model)}_{safe_name(metric)}.png"
        paths += save_figure(fig, folder / name)
    return paths


def bar_charts(
    tables: Dict[str, Any], folder: Path, order: Sequence[str] = ()
) -> List[Path]:
    """One bar chart per metric: methods on the x-axis (in ``order``), one bar
    per model (supervised and self-supervised of a family side by side), 95%
    CIs; PNG and SVG."""
    folder.mkdir(parents=True, exist_ok=True)
    return [
        p
        for metric, fig in bar_figures(tables, order)
        for p in save_figure(fig, folder / f"bar_{safe_name(metric)}.png")
    ]


def bar_figures(
    tables: Dict[str, Any], order: Sequence[str] = ()
) -> List[Tuple[str, Any]]:
    """``(metric, Figure)`` per metric of the accuracy table (see
    :func:`bar_charts`)."""
    plt = _plt()
    by_metric: Dict[str, List[Dict[str, Any]]] = defaultdict(list)
    for r in tables["per_model"]:
        by_metric[r["metric"]].append(r)
    out: List[Tuple[str, Any]] = []
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
        out.append((metric, fig))
    return out
