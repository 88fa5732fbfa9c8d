"""What the main job prints at the end: the accuracy tables (mean, 95% CI and
direction per metric), the supervised vs self-supervised differences, the
cost table, the files written and the downloads that would add left-out
models. Plain text tables that fit a terminal."""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence


def text_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Columns padded to their widest cell, separated by two spaces."""
    cells = [list(map(str, header))] + [list(map(str, r)) for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _pm(mean: float, half: float) -> str:
    if math.isnan(mean):
        return "n/a"
    if math.isnan(half):
        return f"{mean:.3f}"
    return f"{mean:.3f} ± {half:.3f}"


def _num(v: Any, fmt: str = "{:.3g}") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    return fmt.format(v)


def accuracy_text(tabs: Dict[str, Any]) -> str:
    """Per model: method x metric (mean ± 95% CI), each metric's direction."""
    out: List[str] = []
    per: Dict[str, List[Dict[str, Any]]] = defaultdict(list)
    for r in tabs["per_model"]:
        per[r["model"]].append(r)
    top1 = {r["model"]: r for r in tabs["images"]}
    for model, rows in per.items():
        metrics = list(dict.fromkeys(r["metric"] for r in rows))
        methods = list(dict.fromkeys(r["method"] for r in rows))
        cell = {(r["method"], r["metric"]): r for r in rows}
        arrow = {
            r["metric"]: "↑" if r["direction"].startswith("higher") else "↓"
            for r in rows
        }
        n = max(r["n"] for r in rows)
        info = top1.get(model, {})
        acc = ""
        if info.get("labelled"):
            acc = f", top-1 {100 * info['top1']:.0f}% of {info['labelled']} labelled"
        out += [
            f"{model} ({rows[0]['architecture']}, {rows[0]['training']}): "
            f"mean ± 95% CI over {n} images{acc}; ↑ higher / ↓ lower is better",
            text_table(
                ["method"] + [f"{m} {arrow[m]}" for m in metrics],
                [
                    [meth]
                    + [
                        _pm(cell[meth, m]["mean"], cell[meth, m]["ci95"])
                        if (meth, m) in cell
                        else "-"
                        for m in metrics
                    ]
                    for meth in methods
                ],
            ),
            "",
        ]
    return "\n".join(out)


def comparison_text(tabs: Dict[str, Any]) -> str:
    """Self-supervised minus supervised, paired over the same images, one
    table per family (ResNet-50, ViT-S, ViT-B, XCiT-S12, ...)."""
    rows = tabs.get("comparison") or []
    if not rows:
        return ""
    by_family: Dict[str, List[Dict[str, Any]]] = defaultdict(list)
    for r in rows:
        by_family[r.get("family", "?")].append(r)
    out = [
        "Self-supervised vs supervised within each family (difference paired\n"
        "over the same images, mean ± 95% CI; Wilcoxon p; better where p < 0.05)"
    ]
    for family, rs in by_family.items():
        body = [
            [
                f"{r['self_supervised']} - {r['supervised']}",
                r["method"],
                r["metric"] + (" ↑" if r["direction"].startswith("higher") else " ↓"),
                _pm(r["diff"], r["diff_ci95"]),
                _num(r["wilcoxon_p"], "{:.2g}"),
                r["better"],
            ]
            for r in rs
        ]
        out += [
            f"{family}:",
            text_table(["pair", "method", "metric", "diff", "p", "better"], body),
        ]
    return "\n".join(out) + "\n"


def cost_text(tabs: Dict[str, Any]) -> str:
    """Each method's time in forward passes of its model (and per image)."""
    rows = tabs.get("timing") or []
    if not rows:
        return ""
    body = [
        [
            r["model"] + ("" if r["weights"] == "pretrained" else " (random)"),
            r["method"],
            _num(r["attribution_forward_passes"], "{:.2f}"),
            _num(r["attribution_s_per_image"], "{:.3f}"),
            _num(r["metrics_s_per_image"], "{:.2f}"),
        ]
        for r in rows
    ]
    device = rows[0].get("device", "?")
    return (
        f"Cost on {device} (attribution time in no-grad forward passes of the same "
        "batch; seconds per image)\n"
        + text_table(
            ["model", "method", "forward passes", "s/image", "metrics s/image"],
            body,
        )
        + "\n"
    )


def tables_text(tabs: Dict[str, Any]) -> str:
    parts = [accuracy_text(tabs), comparison_text(tabs), cost_text(tabs)]
    return "\n".join(p for p in parts if p)


def download_line(absent: Sequence[str]) -> str:
    """One line naming the files that would add the left-out models."""
    if not absent:
        return ""
    from captum_ssl.models import describe

    files = []
    for name in absent:
        files += [f["filename"] for f in describe(name)["files"] if not f["present"]]
    files = list(dict.fromkeys(files))
    return (
        f"Left out (no pretrained weights): {', '.join(absent)}. To add them, "
        f"download into storage/pretrained_weights/: {' '.join(files)} "
        "(addresses: docs/models_table.md)"
    )


def closing(
    written: Dict[str, Path], seconds: float, footer: Sequence[str] = ()
) -> str:
    """Files written, the footer lines (downloads, skipped photos), wall time."""
    out = []
    if written:
        out.append("Files written:")
        out += [f"  {p}" for p in dict.fromkeys(str(p) for p in written.values())]
    out += [line for line in footer if line]
    out.append(f"Wall time: {_duration(seconds)}.")
    return "\n".join(out)


def _duration(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    return f"{m} min {s:02d} s" if m else f"{seconds:.1f} s"


def unreadable_text(caught: Sequence[str]) -> Optional[str]:
    if not caught:
        return None
    return f"Skipped {len(caught)} unreadable photo(s):\n" + "\n".join(
        f"  {c}" for c in caught
    )
