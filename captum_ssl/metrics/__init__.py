"""Faithfulness, confidence, consistency and sanity metrics for saliency maps.

Per-sample metrics share one convention,
``metric(model, inputs, attributions, target, **options) -> Tensor[B]``:
``attributions`` is any map that upsamples to the input (layer or patch maps
``(B, 1, h, w)`` and input maps ``(B, C, H, W)`` alike), scores come back on
the model's device, perturbed copies are evaluated ``batch_size`` at a time
across images and steps, and random metrics are seeded. Each metric carries
``higher_is_better`` (see :func:`higher_is_better`). The metrics that must
re-explain (``explanation_consistency``, ``randomization_sanity``) take the
attribution method in place of maps.
"""

from captum_ssl.metrics._arcc import arcc, coherency, complexity, road_combined
from captum_ssl.metrics._common import (
    MetricInputError,
    gaussian_blur,
    higher_is_better,
    pearson,
    rise_kernel,
    spearman,
    ssim,
    substrate,
    topk_iou,
)
from captum_ssl.metrics._confidence import (
    accuracy,
    average_drop,
    average_increase,
    class_probability,
    explanation_masked,
)
from captum_ssl.metrics._consistency import explanation_consistency
from captum_ssl.metrics._content_heatmap import (
    box_mask,
    content_heatmap,
    read_boxes,
    scale_boxes,
)
from captum_ssl.metrics._perturbation import (
    deletion_auc,
    insertion_auc,
    perturbation_auc,
    perturbation_curve,
)
from captum_ssl.metrics._quantus import (
    DEFAULT_METRICS,
    numpy_compat,
    quantus_explain_func,
    quantus_faithfulness,
)
from captum_ssl.metrics._road import noisy_linear_imputation, road
from captum_ssl.metrics._sanity import randomization_sanity

__all__ = [
    "arcc",
    "coherency",
    "complexity",
    "road_combined",
    "DEFAULT_METRICS",
    "MetricInputError",
    "accuracy",
    "average_drop",
    "average_increase",
    "box_mask",
    "class_probability",
    "content_heatmap",
    "deletion_auc",
    "explanation_consistency",
    "explanation_masked",
    "gaussian_blur",
    "rise_kernel",
    "higher_is_better",
    "insertion_auc",
    "noisy_linear_imputation",
    "numpy_compat",
    "pearson",
    "perturbation_auc",
    "perturbation_curve",
    "quantus_explain_func",
    "quantus_faithfulness",
    "randomization_sanity",
    "read_boxes",
    "road",
    "scale_boxes",
    "spearman",
    "ssim",
    "substrate",
    "topk_iou",
]
