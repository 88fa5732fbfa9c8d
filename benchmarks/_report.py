"""The timing suites' report: readable tables (``results.md`` / ``.csv``).

Column names are the measurements in words with their units, not asv's
``time_`` / ``track_`` / ``peakmem_`` method names; each table is titled with
the first line of its suite's docstring.
"""

from __future__ import annotations

import csv
import platform
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

PREFIXES = {"time_": "", "track_": "", "peakmem_": "peak memory, "}
UNITS = {"s": "seconds", "MiB": "MiB"}

INTRO = (
    "Timing benchmarks (`benchmarks/bench_*.py`). One table per benchmark, one "
    "row per setting. Ratios such as *x forward* or *x baseline* are the "
    "method's time over the time of one plain forward pass (no gradients) of "
    "the same batch, or of the named baseline, both measured in turns in the "
    "same process; *x pytorch-grad-cam* is our time over pytorch-grad-cam's "
    "for the same work. Peak memory is measured in a fresh process on the "
    "CPU (allocator peak on CUDA)."
)


def measure_label(measure: str, unit: str) -> str:
    """``track_forward_ratio`` + ``x forward`` -> ``forward ratio [x forward]``."""
    for prefix, word in PREFIXES.items():
        if measure.startswith(prefix):
            measure = word + measure[len(prefix) :]
            break
    text = measure.replace("_", " ")
    return f"{text} [{unit}]" if unit else text


def suite_title(name: str, classes: Dict[str, type]) -> str:
    cls = classes.get(name)
    doc = (cls.__doc__ or "").strip().split("\n\n")[0] if cls is not None else ""
    doc = " ".join(doc.split()).replace("``", "`")  # reST -> Markdown
    return f"{doc} ({name})" if doc else name


def tables(
    rows: List[dict], classes: Optional[Dict[str, type]] = None
) -> List[Tuple[str, str, List[str], List[List[str]]]]:
    """(title, note, header, body) per suite: one row per parameter
    combination, one column per measurement."""
    classes = classes or {}
    by_suite: Dict[str, List[dict]] = {}
    for r in rows:
        by_suite.setdefault(r["suite"], []).append(r)
    out = []
    for suite, rs in by_suite.items():
        pnames = list(rs[0]["params"].keys())
        measures: List[Tuple[str, str]] = []
        for r in rs:
            if (r["measure"], r["unit"]) not in measures:
                measures.append((r["measure"], r["unit"]))
        combos: Dict[tuple, Dict[str, Optional[float]]] = {}
        for r in rs:
            key = tuple(str(r["params"][n]) for n in pnames)
            combos.setdefault(key, {})[r["measure"]] = r["value"]
        header = [p.replace("_", " ") for p in pnames]
        header += [measure_label(m, u) for m, u in measures]
        body = [
            list(k) + [_fmt(v.get(m)) for m, _ in measures] for k, v in combos.items()
        ]
        note = next((r["note"] for r in rs if r.get("note")), "")
        out.append((suite_title(suite, classes), note, header, body))
    return out


def _fmt(v: Optional[float]) -> str:
    return "n/a" if v is None else f"{v:.4g}"


def conditions(device: str, threads: int, seconds: Optional[float] = None) -> str:
    """One line: where and how the numbers were measured."""
    cpu = platform.processor() or platform.machine()
    text = (
        f"Measured on {device} ({cpu}), {threads} CPU threads, torch "
        f"{torch.__version__}, Python {platform.python_version()}"
    )
    if seconds is not None:
        text += f"; these suites took {seconds:.0f} s"
    return text + "."


def markdown(tabs, head: Sequence[str] = ()) -> str:
    parts = ["# Timing benchmarks", "", INTRO, ""]
    for line in head:
        parts += [line, ""]
    for title, note, header, body in tabs:
        parts.append(f"## {title}\n")
        if note:
            parts.append(f"Setting: {note}.\n")
        parts.append("| " + " | ".join(header) + " |")
        parts.append("|" + "---|" * len(header))
        parts += ["| " + " | ".join(row) + " |" for row in body]
        parts.append("")
    return "\n".join(parts)


def write_csv(path: Path, rows: List[dict]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["suite", "group", "params", "measure", "value", "unit", "note"])
        for r in rows:
            params = ";".join(f"{k}={v}" for k, v in r["params"].items())
            w.writerow(
                [
                    r["suite"],
                    r["group"],
                    params,
                    measure_label(r["measure"], ""),
                    r["value"],
                    r["unit"],
                    r["note"],
                ]
            )
