"""The primitives a family adapter writes its forwards in, and installing them.

A family adapter (:mod:`captum_ssl.attr._families`) gives the supported
modules of a model a forward of their own (an instance attribute ``forward``;
the class is never touched) that computes exactly what the library computes,
with every operation written as a primitive of a :class:`Propagator`:
``P.leaf`` (a leaf module), ``P.linear``, ``P.scale``, ``P.add``,
``P.add_const``, ``P.mul``, ``P.linear_map`` and ``P.attend`` (scores, bias,
softmax, attention x values). Each primitive routes its operation through a
rule of :mod:`.rules` (relevance propagation) or, with a *plain* propagator
(``State(mode="plain")``), runs it as it is; either way ``P.attend`` records
the attention probabilities of the modules being watched, which is how
attention is captured (:func:`captum_ssl.attr._attention.capture.
capture_attention`). So capture and LRP run the same forwards and cannot
disagree, and a fused / sdpa kernel never hides the maps.

:func:`installed` puts forwards in place for the duration of one call and
deletes them again in ``finally``, also when the call raises; parameters,
flags and hooks are left as they were.
"""

from __future__ import annotations

import contextlib
from typing import (
    Any,
    Callable,
    Dict,
    Iterator,
    List,
    Optional,
    Sequence,
    Tuple,
    TypeGuard,
    cast,
)

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from captum_ssl.attr._core import AttributionInputError
from captum_ssl.attr._lrp.rules import (
    AttnLRPRules,
    Rules,
    State,
    apply_rule,
    half_gradient,
)

ACTIVATIONS = (nn.GELU, nn.ReLU, nn.SiLU, nn.Tanh, nn.Sigmoid)
_MISSING = object()

#: (module, forward) pairs a family adapter installs for one call
Plan = List[Tuple[nn.Module, Callable]]


def _passthrough() -> tuple:
    from timm.layers import DropPath

    return (nn.Identity, nn.Dropout, DropPath)


def _layer_scale() -> tuple:
    from timm.layers import LayerScale

    return (LayerScale,)


def plain_linear(m: nn.Module) -> TypeGuard[nn.Linear]:
    """Whether ``m`` computes ``F.linear(x, m.weight, m.bias)`` (an
    ``nn.Linear`` or a subclass that keeps its forward, e.g. the output
    projection of ``nn.MultiheadAttention``)."""
    return isinstance(m, nn.Linear) and type(m).forward is nn.Linear.forward


class Propagator:
    """The model's operations, each applied through its rule (or, in plain
    mode, as they are); :meth:`attend` records watched attention."""

    def __init__(self, rules: Optional[Rules], state: State) -> None:
        self.rules, self.state = rules, state
        #: leaves that are the identity in eval mode (no rule needed)
        self.passthrough = _passthrough()
        self._scale = _layer_scale()
        self._watched: Dict[int, List[Tensor]] = {}

    @property
    def active_rules(self) -> Rules:
        """The rules, for a rule being applied (plain mode applies no rule, so
        it never reads them)."""
        if self.rules is None:
            raise AssertionError("a plain Propagator applies no rule")
        return self.rules

    @classmethod
    def plain(cls) -> Propagator:
        """A propagator that applies no rule (the ordinary forward)."""
        return cls(None, State(mode="plain"))

    # ------------------------------------------------------------- watching
    def watch(self, modules: Sequence[nn.Module]) -> Dict[int, List[Tensor]]:
        """``{position: [probabilities per call]}`` filled by :meth:`attend`."""
        store: Dict[int, List[Tensor]] = {i: [] for i in range(len(modules))}
        for i, m in enumerate(modules):
            self._watched[id(m)] = store[i]
        return store

    def unwatch(self) -> None:
        self._watched = {}

    # ---------------------------------------------------------------- leaves
    def check_leaf(self, m: nn.Module, where: str) -> None:
        ok = (nn.LayerNorm,) + self._scale + ACTIVATIONS + self.passthrough
        if plain_linear(m) or isinstance(m, ok):
            return
        raise AttributionInputError(
            f"No LRP rule for the layer {type(m).__name__} at `{where}`. Rules "
            "exist for nn.Linear, nn.LayerNorm, LayerScale, activations "
            f"({', '.join(a.__name__ for a in ACTIVATIONS)}), dropout and identity "
            "layers."
        )

    def leaf(self, m: nn.Module, x: Tensor) -> Tensor:
        """``m(x)`` with ``m``'s rule (``m`` is a leaf module)."""
        st = self.state
        if isinstance(m, self.passthrough):
            return type(m).forward(m, x)
        if plain_linear(m):
            return self.linear(x, m.weight, m.bias)
        if isinstance(m, nn.LayerNorm):
            return apply_rule(
                st,
                lambda rr, y, xx: (self.active_rules.norm(rr, y, xx, m),),
                lambda xx: type(m).forward(m, xx),
                x,
                implicit=lambda g, y, xx: (
                    self.active_rules.implicit_norm(g, y, xx, m),
                ),
            )
        if isinstance(m, self._scale):
            return self.scale(x, m.gamma)
        if isinstance(m, ACTIVATIONS):
            act: nn.Module = m
            return self.elementwise(lambda xx: type(act).forward(act, xx), x)
        self.check_leaf(m, type(m).__name__)
        raise AssertionError("unreachable")

    def sequential(self, ms: Sequence[nn.Module], x: Tensor) -> Tensor:
        """Leaf modules applied in turn (an ``nn.Sequential`` MLP)."""
        for m in ms:
            x = self.leaf(m, x)
        return x

    # ------------------------------------------------------------ operations
    def linear(self, x: Tensor, w: Tensor, b: Optional[Tensor] = None) -> Tensor:
        """``F.linear(x, w, b)`` (the bias absorbs its share of relevance)."""
        return apply_rule(
            self.state,
            lambda rr, y, xx: (self.active_rules.linear(rr, y, xx, w, b),),
            lambda xx: F.linear(xx, w, b),
            x,
        )

    def scale(self, x: Tensor, c: Any) -> Tensor:
        return apply_rule(
            self.state,
            lambda rr, y, xx: (self.active_rules.elementwise(rr, y, xx),),
            lambda xx: xx * c,
            x,
        )

    def add(self, a: Tensor, b: Tensor) -> Tensor:
        return apply_rule(
            self.state,
            lambda *args: self.active_rules.add(*args),
            torch.add,
            a,
            b,
        )

    def add_const(self, a: Tensor, b: Tensor) -> Tensor:
        """``a + b`` with ``b`` a constant (a position embedding, a position
        bias of the attention scores): ``b`` takes its share, ``a`` the rest."""

        def rule(rr, z, aa):
            full = b.expand_as(aa)
            return (self.active_rules.add(rr, z, aa, full)[0],)

        return apply_rule(self.state, rule, lambda aa: aa + b, a)

    def mul(self, a: Tensor, b: Tensor) -> Tensor:
        """``a * b`` of two tensors (a gated MLP): the uniform rule, half of
        the relevance to each factor (Achtibat et al., 2024)."""

        def rule(rr, _z, _a, _b):
            return rr / 2, rr / 2

        def implicit(g, _z, aa, bb):  # the rule over the inputs: half gradients
            g = g / 2
            return g * bb, g * aa

        return apply_rule(self.state, rule, torch.mul, a, b, implicit=implicit)

    def elementwise(self, fn: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
        """``fn(x)`` for an elementwise activation that is not a module of
        :data:`ACTIVATIONS` (e.g. open_clip's QuickGELU): the identity rule."""
        return apply_rule(
            self.state,
            lambda rr, y, xx: (self.active_rules.elementwise(rr, y, xx),),
            fn,
            x,
            implicit=lambda g, y, xx: (
                self.active_rules.implicit_elementwise(g, y, xx),
            ),
        )

    def linear_map(self, fn: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
        """``fn(x)`` for a fixed linear map ``fn`` (a rotary embedding)."""

        def vjp(s: Tensor) -> Tensor:
            with torch.enable_grad():
                xx = x.detach().requires_grad_()
                return torch.autograd.grad(fn(xx), xx, s)[0]

        return apply_rule(
            self.state,
            lambda rr, y, xx: (self.active_rules.linear_map(rr, y, xx, vjp),),
            fn,
            x,
        )

    def token_mean(self, x: Tensor) -> Tensor:
        """The mean over the tokens ``(B, N, C) -> (B, C)`` (an average-pooling
        head): a fixed linear map (:meth:`linear_map`)."""
        return self.linear_map(lambda t: t.mean(dim=1), x)

    def attend(
        self,
        m: nn.Module,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        *,
        scale: Optional[float] = None,
        bias: Optional[Tensor] = None,
        keep: Optional[List[Tensor]] = None,
    ) -> Tensor:
        """``softmax(q k^T * scale + bias) v`` of attention module ``m``
        (``scale`` defaults to ``m.scale``; ``bias`` is a constant such as a
        relative position bias); talking-heads projections (``proj_l``,
        ``proj_w``) when ``m`` has them. The probabilities are recorded when
        ``m`` is watched (and appended to ``keep`` when given), then pass
        through ``m.attn_drop`` when it has one."""
        r, st = self.rules, self.state
        q = self.scale(q, m.scale if scale is None else scale)
        dots = self.matmul(q, k.transpose(-2, -1))
        if bias is not None:
            dots = self.add_const(dots, bias)
        if hasattr(m, "proj_l"):
            dots = self.leaf(
                cast(nn.Module, m.proj_l), dots.permute(0, 2, 3, 1)
            ).permute(0, 3, 1, 2)
        attn = apply_rule(
            st,
            lambda rr, s, xx: (self.active_rules.softmax(rr, s, xx),),
            lambda xx: xx.softmax(dim=-1),
            dots,
        )
        if hasattr(m, "proj_w"):
            attn = self.leaf(
                cast(nn.Module, m.proj_w), attn.permute(0, 2, 3, 1)
            ).permute(0, 3, 1, 2)
        self.record(m, attn)
        if keep is not None:
            keep.append(attn)
        drop = getattr(m, "attn_drop", None)
        if isinstance(drop, nn.Module):
            attn = drop(attn)
        if isinstance(r, AttnLRPRules) and r.cp:
            return apply_rule(
                st, r.value_matmul, lambda vv, aa: aa @ vv, v, attn.detach()
            )
        return self.matmul(attn, v)

    def matmul(self, a: Tensor, b: Tensor) -> Tensor:
        """``a @ b`` of two activations (scores, attention x values)."""
        return apply_rule(
            self.state,
            lambda *args: self.active_rules.matmul(*args),
            torch.matmul,
            a,
            b,
            implicit=half_gradient,
        )

    def record(self, m: nn.Module, attn: Tensor) -> None:
        """Keep ``attn`` (attention probabilities of ``m``) if ``m`` is watched."""
        store = self._watched.get(id(m))
        if store is not None:
            store.append(attn)


def no_mask(attn_mask: Any = None, is_causal: bool = False, **masks: Any) -> None:
    """Refuse attention masks: the maps are defined for unmasked attention."""
    if attn_mask is not None or is_causal or any(v is not None for v in masks.values()):
        raise AttributionInputError(
            "The attention methods and LRP support unmasked self-attention only: "
            "call the model without attention masks / is_causal."
        )


def leaf_forward(P: Propagator, m: nn.Module) -> Callable:
    return lambda x: P.leaf(m, x)


def plan_leaf(P: Propagator, plan: Plan, m: nn.Module, where: str) -> None:
    """Check ``m`` has a rule and, unless it is an identity, install it."""
    P.check_leaf(m, where)
    if not isinstance(m, P.passthrough):
        plan.append((m, leaf_forward(P, m)))


def check_leaves(P: Propagator, m: nn.Module, names: Sequence[str], where: str):
    for n in names:
        P.check_leaf(getattr(m, n), f"{where}.{n}")


@contextlib.contextmanager
def installed(plan: Plan) -> Iterator[None]:
    """Within the block, each module of ``plan`` runs its planned forward;
    the instance attributes are removed (or the user's own restored) on exit,
    also when the block raises."""
    saved: List[Tuple[nn.Module, Any]] = []
    try:
        for m, fwd in plan:
            saved.append((m, m.__dict__.get("forward", _MISSING)))
            m.forward = fwd
        yield
    finally:
        for m, old in reversed(saved):
            if old is _MISSING:
                m.__dict__.pop("forward", None)
            else:
                m.forward = old


@contextlib.contextmanager
def relevance_rules(
    model: nn.Module, rules: Rules, state: State, *, embedding: bool = False
) -> Iterator[Propagator]:
    """Within the block, ``model`` computes its usual output with every
    operation routed through ``rules`` (see the module docstring).

    ``embedding`` adds the rules below the first block (position embedding,
    patch convolution) for relevance at the patch tokens or the pixels.
    Everything is restored on exit, also when the block raises.
    """
    from captum_ssl.attr._families import lrp_adapter

    adapter = lrp_adapter(model)
    if adapter.model.training:
        raise AttributionInputError(
            "LRP explains the model in evaluation mode: call model.eval() first."
        )
    P = Propagator(rules, state)
    plan = adapter.plan(P, embedding)
    handles: list = []
    try:
        with installed(plan):
            handles.extend(adapter.hooks(P))
            yield P
    finally:
        for handle in handles:
            handle.remove()
