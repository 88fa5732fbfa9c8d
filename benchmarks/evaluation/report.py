"""``report.html``: one self-contained page per run, to open in any browser.

The page holds the run's settings, every table (sortable: click a column
header; each metric's direction beside its name), the bar charts and the
deletion / insertion curves, and every image x model x method overlay drawn
from the maps at their native resolution, with the model's predicted class
and probability (wrong predictions framed in red). Pictures are embedded as
``data:`` URIs (JPEG thumbnails, PNG charts) and the few lines of sorting
script are inline: no server, no network, no other file.

The main job writes it from the store (:func:`write_run_report`);
``--explain`` writes the same page for its photos (:func:`write_report`).
"""

from __future__ import annotations

import base64
import html
import io
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from benchmarks.evaluation.figures import OverlaySection

#: side of an overlay thumbnail in pixels
THUMB = 192


@dataclass
class Table:
    """A sortable table: ``rows`` of cells; a cell is a value or a
    ``(text, sort value)`` pair."""

    title: str
    columns: List[str]
    rows: List[List[Any]]
    note: str = ""
    tips: Dict[str, str] = field(default_factory=dict)  # column -> hover text


@dataclass
class Report:
    title: str
    settings: List[Tuple[str, str]]
    tables: List[Table] = field(default_factory=list)
    # (caption, matplotlib Figure or the path of a PNG already written)
    charts: List[Tuple[str, Any]] = field(default_factory=list)
    overlays: List[OverlaySection] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)


# ------------------------------------------------------------------ pictures


def _data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def _jpeg(rgb) -> str:
    """An ``(H, W, 3)`` array in [0, 1] as a THUMB-px JPEG data URI."""
    import numpy as np
    from PIL import Image

    im = Image.fromarray((np.clip(rgb, 0, 1) * 255).round().astype("uint8"))
    im = im.resize((THUMB, round(THUMB * im.height / im.width)), Image.BICUBIC)
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=85)
    return _data_uri(buf.getvalue(), "image/jpeg")


def _png(fig, dpi: int = 100) -> str:
    import matplotlib.pyplot as plt

    if isinstance(fig, Path):
        return _data_uri(fig.read_bytes(), "image/png")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    return _data_uri(buf.getvalue(), "image/png")


def _colour_bar(cmap: str) -> str:
    """The colour map as a CSS gradient (the overlays' shared scale)."""
    from matplotlib import colormaps

    stops = []
    for i in range(11):
        r, g, b, _ = colormaps[cmap](i / 10)
        stops.append(f"rgb({r * 255:.0f},{g * 255:.0f},{b * 255:.0f}) {i * 10}%")
    return (
        '<div class="cbar"><span>0</span><div style="background:linear-gradient('
        f'to right,{",".join(stops)})"></div><span>1</span> attribution, each map '
        "ReLU'd, upsampled from its native resolution and scaled to [0, 1]</div>"
    )


# -------------------------------------------------------------------- html

CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222}
h1{font-size:1.5em}h2{font-size:1.25em;margin-top:1.6em}h3{font-size:1.05em}
table{border-collapse:collapse;margin:.4em 0 1em}
td,th{border:1px solid #ccc;padding:3px 7px;text-align:left;vertical-align:top}
table.sortable th{cursor:pointer;background:#f2f2f2;user-select:none}
th[aria-sort=ascending]::after{content:" \\25B2"}
th[aria-sort=descending]::after{content:" \\25BC"}
.note{color:#555;max-width:70em}
.grid td{border:none;padding:2px;text-align:center;font-size:12px}
.grid img{display:block;width:THUMBpx;height:auto;border:3px solid transparent}
.grid .wrong img{border-color:#c00000}.grid .wrong .cap{color:#c00000}
.cbar{display:flex;align-items:center;gap:6px;font-size:12px;margin:.5em 0}
.cbar div{width:240px;height:12px}
.charts{display:flex;flex-wrap:wrap;gap:1em}
.charts img{max-width:min(48%,760px);height:auto}
nav a{margin-right:1em}
""".replace("THUMB", str(THUMB))

# sorts a table by the clicked column: numbers by value (data-v), text by text
JS = """
document.querySelectorAll("table.sortable th").forEach(function (th) {
  th.addEventListener("click", function () {
    var table = th.closest("table"), body = table.tBodies[0];
    var col = Array.prototype.indexOf.call(th.parentNode.children, th);
    var asc = th.getAttribute("aria-sort") !== "ascending";
    table.querySelectorAll("th").forEach(function (h) {
      h.removeAttribute("aria-sort");
    });
    th.setAttribute("aria-sort", asc ? "ascending" : "descending");
    var key = function (tr) {
      var td = tr.children[col], v = td.getAttribute("data-v");
      return v === null ? td.textContent : (v === "" ? NaN : parseFloat(v));
    };
    var rows = Array.prototype.slice.call(body.rows);
    rows.sort(function (a, b) {
      var x = key(a), y = key(b);
      if (typeof x === "number" || typeof y === "number") {
        if (isNaN(x)) return 1;
        if (isNaN(y)) return -1;
        return asc ? x - y : y - x;
      }
      return asc ? x.localeCompare(y) : y.localeCompare(x);
    });
    rows.forEach(function (r) { body.appendChild(r); });
  });
});
"""


def _e(v: Any) -> str:
    return html.escape(str(v))


def _cell(v: Any) -> str:
    if isinstance(v, tuple):
        text, key = v
    else:
        text, key = v, v
    if isinstance(key, bool) or not isinstance(key, (int, float)):
        return f"<td>{_e(text)}</td>"
    num = "" if isinstance(key, float) and not math.isfinite(key) else repr(key)
    if text is key:
        text = _fmt(key)
    return f'<td data-v="{num}">{_e(text)}</td>'


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "n/a" if math.isnan(v) else f"{v:.4g}"
    return str(v)


def _table(t: Table, ident: str) -> str:
    head = "".join(
        f'<th title="{_e(t.tips.get(c, "click to sort"))}">{_e(c)}</th>'
        for c in t.columns
    )
    body = "\n".join("<tr>" + "".join(_cell(v) for v in r) + "</tr>" for r in t.rows)
    note = f'<p class="note">{_e(t.note)}</p>' if t.note else ""
    return (
        f'<h3 id="{ident}">{_e(t.title)}</h3>{note}\n<table class="sortable">'
        f"<thead><tr>{head}</tr></thead>\n<tbody>\n{body}\n</tbody></table>"
    )


def _overlays(section: OverlaySection, cmap: str) -> str:
    from captum_ssl.viz import blend, prediction_text
    from captum_ssl.viz._plot import _image_np

    head = "<tr><th>image</th>" + "".join(f"<th>{_e(m)}</th>" for m in section.methods)
    out = [f"<h3>{_e(section.title)}</h3>", '<table class="grid">', head + "</tr>"]
    wrong_n = 0
    for row in section.rows:
        text, wrong = prediction_text(row.prediction, row.true_classes)
        wrong_n += wrong
        cap = "<br>".join(_e(x) for x in text.split("\n"))
        cls = ' class="wrong"' if wrong else ""
        alt = _e(f"{row.label}")
        cells = [
            f'<td{cls}><img src="{_jpeg(_image_np(row.image))}" alt="{alt}">'
            f'<div>{_e(row.label)}</div><div class="cap">{cap}</div></td>'
        ]
        for m in section.methods:
            a = row.maps.get(m)
            if a is None:
                cells.append("<td>n/a</td>")
                continue
            shape = "x".join(str(s) for s in a.shape[-2:])
            cells.append(
                f'<td><img src="{_jpeg(blend(row.image, a, cmap))}" '
                f'alt="{_e(m)} on {alt}" title="{_e(m)}, map {shape}">'
                f"<div>{shape}</div></td>"
            )
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</table>")
    n = len(section.rows)
    if section.scored:
        marked = (
            f"a headless backbone, explained by its {section.scored}: under "
            "each image that score (no class is predicted)"
        )
    elif any(r.true_classes for r in section.rows):
        marked = f"{wrong_n} wrong predictions (framed in red, with the true class)"
    else:
        marked = "true class unknown (each prediction is the model's top class)"
    out.insert(
        1,
        f'<p class="note">{n} image(s); {marked}; under each map its native size.</p>',
    )
    return "\n".join(out)


def render(report: Report, cmap: str = "jet") -> str:
    """The page as a string."""
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8"><link rel="icon" href="data:,">',
        f"<title>{_e(report.title)}</title><style>{CSS}</style></head><body>",
        f"<h1>{_e(report.title)}</h1>",
        "<nav>"
        + "".join(
            f'<a href="#{k}">{t}</a>'
            for k, t, present in (
                ("settings", "settings", True),
                ("tables", "tables", bool(report.tables)),
                ("charts", "charts", bool(report.charts)),
                ("overlays", "overlays", bool(report.overlays)),
            )
            if present
        )
        + "</nav>",
        '<h2 id="settings">Settings</h2><table class="settings">'
        + "".join(
            f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in report.settings
        )
        + "</table>",
    ]
    parts += [f'<p class="note">{_e(n)}</p>' for n in report.notes if n]
    if report.tables:
        parts.append('<h2 id="tables">Tables</h2>')
        parts += [_table(t, f"table{i}") for i, t in enumerate(report.tables)]
    if report.charts:
        parts.append('<h2 id="charts">Charts</h2><div class="charts">')
        for caption, fig in report.charts:
            parts.append(f'<img src="{_png(fig)}" alt="{_e(caption)}">')
        parts.append("</div>")
    if report.overlays:
        parts += ['<h2 id="overlays">Overlays</h2>', _colour_bar(cmap)]
        parts += [_overlays(s, cmap) for s in report.overlays]
    parts += [f"<script>{JS}</script>", "</body></html>"]
    return "\n".join(parts)


def write_report(report: Report, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render(report), encoding="utf-8")
    return path


# ------------------------------------------------------------ the main job


def _pm(mean: float, half: float) -> str:
    if math.isnan(mean):
        return "n/a"
    return f"{mean:.3f}" if math.isnan(half) else f"{mean:.3f} ± {half:.3f}"


def _arrow(direction: str) -> str:
    return "↑" if direction.startswith("higher") else "↓"


def run_tables(tabs: Dict[str, Any]) -> List[Table]:
    """The main job's tables (accuracy per model, supervised vs
    self-supervised, agreement, cost) as sortable tables."""
    out: List[Table] = []
    if tabs.get("images"):
        cols = ["model", "architecture", "training", "n", "labelled", "top1"]
        out.append(
            Table(
                "Models on these images",
                cols,
                [[r[c] for c in cols] for r in tabs["images"]],
                "top1: fraction of the labelled images predicted correctly.",
            )
        )
    per: Dict[str, List[Dict[str, Any]]] = {}
    for r in tabs.get("per_model", []):
        per.setdefault(r["model"], []).append(r)
    for model, rows in per.items():
        metrics = list(dict.fromkeys(r["metric"] for r in rows))
        methods = list(dict.fromkeys(r["method"] for r in rows))
        cell = {(r["method"], r["metric"]): r for r in rows}
        direction = {r["metric"]: r["direction"] for r in rows}
        n = max(r["n"] for r in rows)
        body = []
        for meth in methods:
            line: List[Any] = [meth]
            for m in metrics:
                r = cell.get((meth, m))
                line.append(("-", math.nan) if r is None else (
                    _pm(r["mean"], r["ci95"]) + (
                        f" ({r['nonfinite']} non-finite)" if r.get("nonfinite") else ""
                    ), r["mean"]))  # fmt: skip
            body.append(line)
        out.append(
            Table(
                f"{model} ({rows[0]['architecture']}, {rows[0]['training']})",
                ["method"] + [f"{m} {_arrow(direction[m])}" for m in metrics],
                body,
                f"Mean ± 95% CI over {n} images; ↑ higher is better, ↓ lower is "
                "better. Click a column to sort by its mean.",
                {f"{m} {_arrow(direction[m])}": direction[m] for m in metrics},
            )
        )
    if tabs.get("comparison"):
        group = "family" if "family" in tabs["comparison"][0] else "architecture"
        cols = [group, "supervised", "self_supervised", "method", "metric"]
        cols += ["direction", "n", "supervised_mean", "self_supervised_mean"]
        body = [
            [r.get(c, "") for c in cols]
            + [
                (_pm(r["diff"], r["diff_ci95"]), r["diff"]),
                r["t_p"],
                r["wilcoxon_p"],
                "yes" if r["significant"] else "no",
                r["better"],
            ]
            for r in tabs["comparison"]
        ]
        out.append(
            Table(
                "Supervised vs self-supervised (paired over the same images)",
                cols + ["diff", "t_p", "wilcoxon_p", "significant", "better"],
                body,
                "diff = self-supervised - supervised (mean ± 95% CI); "
                "significant: Wilcoxon p < 0.05.",
            )
        )
    if tabs.get("agreement"):
        rows = tabs["agreement"]
        cols = [c for c in rows[0] if not c.endswith("_ci95")]
        body = [
            [
                (_pm(r[c], r[c + "_ci95"]), r[c]) if c + "_ci95" in r else r.get(c)
                for c in cols
            ]
            for r in rows
        ]
        out.append(
            Table(
                "Agreement of supervised and self-supervised maps",
                cols,
                body,
                "Spearman rank correlation and top-k% IoU of the maps, mean ± 95% CI.",
            )
        )
    if tabs.get("timing"):
        cols = list(tabs["timing"][0])
        out.append(
            Table(
                "Cost",
                cols,
                [[r[c] for c in cols] for r in tabs["timing"]],
                "Seconds per image; attribution_forward_passes: the attribution's "
                "time in no-grad forward passes of the same batch; metrics "
                "against a forward pass at the metrics' batch size (nominal: "
                "what their protocols need). Peak memory on CUDA only.",
            )
        )
    return out


def run_settings(cfg, plan) -> List[Tuple[str, str]]:
    """The settings of a main-job run, as (name, value) rows."""
    import shlex
    import sys

    v, rt = plan.version, plan.runtime
    argv = cfg.command if cfg.command is not None else shlex.join(sys.argv[1:])
    models = [
        f"{s.name} ({s.architecture}, {s.training}, {s.weights} weights)"
        for s in plan.model_specs
    ]
    return [
        ("command", f"python -m benchmarks.run {argv}"),
        ("models", "; ".join(models)),
        ("methods", ", ".join(plan.methods)),
        ("metrics", ", ".join(plan.metrics)),
        ("images", plan.source.describe()),
        (
            "batch sizes",
            f"{cfg.batch_size} images, {cfg.metric_batch_size} "
            "perturbed images per metric pass",
        ),  # fmt: skip
        ("device", f"{rt.get('device')}, {rt.get('threads')} CPU threads"),
        (
            "code",
            f"captum_ssl {v.get('version')} (sources {v.get('source_sha256')}"
            + (f", commit {v['commit']}" if v.get("commit") else "")
            + f"), torch {v.get('torch')}",
        ),  # fmt: skip
        ("store", str(cfg.out / "results.sqlite")),
    ]


def write_run_report(
    cfg,
    plan,
    tabs: Dict[str, Any],
    sections: Sequence[OverlaySection] = (),
    charts: Sequence[Path] = (),
    notes: Sequence[str] = (),
) -> Path:
    """``report.html`` of a main-job run, next to its tables: the tables, the
    chart PNGs written into ``figures/`` (bar charts, curves) and the
    overlays of every image."""
    report = Report(
        "captum_ssl: accuracy of the explanations",
        run_settings(cfg, plan),
        run_tables(tabs),
        [(p.stem.replace("_", " "), p) for p in charts],
        list(sections),
        notes=list(notes) + [f"Skipped: {u}" for u in cfg.unreadable],
    )
    if not cfg.figures:
        report.notes.append("Run with --no-figures: no charts or overlays here.")
    return write_report(report, cfg.out / "report.html")


def explain_report(
    title: str,
    settings: List[Tuple[str, str]],
    sections: List[OverlaySection],
    top: Dict[str, List[Tuple[int, float]]],
    path: Path,
    note: Optional[str] = None,
) -> Path:
    """The ``--explain`` page: the photos' overlays and each model's top classes."""
    from captum_ssl.data import class_name

    tables = [
        Table(
            f"{label}: top classes",
            ["rank", "probability", "class", "name"],
            [[i + 1, p, c, class_name(c)] for i, (c, p) in enumerate(rows)],
        )
        for label, rows in top.items()
    ]
    report = Report(title, settings, tables, overlays=sections)
    if note:
        report.notes.append(note)
    return write_report(report, path)
