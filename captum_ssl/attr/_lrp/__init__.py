"""Relevance propagation (LRP) for Vision Transformers (issue 9)."""

from captum_ssl.attr._lrp.methods import (
    LRP,
    AttnLRP,
    PartialLRP,
    TransformerAttribution,
)
from captum_ssl.attr._lrp.propagate import relevance_rules
from captum_ssl.attr._lrp.rules import AttnLRPRules, CheferRules

__all__ = [
    "LRP",
    "AttnLRP",
    "AttnLRPRules",
    "CheferRules",
    "PartialLRP",
    "TransformerAttribution",
    "relevance_rules",
]
