"""What a model returns, reduced to the tensor that methods and metrics read.

The one place that knows the output containers of the ecosystem: a Hugging
Face ``ModelOutput`` (``ImageClassifierOutput``, ``BaseModelOutputWithPooling``
...) is read as a tensor here, and every target selection, metric forward and
embedding wrapper of this package calls :func:`model_output`.
"""

from __future__ import annotations

import sys
from typing import Any, Callable

from torch import Tensor, nn

#: the fields read, in this order (see :func:`model_output`)
FIELDS = ("logits", "pooler_output", "last_hidden_state")


def _is_model_output(out: Any) -> bool:
    generic = sys.modules.get("transformers.utils.generic")  # imported by HF models
    cls = getattr(generic, "ModelOutput", None)
    return cls is not None and isinstance(out, cls)


def model_output(out: Any) -> Any:
    r"""``out`` as the tensor a method reads; other outputs pass through unchanged.

    A Hugging Face ``ModelOutput`` is read as

    - ``logits`` for a classifier (``ViTForImageClassification``,
      ``Dinov2ForImageClassification``, DeiT with teacher: the mean of its
      class- and distillation-token logits, as Hugging Face computes them);
    - ``pooler_output`` for a backbone that has one (``Dinov2Model``,
      ``CLIPVisionModel``: the normed class token; ``ViTModel``: its pooler,
      a dense layer with tanh on the class token);
    - else the class token ``last_hidden_state[:, 0]`` (``ViTMAEModel``,
      ``ViTModel(config, add_pooling_layer=False)``).

    ``ViTMAEForPreTraining``'s output (a pixel reconstruction) is refused,
    naming its encoder ``model.vit``.

    Args:
        out (Any): what the model returned.

    Returns:
        The tensor above for a ``ModelOutput``, else ``out`` itself.

    Raises:
        ValueError: a ``ModelOutput`` with none of those fields (the message
            names the fields it has and how to choose one), or
            ``ViTMAEForPreTraining``'s.

    Examples::

        >>> from transformers import ViTConfig, ViTForImageClassification
        >>> model = ViTForImageClassification(ViTConfig(num_labels=10)).eval()
        >>> model_output(model(torch.randn(1, 3, 224, 224))).shape
        torch.Size([1, 10])
    """
    if isinstance(out, Tensor) or not _is_model_output(out):
        return out
    if type(out).__name__ == "ViTMAEForPreTrainingOutput":
        raise ValueError(
            "ViTMAEForPreTraining returns its decoder's reconstruction of the "
            "patches (logits of shape (B, patches, pixels)) and the loss: there "
            "is no class score or embedding to explain. Explain its encoder "
            "`model.vit` (a ViTMAEModel, read by its class token), e.g. "
            "`EmbeddingSimilarity(model.vit, reference_embeddings(model.vit, "
            "images))`, with `model.config.mask_ratio = 0.0`."
        )
    for name in FIELDS:
        value = out.get(name)
        if isinstance(value, Tensor):
            if name == "last_hidden_state" and value.dim() == 3:
                return value[:, 0]
            if name != "last_hidden_state":
                return value
    raise ValueError(
        f"The model returns a {type(out).__name__} with the fields "
        f"{list(out.keys())}, none of {', '.join(FIELDS)}: there is no score or "
        "embedding to explain. Pass a function that returns one tensor, e.g. "
        f"`lambda x: model(x).{next(iter(out.keys()), 'FIELD')}`."
    )


_MISSING = object()


def keep_device_ids(forward: Callable[..., Any], forward_func: Callable) -> None:
    """Give the wrapper ``forward`` of ``forward_func`` its ``device_ids``
    (Captum reads them off the forward function: DataParallel), if it has
    them."""
    device_ids = getattr(forward_func, "device_ids", _MISSING)
    if device_ids is not _MISSING:
        vars(forward)["device_ids"] = device_ids  # a function attribute


def tensor_forward(forward_func: Callable) -> Callable:
    """``forward_func`` whose output goes through :func:`model_output` (keeps
    ``device_ids``, which Captum reads off the forward function)."""

    def forward(*args: Any, **kwargs: Any) -> Any:
        return model_output(forward_func(*args, **kwargs))

    keep_device_ids(forward, forward_func)
    return forward


class TensorOutput(nn.Module):
    """``model`` whose forward returns :func:`model_output` of its output, for
    code outside this package that calls a model and expects a tensor (e.g.
    Quantus's metrics). It follows the wrapped model's train / eval mode.

    Examples::

        >>> scores = TensorOutput(hf_classifier)(images)  # (B, classes) logits
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.training = model.training

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return model_output(self.model(*args, **kwargs))
