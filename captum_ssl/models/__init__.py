"""Model zoo: supervised and self-supervised models from their official files.

Nothing is built or read at import time. See ``docs/models_table.md`` for the
models, the file(s) each needs in ``storage/pretrained_weights/`` and where to
download them.

Examples::

    >>> import captum_ssl.models as zoo
    >>> zoo.available()  # entries whose files are present
    ['efficientnet_lite0', ...]
    >>> model = zoo.load("efficientnet_lite0")
    >>> layer = zoo.get_layer(model, zoo.entry("efficientnet_lite0").cam_layer)
"""

from ._api import (
    WEIGHTS_ENV,
    available,
    checkpoint_paths,
    default_weights_dir,
    describe,
    entry,
    is_available,
    list_models,
    load,
    models_table,
    preprocess,
)
from ._checkpoint import (
    CheckpointError,
    CheckpointMismatchError,
    ChecksumError,
    CorruptCheckpointError,
    MissingCheckpointError,
    NonFiniteWeightsError,
    UnsafeCheckpointError,
    incomplete_reason,
    read_checkpoint,
    sha256sum,
)
from ._heads import TokenLinearProbe, TokenProbe
from ._layers import get_layer, get_layers
from ._preprocessing import Preprocessing
from ._registry import FAMILIES, REGISTRY, CheckpointFile, ModelEntry, family_name
from ._targets import (
    EmbeddingNorm,
    EmbeddingSimilarity,
    headless,
    reference_embeddings,
)

__all__ = [
    "FAMILIES",
    "REGISTRY",
    "WEIGHTS_ENV",
    "CheckpointError",
    "CheckpointFile",
    "CheckpointMismatchError",
    "ChecksumError",
    "CorruptCheckpointError",
    "EmbeddingNorm",
    "EmbeddingSimilarity",
    "MissingCheckpointError",
    "ModelEntry",
    "NonFiniteWeightsError",
    "Preprocessing",
    "TokenLinearProbe",
    "TokenProbe",
    "UnsafeCheckpointError",
    "available",
    "checkpoint_paths",
    "default_weights_dir",
    "describe",
    "entry",
    "family_name",
    "get_layer",
    "get_layers",
    "headless",
    "incomplete_reason",
    "is_available",
    "list_models",
    "load",
    "models_table",
    "preprocess",
    "read_checkpoint",
    "reference_embeddings",
    "sha256sum",
]
