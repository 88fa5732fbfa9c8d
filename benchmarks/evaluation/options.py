"""Checks of the main job's options, before any model or data is loaded.

``validate(args)`` is called once by ``benchmarks.run`` right after argument
parsing. Each problem is one :class:`OptionError` whose message names the
option (or path) and the fix; ``benchmarks.run`` prints it as one line and
exits with status 2. Nothing here loads a model, reads an image or writes
anything but a probe file that is removed at once.
"""

from __future__ import annotations

import argparse
import difflib
import inspect
import os
import pkgutil
import re
import tempfile
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Set

from benchmarks.evaluation import methods as M

#: words that stand for sets of methods / metrics
SET_WORDS = ("quick", "thesis", "all")
#: options that must be positive integers where given (None allowed: auto)
POSITIVE_INTS = (
    "perturbations_per_eval",
    "internal_batch_size",
    "nt_samples_batch_size",
    "nt_samples",
    "n_steps",
    "batch_size",
    "step",
)


def choices() -> Dict[str, tuple]:
    """The options (of the methods and metrics the CLI runs) whose value is
    one of a few words, with those words: the library's own tuples, so a new
    choice needs no change here. An option name means the same in every
    method and metric that has it."""
    from captum.attr._utils.approximation_methods import SUPPORTED_METHODS

    from captum_ssl.attr._attention.methods import DISCARDS, HEAD_FUSIONS
    from captum_ssl.attr._cam.extra_cams import KERNELS
    from captum_ssl.attr._cam.multi_cams import POOLS
    from captum_ssl.attr._lrp.methods import ATS
    from captum_ssl.metrics._arcc import MEANS
    from captum_ssl.metrics._common import SCORES
    from captum_ssl.metrics._perturbation import MODES
    from captum_ssl.metrics._road import ORDERS

    return {
        "head_fusion": HEAD_FUSIONS,
        "discard": DISCARDS,
        "at": ATS,
        "mean": MEANS,
        "score": SCORES,
        "kernel": KERNELS,  # KPCA-CAM's
        "pool": POOLS,  # SESS's
        "method": tuple(SUPPORTED_METHODS),  # Captum's integral approximations
        "interpolate_mode": ("nearest", "nearest-exact", "bilinear", "bicubic", "area"),
        "mode": tuple(MODES),
        "order": tuple(ORDERS),
        # a word, or a number (a token index, a constant substrate)
        "query": ("cls", "dist"),
        "substrate": ("zero", "blur", "blur_gaussian", "mean"),
    }


#: options of :func:`choices` that also take a number
NUMBER_TOO = ("query", "substrate")
#: arguments the pipeline passes itself
_FIXED = {"self", "inputs", "target", "additional_forward_args"}
_METRIC_FIXED = {"model", "inputs", "attributions", "target"}


class OptionError(ValueError):
    """A bad option of the main job; the message says which and how to fix it."""


def validate(args: argparse.Namespace) -> None:
    """Raise :class:`OptionError` for the first bad option of ``args``."""
    _numbers(args)
    pattern = getattr(args, "filter", None)
    if pattern is not None:
        try:
            re.compile(pattern)
        except re.error as err:
            raise OptionError(
                f"--filter {pattern}: not a regular expression ({err})"
            ) from None
    _device(args)
    _bench(args)
    _models(args)
    for word in getattr(args, "methods", None) or []:
        check_method(word)
    for word in getattr(args, "metrics", None) or []:
        check_metric(word)
    _data(getattr(args, "data", None))
    if not getattr(args, "list", False):
        check_out(Path(args.out))


# ----------------------------------------------------------------- numbers


def _numbers(args: argparse.Namespace) -> None:
    from benchmarks.evaluation.cli import QUICK_LIMIT

    hints = {
        "limit": (
            f"leave --limit out for the default ({QUICK_LIMIT} images; all with --full)"
        ),
        "images": "leave --images out for the default",
        "batch_size": "e.g. --batch-size 8",
        "metric_batch_size": "e.g. --metric-batch-size 64",
        "repeat": "e.g. --repeat 3",
        "threads": "e.g. --threads 4, or leave --threads out (one per core)",
    }
    for name, hint in hints.items():
        v = getattr(args, name, None)
        if v is not None and v < 1:
            flag = "--" + name.replace("_", "-")
            raise OptionError(f"{flag} must be at least 1 (got {v}); {hint}")


# -------------------------------------------------------------------- data


def _data(data: Optional[Path]) -> None:
    """``--data``: a folder holding at least one ``<wnid>_<name>.JPEG``."""
    if data is None:
        return
    fix = (
        "pass the folder of the ImageNet sample photos (<wnid>_<name>.JPEG), "
        "or leave --data out"
    )
    path = Path(data)
    if not path.is_dir():
        what = "is a file, not a folder" if path.exists() else "no such folder"
        raise OptionError(f"--data {data}: {what}; {fix}")
    from captum_ssl.data import sample_files

    try:
        found = sample_files(path)
    except (ValueError, OSError) as err:
        raise OptionError(f"--data {data}: {err}; {fix}") from None
    if not found:
        raise OptionError(f"--data {data}: holds no <wnid>_<name>.JPEG photo; {fix}")


# ------------------------------------------------------------------ device


def _device(args: argparse.Namespace) -> None:
    device = getattr(args, "device", None)
    if device is not None:
        given, flag = device, f"--device {device}"
    elif os.environ.get("BENCH_DEVICE"):
        given = os.environ["BENCH_DEVICE"]
        flag = f"BENCH_DEVICE={given}"
    else:
        return
    import torch

    try:
        dev = torch.device(given)
    except (RuntimeError, ValueError):
        raise OptionError(
            f"{flag}: not a torch device; use cpu, cuda or cuda:N"
        ) from None
    fix = "leave --device out (CUDA when present, else the CPU) or use --device cpu"
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise OptionError(f"{flag}: no CUDA GPU is available here; {fix}")
        n = torch.cuda.device_count()
        if dev.index is not None and dev.index >= n:
            raise OptionError(
                f"{flag}: this machine has {n} CUDA device(s) (cuda:0..cuda:{n - 1})"
            )
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise OptionError(f"{flag}: MPS is not available here; {fix}")
    elif dev.type != "cpu":
        raise OptionError(f"{flag}: unsupported device type {dev.type!r}; {fix}")


# ------------------------------------------------------------- names


def bench_areas() -> List[str]:
    """The areas ``--bench`` accepts: ``benchmarks/bench_<area>.py`` and
    ``evaluation`` (the accuracy pipeline)."""
    import benchmarks

    areas = [
        m.name[len("bench_") :]
        for m in pkgutil.iter_modules(benchmarks.__path__)
        if m.name.startswith("bench_")
    ]
    return sorted(areas) + ["evaluation"]


def _bench(args: argparse.Namespace) -> None:
    known = bench_areas()
    bad = [b for b in getattr(args, "bench", None) or [] if b not in known]
    if bad:
        raise OptionError(
            f"--bench {' '.join(bad)}: unknown area; known: {', '.join(known)}"
        )


def _models(args: argparse.Namespace) -> None:
    from benchmarks.evaluation import local
    from captum_ssl.models import list_models

    known = list_models()
    names = list(getattr(args, "models", None) or [])
    if names == ["none"]:
        names = []
    labels = []
    for word in names:
        if local.is_local(word):
            try:
                labels.append(local.check(word).label)
            except ValueError as err:
                raise OptionError(f"--models {word}: {err}") from None
        else:
            labels.append(word)
    twice = sorted({n for n in labels if labels.count(n) > 1})
    if twice:
        raise OptionError(
            f"--models: two models named {', '.join(twice)}; give each local model "
            "its own label=NAME"
        )
    names = [n for n in names if not local.is_local(n)]
    for flag, given in (
        ("--models", names),
        ("--random-weights", getattr(args, "random_weights", [])),
    ):
        bad = [n for n in given if n not in known]
        if bad:
            raise OptionError(
                f"{flag} {' '.join(bad)}: unknown model; known: {', '.join(known)}"
                + (
                    " (or timm:NAME=PATH, hf:PATH; 'none' with --random-weights)"
                    if flag == "--models"
                    else ""
                )
            )


def _parse(flag: str, word: str):
    try:
        return M.parse_spec(word)
    except ValueError:
        raise OptionError(
            f"{flag} {word}: options are written name:option=value,option=value"
        ) from None


def check_method(word: str) -> None:
    """One ``--methods`` word: a set word, or a known method whose options are
    arguments of that method."""
    if word in SET_WORDS:
        return
    name, opts = _parse("--methods", M.method_word(word))
    base, _, nt = name.partition("+")
    if name not in M.method_names():
        if base in M.GRADIENT and nt:
            raise OptionError(
                f"--methods {word}: unknown NoiseTunnel variant {nt!r}; known: "
                f"{', '.join(M.NOISE_TUNNELS)}"
            )
        known = list(SET_WORDS) + [n for n in M.method_names() if "+" not in n]
        raise OptionError(
            f"--methods {word}: unknown method {name!r}; known: "
            f"{', '.join(known)} (the last {len(M.GRADIENT)} also as "
            f"name+{'/'.join(M.NOISE_TUNNELS)})"
        )
    allowed = method_options(name)
    _check_opts("--methods", word, opts, allowed, _method_bools(name))


def method_options(name: str) -> Optional[Set[str]]:
    """Option names ``name`` accepts (None: any), read from the signatures of
    the classes :func:`methods.build_method` calls."""
    import captum.attr as CA

    import captum_ssl.attr as A

    base, _, nt = name.partition("+")
    extra: Set[str] = set()
    ours = {**M.CAMS, **M.OTHER_CAMS, **M.ATTENTION, **M.LRP_METHODS}
    if base in ours:
        fn = getattr(A, ours[base]).attribute
        # options build_method consumes itself (layers of RawAttention and
        # RefineCAM, the CAM that RefineCAM / SESS wrap)
        extra |= set(M.method_defaults(base)) - {"relu_attributions"}
        if base == "raw_attention":
            extra.add("layers")
    else:
        fn = getattr(CA, M.GRADIENT[base]).attribute
        extra.add("reduce")
        if nt:
            nt_params = inspect.signature(CA.NoiseTunnel.attribute).parameters
            extra |= {p for p in nt_params if p not in ("self", "inputs", "nt_type")}
    names = _params(fn)
    return None if names is None else (names | extra) - _FIXED - {"kwargs"}


def check_metric(word: str) -> None:
    """One ``--metrics`` word: a set word, or a known metric with options of
    its function."""
    if word in SET_WORDS:
        return
    name, opts = _parse("--metrics", M.metric_word(word, note=False))
    if name not in M.METRICS:
        raise OptionError(
            f"--metrics {word}: unknown metric {name!r}; known: "
            f"{', '.join(list(SET_WORDS) + list(M.METRICS))} (old spellings: "
            f"{', '.join(M.METRIC_ALIASES)})"
        )
    allowed = _params(M.metric_function(name))
    if allowed is not None:
        allowed = allowed - _METRIC_FIXED - {"return_curve"}
    _check_opts("--metrics", word, opts, allowed, _bools(M.metric_function(name)))


def _bools(fn) -> Set[str]:
    """Parameters of ``fn`` whose default is a bool (their value must be one)."""
    params = inspect.signature(fn).parameters.values()
    return {p.name for p in params if isinstance(p.default, bool)}


def _method_bools(name: str) -> Set[str]:
    import captum.attr as CA

    import captum_ssl.attr as A

    base = name.partition("+")[0]
    ours = {**M.CAMS, **M.OTHER_CAMS, **M.ATTENTION, **M.LRP_METHODS}
    cls = getattr(A, ours[base]) if base in ours else getattr(CA, M.GRADIENT[base])
    defaults = M.method_defaults(base) if base in ours else {}
    return _bools(cls.attribute) | {
        k for k, v in defaults.items() if isinstance(v, bool)
    }


def _params(fn) -> Optional[Set[str]]:
    params = inspect.signature(fn).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return {p.name for p in params}


def _check_opts(
    flag: str,
    word: str,
    opts: Dict[str, Any],
    allowed: Optional[Iterable[str]],
    bools: Iterable[str] = (),
) -> None:
    if allowed is not None:
        bad = sorted(k for k in opts if k not in allowed)
        if bad:
            raise OptionError(
                f"{flag} {word}: unknown option {', '.join(bad)}; this one takes: "
                f"{', '.join(sorted(allowed)) or 'no options'}"
            )
    for k in bools:
        if k in opts and not isinstance(opts[k], bool):
            raise OptionError(f"{flag} {word}: {k} is true or false (got {opts[k]!r})")
    for k, words in choices().items():
        v = opts.get(k)
        if v is None or v in words:
            continue
        number = isinstance(v, (int, float)) and not isinstance(v, bool)
        if k in NUMBER_TOO and number:
            continue
        close = difflib.get_close_matches(str(v), words, n=1)
        raise OptionError(
            f"{flag} {word}: {k} must be one of {', '.join(words)}"
            + (" or a number" if k in NUMBER_TOO else "")
            + f" (got {v!r}"
            + (f"; did you mean {close[0]}?)" if close else ")")
        )
    for k in POSITIVE_INTS:
        v = opts.get(k, 1)
        if v is None and k in ("perturbations_per_eval", "internal_batch_size"):
            continue
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise OptionError(f"{flag} {word}: {k} must be an integer >= 1 (got {v!r})")


# ----------------------------------------------------------- output folder


def check_out(out: Path) -> None:
    """The output folder can be created and written, and a results store in it
    can be read."""
    if out.exists() and not out.is_dir():
        raise OptionError(
            f"--out {out}: is a file, not a folder; pass a folder (created if absent)"
        )
    folder = out
    while not folder.exists():  # the nearest existing parent gets the folder
        folder = folder.parent
    if not folder.is_dir():
        raise OptionError(f"--out {out}: {folder} is a file; pass another folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-probe-", dir=folder)
    except OSError as err:
        raise OptionError(
            f"--out {out}: cannot write in {folder} ({err.strerror}); pass a "
            "writable folder with --out"
        ) from None
    os.close(fd)
    os.unlink(probe)
    from benchmarks.evaluation.pipeline import DB_NAME
    from benchmarks.evaluation.store import StoreError, check_file

    db = out / DB_NAME
    if db.exists():
        try:
            check_file(db)
        except StoreError as err:
            raise OptionError(str(err)) from None
