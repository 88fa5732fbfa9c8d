"""The headless-backbone targets :class:`~captum_ssl.models.EmbeddingSimilarity`
and :class:`~captum_ssl.models.EmbeddingNorm` around a backbone of any family.

The backbone's family adapter (found inside ``.backbone``) knows the blocks,
attention, token layout and rules; this adapter adds what the wrapper computes
after the backbone, so that LRP and LeGrad explain the similarity (or norm),
not an embedding dimension:

* similarity ``cos(e, r) = (e / |e|) . r``: the division by ``|e|`` takes the
  identity rule (as LayerNorm's division by its standard deviation), the dot
  product with the references is a linear layer (weight = the references);
* norm ``|e| = e . (e / |e|)``: the unit vector is held constant, so the
  relevance of ``e_i`` is ``e_i^2 / |e|`` (it sums to the norm).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Optional, Tuple, Union, cast

import torch
from torch import Tensor, nn

from captum_ssl.attr._families.base import (
    FamilyAdapter,
    WrapperAdapter,
    find_adapter,
    register,
)
from captum_ssl.attr._lrp.propagate import Plan, Propagator

if TYPE_CHECKING:  # captum_ssl.models imports captum_ssl.attr
    from captum_ssl.models._targets import EmbeddingNorm, EmbeddingSimilarity


def _targets() -> Tuple[type, type]:
    from captum_ssl.models._targets import EmbeddingNorm, EmbeddingSimilarity

    return EmbeddingSimilarity, EmbeddingNorm


def _inner(model: nn.Module, prefix: str) -> Optional[FamilyAdapter]:
    """The backbone's own adapter, named from ``model`` (``backbone....``)."""
    backbone = getattr(model, "backbone", None)
    if not isinstance(backbone, nn.Module):
        return None
    found = find_adapter(backbone)
    if found is None:
        return None
    where = next(n for n, m in backbone.named_modules() if m is found.model)
    return type(found)(found.model, f"{prefix}backbone.{where + '.' if where else ''}")


@register
class EmbeddingTargetAdapter(WrapperAdapter):
    label = (
        "captum_ssl EmbeddingSimilarity / EmbeddingNorm around a backbone of "
        "any family above"
    )

    def __init__(self, model: nn.Module, prefix: str = "") -> None:
        super().__init__(model, prefix)
        inner = _inner(model, prefix)
        assert inner is not None  # matches() checked it
        self.inner = inner
        self.target = cast("Union[EmbeddingSimilarity, EmbeddingNorm]", model)

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return isinstance(model, _targets()) and _inner(model, "") is not None

    # ------------------------------------------------------------ structure
    def _inner_path(self) -> str:
        """Where the backbone's family model sits in the wrapper
        (``backbone`` or ``backbone.<path>``)."""
        return self.inner.prefix[len(self.prefix) :].rstrip(".")

    def norm_layer(self) -> Optional[str]:
        path = self.inner.norm_layer()
        return None if path is None else f"{self._inner_path()}.{path}"

    def norm_layer_hint(self) -> str:
        from captum_ssl.models._layers import layer_expression

        hint = self.inner.norm_layer_hint()
        if not hint.startswith("model"):
            return hint
        return layer_expression(self._inner_path()) + hint[len("model") :]

    # ----------------------------------------------------------------- heads
    def score_projection(self) -> Callable[[Tensor], Tensor]:
        """LeGrad: the backbone's embedding of intermediate tokens, scored as
        the wrapper scores the backbone's output."""
        from captum_ssl.models._targets import _flat

        embed, score = self.inner.score_projection(), self.target.score
        return lambda z: score(_flat(embed(z)))

    # ------------------------------------------------------------------- LRP
    def lrp_unsupported(self) -> Optional[str]:
        why = self.inner.lrp_unsupported()
        if why is None and self.inner.model is not self.target.backbone:
            why = (
                f"LRP needs {type(self.target).__name__}'s backbone to be the "
                f"{type(self.inner.model).__name__} itself; it wraps it in "
                f"{type(self.target.backbone).__name__}, whose operations have no "
                "rule. Pass the model itself as the backbone."
            )
        return why

    def plan(self, P: Propagator, embedding: bool) -> Plan:
        from captum_ssl.models._targets import (
            EmbeddingSimilarity,
            _flat,
            _warn_if_own_embedding,
        )

        target = self.target

        def forward(x: Tensor) -> Tensor:
            e = _flat(target.backbone(x))
            norm = e.detach().norm(dim=1, keepdim=True).clamp_min(1e-12)
            if isinstance(target, EmbeddingSimilarity):
                target.check(e)
                refs = target.references.to(e.dtype)
                sims = P.linear(P.scale(e, 1 / norm), refs)
                if torch.is_grad_enabled():
                    _warn_if_own_embedding(sims)
                return sims
            unit = e.detach() / norm  # constant: |e| = e . unit, a fixed linear map
            return P.linear_map(lambda t: (t * unit).sum(dim=1, keepdim=True), e)

        return self.inner.plan(P, embedding) + [(target, forward)]
