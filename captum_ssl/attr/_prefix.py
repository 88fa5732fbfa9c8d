"""Prefix caching for methods that perturb a layer's output.

Ablation-CAM, Recipro-CAM and similar methods evaluate the model many times
with only the output of one layer changed. Everything computed before that
layer is the same in every evaluation, so it is computed once per image here:

1. **Record.** One forward pass of the batch with hooks on every submodule of
   the model. When the explained layer starts, the *frontier* is known: the
   module calls that have finished and whose caller is still running (for a
   ResNet's ``layer4``: ``conv1``, ``bn1``, ``relu``, ``maxpool``,
   ``layer1``-``layer3``; inside a block also the block's earlier calls, e.g.
   the first call of torchvision's shared Bottleneck ReLU). Their outputs are
   cloned at that moment, and the layer's output when it returns.
2. **Replay.** For a chunk of perturbations the model's own ``forward`` runs
   again on the chunk's input rows, but each frontier module's first calls
   return the recorded outputs (rows of the chunk) instead of computing, and
   the layer returns the perturbed recorded output. Everything after the layer
   runs as usual, so later code that reads tensors from before the layer
   (residual connections, DenseNet concatenations, a ViT block's skip) gets
   them from the replayed frontier; functional code (``torch.flatten``, a class
   token concatenation) runs on real rows; modules called again after the
   layer (the shared ReLU) compute normally.
3. **Prove, else fall back.** A replay of the unperturbed batch must give the
   recorded scores for every sample, and the first two perturbed evaluations
   must equal full forward passes. If either check fails (or the model calls
   the layer more than once, or the replay does not follow the recorded call
   order) the method falls back to full forward passes and warns once.
"""

from __future__ import annotations

import contextlib
import threading
import warnings
from typing import Any, Callable, Dict, Iterator, List, Optional, Set, Tuple, Union

import torch
from captum._utils.common import _run_forward
from captum._utils.typing import TargetType
from torch import Tensor, nn

from captum_ssl._outputs import model_output
from captum_ssl.attr._core import (
    checked_forward,
    chunked_scores,
    per_sample_targets,
    replace_layer_output,
    rows,
    select_target,
    stack_targets,
)
from captum_ssl.attr._layout import root_module

Perturb = Callable[[Tensor, Tensor, Tensor], Tensor]
_WARNED: Set[Tuple[str, str, str]] = set()


class _NotReplayable(RuntimeError):
    """The recorded prefix cannot be replayed for this model and layer."""


def _clone(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.detach().clone()
    if isinstance(value, tuple):
        return tuple(_clone(v) for v in value)
    if isinstance(value, list):
        return [_clone(v) for v in value]
    return value


class _Recording:
    """Outputs of the frontier calls (per module, in call order) and of the layer."""

    def __init__(self) -> None:
        self.frontier: Dict[nn.Module, List[Any]] = {}
        self.ancestors: List[nn.Module] = []
        self.layer_out: Any = None
        self.layer_calls = 0
        self.output: Any = None


def _record(layer: nn.Module, forward: Callable[[], Any]) -> _Recording:
    """Run ``forward`` once, recording the frontier at the layer's start."""
    rec = _Recording()
    # each frame: [module, completed child calls as (module, output)]
    stack: List[List[Any]] = []
    top: List[Tuple[nn.Module, Any]] = []
    me = threading.get_ident()  # the hooks are global: other threads' calls pass

    def pre(module: nn.Module, _args: Any) -> None:
        if threading.get_ident() != me:
            return
        if module is layer:
            rec.layer_calls += 1
            if rec.layer_calls == 1:
                for frame in [None, *stack]:
                    done = top if frame is None else frame[1]
                    for m, out in done:
                        rec.frontier.setdefault(m, []).append(_clone(out))
                rec.ancestors = [frame[0] for frame in stack]
        stack.append([module, []])

    def post(module: nn.Module, _args: Any, out: Any) -> None:
        if threading.get_ident() != me:
            return
        if not stack or stack[-1][0] is not module:
            raise _NotReplayable("module calls do not nest")
        stack.pop()
        if module is layer and rec.layer_calls == 1:
            rec.layer_out = _clone(out)
        if rec.layer_calls == 0:
            (stack[-1][1] if stack else top).append((module, out))

    from torch.nn.modules.module import (
        register_module_forward_hook,
        register_module_forward_pre_hook,
    )

    # global hooks: every module call, whatever object forward_func is
    handles = [register_module_forward_pre_hook(pre)]
    try:
        handles.append(register_module_forward_hook(post))
        rec.output = forward()
    finally:
        for h in handles:
            h.remove()
    if rec.layer_calls != 1:
        raise _NotReplayable(f"the layer ran {rec.layer_calls} times")
    if any(m in rec.frontier for m in rec.ancestors):
        raise _NotReplayable("a module is both before and around the layer")
    return rec


class _Replay:
    """While active, frontier modules return their recorded outputs (rows
    ``b_idx``) until the layer has run, and the layer returns ``perturb`` of
    its recorded output."""

    def __init__(self, rec: _Recording, layer: nn.Module, batch: int) -> None:
        self.rec, self.layer, self.batch = rec, layer, batch
        self.b_idx: Optional[Tensor] = None
        self.perturb: Optional[Callable[[Tensor], Tensor]] = None
        self.pos: Dict[nn.Module, int] = {}
        self.layer_done = False

    def _frontier_forward(self, module: nn.Module, original: Callable) -> Callable:
        def forward(*args: Any, **kwargs: Any) -> Any:
            if self.b_idx is None or self.layer_done:
                return original(*args, **kwargs)
            calls = self.rec.frontier[module]
            i = self.pos.get(module, 0)
            if i >= len(calls):
                raise _NotReplayable("the replay calls a module more often")
            self.pos[module] = i + 1
            return _rows(calls[i], self.b_idx, self.batch)

        return forward

    def _layer_forward(self, original: Callable) -> Callable:
        def forward(*args: Any, **kwargs: Any) -> Any:
            if self.b_idx is None:
                return original(*args, **kwargs)
            if self.layer_done or any(
                self.pos.get(m, 0) != len(c) for m, c in self.rec.frontier.items()
            ):
                raise _NotReplayable("the replay does not follow the recording")
            perturb = self.perturb
            if perturb is None:  # never: chunk() sets it with b_idx
                raise _NotReplayable("no perturbation for this chunk")
            self.layer_done = True
            return perturb(_rows(self.rec.layer_out, self.b_idx, self.batch))

        return forward

    @contextlib.contextmanager
    def installed(self) -> Iterator[_Replay]:
        """Patch the modules' ``forward`` (restored on exit, also on errors)."""
        patched: List[Tuple[nn.Module, bool, Any]] = []
        try:
            for m in [*self.rec.frontier, self.layer]:
                own = "forward" in m.__dict__
                patched.append((m, own, m.__dict__.get("forward")))
                original = m.forward
                m.forward = (
                    self._layer_forward(original)
                    if m is self.layer
                    else self._frontier_forward(m, original)
                )
            yield self
        finally:
            for m, own, old in reversed(patched):
                if own:
                    m.forward = old
                else:
                    del m.forward

    @contextlib.contextmanager
    def chunk(
        self, b_idx: Tensor, perturb: Callable[[Tensor], Tensor]
    ) -> Iterator[None]:
        self.b_idx, self.perturb, self.pos, self.layer_done = b_idx, perturb, {}, False
        try:
            yield
            if not self.layer_done:
                raise _NotReplayable("the layer did not run in the replay")
        finally:
            self.b_idx, self.perturb = None, None


def _take(t: Tensor, b_idx: Tensor) -> Tensor:
    """Rows ``b_idx`` of ``t``; a chunk of one sample is an expanded view."""
    if bool((b_idx == b_idx[0]).all()):
        b = int(b_idx[0])
        return t[b : b + 1].expand(len(b_idx), *t.shape[1:])
    return t[b_idx.to(t.device)]


def _rows(value: Any, b_idx: Tensor, batch: int) -> Any:
    """:func:`_take` of every batched tensor in ``value``."""
    if isinstance(value, Tensor):
        return _take(value, b_idx) if value.dim() and value.shape[0] == batch else value
    if isinstance(value, (tuple, list)):
        return type(value)(_rows(v, b_idx, batch) for v in value)
    return value


def _agree(a: Tensor, b: Tensor) -> bool:
    """Equal up to rounding (NaN where the model's scores are NaN), whatever
    the two dtypes (a float64 model's recorded scores against replayed ones)."""
    a, b = a.double(), b.double()
    finite = b[torch.isfinite(b)].abs()
    scale = 1.0 + float(finite.max() if finite.numel() else 0.0)
    return bool(torch.allclose(a, b, rtol=1e-4, atol=1e-4 * scale, equal_nan=True))


def record_layer(
    forward_func: Callable,
    layer: nn.Module,
    inputs: Tuple[Tensor, ...],
    target: TargetType,
    additional_forward_args: Any,
) -> Union[_Recording, str]:
    """One forward pass recording what the replay needs, with the layer's
    output (``.layer_out``) and the model's (``.output``); or the reason why
    this model cannot be replayed."""
    checked = checked_forward(forward_func, target)
    try:
        with torch.no_grad():
            return _record(
                layer,
                lambda: _run_forward(checked, inputs, None, additional_forward_args),
            )
    except _NotReplayable as err:
        return str(err)


def _warn_once(forward_func: Callable, layer: nn.Module, why: str) -> None:
    model = root_module(forward_func)
    name = type(model).__name__ if model is not None else "this model"
    key = (name, type(layer).__name__, why)
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(
            f"Prefix caching is off for {name} at the layer {type(layer).__name__} "
            f"({why}): each perturbation re-runs the whole model, which gives the "
            "same result more slowly.",
            stacklevel=4,
        )


def on_output(perturb: Perturb, index: int) -> Callable[[Any, Tensor, Tensor], Any]:
    """``perturb`` applied to output ``index`` of a layer that returns a tuple
    of tensors (the other outputs unchanged), or to its one output tensor."""

    def apply(out: Any, b_idx: Tensor, j_idx: Tensor) -> Any:
        if not isinstance(out, tuple):
            return perturb(out, b_idx, j_idx)
        changed = perturb(out[index], b_idx, j_idx)
        return (*out[:index], changed, *out[index + 1 :])

    return apply


def layer_output_scores(
    forward_func: Callable,
    layer: nn.Module,
    inputs: Tuple[Tensor, ...],
    target: TargetType,
    additional_forward_args: Any,
    n_per_sample: int,
    perturb: Perturb,
    perturbations_per_eval: Optional[int] = 1,
    show_progress: bool = False,
    desc: str = "perturbations",
    *,
    prefix_cache: bool = True,
    output_transform: Optional[Callable[[Tensor], Tensor]] = None,
    recording: Union[_Recording, str, None] = None,
    output_index: int = 0,
) -> Tuple[Tensor, Tensor]:
    """Target scores with the layer's output perturbed, and without.

    ``perturb(out, b_idx, j_idx)`` returns the layer's output for a chunk of
    (sample ``b_idx``, perturbation ``j_idx``) pairs, given the layer's
    unperturbed output ``out`` for those samples (one row per pair). With
    ``prefix_cache`` the part of the model before the layer runs once per
    image (see the module docstring), else every evaluation is a full forward
    pass; both give the same scores. ``output_transform`` (e.g. a softmax) is
    applied to the model's output before the target is selected. A
    ``recording`` of :func:`record_layer` for these inputs saves one forward
    pass. On a layer that returns a tuple of tensors, ``perturb`` is given
    (and replaces) output ``output_index`` only; the others pass unchanged.

    Returns:
        ``(base, scores)``: ``(B,)`` unperturbed and ``(B, n_per_sample)``
        perturbed target scores on the input's device.
    """
    perturb_output = on_output(perturb, output_index)
    fwd = forward_func
    if output_transform is not None:

        def fwd(*args: Any, **kwargs: Any) -> Any:
            return output_transform(model_output(forward_func(*args, **kwargs)))

    batch = inputs[0].shape[0]
    device = inputs[0].device
    targets = per_sample_targets(target, batch)

    def select(out: Tensor, b_idx: Tensor) -> Tensor:
        sub = stack_targets([targets[int(b)] for b in b_idx])
        return select_target(out, sub).reshape(len(b_idx))

    def take(b_idx: Tensor, _j: Tensor) -> Tuple[Tensor, ...]:
        return tuple(_take(t, b_idx.to(t.device)) for t in inputs)

    def scores(
        n: int, chunk: Optional[int], ctx: Callable, progress: bool = False
    ) -> Tensor:
        return chunked_scores(
            fwd,
            inputs,
            target,
            additional_forward_args,
            n,
            take,
            chunk,
            progress,
            desc,
            context=ctx,
        )

    def full_ctx(b: Tensor, j: Tensor):
        return replace_layer_output(layer, lambda out: perturb_output(out, b, j))

    def forward_all() -> Any:
        checked = checked_forward(fwd, target)
        return _run_forward(checked, inputs, None, additional_forward_args)

    def full() -> Tensor:
        return scores(n_per_sample, perturbations_per_eval, full_ctx, show_progress)

    if prefix_cache and recording is None:
        recording = record_layer(
            forward_func, layer, inputs, target, additional_forward_args
        )
    if not prefix_cache or not isinstance(recording, _Recording):
        if prefix_cache and isinstance(recording, str):
            _warn_once(forward_func, layer, recording)
        with torch.no_grad():
            base = select(forward_all(), torch.arange(batch))
        return base, full()
    rec = recording
    out = rec.output if output_transform is None else output_transform(rec.output)
    base = select(out, torch.arange(batch))
    replay = _Replay(rec, layer, batch)

    one = torch.zeros(1, dtype=torch.long)
    n_first = min(2, n_per_sample)

    def first(ctx: Callable) -> Tensor:
        """The first ``n_first`` evaluations of sample 0, in one chunk."""
        return chunked_scores(
            fwd,
            tuple(t[:1] for t in inputs),
            stack_targets(targets[:1]),
            rows(additional_forward_args, one.to(device), batch),
            n_first,
            lambda b, j: tuple(_take(t, b.to(t.device)) for t in inputs),
            n_first,
            context=ctx,
        )

    def cached_ctx(b: Tensor, j: Tensor):
        return replay.chunk(b.to(device), lambda out: perturb_output(out, b, j))

    def identity_ctx(b: Tensor, _j: Tensor):
        return replay.chunk(b.to(device), lambda out: out)

    why: Optional[str] = None
    try:
        with replay.installed():
            # proof 1: replaying the unperturbed batch gives every sample's score
            if not _agree(scores(1, batch, identity_ctx)[:, 0], base):
                why = "replayed scores differ from the model's"
            else:
                # proof 2: the first perturbed evaluations (one chunk of one
                # sample, as in the main loop) equal full forward passes
                with_cache = first(cached_ctx)
    except _NotReplayable as err:
        why = str(err)
    except Exception as err:  # noqa: BLE001 - any replay failure: fall back
        why = f"replay failed with {type(err).__name__}"
    if why is None and not _agree(with_cache, first(full_ctx)):
        why = "perturbed scores differ from full forward passes"
    if why is None:
        try:
            with replay.installed():
                return base, scores(
                    n_per_sample, perturbations_per_eval, cached_ctx, show_progress
                )
        except Exception as err:  # noqa: BLE001 - a failing chunk: fall back
            why = f"replay failed with {type(err).__name__}"
    _warn_once(forward_func, layer, why)
    return base, full()
