"""The zoo's linear-probe wrapper :class:`~captum_ssl.models.TokenLinearProbe`
(DINO ViT-S/16 and ViT-B/16, DINOv2 with and without registers) around a timm
``VisionTransformer`` at ``.backbone``.

The backbone is the timm ViT family (:class:`.timm_vit.TimmViTAdapter`:
blocks, attention, token layout, norms and their rules); this adapter adds
what the probe computes after the blocks: the final ``norm`` applied to the
output of each of the last ``n_last_blocks`` blocks (one LayerNorm module
called several times, each call with its own rule), the class token of each,
with ``patch_mean`` the mean of the last block's patch tokens (class and
register tokens excluded), their concatenation (or DINO ViT-B's interleaving)
and the linear head. Token selection, concatenation and interleaving move
relevance as they move gradients (no rule needed); the patch mean is a fixed
linear map (:meth:`~captum_ssl.attr._lrp.propagate.Propagator.token_mean`,
as for the Hugging Face DINOv2 classifier) and the head a linear leaf. The
head reads the class token, so the class-token methods apply.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Optional, cast

from torch import Tensor, nn

from captum_ssl.attr._families.base import WrapperAdapter, register
from captum_ssl.attr._families.timm_vit import TimmViTAdapter
from captum_ssl.attr._lrp.propagate import Plan, Propagator, plan_leaf

if TYPE_CHECKING:
    from captum_ssl.models._heads import TokenLinearProbe


@register
class TokenLinearProbeAdapter(WrapperAdapter):
    label = (
        "captum_ssl TokenLinearProbe (the zoo's DINO / DINOv2 linear probes: "
        "class tokens of the last blocks, patch mean, around a timm "
        "VisionTransformer)"
    )

    def __init__(self, model: nn.Module, prefix: str = "") -> None:
        super().__init__(model, prefix)
        self.wrapper = cast("TokenLinearProbe", model)
        self.backbone: Any = self.wrapper.backbone  # a timm VisionTransformer
        #: the backbone's own family (blocks, attention, layout, norms)
        self.inner = TimmViTAdapter(self.backbone, prefix + "backbone.")

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        from captum_ssl.models._heads import TokenLinearProbe

        return isinstance(model, TokenLinearProbe)

    # ------------------------------------------------------------ structure
    def norm_layer_hint(self) -> str:
        return "model.backbone.blocks[-1].norm1"

    # ---------------------------------------------------------------- tokens
    def class_token_unread(self) -> Optional[str]:
        return None  # the probe reads the class token (of every block it reads)

    # ----------------------------------------------------------------- heads
    def score_projection(self) -> Callable[[Tensor], Tensor]:
        """LeGrad: the mean token through the final norm, read by the probe
        in place of every token it reads (each class token and the patch
        mean), then the head."""
        model, norm = self.wrapper, self.backbone.norm
        k, mean = model.probe.n_last_blocks, model.probe.patch_mean

        def project(z: Tensor) -> Tensor:
            t = norm(z.mean(dim=1))
            return model.head(model.combine([t] * k, t if mean else None))

        return project

    # ------------------------------------------------------------------- LRP
    def lrp_unsupported(self) -> Optional[str]:
        from timm.models.vision_transformer import VisionTransformer

        if not isinstance(self.backbone, VisionTransformer):
            return (
                f"LRP on TokenLinearProbe needs a timm VisionTransformer backbone; "
                f"got {type(self.backbone).__name__}. Use the attention methods, "
                "LeGrad or the CAMs."
            )
        return None  # the backbone's global_pool is never used by the probe

    def plan(self, P: Propagator, embedding: bool) -> Plan:
        model = self.wrapper
        plan = self.inner.plan(P, embedding)
        plan_leaf(P, plan, model.head, self.prefix + "head")
        plan.append((model, lambda x: model.head(model.features(x, mean=P.token_mean))))
        return plan
