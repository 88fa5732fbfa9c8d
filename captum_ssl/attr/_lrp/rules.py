"""Relevance rules, written once, as custom autograd functions.

Every operation of a Vision Transformer that the relevance passes through is
run as ``_Rule.apply(...)``: its forward returns the operation's ordinary
output ``y`` (computed by the caller with the stock module), its backward
either passes the ordinary gradient on to ``y``'s own graph (``mode="grad"``)
or returns the *relevance* of the operation's inputs given the relevance ``R``
of its output (``mode="rel"``). So one forward pass serves both: a backward
pass from the logits with ``grad_outputs`` = the starting relevance carries
relevance (autograd's summation where a tensor is used twice is the LRP rule
for a copy), another carries true gradients. Structural operations (reshape,
permute, indexing, concatenation) redistribute relevance exactly as they
redistribute gradients and need no rule.

Two rule sets: :class:`CheferRules` (Chefer, Gur & Wolf, CVPR 2021) and
:class:`AttnLRPRules` (Achtibat et al., ICML 2024, optionally CP-LRP).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F
import torch.nn.grad
from torch import Tensor

Rule = Callable[..., Tuple[Optional[Tensor], ...]]


@dataclass
class State:
    """Shared by all rule applications of one call."""

    mode: str = "rel"  # "rel": relevance backward; "grad": true gradients;
    # "plain": no rule at all, the operations run as they are (attention capture);
    # "gi": the rules in gradient x input form (:attr:`Rules.implicit`): the
    # backward carries R / x, autograd's own gradient wherever the rule equals it
    need_grad: bool = False  # build the true graph (for a "grad" backward)


class _Rule(torch.autograd.Function):
    @staticmethod
    def forward(ctx, state: State, rule: Rule, y: Tensor, *xs: Tensor) -> Tensor:
        ctx.state, ctx.rule = state, rule
        ctx.save_for_backward(y, *xs)
        return y.view_as(y)

    @staticmethod
    def backward(ctx, r: Tensor):
        y, *xs = ctx.saved_tensors
        if ctx.state.mode == "grad":
            return (None, None, r) + (None,) * len(xs)
        rel = ctx.rule(r, y, *xs)
        return (None, None, None) + tuple(rel)


def apply_rule(
    state: State,
    rule: Rule,
    fn: Callable[..., Tensor],
    *xs: Tensor,
    implicit: Optional[Rule] = None,
) -> Tensor:
    """``fn(*xs)`` whose backward is ``rule`` in relevance mode.

    In gradient x input mode (``state.mode == "gi"``) the backward is
    ``implicit`` (``(g, y, *xs) -> gradients of xs``, the rule divided by the
    inputs), or, without one, autograd's own gradient of ``fn``: the rule of a
    linear operation (linear layer, add, scale, convolution, rotation) is its
    gradient times its input."""
    if state.mode == "gi":
        if implicit is None:
            return fn(*xs)
        rule = implicit
    elif state.mode == "plain":
        return fn(*xs)
    with torch.set_grad_enabled(state.need_grad and torch.is_grad_enabled()):
        y = fn(*xs)
    if not torch.is_grad_enabled():
        return y
    return _Rule.apply(state, rule, y, *xs)


def _per_sample_sum(t: Tensor) -> Tensor:
    return t.reshape(t.shape[0], -1).sum(1).reshape((-1,) + (1,) * (t.dim() - 1))


def chefer_div(a: Tensor, b: Tensor) -> Tensor:
    """``a / b`` stabilised by 1e-9 towards b's sign, 0 where ``b == 0``
    (the reference implementation's ``safe_divide``: its denominator
    ``b.clamp(min=1e-9) + b.clamp(max=1e-9)`` is ``b + 1e-9``, moved off 0)."""
    den = b + 1e-9
    den.masked_fill_(den == 0, 1e-9)
    return (a / den).masked_fill_(b == 0, 0.0)


def eps_div(a: Tensor, b: Tensor, eps: float) -> Tensor:
    """``a / (b + eps * sign(b))`` (sign(0) = +1): the epsilon rule's division."""
    return a / (b + eps * (b >= 0).to(b.dtype) * 2 - eps)


def half_gradient(g: Tensor, _z: Tensor, a: Tensor, b: Tensor) -> Tuple[Tensor, Tensor]:
    """The uniform rule of ``z = a @ b`` divided by the inputs: half of each
    input's gradient (Achtibat et al., 2024, Eq. 7; LXT's ``divide_gradient``)."""
    g = g / 2
    return g @ b.transpose(-2, -1), a.transpose(-2, -1) @ g


def _matmul_rel(s: Tensor, a: Tensor, b: Tensor) -> Tuple[Tensor, Tensor]:
    """``(a * (s @ b^T), b * (a^T @ s))`` for ``z = a @ b`` and ``s = R / z``."""
    return (s @ b.transpose(-2, -1)).mul_(a), (a.transpose(-2, -1) @ s).mul_(b)


class Rules:
    """Interface of a rule set; each method returns input relevances."""

    name = "rules"
    #: where the relevance starts: "one_hot" (1 at the target) or "logit"
    start = "logit"
    #: whether every rule is "input x a modified gradient" (then the set runs in
    #: gradient x input form, ``State(mode="gi")``, one backward pass with
    #: autograd's own gradient for the linear operations; see
    #: :meth:`implicit_norm`, :meth:`implicit_elementwise`, :meth:`implicit_softmax`)
    implicit = False

    def implicit_norm(self, g: Tensor, y: Tensor, x: Tensor, module) -> Tensor:
        """The LayerNorm rule divided by the input (gradient x input form)."""
        raise NotImplementedError

    def implicit_elementwise(self, g: Tensor, y: Tensor, x: Tensor) -> Tensor:
        """The activation rule divided by the input (gradient x input form)."""
        raise NotImplementedError

    def linear(
        self, r: Tensor, y: Tensor, x: Tensor, weight: Tensor, bias=None
    ) -> Tensor:
        """``y = x W^T + bias``."""
        raise NotImplementedError

    def norm(self, r: Tensor, y: Tensor, x: Tensor, module) -> Tensor:
        raise NotImplementedError

    def linear_map(
        self, r: Tensor, y: Tensor, x: Tensor, vjp: Callable[[Tensor], Tensor]
    ) -> Tensor:
        r"""A fixed linear map ``y = A x`` given by its vector-Jacobian product
        ``vjp(s) = A^T s`` (EVA's rotary embedding): the z-rule
        :math:`R_x = x \odot A^\top (R / y)` (epsilon-stabilised)."""
        return x * vjp(eps_div(r, y, getattr(self, "eps", 1e-9)))

    def elementwise(self, r: Tensor, y: Tensor, x: Tensor) -> Tensor:
        """Activations, constant and learned scales: the identity rule."""
        return r

    def softmax(self, r: Tensor, s: Tensor, x: Tensor) -> Tensor:
        raise NotImplementedError

    def matmul(
        self, r: Tensor, z: Tensor, a: Tensor, b: Tensor
    ) -> Tuple[Tensor, Tensor]:
        raise NotImplementedError

    def add(self, r: Tensor, z: Tensor, a: Tensor, b: Tensor) -> Tuple[Tensor, Tensor]:
        raise NotImplementedError

    def patch_conv(self, r: Tensor, y: Tensor, x: Tensor, conv) -> Tensor:
        raise NotImplementedError


class CheferRules(Rules):
    r"""The rules of Chefer, Gur & Wolf (CVPR 2021), as in the authors' code.

    * linear (no bias): :math:`\alpha\beta`-rule with ``alpha`` (default 1,
      so ``beta = alpha - 1 = 0``): positive contributions
      :math:`x^+ w^+ + x^- w^-` share the relevance;
    * LayerNorm, GELU, softmax, dropout, scales: identity (relevance passes);
    * matmul ``a @ b``: :math:`R_a = a (S b^T)/2`, :math:`R_b = b (a^T S)/2`,
      :math:`S = R / (a b)`;
    * residual add ``a + b``: :math:`R_a = a R / (a + b)` rescaled so that
      :math:`\sum R_a : \sum R_b = |\sum a R/z| : |\sum b R/z|` and
      :math:`\sum R_a + \sum R_b = \sum R` (per sample);
    * patch convolution on pixels: :math:`z^\mathcal{B}`-rule with the
      per-image minimum and maximum pixel value as bounds.
    Relevance starts as 1 at the target class (0 elsewhere).
    """

    name = "chefer"
    start = "one_hot"

    def __init__(self, alpha: float = 1.0) -> None:
        self.alpha = alpha

    def linear(self, r, y, x, weight, bias=None):
        # with x = x+ + x-, W = W+ + W-:
        #   2 (x+ W+ + x- W-) = x W + |x| |W|   (x W = y - bias, from the forward)
        #   2 (x+ (s W+) + x- (s W-)) = x (s W) + |x| (s |W|)
        # (and with the signs of the |.| terms flipped for x+ W- + x- W+), so the
        # positive part costs one product forward and two backward; with
        # u = 2 z+, s / 2 = R / (u + 2e-9) (chefer_div of R by z+, as z+ >= 0)
        ax, aw = x.abs(), weight.abs()

        def share(sign: float) -> Tensor:
            u = F.linear(ax, aw)
            if sign > 0:
                u.add_(y)
            else:
                u.sub_(y)
            if bias is not None:
                u.sub_(bias, alpha=sign)
            u.clamp_(min=0)  # >= 0 exactly; the clamp removes rounding below 0
            zero = u == 0
            half_s = r / u.add_(2e-9)
            half_s.masked_fill_(zero, 0.0)
            out = (half_s @ weight).mul_(x)
            return out.addcmul_(ax, half_s @ aw, value=sign)

        out = share(1.0)
        beta = self.alpha - 1
        if self.alpha != 1:
            out = out * self.alpha
        if beta:
            # x+ W- + x- W+ = (|x| |W| - x W) / 2
            out = out - beta * share(-1.0)
        return out

    def norm(self, r, y, x, module):
        return r

    def softmax(self, r, s, x):
        return r

    def matmul(self, r, z, a, b):
        return _matmul_rel(chefer_div(r, z).mul_(0.5), a, b)

    def add(self, r, z, a, b):
        s = chefer_div(r, z)  # z = a + b
        ra, rb = a * s, s.mul_(b)
        asum, bsum = _per_sample_sum(ra), _per_sample_sum(rb)
        total = _per_sample_sum(r)
        afact = chefer_div(asum.abs(), asum.abs() + bsum.abs()) * total
        bfact = chefer_div(bsum.abs(), asum.abs() + bsum.abs()) * total
        return ra.mul_(chefer_div(afact, asum)), rb.mul_(chefer_div(bfact, bsum))

    def patch_conv(self, r, y, x, conv):
        w = conv.weight
        pw, nw = w.clamp(min=0), w.clamp(max=0)
        dims = tuple(range(1, x.dim()))
        low = x.amin(dim=dims, keepdim=True).expand_as(x)
        high = x.amax(dim=dims, keepdim=True).expand_as(x)
        kw = dict(stride=conv.stride, padding=conv.padding)
        z = (
            F.conv2d(x, w, **kw) - F.conv2d(low, pw, **kw) - F.conv2d(high, nw, **kw)
        ) + 1e-9
        s = r / z

        def back(weight: Tensor) -> Tensor:
            return torch.nn.grad.conv2d_input(x.shape, weight, s, **kw)

        return x * back(w) - low * back(pw) - high * back(nw)


class AttnLRPRules(Rules):
    r"""AttnLRP (Achtibat et al., ICML 2024); CP-LRP with ``cp=True``.

    * linear, convolution, residual add: epsilon rule
      :math:`R_x = x\, W^T (R / (z + \epsilon\,\mathrm{sign}(z)))` (the bias
      absorbs its share);
    * LayerNorm: identity rule on the division by the standard deviation,
      epsilon rule on the centring and the affine map;
    * GELU and other activations, scales: identity rule;
    * softmax :math:`s = \mathrm{softmax}(x)`:
      :math:`R_x = x \odot (R - s \sum_j R_j)`;
    * matmul (``Q K^T`` and ``A V``): uniform epsilon rule,
      :math:`R_a = \tfrac12 a (S b^T)`, :math:`R_b = \tfrac12 b (a^T S)`;
      with ``cp=True`` (CP-LRP, Ali et al. 2022) the attention weights are
      constants: all relevance of ``A V`` goes to ``V``, none to ``Q``, ``K``.
    Relevance starts as the target logit.
    """

    name = "attnlrp"
    start = "logit"
    implicit = True

    def __init__(self, epsilon: float = 1e-6, cp: bool = False) -> None:
        self.eps = epsilon
        self.cp = cp

    # gradient x input form (the authors' LXT implementation): the rule of every
    # linear operation and the softmax rule equal autograd's gradient times the
    # input; the matmuls take half the gradient (:func:`half_gradient`); these
    # two carry the relevance divided by the input:
    def implicit_norm(self, g, y, x, module):
        """Identity on ``1 / sigma``: the gradient with ``sigma`` constant."""
        d = module.normalized_shape
        dims = tuple(range(-len(d), 0))
        sigma = (x.var(dim=dims, unbiased=False, keepdim=True) + module.eps).sqrt()
        s = g * module.weight if module.weight is not None else g
        s = s / sigma
        return s - s.mean(dim=dims, keepdim=True)

    def implicit_elementwise(self, g, y, x):
        """Identity rule ``R_x = R_y``: ``g_x = g_y y / x`` (``x`` stabilised
        by ``epsilon`` towards its sign)."""
        den = x.abs().add_(self.eps).copysign_(x)  # x + eps * sign(x), sign(0) = 1
        return y.div(den).mul_(g)

    def linear(self, r, y, x, weight, bias=None):
        return x * (eps_div(r, y, self.eps) @ weight)

    def norm(self, r, y, x, module):
        d = module.normalized_shape
        dims = tuple(range(-len(d), 0))
        sigma = (x.var(dim=dims, unbiased=False, keepdim=True) + module.eps).sqrt()
        s = eps_div(r, y, self.eps)
        if module.weight is not None:
            s = s * module.weight
        s = s / sigma
        return x * (s - s.mean(dim=dims, keepdim=True))

    def softmax(self, r, s, x):
        return x * (r - s * r.sum(dim=-1, keepdim=True))

    def matmul(self, r, z, a, b):
        ra, rb = _matmul_rel(eps_div(r, z, self.eps), a, b)
        return ra / 2, rb / 2

    def value_matmul(self, r, z, b, a):
        """CP-LRP: ``z = a @ b`` with ``a`` (attention) constant."""
        return b * (a.transpose(-2, -1) @ eps_div(r, z, self.eps)), None

    def add(self, r, z, a, b):
        s = eps_div(r, z, self.eps)
        return a * s, b * s

    def patch_conv(self, r, y, x, conv):
        s = eps_div(r, y, self.eps)
        g = torch.nn.grad.conv2d_input(
            x.shape, conv.weight, s, stride=conv.stride, padding=conv.padding
        )
        return x * g
