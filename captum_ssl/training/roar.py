"""Remove-And-Retrain (ROAR) and Keep-And-Retrain (KAR).

Reference: Hooker, Erhan, Kindermans & Kim, "A Benchmark for Interpretability
Methods in Deep Neural Networks", NeurIPS 2019. https://arxiv.org/abs/1806.10758

For each method and fraction ``t`` the training and test images get the
``t`` most important pixels (ROAR) or the ``t`` least important pixels (KAR)
of each image replaced by the per-channel mean of the training set; a model is
trained from scratch on the modified training set and its accuracy on the
modified test set is recorded. A faithful method makes ROAR accuracy drop
fast and KAR accuracy drop slowly, compared with random maps.

Every artefact is stored under the output folder: the base model and its maps
(``base.pt``, ``maps/``), each perturbed data set (``data/``) and each finished
``(method, mode, t, seed)`` accuracy (``results.sqlite``), so a killed run
resumes where it stopped. Under ``torchrun`` (an initialised
``torch.distributed`` process group) the runs are spread over the ranks.
"""

from __future__ import annotations

import hashlib
import json
import math
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from captum_ssl.training.loop import save_atomic, train

Explainer = Callable[[nn.Module, Tensor, Tensor], Tensor]
MODES = ("roar", "kar")
DEFAULT_FRACTIONS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


# ----------------------------------------------------------------- removal
def importance_order(maps: Tensor, size: Tuple[int, int], seed: int = 0) -> Tensor:
    """Pixel indices ``(B, H*W)`` from most to least important.

    ``maps`` ``(B, c, h, w)`` are summed over channels and upsampled
    (bilinear) to ``size``; ties are broken at random (seeded), so flat
    regions of a map are not removed in scan order."""
    m = maps.detach().float().sum(dim=1, keepdim=True)
    if tuple(m.shape[-2:]) != tuple(size):
        m = F.interpolate(m, size=size, mode="bilinear", align_corners=False)
    flat = m.flatten(1)
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(flat.shape[1], generator=g).to(flat.device)
    order = torch.sort(flat[:, perm], dim=1, descending=True, stable=True).indices
    return perm[order]


def remove_pixels(
    images: Tensor,
    order: Tensor,
    fraction: float,
    mode: str = "roar",
    fill: Union[Tensor, str, None] = None,
) -> Tensor:
    """Replace a fraction of each image's pixels by ``fill`` (per channel).

    ``mode="roar"`` replaces the ``fraction`` most important pixels (by
    ``order`` from :func:`importance_order`), ``"kar"`` the ``fraction`` least
    important ones. ``fill`` ``(C,)`` defaults to the batch's channel means
    (Hooker et al.); ``"linear"`` fills by ROAD's noisy linear imputation
    (Rong et al., ICML 2022: each removed pixel from its neighbours, which
    hides the removal mask better than a constant)."""
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}: use one of {MODES}.")
    if not 0 <= fraction <= 1:
        raise ValueError(f"fraction={fraction}: use a value in [0, 1].")
    b, c, h, w = images.shape
    k = int(round(fraction * h * w))
    if fill is None:
        fill = images.mean(dim=(0, 2, 3))
    idx = order[:, :k] if mode == "roar" else order[:, h * w - k :]
    mask = torch.zeros(b, h * w, dtype=torch.bool, device=images.device)
    mask.scatter_(1, idx.to(images.device), True)
    mask = mask.reshape(b, 1, h, w)
    if isinstance(fill, str):
        if fill != "linear":
            raise ValueError(f"fill={fill!r}: use a (C,) tensor or 'linear'.")
        from captum_ssl.metrics import noisy_linear_imputation

        g = torch.Generator(device=images.device).manual_seed(0)
        return noisy_linear_imputation(images, mask, generator=g)
    return torch.where(mask, fill.to(images).reshape(1, c, 1, 1), images)


# ------------------------------------------------------------------- store
class RoarStore:
    """Finished ``(method, mode, fraction, seed)`` accuracies in SQLite.

    Rows carry a key hashing the run's settings, so changed settings never
    mix with old rows. WAL mode and a busy timeout let several ranks write."""

    def __init__(self, path: Union[str, Path]) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as con:
            con.execute(
                "CREATE TABLE IF NOT EXISTS results (key TEXT, method TEXT, "
                "mode TEXT, fraction REAL, seed INTEGER, accuracy REAL, "
                "created REAL, PRIMARY KEY (key, method, mode, fraction, seed))"
            )

    def _connect(self) -> sqlite3.Connection:
        con = sqlite3.connect(self.path, timeout=60)
        for attempt in range(50):  # another rank may be switching the mode
            try:
                con.execute("PRAGMA journal_mode=WAL")
                break
            except sqlite3.OperationalError as err:
                if "locked" not in str(err) or attempt == 49:
                    con.close()
                    raise
                time.sleep(0.1)
        return con

    def put(self, key: str, run: Tuple[str, str, float, int], acc: float) -> None:
        with self._connect() as con:
            con.execute(
                "INSERT OR REPLACE INTO results VALUES (?, ?, ?, ?, ?, ?, ?)",
                (key, *run, float(acc), time.time()),
            )

    def done(self, key: str) -> Dict[Tuple[str, str, float, int], float]:
        with self._connect() as con:
            rows = con.execute(
                "SELECT method, mode, fraction, seed, accuracy FROM results "
                "WHERE key = ?",
                (key,),
            ).fetchall()
        return {(m, mo, round(f, 6), int(s)): a for m, mo, f, s, a in rows}


# ----------------------------------------------------------------- results
@dataclass
class RoarResult:
    """Accuracies of every run and their summary.

    Attributes:
        runs (dict): ``(method, mode, fraction, seed) -> accuracy``; fraction
                    0 (method ``"none"``, mode ``"-"``) is the unmodified data.
        trained (int): models this call trained (the rest came from the store).
    """

    runs: Dict[Tuple[str, str, float, int], float]
    trained: int = 0
    summary: List[Dict[str, Any]] = field(default_factory=list)


def summarize(
    runs: Dict[Tuple[str, str, float, int], float], confidence: float = 0.95
) -> List[Dict[str, Any]]:
    """Mean accuracy per (method, mode, fraction) with a Student-t interval
    over seeds (``half_width`` is 0 with one seed); the unmodified accuracy is
    repeated as fraction 0 of every curve."""
    from scipy import stats

    groups: Dict[Tuple[str, str, float], List[float]] = {}
    for (method, mode, frac, _), acc in sorted(runs.items()):
        groups.setdefault((method, mode, frac), []).append(acc)
    base = groups.pop(("none", "-", 0.0), None)
    curves = sorted({(m, mo) for m, mo, _ in groups})
    if base is not None:
        for m, mo in curves:
            groups[(m, mo, 0.0)] = base
    out = []
    for (method, mode, frac), accs in sorted(groups.items()):
        n = len(accs)
        mean = sum(accs) / n
        half = 0.0
        if n > 1:
            sd = math.sqrt(sum((a - mean) ** 2 for a in accs) / (n - 1))
            half = float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * sd / math.sqrt(n)
        out.append(
            {"method": method, "mode": mode, "fraction": frac, "mean": mean,
             "half_width": half, "n": n}
        )  # fmt: skip
    return out


# ---------------------------------------------------------------- training
def _fit(
    model_fn: Callable[[], nn.Module],
    data: Tuple[Tensor, Tensor],
    seed: int,
    epochs: int,
    batch_size: int,
    lr: float,
    device: torch.device,
) -> nn.Module:
    torch.manual_seed(seed)
    model = model_fn().to(device)
    g = torch.Generator().manual_seed(seed)
    loader = DataLoader(
        TensorDataset(*data), batch_size=batch_size, shuffle=True, generator=g
    )
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    train(
        model, loader, lambda x, y: F.cross_entropy(model(x), cast(Tensor, y)), epochs,
        optimizer=opt, device=device, progress=False,
    )  # fmt: skip
    return model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, data: Tuple[Tensor, Tensor], batch_size=256) -> float:
    """Top-1 accuracy of ``model`` on ``(images, labels)``."""
    device = next(model.parameters()).device
    x, y = data
    hits = 0
    for i in range(0, len(x), batch_size):
        out = model(x[i : i + batch_size].to(device))
        hits += int((out.argmax(1).cpu() == y[i : i + batch_size]).sum())
    return hits / len(x)


def explain_all(
    explainer: Explainer, model: nn.Module, data: Tuple[Tensor, Tensor], batch_size=128
) -> Tensor:
    """Maps of every image (labels as targets), on the CPU."""
    device = next(model.parameters()).device
    x, y = data
    maps = []
    for i in range(0, len(x), batch_size):
        xb, yb = x[i : i + batch_size].to(device), y[i : i + batch_size].to(device)
        m = explainer(model, xb, yb)
        maps.append(m.detach().cpu())
    return torch.cat(maps)


def _dist() -> Tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier() -> None:
    if _dist()[1] > 1:
        import torch.distributed as dist

        dist.barrier()


def _fmt(f: float) -> str:
    return f"{f:.3f}"


def roar_kar(
    train_data: Tuple[Tensor, Tensor],
    test_data: Tuple[Tensor, Tensor],
    model_fn: Callable[[], nn.Module],
    methods: Dict[str, Explainer],
    out_dir: Union[str, Path],
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    modes: Sequence[str] = MODES,
    seeds: Sequence[int] = (0, 1, 2),
    epochs: int = 20,
    batch_size: int = 64,
    lr: float = 1e-3,
    device: Union[str, torch.device, None] = None,
    progress: bool = True,
    on_result: Optional[Callable[[Tuple[str, str, float, int], float], None]] = None,
    fill: str = "mean",
) -> RoarResult:
    r"""ROAR and KAR curves of several attribution methods, with retraining.

    1. A base model (``model_fn()``, seed ``seeds[0]``) is trained on the
       unmodified training set; each method explains every training and test
       image on it, for its label (``methods[name](model, images, labels)``
       returns maps ``(B, c, h, w)``, at any resolution).
    2. For each method, mode (``"roar"``, ``"kar"``) and fraction ``t``, the
       images get ``t`` of their pixels replaced by the training set's
       per-channel mean (:func:`remove_pixels`).
    3. For each seed, a fresh model is trained on the modified training set
       (seeded weights and batch order) and tested on the modified test set;
       the unmodified data is run too (fraction 0).

    Everything is stored under ``out_dir`` and reused: rerunning the same
    call after a kill trains only the missing runs. In an initialised
    ``torch.distributed`` group the runs are split over the ranks (rank 0
    trains the base model and computes the maps); every rank returns the
    full result.

    Args:
        train_data, test_data (tuple[Tensor, Tensor]): images ``(N, C, H, W)``
                    and labels ``(N,)``; see :func:`tensors_of` for a
                    ``torchvision`` ``ImageFolder``.
        model_fn (Callable): builds a fresh, untrained model.
        methods (dict[str, Callable]): name -> ``(model, images, labels) ->
                    maps``; include a random baseline (:func:`random_maps`).
        out_dir (str or Path): where data sets, maps and results are stored.
        fractions (sequence of float): fractions removed. Default: 0.1..0.9
        modes (sequence of str): ``"roar"`` and/or ``"kar"``.
        seeds (sequence of int): retraining seeds (several give an interval).
        epochs, batch_size, lr: training settings (Adam).
        device (optional): training device; default CUDA when available.
        progress (bool, optional): print one line per finished run.
        on_result (Callable, optional): called with each new ``(run, accuracy)``.
        fill (str, optional): ``"mean"``: the training set's per-channel mean
                    (Hooker et al.); ``"linear"``: ROAD's noisy linear
                    imputation (slower; see :func:`remove_pixels`).
                    Default: "mean"

    Returns:
        RoarResult: all accuracies and :func:`summarize`'s table.

    Examples::

        >>> (xtr, ytr), (xte, yte) = digits()
        >>> res = roar_kar((xtr, ytr), (xte, yte), DigitsCNN,
        ...                {"saliency": saliency, "random": random_maps},
        ...                out_dir="runs/roar", fractions=(0.3, 0.6, 0.9))
        >>> res.summary[0]   # {'method', 'mode', 'fraction', 'mean', ...}
    """
    for m in modes:
        if m not in MODES:
            raise ValueError(f"mode {m!r}: use one of {MODES}.")
    if not seeds:
        raise ValueError("seeds is empty: give at least one seed.")
    if fill not in ("mean", "linear"):
        raise ValueError(f"fill={fill!r}: use 'mean' or 'linear'.")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    rank, world = _dist()
    settings = {
        "epochs": epochs, "batch_size": batch_size, "lr": lr, "version": 1,
        "train": list(train_data[0].shape), "test": list(test_data[0].shape),
        "arch": repr(model_fn()),  # a new model never mixes with old rows
        "fill": fill,
    }  # fmt: skip
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()
    key = key[:16]
    filler = train_data[0].mean(dim=(0, 2, 3)) if fill == "mean" else fill
    hw = (train_data[0].shape[-2], train_data[0].shape[-1])

    # 1. base model and maps (rank 0), stored
    base_path = out / f"base-{key}.pt"
    maps_dir = out / f"maps-{key}"
    if rank == 0:
        if base_path.exists():
            base = model_fn().to(device)
            base.load_state_dict(torch.load(base_path, map_location=device))
            base.eval()
        else:
            base = _fit(model_fn, train_data, seeds[0], epochs, batch_size, lr, device)
            save_atomic(base.state_dict(), base_path)
        for name, explainer in methods.items():
            path = maps_dir / f"{name}.pt"
            if not path.exists():
                maps = {
                    "train": explain_all(explainer, base, train_data),
                    "test": explain_all(explainer, base, test_data),
                }
                save_atomic(maps, path)
        # rank 0 creates the store (switching SQLite to WAL needs an exclusive
        # lock that concurrent first openings would fight over)
        RoarStore(out / "results.sqlite")
    _barrier()

    # 2./3. the runs not yet in the store, split over the ranks
    store = RoarStore(out / "results.sqlite")
    done = store.done(key)
    runs: List[Tuple[str, str, float, int]] = [("none", "-", 0.0, s) for s in seeds]
    runs += [
        (name, mode, round(float(t), 6), s)
        for name in methods
        for mode in modes
        for t in fractions
        for s in seeds
    ]
    todo = [r for r in runs if r not in done][rank::world]
    trained = 0
    Sets = Tuple[Tuple[Tensor, Tensor], Tuple[Tensor, Tensor]]
    cache: Dict[Tuple[str, str, float], Sets] = {}
    for run in todo:
        name, mode, t, seed = run
        if name == "none":
            data = (train_data, test_data)
        else:
            if (name, mode, t) not in cache:
                cache.clear()
                cache[(name, mode, t)] = _perturbed(
                    out / f"data-{key}" / f"{name}-{mode}-{_fmt(t)}.pt",
                    maps_dir / f"{name}.pt", train_data, test_data, t, mode,
                    filler, hw,
                )  # fmt: skip
            data = cache[(name, mode, t)]
        model = _fit(model_fn, data[0], seed, epochs, batch_size, lr, device)
        acc = accuracy(model, data[1])
        store.put(key, run, acc)
        trained += 1
        if progress:
            print(
                f"[rank {rank}] {name:>16} {mode:>4} t={t:.2f} seed={seed}: "
                f"accuracy {acc:.4f}",
                flush=True,
            )
        if on_result is not None:
            on_result(run, acc)
    _barrier()
    if world > 1:  # stores on separate file systems still agree in the end
        import torch.distributed as dist

        mine = store.done(key)
        gathered: List[Any] = [None] * world
        dist.all_gather_object(gathered, mine)
        merged: Dict[Tuple[str, str, float, int], float] = {}
        for g in gathered:
            merged.update(g)
    else:
        merged = store.done(key)
    final = {r: merged[r] for r in runs if r in merged}
    return RoarResult(final, trained, summarize(final))


def _perturbed(
    path: Path,
    maps_path: Path,
    train_data: Tuple[Tensor, Tensor],
    test_data: Tuple[Tensor, Tensor],
    t: float,
    mode: str,
    fill: Union[Tensor, str],
    hw: Tuple[int, int],
) -> Tuple[Tuple[Tensor, Tensor], Tuple[Tensor, Tensor]]:
    """The perturbed copies of both sets, built once and stored at ``path``."""
    if path.exists():
        d = torch.load(path)
        return (d["train"], train_data[1]), (d["test"], test_data[1])
    maps = torch.load(maps_path)
    d = {
        split: remove_pixels(x, importance_order(maps[split], hw), t, mode, fill)
        for split, x in (("train", train_data[0]), ("test", test_data[0]))
    }
    save_atomic(d, path)
    return (d["train"], train_data[1]), (d["test"], test_data[1])


def tensors_of(dataset: Any, batch_size: int = 256) -> Tuple[Tensor, Tensor]:
    """``(images, labels)`` tensors of a map-style dataset of ``(image, label)``
    pairs (e.g. ``torchvision.datasets.ImageFolder`` with a ``ToTensor``
    transform) for :func:`roar_kar`."""
    xs, ys = [], []
    for x, y in DataLoader(dataset, batch_size=batch_size, shuffle=False):
        xs.append(x)
        ys.append(torch.as_tensor(y))
    return torch.cat(xs), torch.cat(ys).long()


def random_maps(model: nn.Module, images: Tensor, labels: Tensor) -> Tensor:
    """The random baseline: uniform noise maps ``(B, 1, H, W)``, seeded by the
    batch's content (reproducible)."""
    seed = int(images.double().sum().item() * 1e6) % (2**31)
    g = torch.Generator().manual_seed(seed)
    b, _, h, w = images.shape
    return torch.rand(b, 1, h, w, generator=g).to(images.device)
