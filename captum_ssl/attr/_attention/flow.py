"""Maximum flow through the layered attention graph (Abnar & Zuidema, 2020).

Why a compiled CPU solver: max flow is a combinatorial algorithm with
data-dependent control flow (breadth-first levels, augmenting paths) that does
not map onto tensor operations. The capacities are computed with torch (on the
input's device); only the final ``L x N x N`` capacity array of one image
leaves the autograd-free computation, is solved by SciPy's compiled Dinic
solver (``scipy.sparse.csgraph.maximum_flow``; SciPy is installed with quantus
and scikit-image), and the ``N`` flow values go back to the input's device.

SciPy's solver takes integer capacities, so capacities (all in ``[0, 1]``) are
scaled by ``SCALE = 2**23`` and rounded down. Each edge then loses less than
``1 / SCALE`` (1.2e-7), so a computed flow is below the exact one by at most
(number of edges in the minimum cut) / SCALE, and never above it.
"""

from __future__ import annotations

from typing import List, Sequence

import numpy as np
import torch
from torch import Tensor

SCALE = 2**23  # 197 tokens x SCALE stays below the int32 limit


def _solve(graph, sources: Sequence[int], target: int) -> List[float]:
    from scipy.sparse.csgraph import maximum_flow

    return [
        maximum_flow(graph, int(s), target, method="dinic").flow_value / SCALE
        for s in sources
    ]


def layered_max_flows(mats: Tensor, sink: int, sources: Sequence[int]) -> Tensor:
    """Max flow from each ``sources`` token of the input layer to ``sink`` of
    the output layer of a layered graph.

    Args:
        mats (Tensor): ``(L, N, N)`` capacities, layer by layer in execution
                    order; ``mats[l, i, j]`` is the capacity of the edge from
                    token ``j`` of layer ``l`` to token ``i`` of layer ``l + 1``
                    (layer 0 is the input).
        sink (int): token index of the sink in the last layer.
        sources (sequence of int): token indices in the input layer.

    Returns:
        Tensor: ``(len(sources),)`` flow values on ``mats``' device.
    """
    from scipy.sparse import csr_matrix

    num_layers, n, _ = mats.shape
    caps = np.floor(mats.detach().double().cpu().numpy() * SCALE).astype(np.int64)
    caps = np.clip(caps, 0, SCALE).astype(np.int32)
    rows, cols, data = [], [], []
    tok = np.arange(n)
    for layer in range(num_layers):
        if layer == num_layers - 1:  # only the sink of the last layer matters
            i_idx, j_idx = np.full(n, sink), tok
        else:
            i_idx, j_idx = np.repeat(tok, n), np.tile(tok, n)
        c = caps[layer, i_idx, j_idx]
        keep = c > 0
        rows.append(layer * n + j_idx[keep])
        cols.append((layer + 1) * n + i_idx[keep])
        data.append(c[keep])
    size = (num_layers + 1) * n
    graph = csr_matrix(
        (np.concatenate(data), (np.concatenate(rows), np.concatenate(cols))),
        shape=(size, size),
        dtype=np.int32,
    )
    graph.sort_indices()
    target = num_layers * n + sink
    values = _solve(graph, sources, target)
    return torch.tensor(values, dtype=mats.dtype, device=mats.device)
