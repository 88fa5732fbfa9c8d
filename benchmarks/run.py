r"""The main job: the accuracy tables first, the timing suites on request.

    python -m benchmarks.run                  # default: accuracy tables + cost table
    python -m benchmarks.run --suite timing   # the timing suites (comparisons, memory)
    python -m benchmarks.run --full           # everything, full grids (thesis steps)
    python -m benchmarks.run --explain photo.jpg [--models ...] [--methods ...]
    python -m benchmarks.run --suite accuracy --models res_50 moco_v3_res_50 \
        --methods thesis --metrics thesis --data storage/imagenet_1000samples
    torchrun --nproc_per_node=2 -m benchmarks.run --suite accuracy ...
    python -m benchmarks.run --bench roar       # ROAR / KAR with retraining (digits)
    python -m benchmarks.run --bench cgc        # CGC fine-tuning of EfficientNet-Lite0

Default run: the accuracy pipeline (``benchmarks/evaluation``) on the real
EfficientNet-Lite0 and every zoo model whose files are in
storage/pretrained_weights/, over the ImageNet sample photos in
storage/imagenet_1000samples/ (else the bundled photos), then a cost table
(each method's time in forward passes of its model). Every finished value goes
at once into ``results.sqlite`` in the output folder; re-running the same
command reuses it. The tables are printed at the end and written as
``accuracy.md`` / ``.json`` / ``accuracy_*.csv`` (``accuracy_per_image.csv``:
one row per model, method, metric and image), figures (PNG + SVG) into
``figures/``.

Timing suites (asv-style classes in ``benchmarks/bench_*.py``, with --suite
timing, --suite all, --bench or --full): every finished measurement is
appended at once to ``results-<stamp>.jsonl`` and the tables are written as
``results.md`` / ``results.csv``.

Methods and metrics take options as ``name:option=value,...``; the words
``quick``, ``thesis`` and ``all`` stand for sets of them.
"""

from __future__ import annotations

import time

_T0 = time.perf_counter()  # wall time counts imports too

import argparse  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import shlex  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Dict, List, Optional, Sequence  # noqa: E402

from benchmarks._report import markdown, tables, write_csv  # noqa: E402
from benchmarks.evaluation.cli import QUICK_LIMIT  # noqa: E402

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
        default=None,
        help="timing: the timing suites; accuracy: the accuracy pipeline and "
        "suites; all: both. Default: the accuracy pipeline and its cost table "
        "(all with --full, --bench or --filter)",
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
        help="images for the asv-style accuracy suites (BENCH_IMAGES, default "
        "16); also the pipeline's --limit when that is not given",
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
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads for torch (default: torch's, one per core); recorded "
        "with every result",
    )
    p.add_argument("--list", action="store_true", help="list the suites and exit")
    p.add_argument(
        "--explain",
        nargs="+",
        type=Path,
        default=None,
        metavar="IMAGE",
        help="explain these image files: one figure (models x methods) and the "
        "top classes; with --models and --methods",
    )
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
        help=f"at most N images (default {QUICK_LIMIT}; all with --full)",
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
    args = p.parse_args(argv)
    # the command as typed, for the report's settings
    args.command = shlex.join(sys.argv[1:] if argv is None else list(argv))
    return args


def _configure(args: argparse.Namespace) -> None:
    """Options travel to the suites as environment variables (asv-compatible);
    the thread count is set once, here, and recorded in ``args.threads``."""
    import torch

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.full:
        os.environ["BENCH_FULL"] = "1"
    if args.images is not None:
        os.environ["BENCH_IMAGES"] = str(args.images)
    if args.device is not None:
        os.environ["BENCH_DEVICE"] = args.device
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    args.threads = torch.get_num_threads()


PIPELINE_OPTIONS = ("models", "methods", "metrics", "data", "limit")


def _mode(args: argparse.Namespace) -> str:
    """``"default"`` (the accuracy pipeline and its cost table only), or the
    ``--suite`` given (``all`` when --full, --bench or --filter ask for suites)."""
    if args.suite is not None:
        return args.suite
    if args.full or args.bench is not None or args.filter:
        return "all"
    return "default"


def _pipeline_wanted(args: argparse.Namespace) -> bool:
    if _mode(args) == "timing" or args.filter:
        return False
    return args.bench is None or "evaluation" in args.bench


def _explicit_pipeline(args: argparse.Namespace) -> bool:
    return args.bench is None and any(
        getattr(args, n) is not None for n in PIPELINE_OPTIONS
    )


def _select_suites(args: argparse.Namespace) -> List[type]:
    from benchmarks._runner import discover, group_of

    mode = _mode(args)
    if mode == "default" or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return []  # timing suites are single-process measurements
    areas = None if args.bench is None else [b for b in args.bench if b != "evaluation"]
    suites = [] if areas == [] else discover(areas)
    if mode != "all":
        suites = [s for s in suites if group_of(s) == mode]
    if args.filter:
        suites = [s for s in suites if re.search(args.filter, s.__name__)]
    if _explicit_pipeline(args):  # the pipeline replaces the asv accuracy suites
        suites = [s for s in suites if group_of(s) != "accuracy"]
    return suites


def _run_timing(
    args: argparse.Namespace, suites: List[type]
) -> Optional[Dict[str, Path]]:
    """Run the timing suites; their files, or None when none measured anything."""
    from dataclasses import asdict

    from benchmarks._measure import default_device
    from benchmarks._report import conditions
    from benchmarks._runner import run_suites, save_jsonl

    start = time.perf_counter()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    jsonl = args.out / f"results-{stamp}.jsonl"
    print(f"running {len(suites)} timing suites; results stream to {jsonl}", flush=True)
    rows = [
        asdict(r)
        for r in run_suites(suites, on_row=save_jsonl(jsonl), repeat=args.repeat)
    ]
    if not rows:
        print(
            "error: no timing suite produced a measurement (see the errors above)",
            file=sys.stderr,
        )
        return None
    seconds = time.perf_counter() - start
    head = [conditions(str(default_device()), args.threads, seconds)]
    md = markdown(tables(rows, {s.__name__: s for s in suites}), head)
    paths = {"timing_md": args.out / "results.md"}
    paths["timing_csv"] = args.out / "results.csv"
    paths["timing_md"].write_text(md)
    write_csv(paths["timing_csv"], rows)
    paths["timing_jsonl"] = jsonl
    print("\n" + md, flush=True)
    return paths


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
    if not args.list and int(os.environ.get("RANK", "0")) == 0:
        print(
            f"python -m benchmarks.run: started {time.perf_counter() - _T0:.1f} s "
            "ago; progress lines follow (at least one every 10 s, with the time "
            "left once the first step is measured)",
            flush=True,
        )
    protocols = [b for b in args.bench or [] if b in PROTOCOLS]
    if protocols:
        import importlib

        _configure(args)
        for name in protocols:
            rc = importlib.import_module(f"benchmarks.bench_{name}").run(args)
            if rc:
                return rc
        args.bench = [b for b in args.bench if b not in PROTOCOLS]
        if not args.bench:
            return 0
    from benchmarks.evaluation.store import StoreError

    try:
        return _main(args)
    except StoreError as err:  # a damaged store, a full disk: one line
        print(f"python -m benchmarks.run: error: {err}", file=sys.stderr)
        return 1


def _main(args: argparse.Namespace) -> int:
    start = min(_T0, time.perf_counter())
    _configure(args)
    if args.explain is not None:
        from benchmarks.evaluation.explain import explain_files

        return explain_files(args)
    suites = _select_suites(args)
    pipeline = _pipeline_wanted(args)
    if args.list:
        from benchmarks._runner import group_of

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
    written: Dict[str, Path] = {}
    footer: List[str] = []
    code = 0
    if pipeline:
        from benchmarks.evaluation.cli import run_pipeline

        code, paths, footer = run_pipeline(args)
        written.update(paths)
    if suites and not args.report_only:
        timing = _run_timing(args, suites)
        if timing is None:
            code = 1
        else:
            written.update(timing)
    if int(os.environ.get("RANK", "0")) == 0:
        from benchmarks.evaluation.summary import closing

        print(closing(written, time.perf_counter() - start, footer), flush=True)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
