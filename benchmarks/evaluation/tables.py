"""Tables from the store: per model, supervised vs self-supervised, agreement,
timing; written as Markdown, CSV and JSON.

Statistics: mean with a 95% Student-t confidence interval over images; the
supervised vs self-supervised difference is paired over the images both
models have, tested with the paired t-test and the Wilcoxon signed-rank test
(``scipy.stats``); *significant* means Wilcoxon p < 0.05. Only models with
pretrained weights enter the accuracy tables; random-weight models appear in
the timing table only, labelled.
"""

from __future__ import annotations

import csv
import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from benchmarks.evaluation import methods as M
from benchmarks.evaluation.store import ResultStore

ALPHA = 0.05

# -------------------------------------------------------------- statistics


def mean_ci(values: Sequence[float], confidence: float = 0.95) -> Tuple[float, float]:
    """Mean and half-width of its Student-t confidence interval (nan if n < 2).

    ``None`` and NaN values (undefined, e.g. the rank correlation of a constant
    map) are left out."""
    from scipy import stats

    v = np.asarray([x for x in values if x is not None], dtype=float)
    v = v[~np.isnan(v)]
    if len(v) == 0:
        return math.nan, math.nan
    if len(v) < 2:
        return float(v.mean()), math.nan
    sem = v.std(ddof=1) / math.sqrt(len(v))
    return float(v.mean()), float(stats.t.ppf(0.5 + confidence / 2, len(v) - 1) * sem)


def paired(a: Sequence[float], b: Sequence[float]) -> Dict[str, float]:
    """Paired comparison of ``b - a``: mean, CI half-width, t-test and Wilcoxon p."""
    from scipy import stats

    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    ok = ~(np.isnan(a) | np.isnan(b))
    a, b = a[ok], b[ok]
    d = b - a
    mean, half = mean_ci(d)
    t_p = w_p = math.nan
    if len(d) >= 2 and np.any(d != 0):
        t_p = float(stats.ttest_rel(b, a).pvalue)
        w_p = float(stats.wilcoxon(b, a).pvalue)
    return dict(n=int(len(d)), diff=mean, ci=half, t_p=t_p, wilcoxon_p=w_p)


# ---------------------------------------------------------------- gathering


def _models_info(store: ResultStore, plan) -> Dict[str, Dict[str, Any]]:
    info = {}
    for model, key in plan.model_keys.items():
        spec = store.spec(key) or {}
        info[model] = dict(
            architecture=spec.get("architecture", "?"),
            training=spec.get("training", "?"),
            weights=spec.get("model", {}).get("weights", "?"),
            family=family_label(spec.get("family") or "", spec.get("architecture")),
        )
    return info


def family_label(family: str, architecture: Optional[str] = None) -> str:
    """The family a model is paired within: the registry's display name
    (``"vit_s"`` -> ``"ViT-S"``), else its architecture."""
    from captum_ssl.models import family_name

    return family_name(family) if family else (architecture or "?")


def _values(store: ResultStore, plan) -> Dict[Tuple[str, str, str], Dict[str, float]]:
    """(model, method, metric) -> {image: value} for the plan's keys only."""
    by_key = {k: mmx for mmx, k in plan.result_keys.items()}
    out: Dict[Tuple[str, str, str], Dict[str, float]] = defaultdict(dict)
    for r in store.results(list(by_key)):
        v = r["value"]
        out[by_key[r["key"]]][r["image"]] = math.nan if v is None else v
    return out


def _direction(plan, metric: str) -> bool:
    name, opts = plan.metrics[metric]
    return M.metric_direction(name, opts)


def _arrow(higher: bool) -> str:
    return "higher is better" if higher else "lower is better"


def family_pairs(info: Dict[str, Dict[str, Any]]) -> List[Tuple[str, str, str]]:
    """(family, supervised model, self-supervised model): every supervised
    model paired with every self-supervised one of its family (ResNet-50,
    ViT-S, ViT-B, XCiT-S12, ...; the architecture where no family is known),
    among the models with pretrained weights; families in the order their
    first model appears."""
    fams: Dict[str, Dict[str, List[str]]] = defaultdict(lambda: defaultdict(list))
    for m, i in info.items():
        if i["weights"] == "pretrained":
            fams[i.get("family") or i["architecture"]][i["training"]].append(m)
    return [
        (family, sup, ssl)
        for family, t in fams.items()
        for sup in t.get("supervised", [])
        for ssl in t.get("self-supervised", [])
    ]


# ------------------------------------------------------------------- tables


def build_tables(store: ResultStore, plan, top_k: float = 0.2) -> Dict[str, Any]:
    """Every table of a run as lists of dicts (JSON-ready)."""
    info = _models_info(store, plan)
    values = _values(store, plan)
    pretrained = [m for m, i in info.items() if i["weights"] == "pretrained"]
    per_model: List[Dict[str, Any]] = []
    for (model, method, metric), vals in values.items():
        if model not in pretrained:
            continue  # honesty: random weights never enter accuracy tables
        mean, half = mean_ci(list(vals.values()))
        # non-finite values (stored NULL with their status) are counted, never
        # averaged: n is the number of finite values
        nonfinite = sum(1 for v in vals.values() if not math.isfinite(v))
        per_model.append(
            dict(
                model=model,
                architecture=info[model]["architecture"],
                family=info[model]["family"],
                training=info[model]["training"],
                method=method,
                metric=metric,
                direction=_arrow(_direction(plan, metric)),
                n=len(vals) - nonfinite,
                nonfinite=nonfinite,
                mean=mean,
                ci95=half,
            )
        )
    images = []
    for model in pretrained:
        key = plan.model_keys[model]
        prob = [r["value"] for r in store.results([key])]
        top1 = [r["value"] for r in store.results([key + ":top1"])]
        top1 = [v for v in top1 if v is not None]
        images.append(
            dict(
                model=model,
                architecture=info[model]["architecture"],
                training=info[model]["training"],
                n=len(prob),
                labelled=len(top1),
                top1=float(np.mean(top1)) if top1 else math.nan,
                probability=mean_ci(prob)[0],
            )
        )
    comparison, agreement = [], []
    maps = _maps(store, plan)
    for family, sup, ssl in family_pairs(info):
        for (model, method, metric), a in values.items():
            if model != sup or (ssl, method, metric) not in values:
                continue
            b = values[ssl, method, metric]
            common = sorted(set(a) & set(b))
            p = paired([a[i] for i in common], [b[i] for i in common])
            higher = _direction(plan, metric)
            better = "-"
            if p["wilcoxon_p"] < ALPHA:
                better = ssl if (p["diff"] > 0) == higher else sup
            comparison.append(
                dict(
                    family=family,
                    supervised=sup,
                    self_supervised=ssl,
                    method=method,
                    metric=metric,
                    direction=_arrow(higher),
                    n=p["n"],
                    # images left out of the pair because a value is not finite
                    nonfinite=len(common) - p["n"],
                    supervised_mean=mean_ci([a[i] for i in common])[0],
                    self_supervised_mean=mean_ci([b[i] for i in common])[0],
                    diff=p["diff"],
                    diff_ci95=p["ci"],
                    t_p=p["t_p"],
                    wilcoxon_p=p["wilcoxon_p"],
                    significant=bool(p["wilcoxon_p"] < ALPHA),
                    better=better,
                )
            )
        for method in plan.methods:
            ma, mb = maps.get((sup, method)), maps.get((ssl, method))
            if not ma or not mb:
                continue
            agreement.append(
                dict(
                    family=family,
                    supervised=sup,
                    self_supervised=ssl,
                    method=method,
                    **agreement_stats(ma, mb, top_k),
                )
            )
    timing = timing_table(store, plan, info)
    families = list(dict.fromkeys(info[m]["family"] for m in plan.model_keys))
    order = {
        **{f: i for i, f in enumerate(families)},
        **{m: i for i, m in enumerate(plan.model_keys)},
        **{m: i for i, m in enumerate(plan.methods)},
        **{m: i for i, m in enumerate(plan.metrics)},
    }

    def by_plan(rows: List[Dict[str, Any]], *cols: str) -> List[Dict[str, Any]]:
        return sorted(rows, key=lambda r: tuple(order.get(r[c], 0) for c in cols))

    per_model = by_plan(per_model, "model", "method", "metric")
    comparison = by_plan(
        comparison, "family", "supervised", "self_supervised", "method", "metric"
    )
    agreement = by_plan(agreement, "supervised", "self_supervised", "method")
    timing = by_plan(timing, "model", "method")
    return dict(
        images=images,
        per_model=per_model,
        comparison=comparison,
        agreement=agreement,
        timing=timing,
        excluded=sorted(m for m in info if m not in pretrained),
    )


def _maps(store: ResultStore, plan) -> Dict[Tuple[str, str], Dict[str, np.ndarray]]:
    by_key = {k: mm for mm, k in plan.map_keys.items()}
    out: Dict[Tuple[str, str], Dict[str, np.ndarray]] = defaultdict(dict)
    for r in store.maps(list(by_key)):
        out[by_key[r["key"]]][r["image"]] = r["map"]
    return out


def agreement_stats(
    a: Dict[str, np.ndarray], b: Dict[str, np.ndarray], top_k: float
) -> Dict[str, Any]:
    """Spearman rank correlation and top-k IoU of two models' maps per image."""
    import torch

    from captum_ssl.metrics import spearman, topk_iou

    common = sorted(set(a) & set(b))
    if not common:
        return dict(n=0)
    ta = torch.from_numpy(np.stack([a[i] for i in common]))[:, None]
    tb = torch.from_numpy(np.stack([b[i] for i in common]))[:, None]
    rho = spearman(ta, tb).tolist()
    iou = topk_iou(ta, tb, k=top_k).tolist()
    rm, rc = mean_ci(rho)
    im, ic = mean_ci(iou)
    return dict(
        n=len(common),
        spearman=rm,
        spearman_ci95=rc,
        **{f"top{round(100 * top_k)}_iou": im, f"top{round(100 * top_k)}_iou_ci95": ic},
    )


def timing_table(store: ResultStore, plan, info) -> List[Dict[str, Any]]:
    """Seconds per image and cost in forward passes, per model and method."""
    by_key = {k: mmx for mmx, k in plan.timing_keys.items()}
    acc: Dict[Tuple[str, str], Dict[str, Any]] = {}
    for r in store.timings(list(by_key)):
        model, method, metric = by_key[r["key"]]
        d = acc.setdefault(
            (model, method),
            dict(attr_s=0.0, attr_fwd=0.0, attr_n=0, metric_s={}, metric_fwd={}),
        )
        d["device"] = r["device"]
        if metric == "":
            d["attr_s"] += r["seconds"]
            d["attr_fwd"] += r["forward_seconds"]
            d["attr_n"] += r["images"]
            if r["peak_mib"] is not None:
                d["peak"] = max(d.get("peak", 0.0), r["peak_mib"])
        else:
            d["metric_s"][metric] = d["metric_s"].get(metric, 0.0) + r["seconds"]
            d["metric_fwd"][metric] = (
                d["metric_fwd"].get(metric, 0.0) + r["forward_seconds"]
            )
    rows = []
    for (model, method), d in acc.items():
        if not d["attr_n"]:
            continue
        n = d["attr_n"]
        msec = sum(d["metric_s"].values())
        # measured passes: each metric's seconds over the forward time of its
        # images at the metrics' batch size, summed over the metrics
        mpasses = sum(
            s / d["metric_fwd"][x]
            for x, s in d["metric_s"].items()
            if d["metric_fwd"][x]
        )
        nominal = sum(
            M.METRICS[plan.metrics[x][0]].passes(plan.metrics[x][1], 224 * 224)
            for x in d["metric_s"]
        )
        weights = info.get(model, {}).get("weights", "?")
        rows.append(
            dict(
                model=model,
                weights=weights
                if weights == "pretrained"
                else "random weights (timing only)",
                method=method,
                device=d["device"],
                images=n,
                attribution_s_per_image=d["attr_s"] / n,
                attribution_forward_passes=d["attr_s"] / d["attr_fwd"]
                if d["attr_fwd"]
                else math.nan,
                metrics_s_per_image=msec / n,
                metrics_forward_passes=mpasses if d["metric_s"] else math.nan,
                metrics_nominal_passes=nominal,
                metrics_overhead=mpasses / nominal if nominal else math.nan,
                total_s_per_image=(d["attr_s"] + msec) / n,
                peak_mib=d.get("peak", math.nan),
            )
        )
    return rows


# ------------------------------------------------------------------ writing


def _f(v: Any, digits: int = 4) -> str:
    if isinstance(v, float):
        if math.isnan(v):
            return "n/a"
        return f"{v:.{digits}g}"
    return str(v)


def _pm(mean: float, half: float) -> str:
    if math.isnan(half):
        return _f(mean, 3)
    return f"{mean:.3f} ± {half:.3f}"


def _cell(r: Dict[str, Any]) -> str:
    """Mean ± CI of the finite values, and how many were not finite."""
    text = _pm(r["mean"], r["ci95"])
    bad = r.get("nonfinite", 0)
    return f"{text} ({bad} non-finite)" if bad else text


def markdown(tables: Dict[str, Any], plan=None, notes: Sequence[str] = ()) -> str:
    out: List[str] = ["# Accuracy of the explanations", ""]
    for n in notes:
        out += [f"```text\n{n}\n```" if "\n" in n else n, ""]
    if tables["images"]:
        out += ["## Models on these images", ""]
        out += _md_rows(
            tables["images"],
            ["model", "architecture", "training", "n", "labelled", "top1"],
        )
    per: Dict[str, List[Dict[str, Any]]] = defaultdict(list)
    for r in tables["per_model"]:
        per[r["model"]].append(r)
    for model, rows in per.items():
        metrics = list(dict.fromkeys(r["metric"] for r in rows))
        methods = list(dict.fromkeys(r["method"] for r in rows))
        cell = {(r["method"], r["metric"]): r for r in rows}
        arrows = {
            r["metric"]: ("↑" if r["direction"].startswith("higher") else "↓")
            for r in rows
        }
        n = max(r["n"] for r in rows)
        out += [
            f"## {model} ({rows[0]['architecture']}, {rows[0]['training']})",
            "",
            f"Mean ± 95% CI over {n} images; ↑ higher is better, ↓ lower is better.",
            "",
            "| method | " + " | ".join(f"{m} {arrows[m]}" for m in metrics) + " |",
            "|---|" + "---|" * len(metrics),
        ]
        for meth in methods:
            cells = [
                _cell(cell[k]) if k in cell else "-"
                for k in ((meth, m) for m in metrics)
            ]
            out.append(f"| {meth} | " + " | ".join(cells) + " |")
        out.append("")
    if tables["comparison"]:
        out += [
            "## Supervised vs self-supervised within each family (paired over "
            "the same images)",
            "",
            "Every supervised model against every self-supervised model of its "
            "family (ResNet-50, ViT-S, ViT-B, XCiT-S12, ...). "
            "diff = self-supervised - supervised (mean ± 95% CI); p: paired "
            "t-test and Wilcoxon signed-rank; significant: Wilcoxon p < 0.05; "
            "better: the model with the better value where significant.",
            "",
        ]
        rows = [
            dict(
                r,
                n=f"{r['n']} ({r['nonfinite']} non-finite)"
                if r.get("nonfinite")
                else r["n"],
                diff=_pm(r["diff"], r["diff_ci95"]),
                significant="yes" if r["significant"] else "no",
            )
            for r in tables["comparison"]
        ]
        cols = ["family", "supervised", "self_supervised", "method", "metric"]
        cols += ["direction", "n", "supervised_mean", "self_supervised_mean", "diff"]
        out += _md_rows(rows, cols + ["t_p", "wilcoxon_p", "significant", "better"])
    if tables["agreement"]:
        out += [
            "## Agreement of supervised and self-supervised maps (same images)",
            "",
            "Spearman rank correlation and top-k% IoU of the maps (stored at "
            "low resolution), mean ± 95% CI.",
            "",
        ]
        rows = []
        for r in tables["agreement"]:
            r = dict(r)
            for k in [k for k in r if k.endswith("_ci95")]:
                base = k[: -len("_ci95")]
                r[base] = _pm(r[base], r.pop(k))
            rows.append(r)
        out += _md_rows(rows, list(rows[0]))
    if tables["timing"]:
        out += [
            "## Timing",
            "",
            "Seconds per image; cost in forward passes: the attribution against "
            "a no-grad forward pass of the same batch, the metrics against a "
            "no-grad forward at the metrics' batch size; nominal: the passes the "
            "metrics' protocols need; overhead: measured / nominal (1.0 = no "
            "cost beyond the forward passes). Peak memory on CUDA only.",
            "",
        ]
        out += _md_rows(tables["timing"], list(tables["timing"][0]))
    if tables["excluded"]:
        out += [
            "Not in the accuracy tables (random weights, timing only): "
            + ", ".join(tables["excluded"]),
            "",
        ]
    return "\n".join(out)


def _md_rows(rows: List[Dict[str, Any]], cols: List[str]) -> List[str]:
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(_f(r.get(c, "")) for c in cols) + " |")
    lines.append("")
    return lines


def write_tables(
    tables: Dict[str, Any], out: Path, notes: Sequence[str] = (), plan=None
) -> Dict[str, Path]:
    """``accuracy.md``, ``accuracy.json`` and one CSV per table in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {"md": out / "accuracy.md", "json": out / "accuracy.json"}
    paths["md"].write_text(markdown(tables, plan, notes))
    paths["json"].write_text(
        json.dumps(_no_nan(tables), indent=1, default=_json_default, allow_nan=False)
    )
    for name, rows in tables.items():
        if not rows or not isinstance(rows[0], dict):
            continue
        path = out / f"accuracy_{name}.csv"
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
        paths[name] = path
    return paths


PER_IMAGE_COLUMNS = [
    "model", "architecture", "training", "image", "label", "target", "predicted",
    "predicted_probability", "method", "metric", "direction", "value",
]  # fmt: skip


def write_per_image(store: ResultStore, plan, path: Path) -> Path:
    """One row per (model, method, metric, image): the metric value, with the
    image's label (-1 if unknown), the explained target and the model's
    prediction. Models with random weights are left out."""
    info = _models_info(store, plan)
    pred = {}
    for model, key in plan.model_keys.items():
        for r in store.results([key + ":pred"]):
            pred[model, r["image"]] = (r["target"], r["value"])
    by_key = {k: mmx for mmx, k in plan.result_keys.items()}
    rows = store.results(list(by_key))
    order = {k: i for i, k in enumerate(plan.result_keys.values())}
    rows.sort(key=lambda r: (order[r["key"]], r["image"]))
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(PER_IMAGE_COLUMNS)
        for r in rows:
            model, method, metric = by_key[r["key"]]
            if info[model]["weights"] != "pretrained":
                continue
            p, pp = pred.get((model, r["image"]), ("", ""))
            w.writerow(
                [
                    model, info[model]["architecture"], info[model]["training"],
                    r["image"], r["label"], r["target"], p, pp, method, metric,
                    _arrow(_direction(plan, metric)), r["value"],
                ]
            )  # fmt: skip
    return path


def _json_default(v: Any) -> Optional[Any]:
    if isinstance(v, (np.floating, np.integer)):
        return v.item()
    return str(v)


def _no_nan(v: Any) -> Any:
    """NaN -> None (strict JSON)."""
    if isinstance(v, float) and math.isnan(v):
        return None
    if isinstance(v, dict):
        return {k: _no_nan(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_no_nan(x) for x in v]
    return v
