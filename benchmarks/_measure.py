"""Measurement helpers shared by every suite: timing, peak memory, devices."""

from __future__ import annotations

import contextlib
import os
import statistics
import time
from typing import Callable, Iterator

import torch


def default_device() -> torch.device:
    """``BENCH_DEVICE`` if set, else CUDA when present, else CPU."""
    name = os.environ.get("BENCH_DEVICE")
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_time(
    fn: Callable[[], object],
    device: torch.device,
    repeat: int = 3,
    warmup: int = 1,
) -> float:
    """Median wall time of ``fn()`` in seconds over ``repeat`` runs."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def best_times(fns, device: torch.device, repeat: int = 3, warmup: bool = True):
    """Fastest of ``repeat`` runs of each function, in seconds, run in turns.

    ``fns`` is a list or a dict of callables; the result has the same shape.
    Interleaving the runs (one warm-up each) and keeping the fastest makes a
    ratio of two timings fair on a machine that other processes share.
    """
    items = list(fns.items()) if isinstance(fns, dict) else list(enumerate(fns))
    if warmup:
        for _, fn in items:
            fn()
    best = {k: float("inf") for k, _ in items}
    for _ in range(repeat):
        for k, fn in items:
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            best[k] = min(best[k], time.perf_counter() - start)
    return best if isinstance(fns, dict) else [best[k] for k, _ in items]


def no_grad_forward(model: torch.nn.Module, x: torch.Tensor) -> Callable[[], object]:
    """One plain forward pass of ``x`` under ``torch.no_grad`` (the reference)."""

    def run() -> object:
        with torch.no_grad():
            return model(x)

    return run


def forward_time(model: torch.nn.Module, x: torch.Tensor, repeat: int = 3) -> float:
    """Median time of one plain forward pass (``torch.no_grad``) of ``x``."""

    def run() -> None:
        with torch.no_grad():
            model(x)

    return median_time(run, x.device, repeat=repeat)


def _rss_hwm_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


@contextlib.contextmanager
def peak_memory(device: torch.device) -> Iterator[dict]:
    """Peak memory (MiB) used by the block above what was in use before it.

    CUDA: ``torch.cuda.max_memory_allocated``. CPU (Linux): the process's peak
    resident set, reset through ``/proc/self/clear_refs``; memory the allocator
    kept from earlier work hides part of the peak, so the runner measures CPU
    ``peakmem_*`` in a fresh process (see ``benchmarks._peakmem``).
    """
    out: dict = {}
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        yield out
        sync(device)
        out["mib"] = (torch.cuda.max_memory_allocated(device) - base) / 2**20
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    base = _rss_mib()
    yield out
    out["mib"] = max(0.0, _rss_hwm_mib() - base)


class RatioSuite:
    """A suite whose ``setup`` sets ``self.fns = {"method": ..., "baseline":
    ...}`` and ``self.device``: ``track_ratio`` is method time / baseline
    time (fastest of ``repeat`` runs each, in turns: :func:`best_times`),
    measured once per setup."""

    repeat = 3
    fns: dict
    device: torch.device

    def _measure(self) -> dict:
        if getattr(self, "_times", None) is None:
            self._times = best_times(self.fns, self.device, self.repeat)
        return self._times

    def track_ratio(self, *params: object) -> float:
        """Method time / baseline time."""
        t = self._measure()
        return t["method"] / t["baseline"]

    track_ratio.unit = "x baseline"  # type: ignore[attr-defined]
