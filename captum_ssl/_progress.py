"""The one progress bar of the library: Captum's (tqdm), on stderr.

Every call that can take more than a few seconds (Score-CAM, Ablation-CAM and
the other perturbation CAMs, the perturbation metrics, photo loading, training
epochs) takes ``show_progress=True`` (``progress=True`` where the argument
already had that name) and draws its bar through :func:`progress_bar`.
"""

from __future__ import annotations

from typing import Iterable, Optional, TypeVar

T = TypeVar("T")


def progress_bar(
    iterable: Iterable[T],
    desc: str,
    total: Optional[int] = None,
    enabled: bool = True,
    unit: str = "it",
) -> Iterable[T]:
    """``iterable`` wrapped in Captum's progress bar (printed on stderr, first
    line at once, then at most every half second), or unchanged when not
    ``enabled``."""
    if not enabled:
        return iterable
    from captum._utils.progress import progress

    return progress(iterable, desc=desc, total=total, unit=unit)
