"""Post-processing and figures for attribution maps."""

from captum_ssl.viz._maps import as_map, normalize, to_heatmap, upsample
from captum_ssl.viz._plot import grid_figure, overlay

__all__ = ["as_map", "grid_figure", "normalize", "overlay", "to_heatmap", "upsample"]
