"""Model-parameter randomisation test (Adebayo et al., NeurIPS 2018)."""

from __future__ import annotations

import copy
from typing import Any, Callable, List, Optional, Sequence, Union, cast

import torch
from captum._utils.typing import TargetType
from torch import Tensor, nn

from captum_ssl.metrics._common import (
    MetricInputError,
    direction,
    explain,
    explainer,
    prepare,
    resolve_target,
    spearman,
    ssim,
)


def parameter_layers(model: nn.Module) -> List[str]:
    """Names of the leaf modules holding parameters, from the output down."""
    names = [
        name
        for name, m in model.named_modules()
        if name and not list(m.children()) and any(True for _ in m.parameters(False))
    ]
    return names[::-1]


def randomize_(module: nn.Module) -> None:
    """Re-initialise a module in place (``reset_parameters`` or N(0, 0.02))."""
    if hasattr(module, "reset_parameters"):
        cast(Callable[[], None], module.reset_parameters)()
        return
    for p in module.parameters(recurse=False):
        nn.init.normal_(p, std=0.02)


@direction(False)
def randomization_sanity(
    model: nn.Module,
    inputs: Tensor,
    method: Callable[[nn.Module], Any],
    target: TargetType = None,
    layers: Optional[Union[int, Sequence[str]]] = None,
    measure: str = "spearman",
    absolute: bool = True,
    seed: int = 0,
    return_curve: bool = False,
) -> Tensor:
    r"""Similarity of maps of the trained and a randomised model. Lower is better.

    Adebayo et al. (Sanity Checks for Saliency Maps, NeurIPS 2018) re-initialise
    a model's layers from the top (cascading) and compare the maps of the
    trained model with those of the randomised one: a method that explains
    the model must give different maps (low similarity). The user's model is
    never touched: a ``copy.deepcopy`` is randomised (memory for a second
    copy of the model on its device).

    Cost: two explanations of the batch (``len(layers) + 1`` with
    ``return_curve=True``).

    Args:
        model (nn.Module): the trained model.
        inputs (Tensor): images ``(B, C, H, W)``.
        method (callable): ``model -> attribution``, building the method on a
                    given model, e.g. ``lambda m: LayerGradCam(m, m.layer4)``;
                    the attribution is an object with ``attribute`` or a
                    callable ``(inputs, target) -> maps``.
        target (optional): class per image (kept for the randomised model);
                    ``None`` = top-1 class of the trained model.
        layers (int or list of str, optional): names of the modules to
                    re-initialise, in cascade order (top first); an int ``n``
                    takes the top ``n`` leaf modules with parameters; ``None``
                    all of them (full randomisation). Default: None
        measure (str, optional): ``"spearman"`` (rank correlation, average
                    ranks for ties) or ``"ssim"``. Default: "spearman"
        absolute (bool, optional): compare absolute maps, as the paper's
                    rank correlation (abs). Default: True
        seed (int, optional): seed of the re-initialisation (the global RNG
                    state is restored afterwards). Default: 0
        return_curve (bool, optional): return ``(B, len(layers))``, the
                    similarity after each step of the cascade (one explanation
                    per step) instead of only after the last. Default: False

    Returns:
        Tensor: ``(B,)`` similarities on the model's device.

    Examples::

        >>> sim = randomization_sanity(
        ...     model, x, lambda m: LayerGradCam(m, m.layer4), y, layers=1)
    """
    if measure not in ("spearman", "ssim"):
        raise MetricInputError(f"measure={measure!r}: use 'spearman' or 'ssim'.")
    if not isinstance(model, nn.Module):
        raise MetricInputError("randomization_sanity needs an nn.Module to copy.")
    x, _ = prepare(model, inputs, None)
    target = resolve_target(model, x, target)
    names = parameter_layers(model)
    if isinstance(layers, int):
        names = names[:layers]
    elif layers is not None:
        names = list(layers)
    if not names:
        raise MetricInputError("No layer to randomise: pass layer names or n > 0.")

    def similarity(a: Tensor, b: Tensor) -> Tensor:
        if absolute:
            a, b = a.abs(), b.abs()
        return spearman(a, b) if measure == "spearman" else ssim(a, b)

    trained = explain(explainer(method(model)), x, target)
    rand = copy.deepcopy(model)
    modules = dict(rand.named_modules())
    missing = [n for n in names if n not in modules]
    if missing:
        raise MetricInputError(
            f"No module named {missing[0]!r} in the model; names come from "
            "model.named_modules()."
        )
    fn = explainer(method(rand))
    curve = []
    devices = []
    if x.device.type == "cuda":
        devices = [x.device.index if x.device.index is not None else 0]
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        for i, name in enumerate(names):
            with torch.no_grad():
                randomize_(modules[name])
            if return_curve or i == len(names) - 1:
                curve.append(similarity(trained, explain(fn, x, target)))
    out = torch.stack(curve, dim=1)
    return out if return_curve else out[:, 0]
