"""Shared machinery of every method: inputs, targets, hooks and layer capture.

Each attribution class states only its own arithmetic; everything that touches
the model (hooks, the forward and backward passes, target selection, the token
layout, the errors users see) lives here once and reuses Captum's helpers.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Any, Callable, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from captum._utils.common import _run_forward, _select_targets
from captum._utils.gradient import (
    _forward_layer_eval,
    compute_layer_gradients_and_eval,
)
from captum._utils.typing import TargetType
from torch import Tensor, nn

from captum_ssl.attr._layout import TokenLayout, layout_for, root_module

TensorOrTuple = Union[Tensor, Tuple[Tensor, ...]]


class AttributionInputError(ValueError):
    """Bad input to an attribution method; the message names the fix."""


# --------------------------------------------------------------------- inputs
def format_inputs(inputs: TensorOrTuple) -> Tuple[Tensor, ...]:
    """Inputs as a tuple of tensors with a common, non-empty batch dimension."""
    if isinstance(inputs, Tensor):
        inputs = (inputs,)
    if not isinstance(inputs, tuple) or not all(isinstance(t, Tensor) for t in inputs):
        raise AttributionInputError(
            "inputs must be a tensor or a tuple of tensors, got "
            f"{type(inputs).__name__}."
        )
    if len(inputs) == 0 or inputs[0].dim() == 0:
        raise AttributionInputError("inputs must have a batch dimension.")
    batch = inputs[0].shape[0]
    if batch == 0:
        raise AttributionInputError(
            "inputs is an empty batch (batch size 0): pass at least one sample."
        )
    if torch.is_inference_mode_enabled() or any(t.is_inference() for t in inputs):
        raise AttributionInputError(
            "inputs were created under torch.inference_mode(), which forbids the "
            "autograd graph this method needs. Create them under torch.no_grad() "
            "or outside any grad mode, or call `.clone()` outside inference_mode."
        )
    return inputs


def input_hw(inputs: Tuple[Tensor, ...]) -> Optional[Tuple[int, int]]:
    """Spatial size of an image batch ``(B, C, H, W)``, else ``None``."""
    x = inputs[0]
    return (int(x.shape[-2]), int(x.shape[-1])) if x.dim() == 4 else None


# -------------------------------------------------------------------- targets
def check_target(output: Tensor, target: TargetType) -> None:
    """Raise a clear error when ``target`` cannot index ``output``."""
    if target is None:
        if output.dim() > 1 and output[0].numel() > 1:
            raise AttributionInputError(
                f"The model returns {tuple(output.shape)} scores per batch; pass "
                "target=<class index> (an int, or one per sample) to choose one."
            )
        return
    batch = output.shape[0]
    if isinstance(target, Tensor):
        if target.numel() not in (1, batch):
            raise AttributionInputError(
                f"target has {target.numel()} entries for a batch of {batch}: give "
                "one class index, or one per sample."
            )
        indices: Sequence = target.flatten().tolist()
    elif isinstance(target, int):
        indices = [target]
    elif isinstance(target, tuple):
        indices = [target[0]]
    elif isinstance(target, list):
        if len(target) != batch:
            raise AttributionInputError(
                f"target is a list of {len(target)} for a batch of {batch}: give "
                "one target per sample."
            )
        indices = [t[0] if isinstance(t, tuple) else t for t in target]
    else:
        raise AttributionInputError(
            f"Unsupported target type {type(target).__name__}: use an int, a tuple, "
            "a tensor or a list with one entry per sample."
        )
    if output.dim() < 2:
        raise AttributionInputError(
            f"The model returns one score per sample {tuple(output.shape)}; call "
            "attribute with target=None."
        )
    n = output.shape[1]
    bad = [int(i) for i in indices if not -n <= int(i) < n]
    if bad:
        raise AttributionInputError(
            f"target {bad[0]} is out of range for a model with {n} outputs: use a "
            f"class index in [0, {n - 1}]."
        )


def per_sample_targets(target: TargetType, batch: int) -> List[Any]:
    """``target`` as one entry per sample (``None`` entries when target is None)."""
    if target is None:
        return [None] * batch
    if isinstance(target, Tensor):
        flat = target.flatten()
        return [flat[0 if flat.numel() == 1 else i] for i in range(batch)]
    if isinstance(target, list):
        return list(target)
    return [target] * batch


def stack_targets(targets: List[Any]) -> TargetType:
    """Inverse of :func:`per_sample_targets` for a sub-batch."""
    if all(t is None for t in targets):
        return None
    if all(isinstance(t, Tensor) for t in targets):
        return torch.stack(list(targets))
    return list(targets)


def checked_forward(forward_func: Callable, target: TargetType) -> Callable:
    """``forward_func`` that validates ``target`` against its output."""

    def forward(*args: Any, **kwargs: Any) -> Tensor:
        out = forward_func(*args, **kwargs)
        if isinstance(out, Tensor):
            check_target(out, target)
        return out

    # keep what Captum reads off the forward function (DataParallel)
    if hasattr(forward_func, "device_ids"):
        forward.device_ids = forward_func.device_ids  # type: ignore[attr-defined]
    return forward


def target_scores(
    forward_func: Callable,
    inputs: Tuple[Tensor, ...],
    target: TargetType,
    additional_forward_args: Any = None,
) -> Tensor:
    """One score per sample: the model's output at ``target`` (no gradients)."""
    with torch.no_grad():
        out = _run_forward(
            checked_forward(forward_func, target),
            inputs,
            additional_forward_args=additional_forward_args,
        )
        return _select_targets(out, target).reshape(inputs[0].shape[0])


def rows(value: Any, index: Tensor, batch: int) -> Any:
    """Rows ``index`` of every batched tensor in ``value`` (others pass through)."""
    if isinstance(value, Tensor):
        return value[index] if value.dim() > 0 and value.shape[0] == batch else value
    if isinstance(value, tuple):
        return tuple(rows(v, index, batch) for v in value)
    if isinstance(value, list):
        return [rows(v, index, batch) for v in value]
    return value


# --------------------------------------------------------------- layer access
@contextlib.contextmanager
def layer_errors(layer: nn.Module) -> Iterator[None]:
    """Turn Captum's and autograd's generic failures into errors naming the fix."""
    try:
        yield
    except AssertionError as err:
        if "did not obtain any outputs" in str(err):
            raise AttributionInputError(
                f"The layer {layer.__class__.__name__} never ran in the forward pass. "
                "Pass a submodule that the model's forward actually calls (for "
                "example `model.layer4` or `model.blocks[-1].norm1`; print(model) "
                "lists them), and the same model instance as forward_func."
            ) from err
        raise
    except RuntimeError as err:
        msg = str(err)
        if any(
            m in msg
            for m in (
                "does not require grad",
                "does not have a grad_fn",
                "not have been used in the graph",
            )
        ):
            raise AttributionInputError(
                f"No gradient path from the target to the layer "
                f"{layer.__class__.__name__}: its output is detached from the model "
                "output (computed under torch.no_grad(), .detach(), or a frozen/"
                "traced graph). Use a layer whose output feeds the prediction with "
                "autograd enabled, or a gradient-free method (LayerScoreCam, "
                "LayerAblationCam, LayerEigenCam)."
            ) from err
        raise


@contextlib.contextmanager
def record_from_layer_only(forward_func: Callable) -> Iterator[None]:
    """Autograd records only what follows the explained layer.

    Layer methods need gradients with respect to the layer's output, never
    with respect to the parameters. With every parameter temporarily frozen
    (and inputs that do not require grad), the forward pass builds no graph up
    to the layer; Captum's hook makes the layer's output require grad, so only
    the ops after it are recorded. The flags are restored on exit, also when
    the block raises. Without a module behind ``forward_func`` this is a no-op.
    """
    model = root_module(forward_func)
    params = [] if model is None else [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def resolve_layout(
    forward_func: Callable,
    layer: nn.Module,
    inputs: Tuple[Tensor, ...],
    layout: Optional[TokenLayout],
) -> TokenLayout:
    """The layout of ``layer`` for this call (grid follows the input size)."""
    return layout_for(forward_func, layer, input_hw(inputs), layout)


def _grid_tuple(layout: TokenLayout) -> Callable:
    return lambda tensors: tuple(layout.to_grid(t) for t in tensors)


def layer_activations_and_gradients(
    forward_func: Callable,
    layer: nn.Module,
    inputs: Tuple[Tensor, ...],
    target: TargetType,
    additional_forward_args: Any = None,
    *,
    layout: Optional[TokenLayout] = None,
    device_ids: Optional[List[int]] = None,
    attribute_to_layer_input: bool = False,
    grad_kwargs: Optional[dict] = None,
) -> Tuple[Tuple[Tensor, ...], Tuple[Tensor, ...]]:
    """Activations and target gradients of ``layer`` as ``(B, C, h, w)`` grids.

    One forward pass with a hook on ``layer`` and one backward pass from the
    selected target down to the layer only (Captum's
    ``compute_layer_gradients_and_eval``); the hook is always removed.
    """
    lay = resolve_layout(forward_func, layer, inputs, layout)
    with layer_errors(layer), record_from_layer_only(forward_func):
        grads, acts = compute_layer_gradients_and_eval(
            checked_forward(forward_func, target),
            layer,
            inputs,
            target,
            additional_forward_args,
            device_ids=device_ids or getattr(forward_func, "device_ids", None),
            attribute_to_layer_input=attribute_to_layer_input,
            output_fn=_grid_tuple(lay),
            grad_kwargs=grad_kwargs,
        )
    if all(bool((g == 0).all()) for g in grads):
        warnings.warn(
            f"All gradients at the layer {layer.__class__.__name__} are zero for "
            "this target, so gradient-based maps are empty. With a class-token "
            "head the last block's patch tokens do not reach the output: use an "
            "earlier layer such as `blocks[-1].norm1`.",
            stacklevel=3,
        )
    return tuple(a.detach() for a in acts), tuple(g.detach() for g in grads)


def layer_activations(
    forward_func: Callable,
    layer: nn.Module,
    inputs: Tuple[Tensor, ...],
    additional_forward_args: Any = None,
    *,
    target: TargetType = None,
    layout: Optional[TokenLayout] = None,
    device_ids: Optional[List[int]] = None,
    attribute_to_layer_input: bool = False,
) -> Tuple[Tensor, ...]:
    """Activations of ``layer`` as ``(B, C, h, w)`` grids, without gradients.

    A ``target`` other than ``None`` is checked against the model's output."""
    lay = resolve_layout(forward_func, layer, inputs, layout)
    if target is not None:
        forward_func = checked_forward(forward_func, target)
    with layer_errors(layer), torch.no_grad():
        acts = _forward_layer_eval(
            forward_func,
            inputs,
            layer,
            additional_forward_args,
            device_ids=device_ids or getattr(forward_func, "device_ids", None),
            attribute_to_layer_input=attribute_to_layer_input,
        )
    return tuple(lay.to_grid(a) for a in acts)


@contextlib.contextmanager
def replace_layer_output(
    layer: nn.Module, fn: Callable[[Tensor], Tensor]
) -> Iterator[None]:
    """Within the block, ``layer``'s output is ``fn(output)``; the hook is removed
    on exit, also when the block raises."""

    def hook(_module: nn.Module, _inp: Any, out: Any) -> Any:
        return fn(out)

    handle = layer.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


#: automatic chunks: at most this many perturbed inputs per forward pass
AUTO_CHUNK_CAP = {"cpu": 64, "cuda": 256}
#: automatic chunks: memory of one perturbed evaluation, in input sizes (the
#: no-grad forward's activations are counted as this many copies of the input)
AUTO_CHUNK_INPUT_COPIES = 32
#: automatic chunks on the CPU: memory budget of one forward pass. Small on
#: purpose: on the CPU a larger batch is not faster per image once it leaves
#: the caches (Score-CAM, EfficientNet-Lite0, 224 px, 2 cores: 1 or 4 inputs
#: per pass 14-16 s, 16 per pass 25 s), so chunks stay at a few 224 px images.
AUTO_CHUNK_CPU_BYTES = 64 << 20


def auto_perturbations_per_eval(inputs: Tuple[Tensor, ...], total: int) -> int:
    """Perturbed inputs per forward pass when ``perturbations_per_eval=None``.

    The memory of one perturbed evaluation is estimated as
    :data:`AUTO_CHUNK_INPUT_COPIES` times the size of one input sample; the
    chunk fills a quarter of the free CUDA memory (on the CPU
    :data:`AUTO_CHUNK_CPU_BYTES`), capped at :data:`AUTO_CHUNK_CAP` and at
    ``total``, and is at least 1.
    """
    device = inputs[0].device
    per_eval = sum(t[:1].numel() * t.element_size() for t in inputs)
    per_eval = max(1, per_eval * AUTO_CHUNK_INPUT_COPIES)
    if device.type == "cuda":
        budget = torch.cuda.mem_get_info(device)[0] // 4
        cap = AUTO_CHUNK_CAP["cuda"]
    else:
        budget, cap = AUTO_CHUNK_CPU_BYTES, AUTO_CHUNK_CAP["cpu"]
    return int(max(1, min(cap, total, budget // per_eval)))


def chunked_scores(
    forward_func: Callable,
    inputs: Tuple[Tensor, ...],
    target: TargetType,
    additional_forward_args: Any,
    n_per_sample: int,
    make_batch: Callable[[Tensor, Tensor], Tuple[Tensor, ...]],
    perturbations_per_eval: Optional[int] = None,
    show_progress: bool = False,
    desc: str = "perturbations",
    context: Optional[Callable[[Tensor, Tensor], Any]] = None,
) -> Tensor:
    """Target scores of ``B * n_per_sample`` perturbed evaluations, batched.

    Evaluation ``j`` of sample ``b`` is built by ``make_batch(b_idx, j_idx)``
    for a chunk of (sample, perturbation) pairs, ``perturbations_per_eval`` at
    a time (``None``: :func:`auto_perturbations_per_eval`);
    ``context(b_idx, j_idx)``, if given, is a context manager active during
    that chunk's forward pass (for example a layer-output hook). Returns a
    ``(B, n_per_sample)`` tensor on the input's device.
    """
    batch = inputs[0].shape[0]
    device = inputs[0].device
    total = batch * n_per_sample
    if perturbations_per_eval is None:
        perturbations_per_eval = auto_perturbations_per_eval(inputs, total)
    if isinstance(perturbations_per_eval, bool) or perturbations_per_eval < 1:
        raise AttributionInputError(
            "perturbations_per_eval must be an integer >= 1, or None for an "
            f"automatic chunk size; got {perturbations_per_eval!r}."
        )
    targets = per_sample_targets(target, batch)
    scores = torch.empty(total, device=device)
    starts = range(0, total, perturbations_per_eval)
    if show_progress:
        from captum._utils.progress import progress

        starts = progress(starts, desc=desc, total=len(starts))
    for start in starts:
        idx = torch.arange(start, min(start + perturbations_per_eval, total))
        b_idx, j_idx = idx // n_per_sample, idx % n_per_sample
        batch_inputs = make_batch(b_idx, j_idx)
        sub_target = stack_targets([targets[int(b)] for b in b_idx])
        args = rows(additional_forward_args, b_idx.to(device), batch)
        ctx = context(b_idx, j_idx) if context is not None else contextlib.nullcontext()
        with ctx:
            scores[start : start + len(idx)] = target_scores(
                forward_func, batch_inputs, sub_target, args
            )
    return scores.reshape(batch, n_per_sample)
