"""How much the documented reference deviations change the numbers.

``python -m benchmarks.fidelity`` prints, on the real EfficientNet-Lite0 and
the ImageNet sample photos (the bundled photos when absent):

- insertion AUC with RISE's blur kernel (the default) against the normalised
  truncated Gaussian (``substrate="blur_gaussian"``), per image;
- gradient attention rollout in this library's order against vit-explain's
  (``fusion_before_clamp=True, discard="vit_explain"``) on DeiT-S with
  sharpened random weights (no pretrained ViT is available offline);
- attention flow normalised as the reference against raw flows.

Options: ``--n`` images (8), ``--step`` insertion step (448).
See docs/deviations.md for the figures it printed.
"""

from __future__ import annotations

import argparse

import torch

import captum_ssl.attr as A
import captum_ssl.metrics as M
from captum_ssl.data import image_batches
from captum_ssl.models import get_layer, load


def _rel_l1(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a - b).flatten(1).abs().sum(1) / b.flatten(1).abs().sum(1)


def _range(t: torch.Tensor, fmt: str = "{:.3f}") -> str:
    return f"{fmt.format(t.min().item())} .. {fmt.format(t.max().item())}"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--step", type=int, default=448)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    photos = next(image_batches(n=args.n, batch_size=args.n))
    x = photos.images
    model = load("efficientnet_lite0")
    with torch.no_grad():
        y = model(x).argmax(1)
    cam = A.LayerGradCam(model, get_layer(model, "bn2")).attribute(x, target=y)
    kw = dict(target=y, step=args.step, batch_size=64)
    with torch.no_grad():
        rise = M.insertion_auc(model, x, cam, substrate="blur", **kw)
        gauss = M.insertion_auc(model, x, cam, substrate="blur_gaussian", **kw)
    diff = rise - gauss
    print(
        f"insertion AUC, EfficientNet-Lite0, Grad-CAM, {len(x)} images, "
        f"step {args.step}"
    )
    print(
        f"  RISE kernel mean {rise.mean():.4f}, Gaussian kernel mean {gauss.mean():.4f}"
    )
    print(f"  per-image RISE - Gaussian: {_range(diff, '{:+.4f}')}, "
          f"max |diff| {diff.abs().max():.4f}")  # fmt: skip

    from benchmarks.bench_attention import deit_small

    vit = deit_small("cpu", 8.0)
    t = torch.arange(len(x)) % 1000
    roll = A.GradientAttentionRollout(vit)
    for ratio in (0.0, 0.9):
        ours = roll.attribute(x, target=t, discard_ratio=ratio)
        theirs = roll.attribute(
            x,
            target=t,
            discard_ratio=ratio,
            fusion_before_clamp=True,
            discard="vit_explain",
        )
        print(f"gradient rollout, DeiT-S (sharpened random), discard_ratio {ratio}")
        print(f"  relative L1 difference: {_range(_rel_l1(theirs, ours))}, "
              f"Spearman: {_range(M.spearman(theirs, ours))}")  # fmt: skip

    flow = A.AttentionFlow(vit)
    norm = flow.attribute(x[:2])
    raw = flow.attribute(x[:2], normalize=False)
    factor = (raw.flatten(1).sum(1) / norm.flatten(1).sum(1)).tolist()
    print("attention flow, DeiT-S, 2 images: raw = normalised x "
          + ", ".join(f"{f:.3f}" for f in factor)
          + f"; Spearman {_range(M.spearman(raw, norm), '{:.4f}')}")  # fmt: skip


if __name__ == "__main__":
    main()
