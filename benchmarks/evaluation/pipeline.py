"""The accuracy pipeline: model x method x metric over images, into the store.

For each model (its own preprocessing), batch of images, and method: the maps
are computed once, stored small (``map_size`` x ``map_size``, float16) for the
agreement tables and at their native resolution for the figures and the HTML
report, and scored by every metric (deletion / insertion keep their curves
too); each finished
(model, method, metric, image) value is committed at once. Work already in
the store under the same config key is skipped, so re-running a killed
command resumes it. Under ``torchrun`` every rank takes every ``world``-th
image and writes into the same database; rank 0 writes the report.
"""

from __future__ import annotations

import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from benchmarks.evaluation import methods as M
from benchmarks.evaluation.store import ResultStore
from captum_ssl._outputs import model_output

DB_NAME = "results.sqlite"
#: metrics whose per-image curves are stored (their value is the curve's area)
CURVE_METRICS = ("deletion_auc", "insertion_auc")


@dataclass
class EvalConfig:
    r"""Options of an evaluation run (every one that changes a value is keyed).

    Args:
        models (list[ModelSpec]): models to evaluate.
        methods (list[str]): method specs (``name[:opt=val,...]``).
        metrics (list[str]): metric specs.
        out (Path): output folder (database, tables, figures).
        data (Path, optional): ImageNet sample folder; None: the default folder,
                    falling back to the bundled photos.
        limit (int, optional): at most this many images.
        batch_size (int): images per attribution batch.
        metric_batch_size (int): perturbed images per forward pass in metrics.
        device (str, optional): torch device; default CUDA when present.
        saliency (bool): save one overlay PNG per (model, method, image).
        map_size (int): side of the small maps the agreement tables use
                    (the figures use the maps at their native resolution).
        figures (bool): write the figures, and the overlays and charts of
                    ``report.html`` (its tables and settings are always
                    written).
        figure_images (int): images per overlay grid PNG (``report.html``
                    shows every image).
        top_k (float): fraction of pixels for the top-k IoU agreement.
        fail_after (int, optional): raise after this many committed result
                    groups (tests simulate a killed run with it).
        threads (int, optional): CPU threads torch uses (default: its
                    current setting); with the device type it is part of
                    every key, so timings of different settings never mix.
        unreadable (list[str]): messages of the photos skipped as unreadable
                    during the run (filled by the caller, listed in the report).
        command (str, optional): the command line's arguments, shown in
                    ``report.html``'s settings.
    """

    models: List[M.ModelSpec]
    methods: List[str]
    metrics: List[str]
    out: Path
    data: Optional[Path] = None
    limit: Optional[int] = None
    batch_size: int = 8
    metric_batch_size: int = 64
    device: Optional[str] = None
    saliency: bool = False
    map_size: int = 28
    figures: bool = True
    figure_images: int = 4
    top_k: float = 0.2
    log: Callable[[str], None] = print
    fail_after: Optional[int] = None
    threads: Optional[int] = None
    unreadable: List[str] = field(default_factory=list)
    command: Optional[str] = None
    _committed: int = field(default=0, repr=False)


# ------------------------------------------------------------------- data


@dataclass
class Batch:
    images: Tensor  # normalised for the model
    raw: Tensor  # [0, 1] crops
    labels: Tensor  # -1 where unknown
    names: List[str]
    accepted: Optional[List[Tuple[int, ...]]] = None  # correct classes per image


def spread(names: List[str], limit: Optional[int]) -> List[str]:
    """``limit`` names evenly spaced over ``names`` (all when ``limit`` is None
    or not smaller): the first N of the 1000 sample photos would all be fish
    and birds."""
    if limit is None or limit >= len(names):
        return list(names)
    return [names[i * len(names) // limit] for i in range(limit)]


class ImageSource:
    """The images of a run: the sample folder (``limit`` photos spread evenly
    over its classes), else the bundled photos."""

    def __init__(self, data: Optional[Path], limit: Optional[int]) -> None:
        from captum_ssl.data import (
            ImageNetSamples,
            bundled_photos,
            default_imagenet_dir,
        )

        root = Path(data) if data is not None else default_imagenet_dir()
        probe = ImageNetSamples(root, model=None)
        self.limit = limit
        if len(probe):
            self.kind, self.root = "imagenet", root.resolve()
            self.names = spread(probe.names, limit)
        else:
            if data is not None:
                raise FileNotFoundError(
                    f"no <wnid>_<name>.JPEG photos in {root}: pass --data with the "
                    "ImageNet sample folder (or leave it out for the default)"
                )
            self.kind, self.root = "bundled", None
            with warnings.catch_warnings():  # the photos that can be read here
                warnings.simplefilter("ignore")
                self.names = bundled_photos(None, n=limit).names

    def key_spec(self) -> Dict[str, Any]:
        return dict(kind=self.kind, root=str(self.root) if self.root else None)

    def describe(self) -> str:
        where = self.root if self.root else "bundled photos (scikit-image, ...)"
        return f"{len(self.names)} images from {where}"

    def batches(
        self, preprocessing, names: List[str], batch_size: int
    ) -> Iterator[Batch]:
        from captum_ssl.data import ImageNetSamples, bundled_photos

        if not names:
            return
        if self.kind == "bundled":
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                p = bundled_photos(preprocessing, names=names)
            for s in range(0, len(names), batch_size):
                sl = slice(s, s + batch_size)
                yield Batch(
                    p.images[sl], p.raw[sl], p.labels[sl], p.names[sl], p.accepted[sl]
                )
            return
        data = ImageNetSamples(self.root, model=preprocessing)
        data.select(names)  # by the photos' ids (distinct also for x.JPEG / x.jpg)
        for b in data.batches(batch_size):
            yield Batch(b.images, b.raw, b.labels, b.names, b.accepted)


# ------------------------------------------------------------ distribution


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    device: Optional[str] = None

    @property
    def active(self) -> bool:
        return self.world > 1

    def barrier(self) -> None:
        if self.active:
            import torch.distributed as dist

            dist.barrier()


def init_distributed(device: Optional[str]) -> Dist:
    """Join the ``torchrun`` process group when launched by it (gloo on the
    CPU, nccl with one GPU per rank)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist(device=device)
    import torch.distributed as dist

    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available() and (device is None or device.startswith("cuda"))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    if cuda:
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    return Dist(dist.get_rank(), dist.get_world_size(), device or "cpu")


# ---------------------------------------------------------------- the plan


@dataclass
class Plan:
    """Config keys of everything a run produces, by (model, method, metric)."""

    version: Dict[str, str]
    source: ImageSource
    model_keys: Dict[str, str] = field(default_factory=dict)
    map_keys: Dict[Tuple[str, str], str] = field(default_factory=dict)
    native_keys: Dict[Tuple[str, str], str] = field(default_factory=dict)
    result_keys: Dict[Tuple[str, str, str], str] = field(default_factory=dict)
    timing_keys: Dict[Tuple[str, str, str], str] = field(default_factory=dict)
    methods: Dict[str, Tuple[str, Dict[str, Any]]] = field(default_factory=dict)
    metrics: Dict[str, Tuple[str, Dict[str, Any]]] = field(default_factory=dict)
    skipped: List[Tuple[str, str, str]] = field(default_factory=list)
    model_specs: List[M.ModelSpec] = field(default_factory=list)
    runtime: Dict[str, Any] = field(default_factory=dict)
    tables: Optional[Dict[str, Any]] = None
    reused: Tuple[int, int] = (0, 0)

    def keys(self) -> List[str]:
        return (
            list(self.model_keys.values())
            + list(self.map_keys.values())
            + list(self.native_keys.values())
            + list(self.result_keys.values())
            + list(self.timing_keys.values())
        )


def runtime(cfg: EvalConfig, device: Optional[str] = None) -> Dict[str, Any]:
    """The device type and CPU thread count of a run (part of every key)."""
    name = device or cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return dict(
        device=torch.device(name).type, threads=cfg.threads or torch.get_num_threads()
    )


def make_plan(
    cfg: EvalConfig, store: ResultStore, device: Optional[str] = None
) -> Plan:
    version = M.code_version()
    keyed_version = {k: version[k] for k in ("version", "source_sha256", "torch")}
    source = ImageSource(cfg.data, cfg.limit)
    plan = Plan(version, source, model_specs=list(cfg.models))
    plan.runtime = runtime(cfg, device)
    for text in cfg.methods:
        name, opts = M.parse_spec(M.method_word(text))
        full = {**M.method_defaults(name), **opts}
        plan.methods[M.spec_label(name, opts, M.method_defaults(name))] = (name, full)
    for text in cfg.metrics:
        name, opts = M.metric_spec(text)
        if name not in M.METRICS:
            raise ValueError(f"unknown metric {name!r}; known: {', '.join(M.METRICS)}")
        full = {**M.METRICS[name].defaults, **opts}
        if name in ("deletion_auc", "insertion_auc"):
            full.setdefault("score", "probability")
        M.metric_direction(name, opts)  # validates options
        plan.metrics[M.spec_label(name, opts, M.METRICS[name].defaults)] = (name, full)
    for spec in cfg.models:
        mk = dict(
            code=keyed_version,
            data=source.key_spec(),
            model=spec.key_spec(),
            architecture=spec.architecture,
            training=spec.training,
            family=spec.family,
            runtime=plan.runtime,
        )
        plan.model_keys[spec.name] = store.register("model", {**mk, "what": "top1"})
        for mlabel, (mname, mopts) in plan.methods.items():
            reason = M.applies(mname, spec)
            if reason:
                plan.skipped.append((spec.name, mlabel, reason))
                continue
            method = dict(name=mname, options=M.identity(mopts))
            plan.map_keys[spec.name, mlabel] = store.register(
                "map", {**mk, "method": method, "map_size": cfg.map_size}
            )
            plan.native_keys[spec.name, mlabel] = store.register(
                "map", {**mk, "method": method, "map_size": "native"}
            )
            plan.timing_keys[spec.name, mlabel, ""] = store.register(
                "timing", {**mk, "method": method, "what": "attribution"}
            )
            for xlabel, (xname, xopts) in plan.metrics.items():
                used, why = M.metric_options(spec, xname, xopts)
                if used is None:
                    if (spec.name, xlabel, why) not in plan.skipped:
                        plan.skipped.append((spec.name, xlabel, why))
                    continue
                full = {
                    **mk,
                    "method": method,
                    "metric": dict(name=xname, options=M.identity(used)),
                }
                plan.result_keys[spec.name, mlabel, xlabel] = store.register(
                    "result", full
                )
                plan.timing_keys[spec.name, mlabel, xlabel] = store.register(
                    "timing", {**full, "what": "metric"}
                )
    return plan


# ----------------------------------------------------------------- running


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], Any], device: torch.device) -> Tuple[Any, float, Any]:
    """``(result, seconds, peak MiB)``. Peak memory is measured on CUDA only
    (allocator peak above what was in use); on the CPU resetting the resident
    set's peak slows the timed call down, so it is left out (None)."""
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    start = time.perf_counter()
    out = fn()
    _sync(device)
    seconds = time.perf_counter() - start
    peak = None
    if device.type == "cuda":
        peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    return out, seconds, peak


def _correct(pred: int, label: int, accepted: Tuple[int, ...]) -> float:
    """Top-1 correctness against the accepted classes (NaN if none is known)."""
    ok = tuple(accepted) or ((label,) if label >= 0 else ())
    return float(pred in ok) if ok else float("nan")


def _warm_up(explainers, plan, x, t) -> None:
    """One untimed call per method on one image (not the perturbation CAMs,
    whose single call already costs one pass per channel)."""
    for mlabel, explain in explainers.items():
        if plan.methods[mlabel][0] not in M.PERTURBATION_CAMS:
            explain(x, t)


def _forward_seconds(model, x: Tensor, device: torch.device, repeat: int = 3) -> float:
    """Median time of a no-grad forward pass of the batch (the cost unit)."""
    import statistics

    with torch.no_grad():
        return statistics.median(
            _timed(partial(model, x), device)[1] for _ in range(repeat)
        )


def _metric_forward(model, x: Tensor, cfg: EvalConfig, device) -> float:
    """Seconds per image of a no-grad forward at the metrics' batch size
    (metrics evaluate perturbed copies ``metric_batch_size`` at a time)."""
    n = max(1, min(cfg.metric_batch_size, 64))
    reps = -(-n // x.shape[0])
    big = x.repeat(reps, 1, 1, 1)[:n]
    with torch.no_grad():
        model(big)  # warm-up at this batch size
        return _timed(partial(model, big), device)[1] / n


def small_maps(maps: Tensor, size: int, hw: Tuple[int, int]) -> np.ndarray:
    """``(B, 1, h, w)`` -> ``(B, size, size)``: bilinear to the input, area down."""
    from captum_ssl.viz import upsample

    full = upsample(maps.detach().float(), hw)
    return F.adaptive_avg_pool2d(full, size)[:, 0].cpu().numpy()


def run(
    cfg: EvalConfig, dist: Optional[Dist] = None, progress: Optional[Progress] = None
) -> Plan:
    """Compute everything of ``cfg`` not yet in the store; return the plan.
    A line is logged at least every :data:`QUIET_SECONDS` while it works."""
    dist = dist or Dist(device=cfg.device)
    if progress is not None:
        return _run(cfg, dist, progress)
    with Progress(cfg.log if dist.rank == 0 else (lambda s: None)) as progress:
        return _run(cfg, dist, progress)


def _run(cfg: EvalConfig, dist: Dist, progress: Progress) -> Plan:
    from captum_ssl.metrics import class_probability

    device = torch.device(
        dist.device or cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    )
    log = progress.say
    progress.now("reading the results store and the photo list")
    cfg.out.mkdir(parents=True, exist_ok=True)
    store = ResultStore(cfg.out / DB_NAME)
    plan = make_plan(cfg, store, str(device))
    names = plan.source.names[dist.rank :: dist.world]
    log(
        f"accuracy: {len(cfg.models)} models x {len(plan.methods)} methods x "
        f"{len(plan.metrics)} metrics over {plan.source.describe()}"
        + (f", {dist.world} processes" if dist.active else "")
        + f"; store {store.path}"
    )
    for model_name, mlabel, reason in plan.skipped:
        log(f"  skip {model_name} / {mlabel}: {reason}")
    plan.reused = reused(store, plan, names)
    if plan.reused[0]:
        log(
            f"reusing {plan.reused[0]} of {plan.reused[1]} metric values already in "
            f"{store.path} (same code, options, data, device and threads); "
            "computing the rest"
        )
    todos = {spec.name: _todo(store, plan, spec.name, names) for spec in cfg.models}
    progress.total = sum(  # (batch x method) steps
        -(-len(todo) // cfg.batch_size) * sum(m == name for m, _ in plan.map_keys)
        for name, todo in todos.items()
    )
    for i, spec in enumerate(cfg.models, 1):
        todo = todos[spec.name]
        if not todo:
            log(f"[model {i}/{len(cfg.models)}] {spec.name}: all done (from the store)")
            continue
        log(
            f"[model {i}/{len(cfg.models)}] {spec.name} ({spec.architecture}, "
            f"{spec.training}, {spec.weights} weights): {len(todo)} images to do"
        )
        progress.now(f"loading {spec.name}")
        model = spec.build().to(device).eval()
        explainers = {
            mlabel: M.build_method(mname, mopts, model, spec)
            for mlabel, (mname, mopts) in plan.methods.items()
            if (spec.name, mlabel) in plan.map_keys
        }
        mkey = plan.model_keys[spec.name]
        metric_fwd: Optional[float] = None
        done_top1 = store.done(mkey)
        nb = -(-len(todo) // cfg.batch_size)
        ordered = [n for n in names if n in todo]
        for b, batch in enumerate(
            plan.source.batches(spec.preprocessing, ordered, cfg.batch_size), 1
        ):
            progress.now(f"{spec.name} batch {b}/{nb}: predictions and timing")
            x = batch.images.to(device)
            labels = batch.labels
            with torch.no_grad():
                if spec.target:  # a backbone: its references, its targets
                    t_dev = M.backbone_targets(model, spec, x)
                logits = model_output(model(x))  # also the warm-up
                fwd = _forward_seconds(model, x, device)
                if metric_fwd is None:  # per image, at the metrics' batch size
                    metric_fwd = _metric_forward(model, x, cfg, device)
            if spec.target:  # no classes: nothing predicted, no top-1
                target = t_dev.cpu()
            else:
                prob_pred, pred = logits.softmax(1).max(1)
                pred, prob_pred = pred.cpu(), prob_pred.cpu()
                target = torch.where(labels >= 0, labels, pred)
                t_dev = target.to(device)
            if b == 1:  # first calls allocate; keep them out of the timings
                _warm_up(explainers, plan, x[:1], t_dev[:1])
            accepted = batch.accepted or [(int(v),) if v >= 0 else () for v in labels]
            if any(n not in done_top1 for n in batch.names):
                # the score of the target: class probability, or the
                # backbone's similarity / norm (M.metric_options)
                score = M.metric_options(spec, "class_probability", {})[0] or {}
                prob = class_probability(model, x, None, t_dev, **score).cpu()
                rows = [
                    (n, int(t), int(lab), float(p))
                    for n, t, lab, p in zip(batch.names, target, labels, prob)
                ]
                store.add_results(mkey, spec.name, "(image)", "probability", rows)
            if not spec.target and any(n not in done_top1 for n in batch.names):
                store.add_results(
                    mkey + ":pred",
                    spec.name,
                    "(image)",
                    "predicted",
                    [
                        (n, int(p), int(lab), float(pp))
                        for n, p, lab, pp in zip(batch.names, pred, labels, prob_pred)
                    ],
                )
                store.add_results(
                    mkey + ":top1",
                    spec.name,
                    "(image)",
                    "top1",
                    [
                        (n, int(t), int(lab), _correct(int(p), int(lab), ok))
                        for n, t, lab, p, ok in zip(
                            batch.names, target, labels, pred, accepted
                        )
                    ],
                )
            shown = []
            for mlabel, explain in explainers.items():
                progress.now(f"{spec.name} batch {b}/{nb}: {mlabel} and its metrics")
                s = _method_batch(
                    cfg, store, plan, spec, mlabel, explain, model, batch, x,
                    target, t_dev, (fwd, metric_fwd), device, dist.rank,
                )  # fmt: skip
                if s is not None:
                    shown.append(f"{mlabel} {s:.1f}s")
                progress.tick()
            log(
                f"  {spec.name} batch {b}/{nb} ({len(batch.names)} images, "
                f"forward {fwd:.2f}s): " + ", ".join(shown) + progress.status()
            )
            sys.stdout.flush()
        if (
            cfg.figures
            and dist.rank == 0
            and spec.is_vit
            and spec.weights == "pretrained"
        ):
            from benchmarks.evaluation.figures import vit_layer_figure

            progress.now(f"{spec.name}: per-layer figure")
            first = plan.source.names[: min(2, len(plan.source.names))]
            for batch in plan.source.batches(spec.preprocessing, first, len(first)):
                vit_layer_figure(model, batch, spec, cfg.out / "figures", device)
        model = explainers = None  # free before the next model
    dist.barrier()
    store.close()
    return plan


#: longest silence of a run: a "still working" line comes after this long
QUIET_SECONDS = 8.0


class Progress:
    """Elapsed time and an estimate of what is left, in (batch x method)
    steps; while active (``with``), a line naming the current step whenever
    nothing was logged for :data:`QUIET_SECONDS`."""

    def __init__(self, log: Callable[[str], None], total: int = 0) -> None:
        import threading

        self.log, self.total, self.done = log, total, 0
        self.start = self.last = time.perf_counter()
        self.doing = "starting"
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, daemon=True)

    def __enter__(self) -> Progress:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()

    def say(self, line: str) -> None:
        with self._lock:
            self.log(line)
            sys.stdout.flush()
            self.last = time.perf_counter()

    def now(self, doing: str) -> None:
        """Name the step under way (shown by the "still working" lines)."""
        self.doing = doing

    def tick(self) -> None:
        self.done += 1

    def left(self) -> str:
        spent = time.perf_counter() - self.start
        if not self.done or not self.total:
            return f"{spent:.0f} s elapsed, time left estimated after the first step"
        left = spent / self.done * max(self.total - self.done, 0)
        return f"{spent:.0f} s elapsed, about {left:.0f} s left"

    def status(self) -> str:
        return f" [{self.done}/{max(self.total, 1)} steps, {self.left()}]"

    def _beat(self) -> None:
        while not self._stop.wait(0.5):
            if time.perf_counter() - self.last >= QUIET_SECONDS:
                self.say(f"  ... {self.doing} ({self.left()})")


def reused(store: ResultStore, plan: Plan, names: List[str]) -> Tuple[int, int]:
    """(metric values already in the store, metric values of the run)."""
    wanted = set(names)
    done = sum(len(store.done(k) & wanted) for k in plan.result_keys.values())
    return done, len(plan.result_keys) * len(wanted)


def _todo(store: ResultStore, plan: Plan, model: str, names: List[str]) -> set:
    need = set()
    wanted = set(names)
    need |= wanted - store.done(plan.model_keys[model])
    for (m, mlabel), key in plan.map_keys.items():
        if m != model:
            continue
        need |= wanted - store.done(key, "maps")
        need |= wanted - store.done(plan.native_keys[m, mlabel], "maps")
        for (m2, ml2, _), rkey in plan.result_keys.items():
            if m2 == model and ml2 == mlabel:
                need |= wanted - store.done(rkey)
    return need


def _method_batch(
    cfg, store, plan, spec, mlabel, explain, model, batch, x, target, t_dev, fwd,
    device, rank,
) -> Optional[float]:  # fmt: skip
    from captum_ssl.metrics._common import normalized_auc
    from captum_ssl.viz import as_map

    mkey = plan.map_keys[spec.name, mlabel]
    rkeys = {
        xlabel: plan.result_keys[spec.name, mlabel, xlabel]
        for xlabel in plan.metrics
        if (spec.name, mlabel, xlabel) in plan.result_keys
    }
    nkey = plan.native_keys[spec.name, mlabel]
    done_map = store.done(mkey, "maps") & store.done(nkey, "maps")
    done = {xl: store.done(k) for xl, k in rkeys.items()}
    idx = [
        i
        for i, n in enumerate(batch.names)
        if n not in done_map or any(n not in d for d in done.values())
    ]
    if not idx:
        return None
    sel = torch.tensor(idx)
    xs, ts = x[sel.to(device)], t_dev[sel.to(device)]
    names = [batch.names[i] for i in idx]
    labels = batch.labels[sel]
    maps, seconds, peak = _timed(lambda: explain(xs, ts), device)
    maps = maps.detach()
    fwd, metric_fwd = fwd
    fwd_sub = fwd * len(idx) / len(batch.names)
    store.add_timing(
        plan.timing_keys[spec.name, mlabel, ""], names, model=spec.name,
        method=mlabel, seconds=seconds, forward_seconds=fwd_sub, peak_mib=peak,
        device=str(device), weights=spec.weights, rank=rank,
    )  # fmt: skip
    hw = tuple(x.shape[-2:])
    store.add_maps(mkey, spec.name, mlabel, names, small_maps(maps, cfg.map_size, hw))
    native = as_map(maps.float())[:, 0].cpu().numpy()
    store.add_maps(nkey, spec.name, mlabel, names, native)
    if cfg.saliency:
        from benchmarks.evaluation.figures import safe_name, save_saliency

        folder = cfg.out / "saliency" / safe_name(spec.name) / safe_name(mlabel)
        save_saliency(folder, batch, idx, maps, mlabel)
    total = seconds
    for xlabel, (xname, xopts) in plan.metrics.items():
        if xlabel not in rkeys:  # does not apply to this model (the plan says)
            continue
        todo = [j for j, n in enumerate(names) if n not in done[xlabel]]
        if not todo:
            continue
        j = torch.tensor(todo, device=device)
        fn = M.metric_function(xname)
        opts = dict(M.metric_options(spec, xname, xopts)[0] or xopts)
        opts.setdefault("batch_size", cfg.metric_batch_size)
        curve = xname in CURVE_METRICS  # keep the curve, its area is the value
        if curve:
            opts["return_curve"] = True
        run_metric = partial(fn, model, xs[j], maps[j], ts[j], **opts)
        values, secs, _ = _timed(run_metric, device)
        values = values.detach().float().cpu()
        if curve:
            store.add_curves(rkeys[xlabel], [names[k] for k in todo], values.numpy())
            values = normalized_auc(values)
        rows = [
            (names[k], int(ts[k]), int(labels[k]), float(v))
            for k, v in zip(todo, values)
        ]
        store.add_results(rkeys[xlabel], spec.name, mlabel, xlabel, rows, rank)
        store.add_timing(
            plan.timing_keys[spec.name, mlabel, xlabel], [names[k] for k in todo],
            model=spec.name, method=mlabel, metric=xlabel, seconds=secs,
            forward_seconds=metric_fwd * len(todo), peak_mib=None,
            device=str(device), weights=spec.weights, rank=rank,
        )  # fmt: skip
        total += secs
        cfg._committed += 1
        if cfg.fail_after is not None and cfg._committed >= cfg.fail_after:
            raise KeyboardInterrupt(f"simulated kill after {cfg._committed} commits")
    return total


def report(cfg: EvalConfig, plan: Plan, notes: List[str] = ()) -> Dict[str, Path]:
    """Tables and figures of the plan's keys, regenerated from the store."""
    from benchmarks.evaluation import figures, tables
    from benchmarks.evaluation.report import write_run_report

    with ResultStore(cfg.out / DB_NAME) as store:
        tabs = tables.build_tables(store, plan, cfg.top_k)
        plan.tables = tabs
        v = plan.version
        rt = plan.runtime
        head = [
            f"Code: captum_ssl {v['version']} (sources {v['source_sha256']}"
            + (f", commit {v['commit']}" if v.get("commit") else "")
            + f"), torch {v['torch']}; data: {plan.source.describe()}; "
            f"device: {rt.get('device')}, {rt.get('threads')} CPU threads.",
        ]
        if cfg.unreadable:
            head.append(
                f"Skipped {len(cfg.unreadable)} unreadable photo(s): "
                + "; ".join(cfg.unreadable)
            )
        paths = tables.write_tables(tabs, cfg.out, list(head) + list(notes), plan)
        paths["per_image"] = tables.write_per_image(
            store, plan, cfg.out / "accuracy_per_image.csv"
        )
        sections: List[Any] = []
        charts: List[Path] = []
        if cfg.figures:
            fig_dir = cfg.out / "figures"
            order = list(plan.methods)
            sections = figures.stored_overlays(store, plan)
            grids = figures.overlay_grids(sections, fig_dir, cfg.figure_images)
            bars = figures.bar_charts(tabs, fig_dir, order)
            curves = figures.curve_charts(
                figures.stored_curves(store, plan), fig_dir, plan
            )
            charts = [p for p in bars + curves if p.suffix == ".png"]
            for i, p in enumerate(grids + bars + curves):
                paths[f"figure{i}"] = p
            for spec in plan.model_specs:  # drawn during the run (ViTs)
                p = fig_dir / f"{figures.safe_name(spec.name)}_attention_layers.png"
                if p.is_file():
                    paths[f"layers_{spec.name}"] = p
        if cfg.saliency and (cfg.out / "saliency").is_dir():
            paths["saliency"] = cfg.out / "saliency"  # one PNG per image
        paths["html"] = write_run_report(
            cfg, plan, tabs, sections, charts, list(head) + list(notes)
        )
    return paths


def evaluate(cfg: EvalConfig, notes: List[str] = ()) -> Tuple[Plan, Dict[str, Path]]:
    """Run (or resume) and, on rank 0, write the report. Under ``torchrun``
    each process calls this; images are split across ranks."""
    dist = init_distributed(cfg.device)
    paths: Dict[str, Path] = {}
    with Progress(cfg.log if dist.rank == 0 else (lambda s: None)) as progress:
        plan = run(cfg, dist, progress)
        if dist.rank == 0:
            progress.now("writing the tables and figures")
            paths = report(cfg, plan, notes)
    dist.barrier()
    if dist.active:
        import torch.distributed as tdist

        tdist.destroy_process_group()
    return plan, paths
