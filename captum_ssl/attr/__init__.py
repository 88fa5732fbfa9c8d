"""Attribution methods: the CAM family and attention methods, as Captum
attributions."""

from captum_ssl.attr._attention import (
    AttentionFlow,
    AttentionRollout,
    GenericAttention,
    GradientAttentionRollout,
    RawAttention,
)
from captum_ssl.attr._cam.activation_cams import (
    LayerAblationCam,
    LayerClassActivationMap,
    LayerEigenCam,
    LayerScoreCam,
)
from captum_ssl.attr._cam.base import LayerGradCam
from captum_ssl.attr._cam.gradient_cams import (
    LayerEigenGradCam,
    LayerGradCamElementWise,
    LayerGradCamPlusPlus,
    LayerHiResCam,
    LayerLayerCam,
    LayerXGradCam,
)
from captum_ssl.attr._core import AttributionInputError
from captum_ssl.attr._layout import TokenLayout
from captum_ssl.attr._lrp import LRP, AttnLRP, PartialLRP, TransformerAttribution

__all__ = [
    "AttentionFlow",
    "AttentionRollout",
    "GenericAttention",
    "GradientAttentionRollout",
    "RawAttention",
    "AttributionInputError",
    "LayerAblationCam",
    "LayerClassActivationMap",
    "LayerEigenCam",
    "LayerEigenGradCam",
    "LayerGradCam",
    "LayerGradCamElementWise",
    "LayerGradCamPlusPlus",
    "LayerHiResCam",
    "LayerLayerCam",
    "LayerScoreCam",
    "LayerXGradCam",
    "TokenLayout",
    # relevance propagation (issue 9)
    "AttnLRP",
    "LRP",
    "PartialLRP",
    "TransformerAttribution",
]
