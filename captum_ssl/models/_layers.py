"""Dotted layer paths (``"layer4"``, ``"blocks.-1.norm1"``, ``"blocks.*.attn"``)."""

from __future__ import annotations

from typing import List

from torch import nn


def _child(module: nn.Module, part: str, path: str) -> nn.Module:
    if part.lstrip("-").isdigit() and isinstance(
        module, (nn.Sequential, nn.ModuleList)
    ):
        index = int(part)
        if not -len(module) <= index < len(module):
            raise ValueError(
                f"layer path {path!r}: index {index} out of range for a "
                f"{type(module).__name__} of {len(module)} modules"
            )
        return module[index]
    children = dict(module.named_children())
    if part in children:
        return children[part]
    raise ValueError(
        f"layer path {path!r}: {type(module).__name__} has no child {part!r}; "
        f"its children are {sorted(children)}"
    )


def get_layer(model: nn.Module, path: str) -> nn.Module:
    r"""The sub-module of ``model`` at a dotted path; integers index containers.

    Negative indices count from the end, so ``"blocks.-1.norm1"`` is the first
    norm of the last transformer block whatever the depth.

    Args:
        model (nn.Module): the model.
        path (str): dotted path, e.g. ``"layer4"`` or ``"layers.-1.blocks.-1.norm1"``.
                    An empty string returns ``model``.

    Returns:
        nn.Module: the layer.

    Examples::

        >>> import captum_ssl.models as zoo
        >>> model = zoo.load("deit_base")
        >>> layer = zoo.get_layer(model, zoo.entry("deit_base").cam_layer)
    """
    module = model
    if not path:
        return module
    for part in path.split("."):
        module = _child(module, part, path)
    return module


def layer_expression(path: str, root: str = "model") -> str:
    r"""The Python expression of the layer at a dotted path (for messages).

    Examples::

        >>> layer_expression("vit.layers.11.layernorm_before")
        'model.vit.layers[11].layernorm_before'
    """
    parts = [p for p in path.split(".") if p]
    return root + "".join(
        f"[{p}]" if p.lstrip("-").isdigit() else f".{p}" for p in parts
    )


def get_layers(model: nn.Module, pattern: str) -> List[nn.Module]:
    r"""All sub-modules matching a dotted path in which ``*`` stands for every child.

    Args:
        model (nn.Module): the model.
        pattern (str): e.g. ``"blocks.*.attn"``.

    Returns:
        list[nn.Module]: the matching layers in model order.

    Examples::

        >>> attns = get_layers(model, "blocks.*.attn")  # one per block
    """
    modules = [model]
    for part in pattern.split("."):
        if part == "*":
            modules = [c for m in modules for c in m.children()]
        else:
            modules = [_child(m, part, pattern) for m in modules]
    if not modules:
        raise ValueError(f"layer pattern {pattern!r} matches no module")
    return modules
