"""Adapter running Quantus faithfulness metrics on torch models and attributions.

Quantus (Hedström et al., JMLR 2023) takes numpy arrays and returns lists.
This adapter converts once at the boundary, picks per-image-size defaults
that keep each metric to tens of forward passes per image, and runs Quantus
0.6.0 under :func:`numpy_compat`, which restores the numpy names Quantus
still uses but numpy 2.x removed, only for the duration of the call.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import threading
import warnings
from typing import Any, Callable, Dict, Iterator, Optional, Sequence, Union

import numpy as np
import torch
from captum._utils.typing import TargetType
from torch import Tensor, nn

from captum_ssl._outputs import TensorOutput
from captum_ssl.attr._core import model_lock, select_target
from captum_ssl.metrics._common import (
    _BAD_MAPS,
    MetricInputError,
    _mark_nan,
    explain,
    explainer,
    prepare,
    prepare_maps,
    resolve_target,
)

DEFAULT_METRICS = (
    "FaithfulnessCorrelation",
    "FaithfulnessEstimate",
    "MonotonicityCorrelation",
    "PixelFlipping",
    "RegionPerturbation",
    "Selectivity",
    "SensitivityN",
    "IROF",
)

#: metrics run one image per Quantus batch: Quantus 0.6.0's
#: MonotonicityCorrelation assigns ``1 / |y|`` of the whole batch through a
#: boolean mask of the images with ``|y| >= eps``, a NumPy error whenever some
#: but not all target scores are below ``eps`` (1e-5); one image per batch
#: computes the same values
PER_IMAGE = ("MonotonicityCorrelation",)

# numpy names removed in numpy 2.x that Quantus 0.6.0 still calls:
# helpers/utils.py calculate_auc -> np.trapz (removed in 2.4);
# metrics/robustness/continuity.py -> np.NaN (removed in 2.0).
_COMPAT = {"trapz": "trapezoid", "NaN": "nan"}

#: Quantus runs change process-wide state (numpy's names, its global RNG,
#: the warnings filters): one run at a time in the process, whatever the model
_QUANTUS_RUN = threading.RLock()


@contextlib.contextmanager
def numpy_compat() -> Iterator[None]:
    r"""Temporarily restore ``np.trapz`` and ``np.NaN`` when numpy lacks them.

    Sets the old names to their numpy 2 equivalents (``np.trapezoid``,
    ``np.nan``) on entry and deletes them again on exit, also on error, so
    numpy itself is neither pinned nor edited and code outside the block sees
    the installed numpy unchanged. Names that exist are left alone. Blocks
    of several threads run one at a time (a process-wide lock), so one
    thread's exit never removes the names while another's block runs; code
    outside any block in another thread can see the names meanwhile.

    Examples::

        >>> with numpy_compat():
        ...     scores = quantus.IROF(return_aggregate=False)(model=..., ...)
    """
    with _QUANTUS_RUN:
        added = []
        for old, new in _COMPAT.items():
            if not hasattr(np, old) and hasattr(np, new):
                setattr(np, old, getattr(np, new))
                added.append(old)
        try:
            yield
        finally:
            for old in added:
                delattr(np, old)


def quantus_explain_func(method: Any, **attribute_kwargs: Any) -> Callable:
    r"""A Quantus ``explain_func`` from a Captum / captum_ssl attribution.

    Quantus calls ``explain_func(model, inputs, targets, **kwargs)`` with
    numpy arrays and expects numpy maps; this runs ``method`` in torch on the
    model's device and returns ``(B, 1, H, W)`` maps at the input size.
    ``method`` is an attribution object or a callable ``(inputs, target) ->
    maps``; Quantus' own keyword arguments (``device``, ...) are ignored.
    """
    fn = explainer(method, **attribute_kwargs)

    def explain_func(model: nn.Module, inputs: Any, targets: Any, **_: Any):
        device = next(model.parameters()).device
        x = torch.as_tensor(np.asarray(inputs), dtype=torch.float32, device=device)
        t = torch.as_tensor(np.asarray(targets), dtype=torch.long, device=device)
        return explain(fn, x, t).cpu().numpy()

    return explain_func


def irof_replacement_by_mask(arr: np.ndarray, mask: np.ndarray, **kwargs: Any):
    """Quantus' ``baseline_replacement_by_mask`` with the mask spread over channels.

    Quantus 0.6.0's IROF builds ``(B, 1, H, W)`` segment masks and asserts
    they have the image's shape, so it fails on every RGB image.
    """
    from quantus.functions.perturb_func import baseline_replacement_by_mask

    return baseline_replacement_by_mask(
        arr=arr, mask=np.broadcast_to(mask, arr.shape), **kwargs
    )


def _divisor_near(n: int, want: float) -> int:
    """The divisor of ``n`` closest to ``want`` (at least 1)."""
    divs = [d for d in range(1, int(n**0.5) + 1) if n % d == 0]
    divs = divs + [n // d for d in divs]
    return min(divs, key=lambda d: (abs(d - want), d))


def default_kwargs(name: str, shape: Sequence[int], steps: int = 32) -> Dict:
    r"""Constructor defaults scaled to the image size ``(B, C, H, W)``.

    Quantus' own defaults assume one perturbation per pixel (e.g.
    ``features_in_step=1``: 50,176 forward passes per 224x224 image); these
    aim at about ``steps`` perturbation steps per image instead.
    """
    _, c, h, w = shape
    hw = h * w
    # Quantus spreads the map over channels, so one step of f features moves
    # f / C pixels; f must divide H*W.
    step = _divisor_near(hw, c * hw / steps)
    patch = max(1, _divisor_near(min(h, w), min(h, w) / 8))
    common: Dict[str, Any] = {"disable_warnings": True, "return_aggregate": False}
    table: Dict[str, Dict[str, Any]] = {
        "FaithfulnessCorrelation": {"nr_runs": 2 * steps, "subset_size": hw // 8},
        "FaithfulnessEstimate": {"features_in_step": step},
        "MonotonicityCorrelation": {"features_in_step": step, "nr_samples": 5},
        "PixelFlipping": {"features_in_step": step, "return_auc_per_sample": True},
        "RegionPerturbation": {"patch_size": patch, "regions_evaluation": steps},
        "Selectivity": {"patch_size": patch},
        "SensitivityN": {"features_in_step": step, "n_max_percentage": 0.8},
        "IROF": {"perturb_func": irof_replacement_by_mask},
    }
    return {**common, **table.get(name, {})}


def _to_tensor(values: Any, device: torch.device) -> Tensor:
    try:
        arr = np.asarray(values, dtype=np.float64)
    except ValueError:  # ragged curves
        n = min(len(v) for v in values)
        arr = np.asarray([list(v)[:n] for v in values], dtype=np.float64)
    return torch.as_tensor(arr, dtype=torch.float32, device=device)


def _one_run(fn: Callable) -> Callable:
    """``fn(model, ...)`` holding the process-wide Quantus lock, then the
    model's :func:`~captum_ssl.attr.model_lock` (other threads' explanations
    of the model wait: Quantus' forward passes would meet their hooks).
    Always in this order, so the two locks cannot deadlock each other."""

    @functools.wraps(fn)
    def run(model: Any, *args: Any, **kwargs: Any) -> Any:
        with _QUANTUS_RUN, model_lock(model):
            return fn(model, *args, **kwargs)

    return run


@_one_run
def quantus_faithfulness(
    model: nn.Module,
    inputs: Tensor,
    attributions: Optional[Union[Tensor, Any]] = None,
    target: TargetType = None,
    metrics: Sequence[Union[str, Any]] = DEFAULT_METRICS,
    metric_kwargs: Optional[Dict[str, Dict[str, Any]]] = None,
    call_kwargs: Optional[Dict[str, Any]] = None,
    steps: int = 32,
    curves_to_auc: bool = True,
    batch_size: int = 64,
    seed: Optional[int] = 0,
) -> Dict[str, Tensor]:
    r"""Run Quantus faithfulness metrics; one score per image each.

    Args:
        model (nn.Module): the classifier in eval mode (Quantus refuses
                    training mode).
        inputs (Tensor): images ``(B, C, H, W)``.
        attributions (Tensor or attribution, optional): precomputed maps at
                    any resolution (upsampled to the input), or an attribution
                    object / callable ``(inputs, target) -> maps`` that is run
                    here in torch and handed to Quantus as its ``explain_func``.
        target (optional): class per image; ``None`` = top-1 class.
        metrics (sequence, optional): Quantus metric class names (any
                    ``quantus.<Name>``) or metric instances. Default: the eight
                    faithfulness metrics of :data:`DEFAULT_METRICS`.
        metric_kwargs (dict, optional): ``{name: constructor kwargs}``
                    overriding :func:`default_kwargs`.
        call_kwargs (dict, optional): extra keyword arguments for every
                    metric call (e.g. ``softmax``).
        steps (int, optional): perturbation steps per image that the defaults
                    aim at. Default: 32
        curves_to_auc (bool, optional): reduce per-image curves (Region
                    Perturbation, Selectivity) to their trapezoid area, the
                    way Quantus' own ``get_auc_score`` does. Default: True
        batch_size (int, optional): Quantus' batch size. Default: 64
        seed (int, optional): numpy's global seed is set to it (Quantus draws
                    from ``np.random``) and restored afterwards. Default: 0

    Returns:
        dict: name -> ``(B,)`` tensor on the model's device (``(B, T)`` for
        curves when ``curves_to_auc=False``). ``SensitivityN`` is not a
        per-image metric: it correlates, for each subset size ``n``, the
        output drops and attribution sums *across the batch*, and returns one
        value per ``n``.

    Examples::

        >>> gc = LayerGradCam(model, model.layer4)
        >>> scores = quantus_faithfulness(model, x, gc, y,
        ...                               metrics=["PixelFlipping", "IROF"])
    """
    import quantus

    if not isinstance(model, nn.Module):
        raise MetricInputError("quantus_faithfulness needs a torch nn.Module.")
    training = [n or "(the model)" for n, m in model.named_modules() if m.training]
    if training:
        raise MetricInputError(
            f"The model is in training mode ({', '.join(training[:3])}); Quantus "
            "requires model.eval(): call it before quantus_faithfulness."
        )
    x, _ = prepare(model, inputs, None)
    target = resolve_target(model, x, target, batch_size)
    y = _class_indices(model, x, target, batch_size)
    names = [_metric_name(quantus, spec) for spec in metrics]
    record: list = []
    token = _BAD_MAPS.set(record)  # NaN / Inf maps: their values become NaN
    try:
        if isinstance(attributions, Tensor):
            maps, explain_func = prepare_maps(attributions, x), None
        elif attributions is None:
            raise MetricInputError(
                "Pass attributions: maps, or an attribution object / callable."
            )
        else:
            explain_func = quantus_explain_func(attributions)
            maps = explain(explainer(attributions), x, target)
    finally:
        _BAD_MAPS.reset(token)
    # Quantus gets finite maps (NaN breaks its sorting); those images are
    # set to NaN afterwards, with a NonFiniteWarning
    maps = torch.nan_to_num(maps, nan=0.0, posinf=0.0, neginf=0.0)

    x_np = x.cpu().numpy()
    y_np = y.cpu().numpy()
    a_np = maps.cpu().numpy()
    device = str(x.device)
    metric_kwargs = metric_kwargs or {}
    results: Dict[str, Tensor] = {}
    state = np.random.get_state()
    try:
        for spec, name in zip(metrics, names):
            if isinstance(spec, str):
                kw = {
                    **default_kwargs(spec, x.shape, steps),
                    **metric_kwargs.get(spec, {}),
                }
                metric = getattr(quantus, spec)(**kw)
            else:
                metric = spec
            if seed is not None:
                np.random.seed(seed)
            with numpy_compat(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                out = metric(
                    model=TensorOutput(model),  # Hugging Face: the logits
                    x_batch=x_np,
                    y_batch=y_np,
                    a_batch=a_np,
                    explain_func=explain_func,
                    device=device,
                    batch_size=1 if name in PER_IMAGE else batch_size,
                    **(call_kwargs or {}),
                )
            scores = _to_tensor(out, x.device)
            if curves_to_auc and scores.dim() == 2:
                scores = torch.trapezoid(scores, dim=1)
            results[name] = scores
    finally:
        np.random.set_state(state)
    return _mark_nan(results, record, "quantus_faithfulness")


def _metric_name(quantus: Any, spec: Union[str, Any]) -> str:
    """The Quantus class name of ``spec``, or an error naming the close match."""
    if not isinstance(spec, str):
        return type(spec).__name__
    if isinstance(getattr(quantus, spec, None), type):
        return spec
    known = [n for n in dir(quantus) if isinstance(getattr(quantus, n), type)]
    close = difflib.get_close_matches(spec, known, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise MetricInputError(
        f"quantus has no metric {spec!r}: {hint}names are Quantus class names "
        f"such as {', '.join(DEFAULT_METRICS)}."
    )


def _class_indices(
    model: nn.Module, x: Tensor, target: TargetType, batch_size: int
) -> Tensor:
    """``target`` as one non-negative class index per image, checked against
    the model's output (one forward pass), for Quantus' numpy indexing."""
    logits = TensorOutput(model)  # Hugging Face: the logits
    with torch.no_grad():
        out = torch.cat(
            [logits(x[i : i + batch_size]) for i in range(0, x.shape[0], batch_size)]
        )
    return select_target(
        torch.arange(out.shape[1], device=x.device).expand(out.shape[0], -1), target
    )
