"""LeGrad: layer-wise gradients of each block's own prediction with respect
to its attention probabilities."""

from __future__ import annotations

from typing import Any, Callable, List, Optional

import torch
from captum._utils.common import _run_forward
from captum._utils.typing import TargetType
from captum.log import log_usage
from torch import Tensor, nn

from captum_ssl.attr._attention.capture import (
    CHANNEL,
    LayerSpec,
    attention_kind,
    capture_attention,
)
from captum_ssl.attr._attention.methods import _AttentionAttribution, _to_map
from captum_ssl.attr._core import (
    AttributionInputError,
    TensorOrTuple,
    attribution_call,
    checked_forward,
    finish_maps,
    format_inputs,
    input_hw,
    select_target,
)
from captum_ssl.attr._layout import TokenLayout, layout_for, root_module


def default_score_projection(model: Callable) -> Callable[[Tensor], Tensor]:
    """Class logits of intermediate tokens ``(B, N, C)``: the mean token
    through the model's final norm and classifier (LeGrad's and torchcam's
    pooling), as the model's family adapter reads them (``model``: the model,
    a bound method of it or a wrapper, as for ``forward_func``)."""
    from captum_ssl.attr._families import adapter_for

    return adapter_for(model).score_projection()


def _parent(model: nn.Module, child: nn.Module) -> nn.Module:
    for m in model.modules():
        if any(c is child for c in m.children()):
            return m
    raise AttributionInputError(
        f"The attention module {type(child).__name__} is not inside a block of the "
        "model passed as forward_func."
    )


class LeGrad(_AttentionAttribution):
    r"""LeGrad: for each block, the gradient of the block's own class score
    with respect to its attention probabilities.

    For block :math:`l` with output tokens :math:`z^l` and attention
    probabilities :math:`A^l` (``heads x N x N``), the block's prediction is
    :math:`s^l = \mathrm{head}(\mathrm{norm}(\mathrm{mean}_t\, z^l_t))` (the
    model's own final norm and classifier on the mean token), and

    .. math:: E^l = \frac{1}{H N}\sum_{h, q}
              \mathrm{relu}\Big(\frac{\partial s^l_c}{\partial A^l_{h,q,:}}
              \Big), \qquad L^c = \frac{1}{|\mathcal{L}|}
              \sum_{l \in \mathcal{L}} E^l

    restricted to the patch-token columns. Unlike gradient rollout, the
    attention values themselves are not multiplied in. One forward pass and
    one backward pass per selected layer (all through the same graph).

    torchcam 0.5.0's ``LeGrad`` computes the same quantities but only on
    torchvision ``VisionTransformer`` blocks (``nn.MultiheadAttention``);
    this class reads timm attention (:mod:`.capture`), so the two are not
    compared numerically; the test writes the equation out instead.

    Reference: Bousselham et al., "LeGrad: An Explainability Method for Vision
    Transformers via Feature Formation Sensitivity", 2024.
    https://arxiv.org/abs/2404.03214

    Args:
        forward_func (Callable): a timm ViT / DeiT / MoCo v3 / DINO model (or
                    a bound method of it).
        layers (int, nn.Module, or list, optional): attention layers as in
                    :class:`RawAttention`. Default: None (all of them)
        layout (TokenLayout, optional): patch grid / prefix tokens when the
                    model does not expose them.
        score_projection (Callable, optional): maps a block's output tokens
                    ``(B, N, C)`` to class logits ``(B, classes)``. ``None``:
                    the model's ``norm`` (+ ``fc_norm``) and ``head`` on the
                    mean token.

    Examples::

        >>> legrad = LeGrad(vit)                      # every block
        >>> attr = legrad.attribute(images, target=[3, 7])   # (2, 1, 14, 14)
        >>> last4 = LeGrad(vit, layers=[-4, -3, -2, -1])
    """

    def __init__(
        self,
        forward_func: Callable,
        layers: LayerSpec = None,
        layout: Optional[TokenLayout] = None,
        score_projection: Optional[Callable[[Tensor], Tensor]] = None,
    ) -> None:
        super().__init__(forward_func, layers, layout)
        self.score_projection = score_projection or default_score_projection(
            forward_func
        )

    @log_usage()
    def attribute(
        self,
        inputs: TensorOrTuple,
        target: TargetType = None,
        additional_forward_args: Any = None,
    ) -> Tensor:
        r"""
        Args:
            inputs (Tensor or tuple of Tensor): image batch ``(B, 3, H, W)``.
            target (int, tuple, Tensor, or list): class per sample.
            additional_forward_args (Any, optional): extra forward arguments.

        Returns:
            Tensor: ``(B, 1, gh, gw)`` maps on the input's device.
        """
        inputs = format_inputs(inputs, True, self.forward_func)
        modules = self._modules()
        if any(attention_kind(m) == CHANNEL for m in modules):
            raise AttributionInputError(
                "LeGrad needs token attention; XCiT's channel attention (XCA) has "
                "no token map."
            )
        model = root_module(self.forward_func)
        if model is None:  # never: the attention modules were found on it
            raise AttributionInputError("LeGrad needs forward_func to be the model.")
        from captum_ssl.attr._families import find_adapter

        adapter = find_adapter(model)
        blocks = [
            (adapter and adapter.block_of(m)) or _parent(model, m) for m in modules
        ]
        outputs: List[List[Tensor]] = [[] for _ in blocks]
        handles = []
        grads = []
        try:
            with (
                attribution_call(self.forward_func) as record,
                capture_attention(modules) as store,
                torch.enable_grad(),
            ):
                # on under the call's model lock: no other thread's pass meets them
                handles += [
                    blk.register_forward_hook(
                        lambda _m, _i, o, i=i: outputs[i].append(
                            o[0] if isinstance(o, tuple) else o
                        )
                    )
                    for i, blk in enumerate(blocks)
                ]
                x = tuple(
                    t.detach().requires_grad_() if t.is_floating_point() else t
                    for t in inputs
                )
                _run_forward(
                    checked_forward(self.forward_func, target),
                    x,
                    None,
                    additional_forward_args,
                )
                for i, m in enumerate(modules):
                    if len(store[i]) != 1 or len(outputs[i]) != 1:
                        raise AttributionInputError(
                            f"The attention module {type(m).__name__} (layer {i}) "
                            "must run exactly once per forward pass."
                        )
                    score = select_target(self.score_projection(outputs[i][0]), target)
                    (g,) = torch.autograd.grad(
                        score.sum(), store[i][0], retain_graph=True
                    )
                    grads.append(g.detach())
        finally:
            for h in handles:
                h.remove()
        n = grads[0].shape[-1]
        lay = layout_for(self.forward_func, modules[-1], input_hw(inputs), self.layout)
        lay = lay.resolve(torch.Size((inputs[0].shape[0], n, 1)))
        rel = torch.stack([g.clamp(min=0).mean(dim=(1, 2)) for g in grads])
        return finish_maps((_to_map(rel.mean(dim=0), lay),), record)[0]
