"""``python -m benchmarks.run --explain PATH.jpg``: the quick look before a run.

Each image is explained by every chosen model (``--models``; default: the
zoo models whose files are present, plus EfficientNet-Lite0) and method
(``--methods``; default: the quick set) against the model's top class; one
figure per image (rows: models, columns: methods) is written as PNG and SVG,
with the same page the main job writes (``<photo>.html``: the overlays from
the maps at their native resolution, each model's top classes, the
settings), and each model's top classes are printed.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Dict, List

import torch

from benchmarks.evaluation import methods as M
from captum_ssl._outputs import model_output
from captum_ssl.viz import as_map

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
        OverlayRow,
        OverlaySection,
        overlay_figure,
        safe_name,
        save_figure,
    )
    from benchmarks.evaluation.report import explain_report
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
    rows: Dict[Path, List[OverlayRow]] = {path: [] for path in images}
    top_classes: Dict[Path, Dict[str, List]] = {path: {} for path in images}
    for spec in specs:
        model = spec.build().to(device).eval()
        pre = spec.preprocessing
        for path, image in images.items():
            raw = pre.raw_transform()(image)
            x = pre.normalize(raw)[None].to(device)
            pred: Any
            if spec.target:  # a backbone: its score (similarity, norm)
                with torch.no_grad():
                    target = M.backbone_targets(model, spec, x)
                    value = float(model_output(model(x))[0, int(target[0])])
                print(
                    f"{path.name} / {spec.name}: "
                    f"{M.BACKBONE_TARGETS[spec.target]} {value:.3f}"
                )
                pred = M.backbone_caption(spec.target, value)
            else:
                with torch.no_grad():
                    prob = model_output(model(x)).softmax(1)[0].cpu()
                top = prob.topk(TOP)
                print(f"{path.name} / {spec.name}: top-{TOP} classes")
                for p, c in zip(top.values.tolist(), top.indices.tolist()):
                    print(f"  {p:6.3f}  {c:4d}  {class_name(c)}")
                top_classes[path][spec.name] = list(
                    zip(top.indices.tolist(), top.values.tolist())
                )
                target = top.indices[:1].to(device)
                pred = (int(top.indices[0]), float(top.values[0]))
            row = {}
            for label, (name, opts) in labels.items():
                if M.applies(name, spec) is None:
                    explain = M.build_method(name, opts, model, spec)
                    a = as_map(explain(x, target).detach().float())
                    row[label] = a[0, 0].cpu().numpy()
            rows[path].append(OverlayRow(spec.name, raw, pred, (), row))
        model = None
    folder = args.out / "explain"
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    settings = [
        ("command", f"python -m benchmarks.run {getattr(args, 'command', '')}"),
        ("models", ", ".join(s.name for s in specs)),
        ("methods", ", ".join(labels)),
        (
            "target",
            "each model's top class"
            + "".join(
                f"; {s.name}: its {M.BACKBONE_TARGETS[s.target]}"
                for s in specs
                if s.target
            ),
        ),
        ("device", str(device)),
    ]
    for path in images:
        used = [lab for lab in labels if any(lab in r.maps for r in rows[path])]
        section = OverlaySection(path.name, used, rows[path])
        fig = overlay_figure(section)
        written += save_figure(fig, folder / f"{safe_name(path.stem)}.png")
        written.append(
            explain_report(
                f"captum_ssl: explanations of {path.name}",
                [("photo", str(path))] + settings,
                [section],
                {f"{path.name} / {m}": t for m, t in top_classes[path].items()},
                folder / f"{safe_name(path.stem)}.html",
            )
        )
    print("Files written:\n" + "\n".join(f"  {p}" for p in written))
    if absent and args.models is None:
        from benchmarks.evaluation.summary import download_line

        print(download_line(absent))
    return 0
