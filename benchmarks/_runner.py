"""The plain runner of asv-style suites.

A suite is a class with ``params`` / ``param_names`` (the grid), ``setup(*p)``
(raise ``NotImplementedError`` to skip a combination) and measurement methods:
``time_*`` (timed, median of repeats), ``peakmem_*`` (peak memory of one call,
MiB) and ``track_*`` (returns a number; ``unit`` attribute optional). The same
classes run under ``asv run``; this runner adds progress, incremental saving and
tables.
"""

from __future__ import annotations

import importlib
import inspect
import itertools
import json
import pkgutil
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional

from benchmarks._measure import default_device, median_time, peak_memory


@dataclass
class Row:
    """One measurement: a suite, its parameters, a measure and its value."""

    suite: str
    params: Dict[str, Any]
    measure: str
    value: Optional[float]
    unit: str
    kind: str  # "time", "peakmem" or "track"
    group: str  # "timing" or "accuracy"
    note: str = ""


def discover(names: Optional[Iterable[str]] = None) -> List[type]:
    """Suite classes of ``benchmarks/bench_*.py`` (optionally only ``names``)."""
    import benchmarks

    wanted = set(names) if names else None
    suites = []
    for mod in sorted(pkgutil.iter_modules(benchmarks.__path__), key=lambda m: m.name):
        if not mod.name.startswith("bench_"):
            continue
        area = mod.name[len("bench_") :]
        if wanted is not None and area not in wanted:
            continue
        module = importlib.import_module(f"benchmarks.{mod.name}")
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if cls.__module__ == module.__name__ and _measures(cls):
                suites.append(cls)
    return suites


def _measures(cls: type) -> List[str]:
    return [
        n
        for n in dir(cls)
        if n.startswith(("time_", "peakmem_", "track_")) and callable(getattr(cls, n))
    ]


def group_of(cls: type) -> str:
    return getattr(cls, "group", "timing")


def grid(cls: type) -> List[Dict[str, Any]]:
    params = getattr(cls, "params", [])
    names = list(getattr(cls, "param_names", []))
    if params and not isinstance(params[0], (list, tuple)):
        params = [params]
    names += [f"p{i}" for i in range(len(names), len(params))]
    return [dict(zip(names, combo)) for combo in itertools.product(*params)]


def run_suites(
    suites: List[type],
    on_row=None,
    log=print,
    repeat: int = 3,
) -> List[Row]:
    """Run every combination of every suite; ``on_row`` sees each finished row."""
    device = default_device()
    rows: List[Row] = []
    plan = [(cls, p) for cls in suites for p in grid(cls)]
    began = time.perf_counter()
    for i, (cls, params) in enumerate(plan, 1):
        label = f"{cls.__name__}({', '.join(str(v) for v in params.values())})"
        spent = time.perf_counter() - began
        eta = (
            f", about {spent / (i - 1) * (len(plan) - i + 1):.0f} s left"
            if i > 1
            else ""
        )
        log(f"[{i}/{len(plan)}] {label} ({spent:.0f} s elapsed{eta})")
        suite = cls()
        try:
            start = time.perf_counter()
            suite.setup(*params.values())
        except NotImplementedError as err:
            log(f"    skipped: {err}")
            continue
        except Exception:  # noqa: BLE001 - a broken combination must not end the run
            log("    setup failed:\n" + traceback.format_exc())
            continue
        for name in _measures(cls):
            method = getattr(suite, name)
            kind = name.split("_", 1)[0]
            try:
                if kind == "time":
                    value = median_time(
                        lambda m=method, p=params: m(*p.values()),
                        device,
                        repeat=getattr(suite, "repeat", repeat),
                        warmup=getattr(suite, "warmup", 1),
                    )
                    unit = "s"
                elif kind == "peakmem":
                    value, unit = _peakmem(cls, name, params, method, device), "MiB"
                else:
                    value = method(*params.values())
                    value = None if value is None else float(value)
                    unit = getattr(method, "unit", "")
                note = getattr(suite, "note", "")
            except Exception:  # noqa: BLE001
                log(f"    {name} failed:\n" + traceback.format_exc())
                continue
            row = Row(
                cls.__name__, dict(params), name, value, unit, kind, group_of(cls), note
            )
            rows.append(row)
            if on_row is not None:
                on_row(row)
            shown = "n/a" if value is None else f"{value:.4g}"
            log(f"    {name}: {shown} {unit}")
        teardown = getattr(suite, "teardown", None)
        if teardown is not None:
            teardown(*params.values())
        log(f"    done in {time.perf_counter() - start:.1f} s")
        sys.stdout.flush()
    return rows


def _peakmem(cls: type, name: str, params: dict, method, device) -> float:
    """CUDA: in this process. CPU: in a fresh process, so memory the allocator
    kept from earlier measures does not hide the peak."""
    if device.type == "cuda":
        with peak_memory(device) as mem:
            method(*params.values())
        return mem["mib"]
    cmd = [
        sys.executable,
        "-m",
        "benchmarks._peakmem",
        cls.__module__,
        cls.__name__,
        name,
        json.dumps(list(params.values())),
    ]
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run(cmd, cwd=root, capture_output=True, text=True, check=True)
    return float(json.loads(out.stdout.strip().splitlines()[-1])["mib"])


def save_jsonl(path: Path):
    """An ``on_row`` callback appending each finished row to ``path`` at once."""
    path.parent.mkdir(parents=True, exist_ok=True)

    def write(row: Row) -> None:
        with open(path, "a") as f:
            f.write(json.dumps(asdict(row)) + "\n")

    return write
