"""Post-processing and figures for attribution maps."""

from captum_ssl.viz._maps import as_map, normalize, to_heatmap, upsample
from captum_ssl.viz._plot import blend, grid_figure, overlay, prediction_text

__all__ = [
    "as_map",
    "blend",
    "grid_figure",
    "normalize",
    "overlay",
    "prediction_text",
    "to_heatmap",
    "upsample",
]
