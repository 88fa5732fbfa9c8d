"""Family adapters: the only code that knows a ViT implementation (see
:mod:`.base`). Importing this package registers every family."""

from captum_ssl.attr._families import (  # noqa: F401  (registers the families)
    embedding_head,
    hf_beit,
    hf_vit,
    timm_beit,
    timm_eva,
    timm_probe,
    timm_vit,
    torch_mha,
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
    lrp_adapter,
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
    "lrp_adapter",
    "lrp_supported",
    "register",
    "register_attention",
    "supported",
]
