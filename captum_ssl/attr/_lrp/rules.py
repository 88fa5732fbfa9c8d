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
    # "plain": no rule at all, the operations run as they are (attention capture)
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
    state: State, rule: Rule, fn: Callable[..., Tensor], *xs: Tensor
) -> Tensor:
    """``fn(*xs)`` whose backward is ``rule`` in relevance mode."""
    if state.mode == "plain":
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
    den = torch.where(den == 0, 1e-9, den)
    return torch.where(b != 0, a / den, 0.0)


def eps_div(a: Tensor, b: Tensor, eps: float) -> Tensor:
    """``a / (b + eps * sign(b))`` (sign(0) = +1): the epsilon rule's division."""
    return a / (b + eps * (b >= 0).to(b.dtype) * 2 - eps)


def _matmul_rel(s: Tensor, a: Tensor, b: Tensor) -> Tuple[Tensor, Tensor]:
    """``(a * (s @ b^T), b * (a^T @ s))`` for ``z = a @ b`` and ``s = R / z``."""
    return a * (s @ b.transpose(-2, -1)), b * (a.transpose(-2, -1) @ s)


class Rules:
    """Interface of a rule set; each method returns input relevances."""

    name = "rules"
    #: where the relevance starts: "one_hot" (1 at the target) or "logit"
    start = "logit"

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
        #   x+ W+ + x- W- = (x W + |x| |W|) / 2   (x W = y - bias, from the forward)
        #   x+ (s W+) + x- (s W-) = (x (s W) + |x| (s |W|)) / 2
        # (and with the signs of the |.| terms flipped for x+ W- + x- W+)
        # so the positive part costs one product forward and two backward
        ax, aw = x.abs(), weight.abs()
        z = y if bias is None else y - bias

        def share(sign: float) -> Tensor:
            # >= 0 exactly; the clamp removes rounding below 0
            zp = ((sign * z + F.linear(ax, aw)) / 2).clamp_(min=0)
            s = chefer_div(r, zp)
            return (x * (s @ weight) + sign * ax * (s @ aw)) / 2

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
        ra, rb = _matmul_rel(chefer_div(r, z), a, b)
        return ra / 2, rb / 2

    def add(self, r, z, a, b):
        s = chefer_div(r, a + b)
        ra, rb = a * s, b * s
        asum, bsum = _per_sample_sum(ra), _per_sample_sum(rb)
        total = _per_sample_sum(r)
        afact = chefer_div(asum.abs(), asum.abs() + bsum.abs()) * total
        bfact = chefer_div(bsum.abs(), asum.abs() + bsum.abs()) * total
        return ra * chefer_div(afact, asum), rb * chefer_div(bfact, bsum)

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

    def __init__(self, epsilon: float = 1e-6, cp: bool = False) -> None:
        self.eps = epsilon
        self.cp = cp

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
