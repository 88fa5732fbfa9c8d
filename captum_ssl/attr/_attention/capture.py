"""Attention capture: the one place that reads attention probabilities.

Every attention method of this package gets its attention maps (and, where it
needs them, the target's gradients with respect to those maps) from
:func:`attention_forward`. The attention modules and what they compute come
from the model's family adapter (:mod:`captum_ssl.attr._families`): for the
duration of one call each selected module runs its family's attention forward
written in the Propagator primitives (a *plain* propagator: no rule, the
ordinary result), whose ``attend`` records the softmaxed probabilities. The
forward is the same one LRP runs, so capture and LRP cannot disagree, and a
fused / sdpa kernel never hides the maps. Shapes:

* self-attention (timm ``Attention``, EVA, BEiT, ``nn.MultiheadAttention``):
  ``(B, heads, N, N)``;
* class attention (CaiT ``blocks_token_only[i].attn``, XCiT
  ``cls_attn_blocks[i].attn``): only the class token queries, ``(B, heads,
  1, N)``;
* XCiT's cross-covariance attention (XCA): ``(B, heads, C/heads, C/heads)``,
  captured (:func:`capture_attention`) but not a token map, so the
  attribution methods refuse it.

Nothing of the model is changed but the instance attribute ``forward`` of the
selected modules, removed again in a ``finally`` block, also when the forward
pass raises; timm's ``fused_attn`` flags (per module and global) are never
touched.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Union

import torch
from captum._utils.common import _run_forward
from captum._utils.typing import TargetType
from torch import Tensor, nn

from captum_ssl._outputs import model_output
from captum_ssl.attr._core import (
    AttributionInputError,
    check_not_compiled,
    eval_mode,
    format_inputs,
    input_hw,
    selecting_forward,
    working_dtype,
)
from captum_ssl.attr._layout import TokenLayout, layout_for, root_module

LayerSpec = Union[None, int, nn.Module, Sequence[Union[int, nn.Module]]]

SELF, CLASS, CHANNEL = "self", "class", "channel"


def __getattr__(name: str) -> Any:
    if name == "SUPPORTED":  # computed: every registered family
        from captum_ssl.attr._families import supported

        return supported()
    raise AttributeError(name)


def attention_kind(module: nn.Module) -> Optional[str]:
    """``"self"``, ``"class"``, ``"channel"`` (XCiT XCA) or ``None`` (unsupported)."""
    from captum_ssl.attr._families import attention_impl

    impl = attention_impl(module)
    return None if impl is None else impl.kind


def checked_attention_kind(module: nn.Module) -> str:
    """:func:`attention_kind` of a module selected as an attention layer (the
    selection refuses unsupported ones, so this is never ``None`` there)."""
    kind = attention_kind(module)
    if kind is None:
        raise AttributionInputError(
            f"{type(module).__name__} is not an attention layer this library "
            "reads: select the model's attention modules (leave layers=None)."
        )
    return kind


def attention_modules(model: nn.Module) -> List[nn.Module]:
    """All supported attention modules of ``model`` in execution order,
    XCiT's channel-attention (XCA) modules included."""
    from captum_ssl.attr._families import find_adapter

    adapter = find_adapter(model)
    return [] if adapter is None else [s.module for s in adapter.attention_sites()]


def _model_of(forward_func: Callable) -> nn.Module:
    model = root_module(forward_func)
    if model is None:
        raise AttributionInputError(
            "Attention methods need forward_func to be the model (an nn.Module) or "
            "one of its bound methods, so that its attention modules can be found."
        )
    check_not_compiled(model)
    return model


def resolve_layers(
    forward_func: Callable, layers: LayerSpec, *, token_maps: bool = True
) -> List[nn.Module]:
    """The attention modules named by ``layers``.

    Args:
        forward_func (Callable): the model, or a bound method of it.
        layers (int, nn.Module, list, or None): ``None`` selects every attention
                    module that yields token maps; an int indexes (negative
                    allowed) the model's attention modules in execution order,
                    XCiT's XCA modules included; a module must be one of them.
        token_maps (bool, optional): refuse XCiT's channel attention (XCA).
                    Default: True

    Returns:
        list of nn.Module, in the order given (``None``: execution order).
    """
    from captum_ssl.attr._families import adapter_for, supported

    model = _model_of(forward_func)
    adapter = adapter_for(model)
    found = [s.module for s in adapter.attention_sites()]
    if not found:
        raise AttributionInputError(
            f"{type(model).__name__} has no supported attention module. Supported: "
            f"{supported()}. For CNNs (and as an alternative on ViTs) use the CAMs, "
            f"e.g. LayerGradCam on {adapter.norm_layer_hint()}."
        )
    if layers is None:
        chosen = [m for m in found if attention_kind(m) != CHANNEL]
        if not chosen:
            raise AttributionInputError(
                f"{type(model).__name__} has only channel attention (XCiT XCA), "
                "which gives no token map."
            )
        return chosen
    specs = list(layers) if isinstance(layers, (list, tuple)) else [layers]
    if not specs:
        raise AttributionInputError("layers is empty: pass at least one layer.")
    chosen = []
    for spec in specs:
        if isinstance(spec, bool) or not isinstance(spec, (int, nn.Module)):
            raise AttributionInputError(
                f"Unsupported layer {spec!r}: pass an int index into the model's "
                "attention modules, the attention module itself, or a list of those."
            )
        if isinstance(spec, int):
            if not -len(found) <= spec < len(found):
                raise AttributionInputError(
                    f"Layer index {spec} is out of range: the model has "
                    f"{len(found)} attention modules (valid indices "
                    f"-{len(found)}..{len(found) - 1})."
                )
            module = found[spec]
        else:
            module = spec
            if attention_kind(module) is None or not any(module is m for m in found):
                hint = ""
                inner = getattr(module, "attn", None)
                if isinstance(inner, nn.Module) and attention_kind(inner) is not None:
                    hint = " Pass its `.attn` submodule."
                names = ", ".join(f"`{s.name}`" for s in adapter.attention_sites()[:2])
                raise AttributionInputError(
                    f"{type(module).__name__} is not a supported attention module of "
                    f"this model.{hint} Pass one of its attention modules ({names}, "
                    "...) or an index into them."
                )
        if token_maps and attention_kind(module) == CHANNEL:
            raise AttributionInputError(
                "XCiT's XCA blocks attend over channels (a (C/heads) x (C/heads) "
                "matrix per head), not over tokens, so they give no patch map. Use "
                "the class-attention layers `model.cls_attn_blocks[i].attn` (the "
                "default), or capture_attention(...) to read the channel attention."
            )
        chosen.append(module)
    return chosen


# --------------------------------------------------------------------- capture
@contextlib.contextmanager
def capture_attention(
    modules: Sequence[nn.Module], propagator: Optional[Any] = None
) -> Iterator[Dict[int, List[Tensor]]]:
    """Record the attention probabilities of ``modules`` during the block.

    Yields a dict ``{position in modules: [tensor per call]}``. Each tensor is
    the module's softmaxed attention as computed in the forward pass (part of
    the autograd graph when grad is enabled). Each module runs its family's
    attention forward for the duration of the block (see the module
    docstring); without ``propagator`` a plain one (no rule), with one (an LRP
    call that has installed its forwards already) that one records. Restored
    on exit, also when the block raises. A Hugging Face ViT-MAE shuffles its
    patches unless the block runs inside
    :func:`~captum_ssl.attr._families.base.family_call` ``(model)`` (the
    attribution methods do).

    Example::

        >>> with capture_attention([model.blocks[0].attn]) as store:
        ...     model(x)
        >>> store[0][0].shape  # (B, heads, N, N)
    """
    from captum_ssl.attr._families import attention_impl, supported
    from captum_ssl.attr._lrp.propagate import Propagator, installed

    P = propagator if propagator is not None else Propagator.plain()
    plan = []
    for module in modules:
        impl = attention_impl(module)
        if impl is None:
            raise AttributionInputError(
                f"{type(module).__name__} is not a supported attention module. "
                f"Supported: {supported()}."
            )
        drop = getattr(module, "attn_drop", None)
        p = getattr(drop, "p", getattr(module, "dropout", 0.0))
        if module.training and p > 0:
            warnings.warn(
                "The model is in training mode with attention dropout: the "
                "captured attention is taken before dropout. Call model.eval().",
                stacklevel=3,
            )
        if propagator is None:
            plan.append((module, impl.forward(P, module)))
    store = P.watch(modules)
    try:
        with installed(plan):
            yield store
    finally:
        P.unwatch()


@dataclass
class Captured:
    """What one forward pass gave: per layer, attention and (optionally) grads."""

    attentions: List[Tensor]
    gradients: Optional[List[Tensor]]
    kinds: List[str]
    layout: TokenLayout  # resolved for the attention's N tokens
    bad_rows: Optional[Tensor] = None  # (B,) samples whose model output is not finite

    @property
    def grads(self) -> List[Tensor]:
        """:attr:`gradients` of a capture made with gradients."""
        if self.gradients is None:
            raise AssertionError("captured without gradients: with_gradients=True")
        return self.gradients


def attention_forward(
    forward_func: Callable,
    inputs: Any,
    modules: Sequence[nn.Module],
    target: TargetType = None,
    additional_forward_args: Any = None,
    *,
    with_gradients: bool = False,
    layout: Optional[TokenLayout] = None,
) -> Captured:
    """One forward pass recording the attention of ``modules`` (and, with
    ``with_gradients``, one backward pass from the per-sample ``target`` scores
    to those attention tensors: each gradient is paired with its own layer).

    Returns detached tensors; attentions are ``(B, heads, Nq, N)``.
    """
    from captum_ssl.attr._families.base import family_call

    inputs = format_inputs(inputs, with_gradients, forward_func)
    batch = inputs[0].shape[0]
    record: List[Tensor] = []

    def forward(*args: Any, **kwargs: Any) -> Any:
        out = model_output(forward_func(*args, **kwargs))
        if isinstance(out, Tensor) and out.dim() > 0 and out.is_floating_point():
            record.append(~torch.isfinite(out.reshape(out.shape[0], -1)).all(1))
        return out

    with (
        eval_mode(forward_func),
        family_call(forward_func),
        capture_attention(modules) as store,
    ):
        if with_gradients:
            # gradients flow even when the model's parameters are frozen
            inputs = tuple(
                x.detach().requires_grad_() if x.is_floating_point() else x
                for x in inputs
            )
            with torch.enable_grad():
                scores = _run_forward(
                    selecting_forward(forward, target, batch_rows=False),
                    inputs,
                    None,
                    additional_forward_args,
                )
                attns = _single_calls(store, modules)
                if scores.numel() != batch:
                    raise AttributionInputError(
                        f"The selected target gives {scores.numel()} scores for a "
                        f"batch of {batch}: choose one scalar output per sample."
                    )
                grads = list(torch.autograd.grad(scores.sum(), attns))
        else:
            with torch.no_grad():
                _run_forward(
                    selecting_forward(forward, target, False, target is not None),
                    inputs,
                    None,
                    additional_forward_args,
                )
            attns = _single_calls(store, modules)
            grads = None
    kinds = [checked_attention_kind(m) for m in modules]
    n = attns[0].shape[-1]
    for a in attns:
        if a.shape[-1] != n:
            raise AttributionInputError(
                f"The selected attention layers see different numbers of tokens "
                f"({n} and {a.shape[-1]}); select layers of one token sequence."
            )
    lay = layout_for(forward_func, modules[-1], input_hw(inputs), layout)
    lay = lay.resolve(torch.Size((batch, n, 1)))
    # rollout / flow / relevance products accumulate error in bf16 / fp16
    work = working_dtype(attns[0].dtype)
    return Captured(
        [a.detach().to(work) for a in attns],
        None if grads is None else [g.detach().to(work) for g in grads],
        kinds,
        lay,
        record[0] if record else None,
    )


def _single_calls(store: Dict[int, List[Tensor]], modules: Sequence[nn.Module]):
    out = []
    for i, module in enumerate(modules):
        calls = store[i]
        if len(calls) != 1:
            what = "never ran" if not calls else f"ran {len(calls)} times"
            raise AttributionInputError(
                f"The attention module {type(module).__name__} (layer {i}) {what} "
                "in one forward pass; expected exactly once. Pass the model whose "
                "modules were selected as forward_func, and layers its forward uses."
            )
        out.append(calls[0])
    return out
