"""Family adapters: the only code that knows a ViT implementation (see
:mod:`.base`). Importing this package registers every family."""

from captum_ssl.attr._families import (
    hf_vit,  # noqa: F401  (registers)
    timm_vit,  # noqa: F401  (registers)
)
from captum_ssl.attr._families.base import (
    CHANNEL,
    CLASS,
    SELF,
    AttentionImpl,
    FamilyAdapter,
    Site,
    adapter_for,
    attention_impl,
    declared_layout,
    find_adapter,
    lrp_supported,
    register,
    register_attention,
    supported,
)

__all__ = [
    "CHANNEL",
    "CLASS",
    "SELF",
    "AttentionImpl",
    "FamilyAdapter",
    "Site",
    "adapter_for",
    "attention_impl",
    "declared_layout",
    "find_adapter",
    "lrp_supported",
    "register",
    "register_attention",
    "supported",
]
