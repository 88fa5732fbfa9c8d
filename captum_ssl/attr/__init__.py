"""Attribution methods: the CAM family and attention methods, as Captum
attributions."""

from captum_ssl.attr._attention import (
    AttentionFlow,
    AttentionRollout,
    GenericAttention,
    GradientAttentionRollout,
    RawAttention,
)
from captum_ssl.attr._attention.legrad import LeGrad
from captum_ssl.attr._cam.activation_cams import (
    LayerAblationCam,
    LayerClassActivationMap,
    LayerEigenCam,
    LayerScoreCam,
)
from captum_ssl.attr._cam.base import LayerGradCam
from captum_ssl.attr._cam.extra_cams import (
    LayerFEM,
    LayerFinerCam,
    LayerKPCACam,
    LayerRandomCam,
    LayerShapleyCam,
    SobelCam,
)
from captum_ssl.attr._cam.factorization import (
    DeepFeatureFactorization,
    Factorization,
)
from captum_ssl.attr._cam.gradient_cams import (
    LayerEigenGradCam,
    LayerGradCamElementWise,
    LayerGradCamPlusPlus,
    LayerHiResCam,
    LayerLayerCam,
    LayerXGradCam,
)
from captum_ssl.attr._cam.multi_cams import SESS, FullGrad, LayerRefineCam
from captum_ssl.attr._cam.recipro_cam import LayerReciproCam
from captum_ssl.attr._cam.smoothed_cams import (
    LayerISCam,
    LayerSmoothGradCamPlusPlus,
    LayerSSCam,
)
from captum_ssl.attr._core import (
    AttributionAssertionError,
    AttributionInputError,
    CompiledLayerError,
    ConcurrentCallError,
    NonFiniteWarning,
    TrainModeWarning,
    model_lock,
)
from captum_ssl.attr._layout import TokenLayout
from captum_ssl.attr._lrp import (
    AttnLRP,
    PartialLRP,
    TransformerAttribution,
    TransformerLRP,
)

__all__ = [
    "AttentionFlow",
    "AttentionRollout",
    "GenericAttention",
    "GradientAttentionRollout",
    "RawAttention",
    "AttributionAssertionError",
    "AttributionInputError",
    "CompiledLayerError",
    "ConcurrentCallError",
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
    "NonFiniteWarning",
    "TokenLayout",
    "TrainModeWarning",
    "model_lock",
    "DeepFeatureFactorization",
    "Factorization",
    "FullGrad",
    "LayerFEM",
    "LayerFinerCam",
    "LayerKPCACam",
    "LayerRandomCam",
    "LayerRefineCam",
    "LayerShapleyCam",
    "SESS",
    "SobelCam",
    "LeGrad",
    "LayerISCam",
    "LayerReciproCam",
    "LayerSSCam",
    "LayerSmoothGradCamPlusPlus",
    # relevance propagation (issue 9)
    "AttnLRP",
    "PartialLRP",
    "TransformerAttribution",
    "TransformerLRP",
]
