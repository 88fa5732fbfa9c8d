"""The main job: run the benchmark suites and the accuracy pipeline.

    python -m benchmarks.run                    # quick default, a few minutes on CPU
    python -m benchmarks.run --bench cams --suite timing
    BENCH_FULL=1 python -m benchmarks.run       # the full grids (thesis step sizes)
    python -m benchmarks.run --suite accuracy --models res_50 moco_v3_res_50 \
        --methods thesis --metrics thesis --data storage/imagenet_1000samples
    torchrun --nproc_per_node=2 -m benchmarks.run --suite accuracy ...
    python -m benchmarks.run --bench roar       # ROAR / KAR with retraining (digits)
    python -m benchmarks.run --bench cgc        # CGC fine-tuning of EfficientNet-Lite0

Timing suites (asv-style classes in ``benchmarks/bench_*.py``): every finished
measurement is appended at once to ``results-<stamp>.jsonl`` in the output
folder and the tables are written as ``results.md`` / ``results.csv``.

Accuracy pipeline (``benchmarks/evaluation``): model x method x metric over
images; every finished value goes at once into ``results.sqlite`` in the
output folder, and re-running the same command resumes it. Tables
(``accuracy.md``/``.json``/``accuracy_*.csv``) and figures (``figures/``) are
regenerated from the store. Giving --models/--methods/--metrics/--data/--limit
without --bench runs the pipeline instead of the asv-style accuracy suites.
Methods and metrics take options as ``name:option=value,...``; the words
``quick``, ``thesis`` and ``all`` stand for sets of them.
"""

from __future__ import annotations

import argparse
import csv
import os
import re
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

DEFAULT_OUT = Path(__file__).resolve().parent.parent / "storage" / "quant_results"


def _parse(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.run",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--bench",
        nargs="*",
        default=None,
        help="areas to run (benchmarks/bench_<area>.py); default: all",
    )
    p.add_argument(
        "--suite",
        choices=["timing", "accuracy", "all"],
        default="all",
        help="timing suites, accuracy suites, or both (default)",
    )
    p.add_argument(
        "--filter", default=None, help="regular expression on suite class names"
    )
    p.add_argument(
        "--full", action="store_true", help="the full grids (same as BENCH_FULL=1)"
    )
    p.add_argument(
        "--images",
        type=int,
        default=None,
        help="images for accuracy suites (BENCH_IMAGES, default 16)",
    )
    p.add_argument(
        "--device",
        default=None,
        help="torch device (BENCH_DEVICE); default: CUDA when present",
    )
    p.add_argument("--repeat", type=int, default=3, help="repeats of time_* measures")
    p.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_OUT,
        help=f"output folder (default: {DEFAULT_OUT})",
    )
    p.add_argument("--list", action="store_true", help="list the suites and exit")
    g = p.add_argument_group("accuracy pipeline (benchmarks/evaluation)")
    g.add_argument(
        "--models",
        nargs="+",
        default=None,
        help="registry models (default: every model whose files are present, "
        "plus efficientnet_lite0); 'none' with --random-weights for timing only",
    )
    g.add_argument(
        "--methods",
        nargs="+",
        default=None,
        help="methods, name[:opt=val,...]; 'quick' (default), 'thesis' or 'all'",
    )
    g.add_argument(
        "--metrics",
        nargs="+",
        default=None,
        help="metrics, name[:opt=val,...]; 'quick' (default), 'thesis' or 'all'",
    )
    g.add_argument(
        "--data",
        type=Path,
        default=None,
        help="ImageNet sample folder (default storage/imagenet_1000samples/, "
        "else the bundled photos)",
    )
    g.add_argument(
        "--limit",
        type=int,
        default=None,
        help="at most N images (default 16; all with --full)",
    )
    g.add_argument("--batch-size", type=int, default=8, help="images per batch")
    g.add_argument(
        "--metric-batch-size",
        type=int,
        default=64,
        help="perturbed images per forward pass in the metrics",
    )
    g.add_argument(
        "--saliency", action="store_true", help="save one overlay PNG per image"
    )
    g.add_argument(
        "--random-weights",
        nargs="+",
        default=[],
        metavar="MODEL",
        help="also run these registry models with random weights (timing "
        "tables only, labelled)",
    )
    g.add_argument("--no-figures", action="store_true", help="skip the figures")
    g.add_argument(
        "--report-only",
        action="store_true",
        help="regenerate tables and figures from the store, compute nothing",
    )
    return p.parse_args(argv)


def _configure(args: argparse.Namespace) -> None:
    """Options travel to the suites as environment variables (asv-compatible)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.full:
        os.environ["BENCH_FULL"] = "1"
    if args.images is not None:
        os.environ["BENCH_IMAGES"] = str(args.images)
    if args.device is not None:
        os.environ["BENCH_DEVICE"] = args.device


def tables(rows: List[dict]) -> List[Tuple[str, str, List[str], List[List[str]]]]:
    """(title, note, header, body) per suite: one row per parameter combination,
    one column per measure."""
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
        header = pnames + [f"{m} [{u}]" if u else m for m, u in measures]
        body = [
            list(k) + [_fmt(v.get(m)) for m, _ in measures] for k, v in combos.items()
        ]
        note = next((r["note"] for r in rs if r.get("note")), "")
        out.append((f"{suite} ({rs[0]['group']})", note, header, body))
    return out


def _fmt(v: Optional[float]) -> str:
    return "n/a" if v is None else f"{v:.4g}"


def markdown(tabs) -> str:
    parts = []
    for title, note, header, body in tabs:
        parts.append(f"### {title}\n")
        if note:
            parts.append(f"{note}\n")
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
                    r["measure"],
                    r["value"],
                    r["unit"],
                    r["note"],
                ]
            )


PIPELINE_OPTIONS = ("models", "methods", "metrics", "data", "limit")


def _pipeline_wanted(args: argparse.Namespace) -> bool:
    if args.suite == "timing" or args.filter:
        return False
    return args.bench is None or "evaluation" in args.bench


def _explicit_pipeline(args: argparse.Namespace) -> bool:
    return args.bench is None and any(
        getattr(args, n) is not None for n in PIPELINE_OPTIONS
    )


# retraining protocols (benchmarks/bench_<name>.py with run(args)); only on request
PROTOCOLS = ("roar", "cgc")


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parse(argv)
    from benchmarks.evaluation.options import OptionError, validate

    try:
        validate(args)  # before any model or data is loaded
    except OptionError as err:
        print(f"python -m benchmarks.run: error: {err}", file=sys.stderr)
        return 2
    _configure(args)
    protocols = [b for b in args.bench or [] if b in PROTOCOLS]
    if protocols:
        import importlib

        for name in protocols:
            rc = importlib.import_module(f"benchmarks.bench_{name}").run(args)
        args.bench = [b for b in args.bench if b not in PROTOCOLS]
        if not args.bench or rc:
            return rc
    from dataclasses import asdict

    from benchmarks._runner import discover, group_of, run_suites, save_jsonl

    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    areas = None if args.bench is None else [b for b in args.bench if b != "evaluation"]
    suites = [] if areas == [] else discover(areas)
    if args.suite != "all":
        suites = [s for s in suites if group_of(s) == args.suite]
    if args.filter:
        suites = [s for s in suites if re.search(args.filter, s.__name__)]
    if _explicit_pipeline(args):  # the pipeline replaces the asv accuracy suites
        suites = [s for s in suites if group_of(s) != "accuracy"]
    if distributed:  # timing suites are single-process measurements
        suites = []
    pipeline = _pipeline_wanted(args)
    if args.list:
        for s in suites:
            print(f"{s.__module__}.{s.__name__} [{group_of(s)}]")
        if pipeline:
            from benchmarks.evaluation.cli import describe_pipeline

            print(describe_pipeline(args))
        return 0
    if not suites and not pipeline:
        print("no suite matches the options", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    if suites and not args.report_only:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        jsonl = args.out / f"results-{stamp}.jsonl"
        print(f"running {len(suites)} suites; results stream to {jsonl}", flush=True)
        rows = [
            asdict(r)
            for r in run_suites(suites, on_row=save_jsonl(jsonl), repeat=args.repeat)
        ]
        if not rows:
            print(
                "error: no timing suite produced a measurement (see the errors above)",
                file=sys.stderr,
            )
            return 1
        tabs = tables(rows)
        md = markdown(tabs)
        (args.out / "results.md").write_text(md)
        write_csv(args.out / "results.csv", rows)
        print("\n" + md)
        print(
            f"tables written to {args.out / 'results.md'} and "
            f"{args.out / 'results.csv'}"
        )
    if pipeline:
        from benchmarks.evaluation.cli import run_pipeline

        return run_pipeline(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
