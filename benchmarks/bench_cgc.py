"""CGC fine-tuning of the real EfficientNet-Lite0 (``--bench cgc``).

Not an asv suite (the default run skips it): ``run(args)`` fine-tunes the
pretrained EfficientNet-Lite0 twice from the same weights on the same
augmented views, once with the cross-entropy alone and once with the
cross-entropy plus the CGC loss (Pillai et al., CVPR 2022; Grad-CAM on the
registry CAM layer ``bn2``), then reports on held-out photos, for the
pretrained model and both fine-tuned ones: the Grad-CAM consistency under
horizontal flips and random resized crops (Pearson correlation of the map of
the transformed photo with the transformed map), the insertion AUC and the
top-1 accuracy. Photos: the ImageNet sample folder (one photo per class; the
first ``CGC_TRAIN`` train, the next ``CGC_TEST`` are held out), else the
bundled photos with the pretrained model's predictions as labels.

Environment options: ``CGC_TRAIN`` (128), ``CGC_TEST`` (128), ``CGC_EPOCHS`` (3),
``CGC_LAMBDA`` (1.0; the paper uses 0.5 over far more steps), ``CGC_TAU`` (0.5),
``CGC_LR`` (1e-4). Checkpoints go to
``<out>/cgc/`` per epoch; the same command resumes a killed run.
"""

from __future__ import annotations

import argparse
import os
import time
import warnings
from pathlib import Path
from typing import Dict

import torch
from torch.utils.data import DataLoader, TensorDataset

import captum_ssl.metrics as M
from captum_ssl.attr import LayerGradCam
from captum_ssl.data import image_batches
from captum_ssl.models import entry, get_layer, load
from captum_ssl.training import CGCLoss, CropFlip, train

NAME = "efficientnet_lite0"


def _photos(n: int):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the fallback to bundled photos is expected
        batch = next(iter(image_batches(model=NAME, n=n, batch_size=n)))
    return batch.images, batch.labels


def _model(device: torch.device):
    model = load(NAME).to(device)
    return model, get_layer(model, entry(NAME).cam_layer)


def evaluate(model, layer, x, y, batch: int = 8) -> Dict[str, float]:
    """Mean consistency (flip, crop), insertion AUC and top-1 on ``(x, y)``."""
    model.eval()
    cam = LayerGradCam(model, layer)
    sums = {"flip": 0.0, "crop": 0.0, "insertion": 0.0, "top1": 0.0}
    for i in range(0, len(x), batch):
        xb, yb = x[i : i + batch], y[i : i + batch]
        maps = cam.attribute(xb, target=yb, relu_attributions=True)
        for key, tf in (("flip", "hflip"), ("crop", "resized_crop")):
            c = M.explanation_consistency(
                model, xb, cam, yb, transform=tf, attributions=maps, seed=i,
                relu_attributions=True,
            )  # fmt: skip
            sums[key] += float(c.nan_to_num(0.0).sum())
        ins = M.insertion_auc(model, xb, maps, yb, step=224 * 16, batch_size=64)
        sums["insertion"] += float(ins.sum())
        with torch.no_grad():
            sums["top1"] += float((model(xb).argmax(1) == yb).sum())
    return {k: v / len(x) for k, v in sums.items()}


def run(args: argparse.Namespace) -> int:
    n_train = int(os.environ.get("CGC_TRAIN", "128"))
    n_test = int(os.environ.get("CGC_TEST", "128"))
    epochs = int(os.environ.get("CGC_EPOCHS", "3"))
    lam = float(os.environ.get("CGC_LAMBDA", "1.0"))
    tau = float(os.environ.get("CGC_TAU", "0.5"))
    lr = float(os.environ.get("CGC_LR", "1e-4"))
    device = torch.device(
        os.environ.get("BENCH_DEVICE")
        or ("cuda" if torch.cuda.is_available() else "cpu")
    )
    out = Path(args.out) / "cgc"
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    x, labels = _photos(n_train + n_test)
    model, layer = _model(device)
    x = x.to(device)
    with torch.no_grad():
        pred = torch.cat([model(x[i : i + 16]).argmax(1) for i in range(0, len(x), 16)])
    y = torch.where(labels.to(device) >= 0, labels.to(device), pred)
    if len(x) < n_train + n_test:  # the few bundled photos: half and half
        n_train = len(x) // 2
    n_test = len(x) - n_train
    xtr, ytr, xte, yte = x[:n_train], y[:n_train], x[n_train:], y[n_train:]
    print(
        f"CGC on {NAME}: {len(xtr)} training / {len(xte)} held-out photos, "
        f"{epochs} epochs, lambda {lam}, tau {tau}, lr {lr}, {device}",
        flush=True,
    )
    results = {"pretrained": evaluate(model, layer, xte, yte)}
    for name, weight in (("fine-tuned, CE", 0.0), ("fine-tuned, CE + CGC", lam)):
        torch.manual_seed(0)
        model, layer = _model(device)
        loss_fn = CGCLoss(model, layer, lam=weight, tau=tau, augment=CropFlip(seed=0))
        loader = DataLoader(
            TensorDataset(xtr, ytr), batch_size=8, shuffle=True,
            generator=torch.Generator().manual_seed(0),
        )  # fmt: skip
        opt = torch.optim.Adam(model.parameters(), lr=lr)
        tag = "cgc" if weight else "ce"
        hist = train(
            model, loader, loss_fn, epochs, optimizer=opt, device=device,
            checkpoint=out / f"{tag}-lam{weight}-tau{tau}-lr{lr}-n{n_train}.pt",
            frozen_norm=True,
        )  # fmt: skip
        print(f"{name}: per-epoch losses {hist}", flush=True)
        results[name] = evaluate(model, layer, xte, yte)
    lines = [
        "| model | consistency (flip) | consistency (crop) | insertion AUC | top-1 |",
        "|---|---|---|---|---|",
    ]
    for name, r in results.items():
        lines.append(
            f"| {name} | {r['flip']:.3f} | {r['crop']:.3f} | "
            f"{r['insertion']:.3f} | {r['top1']:.3f} |"
        )
    head = (
        f"CGC fine-tuning of {NAME} ({len(xtr)} training / {len(xte)} held-out "
        f"photos, {epochs} epochs, lambda {lam}, tau {tau}; Grad-CAM on bn2; "
        f"{time.perf_counter() - t0:.0f} s)\n\n"
    )
    md = head + "\n".join(lines) + "\n"
    (out / "cgc.md").write_text(md)
    print("\n" + md + f"\ntable: {out / 'cgc.md'}")
    return 0
