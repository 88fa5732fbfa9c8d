"""Shared machinery of every method: inputs, targets, hooks and layer capture.

Each attribution class states only its own arithmetic; everything that touches
the model (hooks, the forward and backward passes, target selection, the token
layout, the errors users see) lives here once and reuses Captum's helpers.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import os
import sys
import threading
import time
import warnings
from types import FrameType
from typing import (
    Any,
    Callable,
    Dict,
    Iterator,
    List,
    Optional,
    Sequence,
    Set,
    Tuple,
    Union,
)

import torch
from captum._utils.common import _run_forward, _select_targets
from captum._utils.gradient import (
    _forward_layer_eval,
    compute_layer_gradients_and_eval,
)
from captum._utils.typing import TargetType
from torch import Tensor, nn

from captum_ssl._outputs import keep_device_ids, model_output
from captum_ssl._progress import progress_bar
from captum_ssl.attr._layout import TokenLayout, layout_for, root_module

nan = float("nan")

TensorOrTuple = Union[Tensor, Tuple[Tensor, ...]]


class AttributionInputError(ValueError):
    """Bad input to an attribution method; the message names the fix."""


class AttributionAssertionError(AttributionInputError, AssertionError):
    """Bad input that Captum rejects with an ``AssertionError``: a target that
    does not fit the model's output (type, shape, length, missing), a layer
    that never runs. Catchable as :class:`AttributionInputError` (a
    ``ValueError``) and as ``AssertionError``, as code written against Captum
    expects; the message names the fix."""


class CompiledLayerError(AttributionAssertionError, RuntimeError):
    """A layer inside a TorchScript model (``torch.jit.trace`` /
    ``torch.jit.script``), which no layer method can hook. Catchable as what
    Captum raises there: ``AssertionError`` (a traced model: the hook never
    runs) and ``RuntimeError`` (a scripted model refuses the hook)."""


def compiled_layer_error(layer: nn.Module) -> CompiledLayerError:
    """The error for ``layer``, a submodule of a TorchScript model."""
    name = getattr(layer, "original_name", type(layer).__name__)
    return CompiledLayerError(
        f"The layer {name} is part of a TorchScript model (torch.jit.trace or "
        "torch.jit.script): the compiled forward calls it without Python hooks, "
        "so no layer method (Captum's included) can read its output. Explain the "
        "eager model (the module before tracing or scripting, with the same "
        "weights) instead; a TorchScript part after the layer is fine."
    )


class TrainModeWarning(UserWarning):
    """The model (or a module of it) was in training mode; the call ran in eval."""


class NonFiniteWarning(UserWarning):
    """A model output or a map is NaN / Inf; the affected maps are NaN."""


class ConcurrentCallError(RuntimeError):
    """Another thread kept explaining the same model for longer than the
    caller's ``timeout``; the message names the fix."""


_HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # captum_ssl/
_SKIP = (
    _HERE,
    os.path.dirname(os.path.abspath(_run_forward.__code__.co_filename)).rsplit(
        os.sep + "_utils", 1
    )[0],  # captum (its log_usage wrappers)
    os.path.dirname(contextlib.__file__) + os.sep + "contextlib",
)


def user_stacklevel() -> int:
    """``stacklevel`` of the first frame outside captum_ssl (and contextlib),
    so that a warning points at the user's call."""
    frame: Optional[FrameType] = sys._getframe(1)
    level = 1
    while frame is not None and frame.f_code.co_filename.startswith(_SKIP):
        frame, level = frame.f_back, level + 1
    return level


# ---------------------------------------------------------------- concurrency
#: per thread holding models: the module-id sets of its nested calls
_HELD: Dict[int, List[Set[int]]] = {}
_HELD_CHANGED = threading.Condition()
#: a wait longer than this warns once (a deadlock would otherwise be silent)
LOCK_WAIT_WARNING_S = 60.0


def _after_fork_in_child() -> None:
    """A forked process (DataLoader worker) has only the forking thread: the
    other threads' calls do not exist there, and the condition's lock may
    have been held by one of them at the fork."""
    global _HELD_CHANGED
    me = threading.get_ident()
    for ident in [t for t in _HELD if t != me]:
        del _HELD[ident]
    _HELD_CHANGED = threading.Condition()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def models_behind(forward_func: Any) -> List[nn.Module]:
    """The modules an explanation of ``forward_func`` can run and change.

    ``forward_func`` itself or a bound method's owner (:func:`root_module`);
    for a plain function (a ``lambda`` or ``def`` wrapping the model) or a
    ``functools.partial``, the modules it refers to: its closure variables,
    the global names its code reads, the partial's arguments.
    """
    model = root_module(forward_func)
    if model is not None:
        return [model]
    if isinstance(forward_func, functools.partial):
        found = models_behind(forward_func.func)
        parts = [*forward_func.args, *forward_func.keywords.values()]
        return found + [m for m in parts if isinstance(m, nn.Module)]
    code = getattr(forward_func, "__code__", None)
    if code is None:
        return []
    values = []
    for cell in getattr(forward_func, "__closure__", None) or ():
        with contextlib.suppress(ValueError):  # an empty cell
            values.append(cell.cell_contents)
    names = getattr(forward_func, "__globals__", {})
    values += [names[n] for n in code.co_names if n in names]
    return [m for m in values if isinstance(m, nn.Module)]


@contextlib.contextmanager
def model_lock(forward_func: Any, timeout: Optional[float] = None) -> Iterator[None]:
    """Within the block, no other thread runs an explanation of this model.

    Every attribution and metric of captum_ssl runs inside this lock (entered
    by :func:`attribution_call` and :func:`eval_mode`), because a call changes
    the model while it runs: hooks on its layers, which fire for every
    thread's forward pass; parameters frozen; attention flags and a few
    modules' ``forward`` replaced; training-mode modules switched to eval.
    Two calls on one model from two threads therefore run one after the
    other, each giving the result it gives alone, and the model is exactly
    as before once both have returned. Calls on different models run in
    parallel. The lock covers every module of ``forward_func``'s model
    (:func:`models_behind`), so a wrapper (``EmbeddingSimilarity(vit, refs)``,
    ``nn.Sequential(normalize, vit)``, a ``lambda x: vit(x)``) and the model
    it wraps share it. It is re-entrant: nested calls of one thread (a metric
    running an attribution, Captum's ``NoiseTunnel``) do not wait. Nothing is
    stored on the model (it stays picklable and copyable), and a forked
    process (a DataLoader worker) starts with no lock held.

    Use it for your own code that runs the model while other threads explain
    it (a forward pass for a prediction), or to bound the wait::

        >>> with model_lock(model):
        ...     logits = model(x)  # never sees another call's hooks or modes
        >>> with model_lock(model, timeout=5.0):  # ConcurrentCallError after 5 s
        ...     maps = LayerGradCam(model, model.layer4).attribute(x, target=3)

    Args:
        forward_func (Callable): the model, or a function or wrapper that
                    runs it.
        timeout (float, optional): seconds to wait for other threads' calls
                    on the model; ``None`` waits as long as they run (with a
                    warning after :data:`LOCK_WAIT_WARNING_S`). Default: None

    Raises:
        ConcurrentCallError: the wait exceeded ``timeout``.
    """
    roots = models_behind(forward_func)
    me = threading.get_ident()
    held = _HELD.get(me)  # only this thread changes its own entry
    if held and all(any(id(r) in s for s in held) for r in roots):
        mine: Set[int] = set()  # nested in a call that holds the model already
    else:
        mine = {id(m) for root in roots for m in root.modules()}
    start = time.monotonic()
    warned = False
    with _HELD_CHANGED:
        while True:
            busy = [t for t, sets in _HELD.items() if t != me and _overlaps(sets, mine)]
            if not busy:
                break
            waited = time.monotonic() - start
            if timeout is not None and waited >= timeout:
                raise ConcurrentCallError(_busy_message(forward_func, busy, waited))
            if not warned and waited >= LOCK_WAIT_WARNING_S:
                warned = True
                warnings.warn(
                    _busy_message(forward_func, busy, waited) + " Still waiting.",
                    stacklevel=user_stacklevel(),
                )
            limits = [LOCK_WAIT_WARNING_S - waited] if not warned else []
            if timeout is not None:
                limits.append(timeout - waited)
            _HELD_CHANGED.wait(max(0.0, min(limits)) if limits else None)
        _HELD.setdefault(me, []).append(mine)
    try:
        yield
    finally:
        with _HELD_CHANGED:
            stack = _HELD.get(me, [])
            if stack:
                stack.pop()
            if not stack:
                _HELD.pop(me, None)
            _HELD_CHANGED.notify_all()


def _overlaps(sets: List[Set[int]], mine: Set[int]) -> bool:
    return any(not s.isdisjoint(mine) for s in sets)


def _busy_message(forward_func: Any, busy: List[int], waited: float) -> str:
    names = {t.ident: t.name for t in threading.enumerate()}
    models = models_behind(forward_func)
    what = type(models[0]).__name__ if models else "this model"
    return (
        f"{what} is being explained by another thread "
        f"({', '.join(names.get(t, str(t)) for t in busy)}) for {waited:.0f} s: "
        "calls on one model run one at a time (each call changes the model while "
        "it runs). For explanations in parallel, give each thread its own model "
        "(`copy.deepcopy(model)`); to wait longer, use "
        "`with captum_ssl.attr.model_lock(model, timeout=None):`."
    )


# ------------------------------------------------------------ the model's mode
#: rows of the explained batch whose model output was not finite (per call)
_BAD_ROWS: contextvars.ContextVar[Optional[List[Tensor]]] = contextvars.ContextVar(
    "captum_ssl_bad_rows", default=None
)


@contextlib.contextmanager
def eval_mode(forward_func: Callable, what: str = "explaining") -> Iterator[None]:
    """Run the block with every module of ``forward_func``'s model in eval mode.

    A model in training mode updates BatchNorm's running statistics and drops
    activations at random in every forward pass, so a map or a metric would
    change the model and depend on chance. Any module found in training mode
    is switched to eval for the block, with one :class:`TrainModeWarning`
    naming ``model.eval()``, and each module gets its own mode back on exit,
    also when the block raises. Nested calls (a metric running an
    attribution) warn only once: the inner call finds the model in eval mode.
    Without a module behind ``forward_func`` this is a no-op. The block runs
    inside :func:`model_lock`: no other thread's call sees the switch.
    """
    with model_lock(forward_func):
        model = root_module(forward_func)
        training = [] if model is None else [m for m in model.modules() if m.training]
        if training and model is not None:
            names = [n or "(the model)" for n, m in model.named_modules() if m.training]
            warnings.warn(
                f"{type(model).__name__} is in training mode ({len(training)} "
                f"modules, e.g. {', '.join(names[:3])}): {what} runs it in eval "
                "mode for this call (BatchNorm statistics untouched, dropout off) "
                "and restores the mode afterwards. Call model.eval() first to make "
                "this explicit.",
                TrainModeWarning,
                stacklevel=user_stacklevel(),
            )
        for m in training:
            m.training = False
        try:
            yield
        finally:
            for m in training:
                m.training = True


@contextlib.contextmanager
def attribution_call(
    forward_func: Callable, keep_mode: bool = False
) -> Iterator[List[Tensor]]:
    """The scope of one ``attribute`` call: eval mode (:func:`eval_mode`) and a
    record of the batch rows whose model output is not finite, for
    :func:`finish_maps`. Nested scopes share the outermost record.

    ``keep_mode=True`` (differentiable maps, ``create_graph=True``, computed
    inside a training step) leaves every module's mode as the caller set it.
    Either way the call holds :func:`model_lock`: calls on one model from
    several threads run one after the other. A model whose family needs a
    forward of its own for the call (ViT-MAE keeps its patches in order) has
    it installed for the block (:func:`~captum_ssl.attr._families.base.
    family_call`)."""
    from captum_ssl.attr._families.base import family_call

    outer = _BAD_ROWS.get()
    record: List[Tensor] = [] if outer is None else outer
    token = _BAD_ROWS.set(record) if outer is None else None
    try:
        with (
            model_lock(forward_func),
            contextlib.nullcontext() if keep_mode else eval_mode(forward_func),
            family_call(forward_func),
        ):
            yield record
    finally:
        if token is not None:
            _BAD_ROWS.reset(token)


def finish_maps(maps: Tuple[Tensor, ...], record: List[Tensor]) -> Tuple[Tensor, ...]:
    """Maps with NaN rows where the model's output was not finite, and one
    :class:`NonFiniteWarning` naming the samples whose maps are not finite."""
    out = []
    for m in maps:
        for bad in record:
            if bad.shape[0] == m.shape[0] and bool(bad.any()):
                m = m.masked_fill(bad.to(m.device).view(-1, *[1] * (m.dim() - 1)), nan)
        out.append(m)
    rows = [
        i
        for m in out
        if m.dim() > 0 and m.is_floating_point()
        for i in (~torch.isfinite(m.flatten(1)).all(1)).nonzero().flatten().tolist()
    ]
    if rows:
        warnings.warn(
            f"The maps of sample(s) {sorted(set(rows))[:10]} are NaN or Inf: the "
            "model's output or activations for them are not finite (NaN weights, "
            "NaN/Inf inputs, or an overflow in half precision). They are returned "
            "as NaN, not as a value.",
            NonFiniteWarning,
            stacklevel=user_stacklevel(),
        )
    return tuple(out)


def _record_bad_rows(out: Tensor) -> None:
    record = _BAD_ROWS.get()
    if record is not None and out.dim() > 0 and out.is_floating_point():
        record.append(~torch.isfinite(out.reshape(out.shape[0], -1)).all(1))


# --------------------------------------------------------------------- inputs
def format_inputs(
    inputs: TensorOrTuple, needs_grad: bool = True, forward_func: Any = None
) -> Tuple[Tensor, ...]:
    """Inputs as a tuple of tensors with a common, non-empty batch dimension.

    Refuses NaN / Inf values (naming the samples), a single unbatched image
    ``(C, H, W)`` given to an image model (``forward_func`` with a 2-D
    convolution), and, where ``needs_grad``, tensors made under
    ``torch.inference_mode()``.
    """
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
    x = inputs[0]
    model = root_module(forward_func) if forward_func is not None else None
    if (
        x.dim() == 3
        and x.shape[0] in (1, 3)
        and model is not None
        and any(isinstance(m, nn.Conv2d) for m in model.modules())
    ):
        raise AttributionInputError(
            f"inputs has shape {tuple(x.shape)}: one unbatched image (C, H, W). "
            "Add the batch dimension: `x.unsqueeze(0)` (or `x[None]`)."
        )
    check_device(model, inputs)
    check_patch_grid(model, x)
    if needs_grad and (
        torch.is_inference_mode_enabled() or any(t.is_inference() for t in inputs)
    ):
        raise AttributionInputError(
            "inputs were created under torch.inference_mode(), which forbids the "
            "autograd graph this method needs. Create them under torch.no_grad() "
            "or outside any grad mode, or call `.clone()` outside inference_mode. "
            "(LayerEigenCam, LayerScoreCam, LayerAblationCam and the gradient-free "
            "attention methods work under inference_mode.)"
        )
    check_finite(inputs)
    return inputs


def check_device(model: Optional[nn.Module], inputs: Tuple[Tensor, ...]) -> None:
    """Refuse inputs on another device than the model's weights (which fail
    deep inside the forward pass, e.g. ``Tensor.item() cannot be called on
    meta tensors``). DataParallel models scatter their inputs themselves."""
    if model is None or isinstance(model, nn.DataParallel):
        return
    weight = next(model.parameters(), None)
    if weight is None:
        return
    bad = [t.device for t in inputs if t.device != weight.device]
    if not bad:
        return
    if weight.device.type == "meta":
        raise AttributionInputError(
            "The model's weights are on the meta device: they were never loaded "
            "(a model built with device='meta' or empty weights). Load its "
            "weights (e.g. `model.to_empty(device='cpu')` then "
            "`load_state_dict`) before explaining it."
        )
    raise AttributionInputError(
        f"inputs are on {bad[0]} but the model's weights are on {weight.device}: "
        f"move the inputs, `x = x.to('{weight.device}')` (or the model, "
        f"`model.to('{bad[0]}')`)."
    )


def check_patch_grid(model: Optional[nn.Module], x: Tensor) -> None:
    """Refuse an image size a timm patch embedding cannot take, naming the
    sizes that work (timm's own assertion names neither the fix nor them)."""
    embed = getattr(model, "patch_embed", None)
    patch = getattr(embed, "patch_size", None)
    if x.dim() != 4 or not isinstance(patch, tuple) or len(patch) != 2:
        return
    hw = (int(x.shape[-2]), int(x.shape[-1]))
    if getattr(embed, "strict_img_size", False):
        size = tuple(getattr(embed, "img_size", None) or ())
        if size and hw != size:
            raise AttributionInputError(
                f"inputs are {hw[0]} x {hw[1]} but the model takes {size[0]} x "
                f"{size[1]} images: resize them (the model's preprocessing), or "
                "build the timm model with dynamic_img_size=True."
            )
        return
    if getattr(embed, "dynamic_img_pad", False):
        return
    if hw[0] % patch[0] or hw[1] % patch[1]:
        sizes = [f"{(n // p) * p} or {-(-n // p) * p}" for n, p in zip(hw, patch)]
        raise AttributionInputError(
            f"inputs are {hw[0]} x {hw[1]}, not a multiple of the model's "
            f"{patch[0]} x {patch[1]} patches: crop or pad them to a height of "
            f"{sizes[0]} and a width of {sizes[1]}, or build the timm model "
            "with dynamic_img_pad=True."
        )


def check_finite(inputs: Tuple[Tensor, ...], name: str = "inputs") -> None:
    """Raise a clear error naming the samples where ``inputs`` hold NaN / Inf."""
    for i, t in enumerate(inputs):
        if not t.is_floating_point() or t.dim() == 0:
            continue
        bad = ~torch.isfinite(t.reshape(t.shape[0], -1)).all(1)
        if bool(bad.any()):
            where = f"{name}[{i}]" if len(inputs) > 1 else name
            raise AttributionInputError(
                f"{where} holds NaN or Inf values in sample(s) "
                f"{bad.nonzero().flatten().tolist()[:10]}: an explanation of them "
                "would be meaningless. Fix or drop those samples (e.g. "
                "`keep = torch.isfinite(x).flatten(1).all(1); x = x[keep]`)."
            )


def layer_hint(forward_func: Optional[Callable]) -> str:
    """A layer of the user's own model for error messages: for a Vision
    Transformer the norm before the last block's attention, named by its
    family adapter as it appears in the model (``model.blocks[-1].norm1``,
    ``model.vit.layers[-1].layernorm_before``, ``model.encoder.layers[-1].ln_1``
    ...; through a wrapper such as EmbeddingSimilarity with the wrapper's
    path); else the usual CNN and timm examples."""
    from captum_ssl.attr._families import find_adapter

    root = None if forward_func is None else root_module(forward_func)
    try:
        adapter = None if root is None else find_adapter(root)
    except Exception:  # a message must never fail: fall back to the examples
        adapter = None
    if adapter is None:
        return "`model.layer4` (a ResNet) or `model.blocks[-1].norm1` (a timm ViT)"
    hint = adapter.norm_layer_hint()
    if hint.startswith("model") and root is not None and adapter.model is not root:
        from captum_ssl.models._layers import layer_expression

        path = next(n for n, m in root.named_modules() if m is adapter.model)
        hint = layer_expression(path) + hint[len("model") :]
    return f"`{hint}`" if hint.startswith("model") else hint


def check_layer(forward_func: Callable, layer: Any) -> None:
    """Refuse a layer that is not a module, a layer inside a TorchScript model,
    and a ``torch.compile``d model."""
    model = root_module(forward_func)
    if isinstance(layer, str):
        raise AttributionInputError(
            f"layer must be the module itself, not the string {layer!r}: pass "
            f"`model.get_submodule({layer!r})` (or e.g. {layer_hint(forward_func)})."
        )
    if not isinstance(layer, nn.Module):
        raise AttributionInputError(
            f"layer must be an nn.Module of the model, got {type(layer).__name__}: "
            f"pass e.g. {layer_hint(forward_func)}."
        )
    if isinstance(model, torch.jit.ScriptModule) and any(
        m is layer for m in model.modules()
    ):
        raise compiled_layer_error(layer)
    check_not_compiled(model)


def check_not_compiled(model: Optional[nn.Module]) -> None:
    """Refuse a ``torch.compile``d module: hooks on its layers do not run."""
    if (
        model is not None
        and hasattr(model, "_orig_mod")
        and hasattr(model, "_torchdynamo_orig_callable")
    ):
        raise AttributionInputError(
            f"forward_func is a torch.compile'd {type(model._orig_mod).__name__}: "
            "the compiled graph does not run the hooks these methods put on its "
            "layers. Explain the original model: pass `model._orig_mod` (the "
            "module you compiled), and its layers."
        )


def input_hw(inputs: Tuple[Tensor, ...]) -> Optional[Tuple[int, int]]:
    """Spatial size of an image batch ``(B, C, H, W)``, else ``None``."""
    x = inputs[0]
    return (int(x.shape[-2]), int(x.shape[-1])) if x.dim() == 4 else None


# -------------------------------------------------------------------- targets
def normalize_target(target: TargetType) -> TargetType:
    """``target`` in one canonical form, or a clear error.

    The rule of every method and metric: an int (negative counts from the
    end), a tuple (Captum's multi-dimensional index), a list with one int or
    tuple per sample, a 1-D integer tensor (one entry, or one per sample), or
    a ``(B, 1)`` integer tensor (flattened). A bool or a float (also as a
    tensor) is refused: ``True`` would silently mean class 1, ``3.0`` a
    truncated index.
    """

    def refuse(what: str) -> AttributionInputError:
        return AttributionAssertionError(
            f"target {what} is not a class index: pass an int (e.g. target=3), a "
            "list of ints or an integer tensor with one class per sample (e.g. "
            "`labels.long()`)."
        )

    if target is None:
        return None
    if isinstance(target, bool):
        raise refuse(f"{target!r} (a bool)")
    if isinstance(target, int):
        return int(target)
    if isinstance(target, float):
        raise refuse(f"{target!r} (a float)")
    if isinstance(target, Tensor):
        if (
            target.dtype == torch.bool
            or target.is_floating_point()
            or (target.is_complex())
        ):
            raise refuse(f"of dtype {target.dtype}")
        if target.dim() == 2 and target.shape[1] == 1:
            target = target[:, 0]
        if target.dim() > 1:
            raise AttributionAssertionError(
                f"target has shape {tuple(target.shape)}: give one class per "
                "sample as a 1-D tensor (B,) or (B, 1), or one int."
            )
        return target.long()
    if isinstance(target, tuple):
        return tuple(normalize_target(t) for t in target)
    if isinstance(target, list):
        out = []
        for t in target:
            if isinstance(t, Tensor) and t.numel() == 1:
                t = normalize_target(t).item()
            elif not isinstance(t, (int, tuple)) or isinstance(t, bool):
                raise refuse(f"entry {t!r} ({type(t).__name__}) in the target list")
            out.append(normalize_target(t))
        return out
    raise AttributionAssertionError(
        f"Unsupported target type {type(target).__name__}: use an int, a tuple, "
        "a tensor or a list with one entry per sample."
    )


def check_target_count(target: TargetType, batch: int) -> None:
    """Raise a clear error when a per-sample ``target`` (normalised) does not
    hold one entry per sample of a batch of ``batch`` (a single class is fine)."""
    if isinstance(target, Tensor) and target.numel() not in (1, batch):
        raise AttributionAssertionError(
            f"target has {target.numel()} entries for a batch of {batch}: give "
            "one class index, or one per sample."
        )
    if isinstance(target, list) and len(target) != batch:
        raise AttributionAssertionError(
            f"target is a list of {len(target)} for a batch of {batch}: give "
            "one target per sample."
        )


def check_target(output: Tensor, target: TargetType) -> None:
    """Raise a clear error when ``target`` cannot index ``output``."""
    target = normalize_target(target)
    if target is None:
        if output.dim() > 1 and output[0].numel() > 1:
            raise AttributionAssertionError(
                f"The model returns {tuple(output.shape)} scores per batch; pass "
                "target=<class index> (an int, or one per sample) to choose one."
            )
        return
    batch = output.shape[0]
    check_target_count(target, batch)
    tuples = [target] if isinstance(target, tuple) else []
    if isinstance(target, list):
        tuples = [t for t in target if isinstance(t, tuple)]
    for t in tuples:
        if len(t) > output.dim() - 1:
            raise AttributionAssertionError(
                f"target {t} indexes {len(t)} output dimensions, but the model "
                f"returns {tuple(output.shape)} ({output.dim() - 1} per sample): "
                "pass one index per output dimension after the batch, e.g. "
                f"target={t[: max(output.dim() - 1, 1)]}."
            )
    if isinstance(target, Tensor):
        indices: Sequence = target.flatten().tolist()
    elif isinstance(target, int):
        indices = [target]
    elif isinstance(target, tuple):
        indices = [target[0]]
    else:
        indices = [t[0] if isinstance(t, tuple) else t for t in target]
    if output.dim() < 2:
        raise AttributionAssertionError(
            f"The model returns one score per sample {tuple(output.shape)}; call "
            "attribute with target=None."
        )
    n = output.shape[1]
    bad = [int(i) for i in indices if not -n <= int(i) < n]
    if bad:
        raise AttributionAssertionError(
            f"target {bad[0]} is out of range for a model with {n} outputs: use a "
            f"class index in [0, {n - 1}] (or a negative index down to {-n})."
        )


def select_target(output: Tensor, target: TargetType) -> Tensor:
    """The scores of ``target`` in ``output`` (checked), one per sample.

    Negative indices count from the end, also in lists and tensors (where
    ``torch.gather`` alone would fail)."""
    check_target(output, target)
    target = normalize_target(target)
    if target is None or isinstance(target, tuple):
        return _select_targets(output, target)
    if isinstance(target, int):
        return output[:, target]
    if isinstance(target, list) and any(isinstance(t, tuple) for t in target):
        return _select_targets(output, target)
    n = output.shape[1]
    idx = torch.as_tensor(target, dtype=torch.long, device=output.device).flatten()
    idx = idx.remainder(n).expand(output.shape[0])
    return output.gather(1, idx.reshape(-1, 1)).reshape(output.shape[0])


def per_sample_targets(target: TargetType, batch: int) -> List[Any]:
    """``target`` as one entry per sample (``None`` entries when target is None)."""
    target = normalize_target(target)
    if target is None:
        return [None] * batch
    check_target_count(target, batch)
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
    """``forward_func`` that validates ``target`` against its output (for one
    forward pass of the whole explained batch: rows whose output is not
    finite are recorded for :func:`finish_maps`). A Hugging Face
    ``ModelOutput`` is read as a tensor (:func:`~captum_ssl._outputs.model_output`)."""

    def forward(*args: Any, **kwargs: Any) -> Tensor:
        out = model_output(forward_func(*args, **kwargs))
        if isinstance(out, Tensor):
            check_target(out, target)
            _record_bad_rows(out)  # a full-batch forward: see finish_maps
        return out

    # keep what Captum reads off the forward function (DataParallel)
    keep_device_ids(forward, forward_func)
    return forward


def selecting_forward(
    forward_func: Callable,
    target: TargetType,
    batch_rows: bool = True,
    select: bool = True,
) -> Callable:
    """``forward_func`` returning the ``target`` scores ``(B,)`` (checked).

    Pass it to Captum's helpers with ``target=None``: the selection here
    applies one target rule everywhere (:func:`normalize_target`). With
    ``batch_rows``, the output rows are those of the explained batch, and the
    rows whose output is not finite are recorded for :func:`finish_maps`.
    With ``select=False`` (gradient-free methods without a target) the output
    is returned whole. A Hugging Face ``ModelOutput`` is read as a tensor
    first (:func:`~captum_ssl._outputs.model_output`: a classifier's
    ``logits``, a backbone's ``pooler_output`` or class token).
    """

    def forward(*args: Any, **kwargs: Any) -> Tensor:
        out = model_output(forward_func(*args, **kwargs))
        if not isinstance(out, Tensor):
            return out
        if batch_rows:
            _record_bad_rows(out)
        return select_target(out, target) if select else out

    keep_device_ids(forward, forward_func)
    return forward


def target_scores(
    forward_func: Callable,
    inputs: Tuple[Tensor, ...],
    target: TargetType,
    additional_forward_args: Any = None,
) -> Tensor:
    """One score per sample: the model's output at ``target`` (no gradients)."""
    with torch.no_grad(), eval_mode(forward_func):
        out = _run_forward(
            selecting_forward(forward_func, target, batch_rows=False),
            inputs,
            additional_forward_args=additional_forward_args,
        )
        return out.reshape(inputs[0].shape[0])


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
def layer_errors(
    layer: nn.Module, forward_func: Optional[Callable] = None
) -> Iterator[None]:
    """Turn Captum's and autograd's generic failures into errors naming the fix
    (and a layer of ``forward_func``'s model)."""
    try:
        yield
    except AssertionError as err:
        if "did not obtain any outputs" in str(err) and isinstance(
            layer, torch.jit.ScriptModule
        ):
            raise compiled_layer_error(layer) from err
        if "did not obtain any outputs" in str(err):
            raise AttributionAssertionError(
                f"The layer {layer.__class__.__name__} never ran in the forward pass. "
                "Pass a submodule that the model's forward actually calls (for "
                f"example {layer_hint(forward_func)}; print(model) lists them), and "
                "the same model instance as forward_func."
            ) from err
        raise
    except RuntimeError as err:
        msg = str(err)
        if "is not supported on ScriptModules" in msg:
            raise compiled_layer_error(layer) from err
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
    The block runs inside :func:`model_lock`.
    """
    with model_lock(forward_func):
        model = root_module(forward_func)
        params = (
            [] if model is None else [p for p in model.parameters() if p.requires_grad]
        )
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
    attribute_to_layer_input: bool = False,
) -> TokenLayout:
    """The layout of ``layer``'s output (or, with ``attribute_to_layer_input``,
    its input) for this call (the grid follows the input size)."""
    return layout_for(
        forward_func, layer, input_hw(inputs), layout, attribute_to_layer_input
    )


def _grid_tuple(
    layout: TokenLayout,
    batch: Optional[int] = None,
    forward_func: Optional[Callable] = None,
) -> Callable:
    def to_grids(tensors: Tuple[Tensor, ...]) -> Tuple[Tensor, ...]:
        for t in tensors:
            if batch is not None and t.dim() > 0 and t.shape[0] != batch:
                raise AttributionInputError(
                    f"The layer's output {tuple(t.shape)} has {t.shape[0]} rows for "
                    f"a batch of {batch}: it is not one map per image (windowed "
                    "attention such as Swin's `attn` splits images into windows). "
                    "Explain the block or its norm instead, e.g. "
                    "`layers[-1].blocks[-1].norm1`."
                )
        try:
            return tuple(layout.to_grid(t) for t in tensors)
        except ValueError as err:
            if forward_func is None or "Unsupported layer output" not in str(err):
                raise
            raise AttributionInputError(
                f"{err} In this model: {layer_hint(forward_func)}."
            ) from err

    return to_grids


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
    create_graph: bool = False,
) -> Tuple[Tuple[Tensor, ...], Tuple[Tensor, ...]]:
    """Activations and target gradients of ``layer`` as channels-first grids
    ``(B, C, *spatial)`` (``(B, C, h, w)`` for token and channels-last layers).

    One forward pass with a hook on ``layer`` and one backward pass from the
    selected target down to the layer only (Captum's
    ``compute_layer_gradients_and_eval``); the hook is always removed.

    ``create_graph=True`` keeps the autograd graph instead: parameters are not
    frozen, the gradients are taken with ``create_graph=True`` and nothing is
    detached, so a loss on a map built from them backpropagates into the
    model's parameters (second-order terms included).
    """
    lay = resolve_layout(forward_func, layer, inputs, layout, attribute_to_layer_input)
    device_ids = device_ids or getattr(forward_func, "device_ids", None)
    batch = None if device_ids else inputs[0].shape[0]
    if create_graph:
        grad_kwargs = {**(grad_kwargs or {}), "create_graph": True}
    # a differentiable map (create_graph) keeps the graph to the parameters
    # and the caller's train/eval mode: it is computed inside a training step
    record = (
        contextlib.nullcontext()
        if create_graph
        else record_from_layer_only(forward_func)
    )
    mode = contextlib.nullcontext() if create_graph else eval_mode(forward_func)
    with layer_errors(layer, forward_func), record, mode:
        grads, acts = compute_layer_gradients_and_eval(
            selecting_forward(forward_func, target),
            layer,
            inputs,
            None,
            additional_forward_args,
            device_ids=device_ids,
            attribute_to_layer_input=attribute_to_layer_input,
            output_fn=_grid_tuple(lay, batch, forward_func),
            grad_kwargs=grad_kwargs,
        )
    if not create_graph and all(bool((g == 0).all()) for g in grads):
        warnings.warn(
            f"All gradients at the layer {layer.__class__.__name__} are zero for "
            "this target, so gradient-based maps are empty. With a class-token "
            "head the last block's patch tokens do not reach the output: use an "
            f"earlier layer such as {layer_hint(forward_func)}.",
            stacklevel=3,
        )
    if create_graph:
        return tuple(acts), tuple(grads)
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
    """Activations of ``layer`` as channels-first grids ``(B, C, *spatial)``,
    without gradients.

    A ``target`` other than ``None`` is checked against the model's output."""
    lay = resolve_layout(forward_func, layer, inputs, layout, attribute_to_layer_input)
    device_ids = device_ids or getattr(forward_func, "device_ids", None)
    with layer_errors(layer, forward_func), torch.no_grad(), eval_mode(forward_func):
        acts = _forward_layer_eval(
            selecting_forward(forward_func, target, select=target is not None),
            inputs,
            layer,
            additional_forward_args,
            device_ids=device_ids,
            attribute_to_layer_input=attribute_to_layer_input,
        )
    batch = None if device_ids else inputs[0].shape[0]
    return _grid_tuple(lay, batch, forward_func)(acts)


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


def draw(
    sample: Callable[..., Tensor],
    shape: Sequence[int],
    generator: Optional[torch.Generator],
    like: Tensor,
) -> Tensor:
    """``sample(shape)`` (``torch.rand`` or ``torch.randn``) in ``like``'s dtype,
    drawn on ``generator``'s device and moved to ``like``'s: a generator on any
    device gives the same numbers for an input on the CPU or a GPU. Without a
    generator, torch's global one of ``like``'s device."""
    device = generator.device if generator is not None else like.device
    out = sample(tuple(shape), generator=generator, device=device, dtype=like.dtype)
    return out.to(like.device)


def working_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the library computes scores and map arithmetic in for a
    model of ``dtype``: float32, or ``dtype`` itself where it is wider
    (float64). bfloat16 / float16 keep 8 / 11 significant bits, too few for
    sums of products over layers, or for differences of close scores."""
    return torch.promote_types(dtype, torch.float32)


def refuse_precision(
    forward_func: Callable,
    inputs: Any,
    dtypes: Tuple[torch.dtype, ...],
    method: str,
    why: str,
) -> None:
    """Refuse a model or inputs in one of ``dtypes``, for a method whose map
    a pass in that precision cannot give correctly (``why``), naming the fix."""
    xs = inputs if isinstance(inputs, tuple) else (inputs,)
    found = [x.dtype for x in xs if isinstance(x, Tensor) and x.is_floating_point()]
    for model in models_behind(forward_func):
        param = next((p for p in model.parameters() if p.is_floating_point()), None)
        if param is not None:
            found.append(param.dtype)
    bad = next((d for d in found if d in dtypes), None)
    if bad is not None:
        raise AttributionInputError(
            f"{method} is not correct in {bad} ({why}): explain a float32 copy, "
            "model.float() with inputs.float()."
        )


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
    scores: Optional[Tensor] = None  # float32, or the model's dtype if wider
    chunks = range(0, total, perturbations_per_eval)
    starts = progress_bar(chunks, desc, len(chunks), show_progress, unit="batch")
    # one eval-mode switch (and at most one warning) for the whole loop
    with eval_mode(forward_func):
        for start in starts:
            idx = torch.arange(start, min(start + perturbations_per_eval, total))
            b_idx, j_idx = idx // n_per_sample, idx % n_per_sample
            batch_inputs = make_batch(b_idx, j_idx)
            sub_target = stack_targets([targets[int(b)] for b in b_idx])
            args = rows(additional_forward_args, b_idx.to(device), batch)
            ctx = context(b_idx, j_idx) if context else contextlib.nullcontext()
            with ctx:
                chunk = target_scores(forward_func, batch_inputs, sub_target, args)
            if scores is None:
                dtype = working_dtype(chunk.dtype)
                scores = torch.empty(total, device=device, dtype=dtype)
            scores[start : start + len(idx)] = chunk
    if scores is None:  # nothing to evaluate
        scores = torch.empty(total, device=device)
    return scores.reshape(batch, n_per_sample)
