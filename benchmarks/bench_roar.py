"""ROAR / KAR with retraining (``python -m benchmarks.run --bench roar``).

Not an asv suite (no ``time_*`` / ``track_*`` methods, so the default run
skips it): ``run(args)`` trains the digits CNN from scratch for every
(method, mode, fraction, seed) and prints the table of test accuracies with
95% Student-t intervals over the seeds; ``roar.md`` and ``roar.png`` go to
``<out>/roar/``. A killed run resumes (same command). Under
``torchrun --nproc_per_node=N -m benchmarks.run --bench roar`` the runs are
spread over the N processes.

Environment options: ``ROAR_SEEDS`` (default 3), ``ROAR_EPOCHS`` (10),
``ROAR_FRACTIONS`` (``0.1,0.3,0.5,0.7,0.9``; ``BENCH_FULL=1``: 0.1..0.9),
``ROAR_DATA``: a ``torchvision.datasets.ImageFolder`` root with ``train/``
and ``test/`` sub-folders (e.g. CIFAR-10 exported as PNGs) instead of the
digits; ``ROAR_SIZE`` (32) is its image size; ``ROAR_FILL``: ``mean`` (Hooker
et al., default) or ``linear`` (ROAD's noisy linear imputation).
"""

from __future__ import annotations

import argparse
import os
import time
import warnings
from pathlib import Path
from typing import Dict, List, Sequence

import torch

from captum_ssl.training import (
    DigitsCNN,
    digits,
    roar_kar,
    standard_explainers,
    tensors_of,
)

QUICK_FRACTIONS = (0.1, 0.3, 0.5, 0.7, 0.9)
FULL_FRACTIONS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def _data():
    root = os.environ.get("ROAR_DATA")
    if not root:
        (tr, te) = digits()
        return tr, te, DigitsCNN, "scikit-learn digits (1257 train / 540 test, 8x8)"
    from torchvision import datasets, transforms

    size = int(os.environ.get("ROAR_SIZE", "32"))
    tf = transforms.Compose([transforms.Resize((size, size)), transforms.ToTensor()])
    sets = [
        datasets.ImageFolder(Path(root) / s, transform=tf) for s in ("train", "test")
    ]
    tr, te = tensors_of(sets[0]), tensors_of(sets[1])
    classes = len(sets[0].classes)
    channels = tr[0].shape[1]

    def model_fn() -> torch.nn.Module:
        return DigitsCNN(classes=classes, in_channels=channels)

    return tr, te, model_fn, f"ImageFolder {root} ({len(tr[1])} / {len(te[1])})"


def table(summary: List[dict], fractions: Sequence[float]) -> str:
    """Markdown: one row per (mode, method), one column per fraction."""
    cols = [0.0, *fractions]
    cell: Dict[tuple, str] = {}
    for r in summary:
        hw = f" ± {r['half_width']:.3f}" if r["n"] > 1 else ""
        cell[(r["mode"], r["method"], round(r["fraction"], 6))] = f"{r['mean']:.3f}{hw}"
    lines = [
        "| mode | method | " + " | ".join(f"t={c:.1f}" for c in cols) + " |",
        "|---|---|" + "---|" * len(cols),
    ]
    for mode in ("roar", "kar"):
        for method in sorted({m for mo, m, _ in cell if mo == mode}):
            vals = [cell.get((mode, method, round(c, 6)), "") for c in cols]
            lines.append(f"| {mode.upper()} | {method} | " + " | ".join(vals) + " |")
    return "\n".join(lines)


def plot(summary: List[dict], path: Path, fill: str = "mean") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, mode in zip(axes, ("roar", "kar")):
        for method in sorted({r["method"] for r in summary if r["mode"] == mode}):
            rs = sorted(
                (r for r in summary if r["mode"] == mode and r["method"] == method),
                key=lambda r: r["fraction"],
            )
            style = "k--" if method == "random" else "-o"
            ax.errorbar(
                [100 * r["fraction"] for r in rs], [r["mean"] for r in rs],
                yerr=[r["half_width"] for r in rs], fmt=style, ms=3, capsize=2,
                label=method,
            )  # fmt: skip
        what = "most" if mode == "roar" else "least"
        ax.set_title(f"{mode.upper()}: the {what} important pixels replaced")
        by = "the channel mean" if fill == "mean" else "linear imputation"
        ax.set_xlabel(f"% of pixels replaced by {by}")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test accuracy after retraining")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(args: argparse.Namespace) -> int:
    warnings.filterwarnings("ignore", module="captum")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("gloo")
    full = os.environ.get("BENCH_FULL", "") != ""
    fractions = os.environ.get("ROAR_FRACTIONS")
    fracs = (
        tuple(float(f) for f in fractions.split(","))
        if fractions
        else (FULL_FRACTIONS if full else QUICK_FRACTIONS)
    )
    seeds = tuple(range(int(os.environ.get("ROAR_SEEDS", "3"))))
    epochs = int(os.environ.get("ROAR_EPOCHS", "10"))
    fill = os.environ.get("ROAR_FILL", "mean")
    train, test, model_fn, what = _data()
    out = Path(args.out) / "roar"
    device = os.environ.get("BENCH_DEVICE") or None
    print(
        f"ROAR / KAR on {what}: {len(fracs)} fractions x {len(seeds)} seeds, "
        f"{epochs} epochs per model, {fill} fill; results in {out}",
        flush=True,
    )
    t0 = time.perf_counter()
    res = roar_kar(
        train, test, model_fn, standard_explainers(), out, fractions=fracs,
        seeds=seeds, epochs=epochs, device=device, fill=fill,
    )  # fmt: skip
    rank = int(os.environ.get("RANK", "0"))
    if rank == 0:
        md = table(res.summary, fracs)
        head = (
            f"ROAR / KAR test accuracy ({what}; {fill} fill; mean ± 95% "
            f"t-interval over {len(seeds)} seeds; {res.trained} of {len(res.runs)} "
            f"models trained by this process, {time.perf_counter() - t0:.0f} s)\n\n"
        )
        suffix = "" if fill == "mean" else f"-{fill}"
        (out / f"roar{suffix}.md").write_text(head + md + "\n")
        plot(res.summary, out / f"roar{suffix}.png", fill)
        print("\n" + head + md)
        print(f"\ntable: {out / f'roar{suffix}.md'}, plot: {out / f'roar{suffix}.png'}")
    if world > 1:
        import torch.distributed as dist

        dist.destroy_process_group()
    return 0
