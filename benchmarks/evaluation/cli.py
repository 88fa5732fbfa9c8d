"""Command-line glue of the accuracy pipeline (called by ``benchmarks.run``)."""

from __future__ import annotations

import argparse
import contextlib
import os
import time
import warnings
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

from benchmarks.evaluation import methods as M

#: images of the default run (spread over the 1000 sample classes)
QUICK_LIMIT = 32


def _full(args: argparse.Namespace) -> bool:
    return bool(args.full or os.environ.get("BENCH_FULL"))


def expand_methods(words: Optional[List[str]], full: bool) -> List[str]:
    if not words:
        words = ["thesis"] if full else ["quick"]
    out: List[str] = []
    for w in words:
        if w == "quick":
            out += M.QUICK_METHODS + ["raw_attention", "rollout"]
        elif w == "thesis":
            out += M.THESIS_METHODS
        elif w == "all":
            out += M.method_names()
        else:
            w = M.method_word(w)
            M.method_defaults(M.parse_spec(w)[0])  # fails early on unknown names
            out.append(w)
    return list(dict.fromkeys(out))


def expand_metrics(words: Optional[List[str]], full: bool) -> List[str]:
    if not words:
        words = ["thesis"] if full else ["quick"]
    out: List[str] = []
    for w in words:
        if w == "quick":
            out += M.QUICK_METRICS
        elif w == "thesis":
            out += M.THESIS_METRICS
        elif w == "all":
            out += M.ALL_METRICS
        else:
            w = M.metric_word(w)
            if M.parse_spec(w)[0] not in M.METRICS:
                raise SystemExit(f"unknown metric {w!r}; known: {', '.join(M.METRICS)}")
            out.append(w)
    return list(dict.fromkeys(out))


def select_models(
    names: Optional[List[str]], random_weights: List[str]
) -> Tuple[List[M.ModelSpec], List[str], List[str]]:
    """(specs, notes, absent): registry models with their files present
    (pretrained), local models (``timm:NAME=PATH``, ``hf:PATH``), plus the
    ``random_weights`` ones; absent ones are listed."""
    from benchmarks.evaluation import local
    from captum_ssl.models import available, list_models

    present = available()
    words = list(names or [])
    names = None if names is None else [n for n in words if not local.is_local(n)]
    if names is None:
        wanted = list(present)
        if "efficientnet_lite0" not in wanted:
            wanted.append("efficientnet_lite0")
    elif names == ["none"]:  # only the --random-weights models (timing)
        wanted = []
    else:
        unknown = [n for n in names + random_weights if n not in list_models()]
        if unknown:
            raise SystemExit(
                f"unknown model(s) {unknown}; known: {', '.join(list_models())}"
            )
        wanted = list(names)
    specs = []
    for word in words or wanted:
        if local.is_local(word):
            try:
                specs.append(local.spec(word))
            except ValueError as err:
                raise SystemExit(f"--models {word}: {err}") from None
        elif word in wanted and word in present:
            specs.append(M.registry_model(word))
    specs += [M.registry_model(n, random_weights=True) for n in random_weights]
    absent = [
        n for n in (list_models() if names is None else wanted) if n not in present
    ]
    notes = []
    msg = M.missing_files_message(absent)
    if msg:
        notes.append(msg)
    if random_weights:
        notes.append(
            "Random-weight models (timing only, never in accuracy tables): "
            + ", ".join(random_weights)
        )
    return specs, notes, absent


def config_from_args(args: argparse.Namespace):
    from benchmarks.evaluation.pipeline import EvalConfig

    full = _full(args)
    specs, notes, absent = select_models(args.models, args.random_weights)
    limit = args.limit if args.limit is not None else args.images
    if limit is None and not full:
        limit = QUICK_LIMIT
    cfg = EvalConfig(
        models=specs,
        methods=expand_methods(args.methods, full),
        metrics=expand_metrics(args.metrics, full),
        out=args.out,
        data=args.data,
        limit=limit,
        batch_size=args.batch_size,
        metric_batch_size=args.metric_batch_size,
        device=args.device,
        saliency=args.saliency,
        figures=not args.no_figures,
        command=getattr(args, "command", None),
    )
    return cfg, notes


def describe_pipeline(args: argparse.Namespace) -> str:
    """What the command would run, then every method, metric and model as a
    table (``--list``)."""
    cfg, notes = config_from_args(args)
    models = ", ".join(
        s.name + ("" if s.weights == "pretrained" else " (random weights)")
        for s in cfg.models
    )
    lines = [
        "benchmarks.evaluation accuracy pipeline [accuracy]; this command runs:",
        f"  models: {models or 'none'}",
        f"  methods: {', '.join(cfg.methods)}",
        f"  metrics: {', '.join(cfg.metrics)}",
        f"  images: {cfg.limit or 'all'} (batch {cfg.batch_size})",
        "",
        catalogue(),
    ]
    return "\n".join(lines + notes)


def catalogue() -> str:
    """Methods, metrics and models as readable tables: the names ``--methods``,
    ``--metrics`` and ``--models`` take, the Python object each one is, its
    cost class or direction, and whether a model's weights are present."""
    from benchmarks.evaluation.summary import text_table
    from captum_ssl.models import describe, list_models

    classes = {
        **M.CAMS, **M.OTHER_CAMS, **M.ATTENTION, **M.LRP_METHODS, **M.GRADIENT
    }  # fmt: skip
    rows = []
    for name in M.method_names():
        if "+" in name:
            continue
        where = "captum.attr" if name in M.GRADIENT else "captum_ssl.attr"
        rows.append([name, f"{where}.{classes[name]}", M.cost_class(name)])
    methods = text_table(["--methods", "Python class", "cost class"], rows)
    rows = []
    for name, d in M.METRICS.items():
        opts = ", ".join(f"{k}={v}" for k, v in d.defaults.items())
        better = "higher" if M.metric_direction(name, {}) else "lower"
        rows.append(
            [name, f"captum_ssl.metrics.{d.fn_name}({opts})", better,
             str(d.passes(d.defaults, 224 * 224))]
        )  # fmt: skip
    metrics = text_table(
        ["--metrics", "Python function (defaults)", "better", "passes/image"], rows
    )
    old = ", ".join(
        f"{k} -> {v}" + "".join(f":{a}={b}" for a, b in o.items())
        for k, (v, o) in M.METRIC_ALIASES.items()
    )
    rows = []
    for name in list_models():
        info = describe(name)
        files = info["files"]
        missing = [f["filename"] for f in files if not f["present"] or f["problem"]]
        weights = "present" if not missing else "missing: " + ", ".join(missing)
        if name == "efficientnet_lite0" and not missing:
            weights = "present (installed package)"
        rows.append([name, info["architecture"], info["training"], weights])
    models = text_table(["--models", "architecture", "training", "weights"], rows)
    return "\n".join([
        "Methods (by name or by Python class; gradient methods also as "
        "NAME+smoothgrad / +smoothgrad_sq / +vargrad; cost class: what one map "
        "costs):", methods, "",
        "Metrics (perturbation AUC and ROAD directions follow mode / order):",
        metrics, f"Old metric names, still accepted with a note: {old}", "",
        "Models (weights: the checkpoint files in storage/pretrained_weights/):",
        models,
    ])  # fmt: skip


@contextlib.contextmanager
def unreadable_photos() -> Iterator[List[str]]:
    """Record the messages of ``UnreadableImageWarning`` (photos skipped because
    they cannot be read; matched by class name) while still showing them."""
    caught: List[str] = []
    shown = warnings.showwarning

    def show(message, category, *rest, **kw):
        if category.__name__ == "UnreadableImageWarning":
            caught.append(str(message))
        return shown(message, category, *rest, **kw)

    warnings.showwarning = show
    try:
        yield caught
    finally:
        warnings.showwarning = shown


def run_pipeline(args: argparse.Namespace) -> Tuple[int, Dict[str, Path], List[str]]:
    """Run (or resume) the pipeline and print its tables; returns the exit
    code, the files written and the lines for the closing summary."""
    from benchmarks.evaluation.pipeline import (
        evaluate,
        init_distributed,
        make_plan,
        report,
    )
    from benchmarks.evaluation.store import ResultStore
    from benchmarks.evaluation.summary import download_line, tables_text

    cfg, notes = config_from_args(args)
    cfg.threads = getattr(args, "threads", None)
    _, _, absent = select_models(args.models, args.random_weights)
    rank = int(os.environ.get("RANK", "0"))
    footer = [download_line(absent)]
    if rank == 0 and absent:
        print(
            f"{len(absent)} zoo models have no weights here and are left out "
            "(the files to download are listed at the end)."
        )
    if not cfg.models:
        print("accuracy: no model to evaluate (none has its pretrained weights)")
        return 0, {}, footer
    start = time.perf_counter()
    with unreadable_photos() as caught:
        cfg.unreadable = caught
        if args.report_only:
            init_distributed(cfg.device)
            with ResultStore(cfg.out / "results.sqlite") as store:
                plan = make_plan(cfg, store)
            paths = report(cfg, plan, notes) if rank == 0 else {}
        else:
            plan, paths = evaluate(cfg, notes)
    if caught:
        footer.append(
            f"Skipped {len(caught)} unreadable photo(s): " + "; ".join(caught)
        )
    if rank == 0:
        print(f"\naccuracy pipeline done in {time.perf_counter() - start:.1f} s\n")
        if plan.tables is not None:
            print(tables_text(plan.tables))
        paths = {**paths, "store": cfg.out / "results.sqlite"}
    return 0, paths, footer
