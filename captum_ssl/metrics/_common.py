"""What every metric shares: inputs, maps, targets, scores, batched evaluation.

A metric states only its own perturbation; moving inputs to the model's
device, upsampling maps, resolving targets, scoring outputs and evaluating
perturbed copies in bounded chunks live here once.
"""

from __future__ import annotations

import contextvars
import functools
import inspect
import math
import warnings
from typing import Any, Callable, Optional, Sequence, Tuple, Union, cast, overload

import torch
import torch.nn.functional as F
from captum._utils.typing import TargetType
from torch import Tensor, nn

from captum_ssl._outputs import model_output, tensor_forward
from captum_ssl.attr._core import (
    AttributionInputError,
    NonFiniteWarning,
    check_target_count,
    chunked_scores,
    eval_mode,
    normalize_target,
    user_stacklevel,
)
from captum_ssl.viz._maps import as_map, upsample

ScoreType = Union[str, Callable[[Tensor], Tensor]]
SubstrateType = Union[str, float, Tensor, Callable[[Tensor], Tensor]]

SCORES = ("probability", "logit", "accuracy")


class MetricInputError(AttributionInputError):
    """Bad input to a metric; the message names the fix."""


# ----------------------------------------------------------------- direction
def higher_is_better(metric: Callable, **options: Any) -> bool:
    r"""Direction of a metric, given the options it is called with.

    Each metric carries ``metric.higher_is_better``: a bool, or a pair
    ``(option_name, {option_value: bool})`` when the direction depends on an
    option (for example ``perturbation_auc``'s ``mode``).

    Examples::

        >>> higher_is_better(deletion_auc)
        False
        >>> higher_is_better(perturbation_auc, mode="negative")
        True
    """
    spec = getattr(metric, "higher_is_better", None)
    if spec is None:
        raise MetricInputError(
            f"{getattr(metric, '__name__', metric)!r} has no `higher_is_better` "
            "attribute; is it a captum_ssl.metrics function?"
        )
    if isinstance(spec, bool):
        return spec
    option, table = spec
    default = inspect.signature(metric).parameters[option].default
    value = options.get(option, default)
    if value not in table:
        raise MetricInputError(
            f"{option}={value!r} is not one of {sorted(table)} for {metric.__name__}."
        )
    return table[value]


#: images whose map is not finite, per metric call (see :func:`direction`)
_BAD_MAPS: contextvars.ContextVar[Optional[list]] = contextvars.ContextVar(
    "captum_ssl_bad_maps", default=None
)


def metric_call(fn: Callable) -> Callable:
    """Run ``fn(model, ...)`` the way every metric must run.

    * The model (first argument) runs in eval mode for the call, each module
      getting its own mode back afterwards (one warning when it was in
      training mode: BatchNorm statistics never change while scoring).
    * An image whose map holds NaN / Inf gets NaN as its value, with a
      :class:`~captum_ssl.attr.NonFiniteWarning`; so does an image whose
      model output is not finite. A NaN is never turned into a number.
    """

    @functools.wraps(fn)
    def metric(*args: Any, **kwargs: Any) -> Any:
        model = cast(Callable, args[0] if args else kwargs.get("model"))
        outer = _BAD_MAPS.get()
        record: list = [] if outer is None else outer
        token = _BAD_MAPS.set(record) if outer is None else None
        try:
            with eval_mode(model, f"{fn.__name__} (a metric)"):
                out = fn(*args, **kwargs)
        finally:
            if token is not None:
                _BAD_MAPS.reset(token)
        return out if outer is not None else _mark_nan(out, record, fn.__name__)

    return metric


def direction(spec: Any) -> Callable[[Callable], Callable]:
    """Decorator of every metric: :func:`metric_call`, and
    ``fn.higher_is_better = spec``."""

    def wrap(fn: Callable) -> Callable:
        metric = metric_call(fn)
        vars(metric)["higher_is_better"] = spec  # a function attribute
        return metric

    return wrap


def mark_undefined(rows: Tensor, reason: str) -> None:
    """Inside a metric call: the images ``rows`` (a ``(B,)`` bool mask) have
    no value for ``reason``; they get NaN and the warning names the reason."""
    record = _BAD_MAPS.get()
    if record is not None:
        record.append((rows, reason))


def _mark_nan(out: Any, record: list, name: str) -> Any:
    if isinstance(out, dict):
        return {k: _mark_nan(v, record, f"{name}[{k!r}]") for k, v in out.items()}
    if not isinstance(out, Tensor) or out.dim() == 0:
        return out
    reasons: dict = {}
    for entry in record:
        bad, why = entry if isinstance(entry, tuple) else (entry, None)
        if bad.shape[0] == out.shape[0] and bool(bad.any()):
            mask = bad.to(out.device).view(-1, *[1] * (out.dim() - 1))
            out = out.masked_fill(mask, float("nan"))
            if why is not None:
                for i in bad.nonzero().flatten().tolist():
                    reasons.setdefault(i, why)
    finite = torch.isfinite(out.reshape(out.shape[0], -1)).all(1)
    bad_rows = (~finite).nonzero().flatten().tolist()
    if bad_rows:
        parts = []
        plain = [i for i in bad_rows if i not in reasons]
        if plain:
            parts.append(
                f"the value of image(s) {plain[:10]} is NaN: their map or the "
                "model's output for them is not finite. NaN is returned, not a "
                "number; drop those images or fix the map/model."
            )
        for why in dict.fromkeys(reasons[i] for i in bad_rows if i in reasons):
            rows = [i for i in bad_rows if reasons.get(i) == why]
            parts.append(f"the value of image(s) {rows[:10]} is NaN: {why}")
        warnings.warn(
            f"{name}: {' '.join(parts)}",
            NonFiniteWarning,
            stacklevel=user_stacklevel(),
        )
    return out


# --------------------------------------------------------------------- model
def model_device(model: Callable, fallback: torch.device) -> torch.device:
    """Device of the model's first parameter or buffer (``fallback`` if none)."""
    if isinstance(model, nn.Module):
        for t in model.parameters():
            return t.device
        for b in model.buffers():
            return b.device
    return fallback


def check_inputs(inputs: Tensor) -> None:
    if not isinstance(inputs, Tensor) or inputs.dim() != 4:
        shape = tuple(inputs.shape) if isinstance(inputs, Tensor) else type(inputs)
        raise MetricInputError(
            f"inputs must be an image batch (B, C, H, W); got {shape}. Add the "
            "batch dimension with `x.unsqueeze(0)` for a single image."
        )
    if inputs.shape[0] == 0:
        raise MetricInputError("inputs is an empty batch: pass at least one image.")
    bad = ~torch.isfinite(inputs.detach().flatten(1)).all(1)
    if bool(bad.any()):
        where = bad.nonzero().flatten().tolist()[:10]
        raise MetricInputError(
            f"inputs hold NaN or Inf in image(s) {where}: fix or drop them "
            "(`keep = torch.isfinite(x).flatten(1).all(1)`)."
        )


def check_map_shape(map_hw: Tuple[int, ...], image_hw: Tuple[int, ...]) -> None:
    """Refuse a map whose aspect ratio is not the image's.

    A layer or patch map is the image seen through a stride, each side
    rounded up or down: ``(h, w)`` fits ``(H, W)`` when ``H / W`` lies within
    ``[(h - 1) / (w + 1), (h + 1) / (w - 1)]``. A transposed map (97 x 65
    for a 65 x 97 image) or a 7 x 3 map for it would otherwise be stretched
    to fit without a word.
    """
    (h, w), (big_h, big_w) = map_hw, image_hw
    if (h, w) == (big_h, big_w) or h * w == 1:
        return
    ratio = big_h / big_w
    low = (h - 1) / (w + 1)
    high = math.inf if w <= 1 else (h + 1) / (w - 1)
    if not low <= ratio <= high:
        raise MetricInputError(
            f"The maps are {h} x {w} (h x w) for images of {big_h} x {big_w}: "
            "their aspect ratios differ, so upsampling would stretch them. Pass "
            "the maps of these images (a transposed map? check the (h, w) "
            "order), or resize them yourself with captum_ssl.viz.upsample(maps, "
            "(H, W)) if stretching is meant."
        )


def prepare_maps(attributions: Tensor, inputs: Tensor) -> Tensor:
    """Maps as ``(B, 1, *spatial)`` at the input's size and device, detached
    (``(B, 1, H, W)`` for images; 1-D signals and 3-D volumes alike)."""
    if not isinstance(attributions, Tensor):
        raise MetricInputError(
            "attributions must be a tensor of maps, (B, 1, h, w), (B, h, w) or "
            f"(B, C, H, W); got {type(attributions).__name__}. To pass an "
            "attribution method, use the metrics that re-explain "
            "(explanation_consistency, randomization_sanity, quantus_faithfulness)."
        )
    if attributions.shape[0] != inputs.shape[0]:
        raise MetricInputError(
            f"attributions has {attributions.shape[0]} maps for {inputs.shape[0]} "
            "images: give one map per image."
        )
    rank = max(1, min(3, inputs.dim() - 2))  # signals, images, volumes
    maps = as_map(attributions.detach().to(inputs.device, torch.float32), rank)
    if rank == 2:
        check_map_shape(tuple(maps.shape[-2:]), tuple(inputs.shape[-2:]))
    record = _BAD_MAPS.get()
    if record is not None:  # NaN / Inf maps: the metric's value becomes NaN
        record.append(~torch.isfinite(maps.flatten(1)).all(1))
    return upsample(maps, inputs)


@overload
def prepare(
    model: Callable, inputs: Tensor, attributions: Tensor
) -> Tuple[Tensor, Tensor]: ...


@overload
def prepare(
    model: Callable, inputs: Tensor, attributions: None
) -> Tuple[Tensor, None]: ...


def prepare(
    model: Callable, inputs: Tensor, attributions: Optional[Tensor]
) -> Tuple[Tensor, Optional[Tensor]]:
    """Inputs (detached) on the model's device and the maps at input size."""
    check_inputs(inputs)
    x = inputs.detach().to(model_device(model, inputs.device))
    maps = None if attributions is None else prepare_maps(attributions, x)
    return x, maps


def resolve_target(
    model: Callable, inputs: Tensor, target: TargetType, batch_size: int = 64
) -> TargetType:
    """``target``, or the model's top-1 class on ``inputs`` when ``None``.

    ``None`` costs one extra forward pass per image; pass the labels (or the
    predictions you already have) to avoid it.
    """
    if target is not None:
        target = normalize_target(target)
        check_target_count(target, inputs.shape[0])
        return target
    preds = []
    with torch.no_grad(), eval_mode(model, "scoring"):
        for start in range(0, inputs.shape[0], batch_size):
            out = model_output(model(inputs[start : start + batch_size]))
            if out.dim() < 2 or out.shape[1] < 2:
                raise MetricInputError(
                    "The model returns one score per sample; these metrics need "
                    "class scores (B, num_classes), or pass a `score` callable."
                )
            preds.append(out.argmax(dim=1))
    return torch.cat(preds)


# -------------------------------------------------------------------- scores
def score_forward(model: Callable, score: ScoreType) -> Callable:
    r"""The model's forward with its output turned into per-class scores.

    ``"probability"``: softmax over classes; ``"logit"``: the raw output;
    ``"accuracy"``: one-hot top-1 prediction (so the target's entry is 1 when
    the target is the top-1 class); a callable maps the output ``(B, K)`` to
    ``(B, K)`` scores. A Hugging Face ``ModelOutput`` is read as a tensor
    first (:func:`~captum_ssl._outputs.model_output`).
    """
    model = tensor_forward(model)
    if callable(score):
        return lambda x: score(model(x))
    if score == "probability":
        return lambda x: torch.softmax(model(x), dim=1)
    if score == "logit":
        return model
    if score == "accuracy":

        def top1(x: Tensor) -> Tensor:
            out = model(x)
            hot = F.one_hot(out.argmax(dim=1), out.shape[1]).to(out.dtype)
            # a NaN output has no top-1 class (argmax would pick the NaN)
            finite = torch.isfinite(out).all(dim=1, keepdim=True)
            return torch.where(finite, hot, torch.full_like(hot, float("nan")))

        return top1
    raise MetricInputError(
        f"score={score!r}: use one of {SCORES} or a callable output -> scores."
    )


def evaluate(
    model: Callable,
    inputs: Tensor,
    target: TargetType,
    n_per_sample: int,
    make_batch: Callable[[Tensor, Tensor], Tensor],
    score: ScoreType = "probability",
    batch_size: int = 64,
    show_progress: bool = False,
    desc: str = "metric",
) -> Tensor:
    """Scores ``(B, n_per_sample)`` of perturbed copies, ``batch_size`` at a time.

    ``make_batch(b_idx, j_idx)`` returns the copies for images ``b_idx`` at
    perturbation steps ``j_idx`` (index tensors on the input's device); a chunk
    mixes images and steps, so a forward pass is always ``batch_size`` full.
    ``show_progress`` draws a progress bar (named ``desc``) of the passes.
    """
    if batch_size < 1:
        raise MetricInputError(f"batch_size must be >= 1, got {batch_size}.")
    device = inputs.device

    def build(b_idx: Tensor, j_idx: Tensor) -> Tuple[Tensor, ...]:
        return (make_batch(b_idx.to(device), j_idx.to(device)),)

    with torch.no_grad():
        return chunked_scores(
            score_forward(model, score),
            (inputs,),
            target,
            None,
            n_per_sample,
            build,
            perturbations_per_eval=batch_size,
            show_progress=show_progress,
            desc=desc,
        )


# ----------------------------------------------------------------- orderings
def ranks(maps: Tensor, descending: bool = True) -> Tensor:
    """Rank of each pixel ``(B, H*W)`` in saliency order (0 = first removed).

    Ties are broken by raster order (stable sort), so the result is
    deterministic.
    """
    flat = maps.flatten(1)
    order = torch.sort(flat, dim=1, descending=descending, stable=True).indices
    r = torch.empty_like(order)
    r.scatter_(
        1, order, torch.arange(flat.shape[1], device=flat.device).expand_as(order)
    )
    return r


def first_k_mask(rank: Tensor, counts: Tensor, hw: Tuple[int, int]) -> Tensor:
    """Boolean masks ``(N, 1, H, W)``: pixel rank < count, one count per row."""
    return (rank < counts[:, None]).view(-1, 1, *hw)


# ---------------------------------------------------------------- substrates
def gaussian_kernel(size: int = 11, sigma: float = 5.0, device: Any = None) -> Tensor:
    """Normalised 2D Gaussian ``(size, size)``."""
    ax = torch.arange(size, dtype=torch.float32, device=device) - (size - 1) / 2
    g = torch.exp(-(ax**2) / (2 * sigma**2))
    k = g[:, None] * g[None, :]
    return k / k.sum()


def rise_kernel(
    size: int = 11, sigma: float = 5.0, truncate: float = 4.0, device: Any = None
) -> Tensor:
    """RISE's blur kernel ``(size, size)``: SciPy's ``gaussian_filter`` of a
    centred unit impulse inside a ``size x size`` window.

    RISE's ``gkern`` builds its kernel that way. SciPy's filter reaches
    ``int(truncate * sigma + 0.5)`` pixels (20 for sigma 5), past the 11 x 11
    window, and its default ``mode="reflect"`` folds the Gaussian's tails back
    into the window: the kernel still sums to one but is much flatter than a
    Gaussian truncated to the window (centre 0.0088 and corner 0.0077 against
    0.0120 and 0.0044 for :func:`gaussian_kernel`). The filter is separable and
    the impulse too, so the kernel is the outer product of the 1-D filter of a
    1-D impulse, computed here with the same half-sample reflection.
    """
    radius = int(truncate * sigma + 0.5)
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64, device=device)
    weights = torch.exp(-0.5 * (offsets / sigma) ** 2)
    weights = weights / weights.sum()
    # positions i + t read (reflected into [0, size)) at the impulse's index
    pos = torch.arange(size, device=device)[:, None] + offsets.long()[None, :]
    pos = pos % (2 * size)
    pos = torch.where(pos >= size, 2 * size - 1 - pos, pos)
    line = (weights[None, :] * (pos == size // 2)).sum(dim=1)
    return (line[:, None] * line[None, :]).float()


#: blur kernels of the ``"blur"`` substrates: RISE's (default) and a Gaussian
#: truncated to the window and renormalised
BLUR_KERNELS = ("rise", "gaussian")


def gaussian_blur(
    inputs: Tensor, size: int = 11, sigma: float = 5.0, kernel: str = "rise"
) -> Tensor:
    """Per-channel blur with zero padding, as RISE's insertion code.

    ``kernel="rise"`` (default) is RISE's own kernel (:func:`rise_kernel`),
    ``"gaussian"`` the normalised Gaussian truncated to the window
    (:func:`gaussian_kernel`, this library's earlier kernel).
    """
    if kernel == "rise":
        k = rise_kernel(size, sigma, device=inputs.device)
    elif kernel == "gaussian":
        k = gaussian_kernel(size, sigma, inputs.device)
    else:
        raise MetricInputError(f"kernel={kernel!r}: use one of {BLUR_KERNELS}.")
    c = inputs.shape[1]
    weight = k.to(inputs.dtype).expand(c, 1, size, size)
    return F.conv2d(inputs, weight, padding=size // 2, groups=c)


def substrate(inputs: Tensor, spec: SubstrateType) -> Tensor:
    r"""The image that removed pixels take their values from.

    Returned broadcastable to ``inputs`` (4D, batch dimension 1 when the same
    for every image), not expanded.

    ``"zero"`` (0 in the model's input space), ``"blur"`` (RISE's blur:
    11 x 11 window, sigma 5, RISE's kernel, see :func:`rise_kernel`),
    ``"blur_gaussian"`` (the same with a normalised Gaussian truncated to the
    window, the kernel this library used before), ``"mean"`` (per-image,
    per-channel mean), a number, a tensor broadcastable to ``inputs`` (e.g.
    ``(C, 1, 1)`` per-channel values such as the normalised black), or a
    callable ``inputs -> substrate``.
    """
    if callable(spec) and not isinstance(spec, Tensor):
        out = spec(inputs)
    elif isinstance(spec, Tensor):
        out = spec.to(inputs.device, inputs.dtype)
    elif isinstance(spec, (int, float)) and not isinstance(spec, bool):
        out = inputs.new_full((1, 1, 1, 1), float(spec))
    elif spec == "zero":
        out = inputs.new_zeros((1, 1, 1, 1))
    elif spec == "blur":
        out = gaussian_blur(inputs, kernel="rise")
    elif spec == "blur_gaussian":
        out = gaussian_blur(inputs, kernel="gaussian")
    elif spec == "mean":
        out = inputs.mean(dim=(2, 3), keepdim=True)
    else:
        raise MetricInputError(
            f"substrate={spec!r}: use 'zero', 'blur', 'blur_gaussian', 'mean', a "
            "number, a tensor "
            "broadcastable to the inputs, or a callable inputs -> substrate."
        )
    try:
        torch.broadcast_shapes(out.shape, inputs.shape)
    except RuntimeError as err:
        raise MetricInputError(
            f"The substrate of shape {tuple(out.shape)} does not broadcast to the "
            f"inputs {tuple(inputs.shape)}."
        ) from err
    while out.dim() < inputs.dim():
        out = out.unsqueeze(0)
    # kept un-expanded: per-image rows are gathered only when they differ
    return out.to(inputs.dtype)


# ----------------------------------------------------------------------- auc
def normalized_auc(curve: Tensor) -> Tensor:
    """Trapezoid area of equally spaced points, x-range scaled to [0, 1] (RISE)."""
    n = curve.shape[1]
    if n < 2:
        raise MetricInputError("A curve needs at least two points.")
    return (curve[:, :-1] + curve[:, 1:]).sum(dim=1) / (2 * (n - 1))


def fraction_grid(fractions: Sequence[float], name: str = "fractions") -> Tensor:
    fr = [float(f) for f in fractions]
    if not fr or any(not 0.0 < f < 1.0 for f in fr) or sorted(fr) != fr:
        raise MetricInputError(
            f"{name} must be increasing values strictly between 0 and 1 (fractions "
            f"of the pixels), got {list(fractions)}."
        )
    return torch.tensor(fr)


def n_steps(hw: Tuple[int, int], step: int) -> int:
    if int(step) < 1:
        raise MetricInputError(f"step must be >= 1 pixel, got {step}.")
    return math.ceil(hw[0] * hw[1] / int(step))


def generator_for(
    device: torch.device, seed: Optional[int], generator: Optional[torch.Generator]
) -> torch.Generator:
    """A generator on ``device``: the given one, or a new one seeded ``seed``."""
    if generator is not None:
        return generator
    g = torch.Generator(device=device)
    g.manual_seed(0 if seed is None else int(seed))
    return g


# ---------------------------------------------------------------- explainers
def explainer(method: Any, **attribute_kwargs: Any) -> Callable[[Tensor, Any], Tensor]:
    r"""``(inputs, target) -> maps`` from a Captum attribution object or a function.

    ``method`` is an object with ``attribute(inputs, target=..., **kw)`` (any
    Captum or captum_ssl attribution, also wrapped in ``NoiseTunnel``), or a
    callable ``(inputs, target) -> maps``.
    """
    if hasattr(method, "attribute"):

        def run(inputs: Tensor, target: Any) -> Tensor:
            return method.attribute(inputs, target=target, **attribute_kwargs)

        return run
    if callable(method):
        if attribute_kwargs:
            return lambda inputs, target: method(inputs, target, **attribute_kwargs)
        return method
    raise MetricInputError(
        "Pass an attribution object with .attribute(inputs, target=...) (e.g. "
        "LayerGradCam(model, layer)) or a callable (inputs, target) -> maps; got "
        f"{type(method).__name__}."
    )


def explain(fn: Callable[[Tensor, Any], Tensor], inputs: Tensor, target: Any) -> Tensor:
    """Maps ``(B, 1, H, W)`` of ``inputs`` at input size, detached."""
    out = fn(inputs, target)
    if isinstance(out, tuple):
        out = out[0]
    return prepare_maps(out, inputs)


# --------------------------------------------------------------- similarity
def _flat(a: Tensor, valid: Optional[Tensor]) -> list:
    a = a.flatten(1)
    if valid is None:
        return list(a)
    v = valid.flatten(1)
    return [row[m] for row, m in zip(a, v)]


def pearson(a: Tensor, b: Tensor, valid: Optional[Tensor] = None) -> Tensor:
    """Per-sample Pearson correlation of two map batches (over ``valid`` pixels).

    A constant map has no correlation with anything; it scores 0 ("no
    agreement") where scipy returns NaN, so means over images stay defined."""
    out = []
    for x, y in zip(_flat(a, valid), _flat(b, valid)):
        x = x - x.mean()
        y = y - y.mean()
        den = x.norm() * y.norm()
        out.append((x * y).sum() / den if den > 0 else x.new_tensor(0.0))
    return torch.stack(out)


def average_ranks(x: Tensor) -> Tensor:
    """Ranks of a 1D tensor, ties sharing their average rank (as scipy's rankdata)."""
    values, inverse, counts = torch.unique(x, return_inverse=True, return_counts=True)
    ends = torch.cumsum(counts, 0).to(x.dtype)
    avg = ends - (counts.to(x.dtype) - 1) / 2  # 1-based average rank of each value
    return avg[inverse]


def spearman(a: Tensor, b: Tensor, valid: Optional[Tensor] = None) -> Tensor:
    """Per-sample Spearman rank correlation (ties get average ranks; 0 for a
    constant map, see :func:`pearson`)."""
    ra = [average_ranks(x) for x in _flat(a, valid)]
    rb = [average_ranks(y) for y in _flat(b, valid)]
    return torch.cat([pearson(x[None], y[None]) for x, y in zip(ra, rb)])


def topk_iou(
    a: Tensor, b: Tensor, k: float = 0.1, valid: Optional[Tensor] = None
) -> Tensor:
    """Per-sample IoU of the top-``k`` fraction of pixels of two map batches."""
    if not 0.0 < k <= 1.0:
        raise MetricInputError(f"top_k must be a fraction in (0, 1], got {k}.")
    out = []
    for x, y in zip(_flat(a, valid), _flat(b, valid)):
        n = max(1, int(round(k * x.numel())))
        sx = torch.zeros_like(x, dtype=torch.bool)
        sy = torch.zeros_like(y, dtype=torch.bool)
        sx[torch.topk(x, n).indices] = True
        sy[torch.topk(y, n).indices] = True
        out.append((sx & sy).sum() / (sx | sy).sum())
    return torch.stack(out).to(a.dtype)


def ssim(a: Tensor, b: Tensor, size: int = 11, sigma: float = 1.5) -> Tensor:
    """Per-sample SSIM (Wang et al. 2004) of maps min-max scaled to [0, 1].

    Gaussian window (11 taps, sigma 1.5), population covariances, averaged
    over the pixels whose window lies inside the map: scikit-image's
    ``structural_similarity(gaussian_weights=True, use_sample_covariance=False,
    data_range=1)``.
    """
    from captum_ssl.viz._maps import normalize

    a, b = normalize(a), normalize(b)
    k = gaussian_kernel(size, sigma, a.device).to(a.dtype)[None, None]

    def blur(t: Tensor) -> Tensor:
        return F.conv2d(t, k)

    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a**2
    var_b = blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / (
        (mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2)
    )
    return s.flatten(1).mean(dim=1)
