"""A short, resumable training loop for any model, loss and data loader."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sized, Union

import torch
from torch import Tensor, nn

from captum_ssl._progress import progress_bar

LossFn = Callable[[Tensor, Optional[Tensor]], Any]


def _split(batch: Any) -> tuple:
    """``(images, labels)`` of a loader batch; bare tensors are unlabelled."""
    if isinstance(batch, Tensor):
        return batch, None
    if isinstance(batch, (tuple, list)) and len(batch) >= 1:
        return batch[0], (batch[1] if len(batch) > 1 else None)
    raise TypeError(
        f"The loader yields {type(batch).__name__}: yield (images, labels) or "
        "images alone (unlabelled)."
    )


def save_atomic(obj: Any, path: Union[str, Path]) -> None:
    """``torch.save`` to a temporary file, then rename: a kill never leaves a
    half-written file behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def train(
    model: nn.Module,
    loader: Iterable,
    loss_fn: LossFn,
    epochs: int,
    optimizer: Optional[torch.optim.Optimizer] = None,
    device: Union[str, torch.device, None] = None,
    checkpoint: Union[str, Path, None] = None,
    scheduler: Any = None,
    progress: bool = True,
    frozen_norm: bool = False,
) -> List[Dict[str, float]]:
    r"""Train ``model`` for ``epochs`` epochs; checkpoint and resume per epoch.

    ``loss_fn(images, labels)`` returns the loss, or ``(loss, parts)`` with a
    dict of floats to log (e.g. :class:`~captum_ssl.training.CGCLoss`);
    ``labels`` is ``None`` when the loader yields images alone. After every
    epoch the model, optimizer, scheduler and history are written to
    ``checkpoint`` (atomically); calling ``train`` again with the same
    checkpoint resumes after the last finished epoch (and returns at once
    when all are done).

    Args:
        model (nn.Module): the model; put in train mode, moved to ``device``.
        loader (Iterable): batches ``(images, labels)`` or ``images``.
        loss_fn (Callable): ``(images, labels) -> loss`` or ``(loss, parts)``.
        epochs (int): total number of epochs.
        optimizer (Optimizer, optional): default Adam, lr 1e-3.
        device (str or torch.device, optional): default the model's device.
        checkpoint (str or Path, optional): checkpoint file; ``None`` = none.
        scheduler (optional): an LR scheduler stepped once per epoch.
        progress (bool, optional): show a progress bar. Default: True
        frozen_norm (bool, optional): keep batch-norm layers in eval mode
                    (their running statistics fixed), as usual when
                    fine-tuning a pretrained model with small batches.
                    Default: False

    Returns:
        list[dict]: per epoch, the mean loss and the mean of each part.

    Examples::

        >>> loss_fn = CGCLoss(model, model.layer4)
        >>> history = train(model, loader, loss_fn, epochs=5,
        ...                 checkpoint="runs/cgc.pt")
    """
    if epochs < 0:
        raise ValueError(f"epochs={epochs}: use a number >= 0.")
    if device is None:
        p = next(model.parameters(), None)
        device = p.device if p is not None else torch.device("cpu")
    model.to(device)
    if optimizer is None:
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    history: List[Dict[str, float]] = []
    start = 0
    if checkpoint is not None and Path(checkpoint).exists():
        state = torch.load(checkpoint, map_location=device, weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None and state.get("scheduler") is not None:
            scheduler.load_state_dict(state["scheduler"])
        history = list(state["history"])
        start = len(history)
    for epoch in range(start, epochs):
        model.train()
        if frozen_norm:
            for m in model.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        sums: Dict[str, float] = {}
        n = 0
        batches: Iterable = loader
        if progress:
            total = len(loader) if isinstance(loader, Sized) else None
            batches = progress_bar(loader, f"epoch {epoch + 1}/{epochs}", total)
        for batch in batches:
            images, labels = _split(batch)
            images = images.to(device)
            labels = None if labels is None else labels.to(device)
            out = loss_fn(images, labels)
            loss, parts = out if isinstance(out, tuple) else (out, {})
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            for k, v in {"loss": loss.item(), **parts}.items():
                sums[k] = sums.get(k, 0.0) + float(v)
            n += 1
        if scheduler is not None:
            scheduler.step()
        history.append({k: v / max(n, 1) for k, v in sums.items()})
        if checkpoint is not None:
            save_atomic(
                {
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": None if scheduler is None else scheduler.state_dict(),
                    "history": history,
                },
                checkpoint,
            )
    return history
