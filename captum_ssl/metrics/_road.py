"""ROAD: RemOve And Debias (Rong et al., ICML 2022).

Removed pixels are filled by *noisy linear imputation*: each takes the
weighted mean of its 8 neighbours (weight 1/6 for the 4 direct, 1/12 for the
4 diagonal neighbours, renormalised over the neighbours inside the image),
where neighbours that are themselves removed are unknowns of the same linear
system, plus Gaussian noise. Solving that sparse system is the one step done
with SciPy on the CPU (a direct sparse solver, which torch lacks); building
masks, noise and the model evaluation stay in torch on the model's device.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import numpy as np
import torch
from captum._utils.typing import TargetType
from torch import Tensor

from captum_ssl.metrics._common import (
    MetricInputError,
    ScoreType,
    direction,
    evaluate,
    first_k_mask,
    fraction_grid,
    generator_for,
    prepare,
    ranks,
    resolve_target,
)

# (dy, dx, weight) of ROAD's NoisyLinearImputer
NEIGHBOURS = (
    (-1, -1, 1 / 12), (-1, 0, 1 / 6), (-1, 1, 1 / 12),
    (0, -1, 1 / 6), (0, 1, 1 / 6),
    (1, -1, 1 / 12), (1, 0, 1 / 6), (1, 1, 1 / 12),
)  # fmt: skip


def _solve_one(image: np.ndarray, removed: np.ndarray) -> np.ndarray:
    """Linear imputation of one image ``(C, H, W)`` at ``removed`` ``(H, W)``."""
    from scipy.sparse import csc_matrix
    from scipy.sparse.linalg import spsolve

    c, h, w = image.shape
    flat = image.reshape(c, -1)
    unknown = np.flatnonzero(removed.reshape(-1))
    n = unknown.size
    if n == 0:
        return image
    if n == h * w:
        raise MetricInputError(
            "Linear imputation needs at least one kept pixel; use percentages "
            "below 100."
        )
    var = -np.ones(h * w, dtype=np.int64)
    var[unknown] = np.arange(n)
    ys, xs = np.divmod(unknown, w)
    rows, cols, vals = [], [], []
    diag = np.zeros(n)
    rhs = np.zeros((n, c))
    for dy, dx, wt in NEIGHBOURS:
        ny, nx = ys + dy, xs + dx
        inside = (ny >= 0) & (ny < h) & (nx >= 0) & (nx < w)
        k = np.flatnonzero(inside)
        nb = ny[k] * w + nx[k]
        diag[k] += wt
        nb_var = var[nb]
        is_var = nb_var >= 0
        rows.append(k[is_var])
        cols.append(nb_var[is_var])
        vals.append(np.full(int(is_var.sum()), -wt))
        known = ~is_var
        rhs[k[known]] += wt * flat[:, nb[known]].T
    rows.append(np.arange(n))
    cols.append(np.arange(n))
    vals.append(diag)
    a = csc_matrix(
        (np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
        shape=(n, n),
    )
    sol = spsolve(a, rhs)
    out = flat.copy()
    out[:, unknown] = np.asarray(sol).reshape(n, c).T
    return out.reshape(c, h, w)


def noisy_linear_imputation(
    inputs: Tensor,
    removed: Tensor,
    noise: float = 0.01,
    generator: Optional[torch.Generator] = None,
) -> Tensor:
    r"""Fill ``removed`` pixels by noisy linear imputation (ROAD, Rong et al. 2022).

    Each removed pixel equals the weighted mean of its 8 neighbours (1/6
    direct, 1/12 diagonal, over the neighbours inside the image; removed
    neighbours are solved for jointly) plus ``noise * N(0, 1)``; kept pixels
    are unchanged. All channels share the mask.

    Args:
        inputs (Tensor): images ``(B, C, H, W)``.
        removed (Tensor): boolean masks ``(B, 1, H, W)`` or ``(B, H, W)``.
        noise (float, optional): noise standard deviation. Default: 0.01
        generator (torch.Generator, optional): for the noise, on the input's device.

    Returns:
        Tensor: ``(B, C, H, W)`` on the input's device.
    """
    removed = removed.reshape(inputs.shape[0], *inputs.shape[2:]).bool()
    img = inputs.detach().double().cpu().numpy()
    rem = removed.cpu().numpy()
    solved = np.stack([_solve_one(img[i], rem[i]) for i in range(img.shape[0])])
    out = torch.from_numpy(solved).to(inputs.device, inputs.dtype)
    if noise:
        eps = torch.randn(
            out.shape, generator=generator, device=out.device, dtype=out.dtype
        )
        out = out + noise * eps * removed[:, None].to(out.dtype)
    return out


ORDERS = {"morf": True, "lerf": False}


@direction(("order", {"morf": False, "lerf": True}))
def road(
    model: Callable,
    inputs: Tensor,
    attributions: Tensor,
    target: TargetType = None,
    order: str = "morf",
    percentages: Sequence[float] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9),
    score: ScoreType = "accuracy",
    noise: float = 0.01,
    seed: Optional[int] = 0,
    generator: Optional[torch.Generator] = None,
    batch_size: int = 64,
    return_curve: bool = False,
    show_progress: bool = False,
) -> Tensor:
    r"""ROAD, RemOve And Debias (Rong et al., ICML 2022).

    For each fraction ``p`` in ``percentages`` the ``int(p * H * W)`` most
    relevant (``order="morf"``, lower is better) or least relevant
    (``"lerf"``, higher is better) pixels are removed and filled by
    :func:`noisy_linear_imputation`, which leaves no sharp removal edges for
    the model to pick up; the score (top-1 accuracy against ``target`` by
    default, or the class probability) is recorded. The result is the mean
    height of the curve: its trapezoid area over the fraction axis divided by
    the axis' length (the mean of the scores for a single fraction).

    Quantus 0.6.0's ``ROAD`` raises ``IndexError`` in its imputation (it
    spreads the attribution over channels before selecting pixels); this one
    selects pixels on the ``(H, W)`` map.

    Cost: ``len(percentages)`` forward passes per image plus one sparse solve
    per image and fraction (SciPy, CPU; about ``p * H * W`` unknowns).

    Args:
        model, inputs, attributions, target: as in :func:`deletion_auc`.
        order (str, optional): ``"morf"`` or ``"lerf"``. Default: "morf"
        percentages (sequence of float, optional): removed fractions in (0, 1).
                    Default: 0.1, ..., 0.9
        score (str or callable, optional): Default: "accuracy"
        noise (float, optional): imputation noise std (input space). Default: 0.01
        seed (int, optional): seed of the noise. Default: 0
        generator (torch.Generator, optional): used instead of ``seed``.
        batch_size (int, optional): Default: 64
        return_curve (bool, optional): return ``(B, len(percentages))``.
        show_progress (bool, optional): print a progress bar of the forward
                    passes (on stderr). Default: False

    Returns:
        Tensor: ``(B,)`` on the model's device.

    Examples::

        >>> morf = road(model, x, cam, y, order="morf").mean()
        >>> lerf = road(model, x, cam, y, order="lerf").mean()
    """
    if order not in ORDERS:
        raise MetricInputError(f"order={order!r}: use 'morf' or 'lerf'.")
    fr = fraction_grid(percentages, "percentages")
    x, maps = prepare(model, inputs, attributions)
    target = resolve_target(model, x, target, batch_size)
    hw = (x.shape[2], x.shape[3])
    counts = torch.tensor(
        [int(float(p) * hw[0] * hw[1]) for p in percentages], device=x.device
    )
    rank = ranks(maps, descending=ORDERS[order])
    gen = generator_for(x.device, seed, generator)

    def make_batch(b_idx: Tensor, j_idx: Tensor) -> Tensor:
        removed = first_k_mask(rank[b_idx], counts[j_idx], hw)
        return noisy_linear_imputation(x[b_idx], removed, noise, gen)

    curve = evaluate(
        model, x, target, len(counts), make_batch, score, batch_size,
        show_progress, "ROAD",
    )  # fmt: skip
    if return_curve or curve.shape[1] == 1:
        return curve if return_curve else curve[:, 0]
    xs = fr.to(curve.device, curve.dtype)
    return torch.trapezoid(curve, x=xs, dim=1) / (xs[-1] - xs[0])
