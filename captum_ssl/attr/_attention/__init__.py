"""Attention explanations for Vision Transformers (issue 3)."""

from captum_ssl.attr._attention.capture import (
    SUPPORTED,
    attention_forward,
    attention_modules,
    capture_attention,
)
from captum_ssl.attr._attention.methods import (
    AttentionFlow,
    AttentionRollout,
    GenericAttention,
    GradientAttentionRollout,
    RawAttention,
)

__all__ = [
    "SUPPORTED",
    "AttentionFlow",
    "AttentionRollout",
    "GenericAttention",
    "GradientAttentionRollout",
    "RawAttention",
    "attention_forward",
    "attention_modules",
    "capture_attention",
]
