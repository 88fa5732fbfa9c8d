"""Relevance propagation (LRP) for Vision Transformers (issue 9)."""

from captum_ssl.attr._lrp.methods import (
    AttnLRP,
    PartialLRP,
    TransformerAttribution,
    TransformerLRP,
)
from captum_ssl.attr._lrp.propagate import relevance_rules
from captum_ssl.attr._lrp.rules import AttnLRPRules, CheferRules

__all__ = [
    "SUPPORTED_MODELS",
    "AttnLRP",
    "AttnLRPRules",
    "CheferRules",
    "PartialLRP",
    "TransformerAttribution",
    "TransformerLRP",
    "relevance_rules",
]
