"""``python -m benchmarks.run --explain PATH.jpg``: the quick look before a run.

Each image is explained by every chosen model (``--models``; default: the
zoo models whose files are present, plus EfficientNet-Lite0) and method
(``--methods``; default: the quick set) against the model's top class; one
figure per image (rows: models, columns: methods) is written as PNG and SVG,
and each model's top classes are printed.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Dict, List

import torch

from benchmarks.evaluation import methods as M

TOP = 5


def read_image(path: Path) -> object:
    """The file as an RGB PIL image, with a clear error when it cannot be read."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, UnidentifiedImageError) as err:
        raise SystemExit(f"--explain: cannot read {path} as an image ({err})") from None


def explain_files(args: argparse.Namespace) -> int:
    from benchmarks.evaluation.cli import expand_methods, select_models
    from benchmarks.evaluation.figures import (
        caption,
        overlay_figure,
        safe_name,
        save_figure,
    )
    from captum_ssl.data import class_name

    specs, _, absent = select_models(args.models, args.random_weights)
    if not specs:
        raise SystemExit("--explain: no model with its weights present")
    methods = expand_methods(args.methods, False)
    labels = {}
    for text in methods:
        name, opts = M.parse_spec(text)
        full = {**M.method_defaults(name), **opts}
        labels[M.spec_label(name, opts, M.method_defaults(name))] = (name, full)
    device = torch.device(
        args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    )
    images = {path: read_image(path) for path in args.explain}
    rows: Dict[Path, List] = {path: [] for path in images}
    maps: Dict[Path, List[Dict[str, torch.Tensor]]] = {path: [] for path in images}
    for spec in specs:
        model = spec.build().to(device).eval()
        pre = spec.preprocessing
        for path, image in images.items():
            raw = pre.raw_transform()(image)
            x = pre.normalize(raw)[None].to(device)
            with torch.no_grad():
                prob = model(x).softmax(1)[0].cpu()
            top = prob.topk(TOP)
            print(f"{path.name} / {spec.name}: top-{TOP} classes")
            for p, c in zip(top.values.tolist(), top.indices.tolist()):
                print(f"  {p:6.3f}  {c:4d}  {class_name(c)}")
            target = top.indices[:1].to(device)
            row = {}
            for label, (name, opts) in labels.items():
                if M.applies(name, spec) is None:
                    explain = M.build_method(name, opts, model, spec)
                    row[label] = explain(x, target)[0, 0].detach().float().cpu()
            pred = (int(top.indices[0]), float(top.values[0]))
            rows[path].append((raw, spec.name, caption(pred)))
            maps[path].append(row)
        model = None
    folder = args.out / "explain"
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for path in images:
        used = [lab for lab in labels if any(lab in row for row in maps[path])]
        fig = overlay_figure(rows[path], used, maps[path], path.name)
        written += save_figure(fig, folder / f"{safe_name(path.stem)}.png")
    print("Files written:\n" + "\n".join(f"  {p}" for p in written))
    if absent and args.models is None:
        from benchmarks.evaluation.summary import download_line

        print(download_line(absent))
    return 0
