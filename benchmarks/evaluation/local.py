"""Models outside the zoo in the accuracy tables: ``--models timm:NAME=PATH``
(a timm architecture with a local checkpoint file) and ``--models hf:PATH``
(a Hugging Face model folder, read with ``local_files_only``).

Options follow the path, comma-separated: ``label=`` (the name in the tables),
``family=`` (the family whose supervised and self-supervised models are
paired, e.g. ``vit_s``), ``training=`` (``supervised`` or ``self-supervised``;
needed with ``family=``), ``cam_layer=`` and ``attention_layers=`` (dotted
paths overriding the ones found), e.g.::

    --models timm:deit_small_patch16_224=deit_s.pth,family=vit_s,training=supervised
    --models hf:models/my-vit,label=my_vit,family=vit_b,training=supervised

Nothing is downloaded: timm reads the file through
``pretrained_cfg_overlay=dict(file=PATH)``, transformers reads the folder with
``local_files_only=True``. The accuracy tables explain class scores, so the
model must end in a classifier (a timm checkpoint with its head, a Hugging
Face ``...ForImageClassification``); a headless backbone is refused with the
fix.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Tuple

from torch import nn

from benchmarks.evaluation.methods import ModelSpec

KINDS = ("timm", "hf")
OPTIONS = ("label", "family", "training", "cam_layer", "attention_layers")
TRAININGS = ("supervised", "self-supervised")
#: file types timm reads as checkpoints
TIMM_FILES = (".pth", ".pt", ".bin", ".safetensors", ".tar", ".ckpt")


def is_local(word: str) -> bool:
    """Whether a ``--models`` word names a local model (``timm:`` / ``hf:``)."""
    return word.partition(":")[0] in KINDS and ":" in word


@dataclass
class LocalModel:
    """A parsed ``timm:NAME=PATH,...`` or ``hf:PATH,...`` word."""

    word: str
    kind: str
    arch: str
    path: Path
    options: Dict[str, str] = field(default_factory=dict)

    @property
    def label(self) -> str:
        default = self.arch if self.kind == "timm" else self.path.name
        return self.options.get("label") or f"{self.kind}:{default}"


def parse(word: str) -> LocalModel:
    """The parts of a local-model word, or a ``ValueError`` naming the fix."""
    kind, _, rest = word.partition(":")
    first, *extra = rest.split(",")
    if kind == "timm":
        arch, eq, path = first.partition("=")
        if not eq or not arch or not path:
            raise ValueError(
                "write timm:NAME=PATH (a timm model name and its checkpoint file), "
                "e.g. timm:vit_small_patch14_dinov2=weights/dinov2.pth"
            )
    else:
        arch, path = "", first
        if not path:
            raise ValueError("write hf:PATH (a Hugging Face model folder)")
    options: Dict[str, str] = {}
    for part in extra:
        key, eq, value = part.partition("=")
        if not eq or key.strip() not in OPTIONS:
            raise ValueError(
                f"unknown option {part!r}; options are written name=value with "
                f"name one of {', '.join(OPTIONS)}"
            )
        options[key.strip()] = value.strip()
    training = options.get("training")
    if training is not None and training not in TRAININGS:
        raise ValueError(
            f"training={training}: write training=supervised or "
            "training=self-supervised"
        )
    if "family" in options and training is None:
        raise ValueError(
            f"family={options['family']} needs training=supervised or "
            "training=self-supervised, so that the tables pair it with the "
            "right models"
        )
    return LocalModel(word, kind, arch.strip(), Path(path.strip()), options)


def check(word: str) -> LocalModel:
    """:func:`parse`, then the file or folder exists and is of the right kind;
    nothing is loaded. ``ValueError`` with a one-line message otherwise."""
    m = parse(word)
    if m.kind == "timm":
        import timm

        if not timm.is_model(m.arch):
            close = timm.list_models(f"*{m.arch.split('.')[0][:12]}*")[:5]
            hint = f" (similar: {', '.join(close)})" if close else ""
            raise ValueError(f"{m.arch!r} is not a timm model name{hint}")
        if m.path.is_dir():
            raise ValueError(
                f"{m.path} is a folder; timm:NAME=PATH takes the checkpoint file "
                "(use hf:PATH for a Hugging Face model folder)"
            )
        if not m.path.is_file():
            raise ValueError(f"{m.path}: no such checkpoint file")
        if m.path.stat().st_size == 0:
            raise ValueError(f"{m.path} is empty (0 bytes): download it again")
        from timm.models import get_pretrained_cfg

        cfg = get_pretrained_cfg(m.arch)
        if cfg is not None and not cfg.num_classes:
            raise ValueError(
                f"timm's {m.arch} is a headless backbone (its config has no "
                "classifier) and the accuracy tables explain class scores: use "
                "an architecture whose checkpoint holds its classifier, or a zoo "
                "entry with the official linear probe (e.g. dinov2_vit_small)"
            )
        return m
    if not m.path.is_dir():
        what = "a file" if m.path.is_file() else "no such folder"
        raise ValueError(
            f"{m.path}: {what}; hf:PATH takes a Hugging Face model folder (with "
            "config.json, weights and preprocessor_config.json; save_pretrained "
            "writes one)"
        )
    for needed in ("config.json", "preprocessor_config.json"):
        if not (m.path / needed).is_file():
            what = "model" if needed == "config.json" else "image processor"
            raise ValueError(
                f"{m.path} has no {needed}: save the {what} there with "
                "save_pretrained(PATH)"
            )
    import json

    try:
        config = json.loads((m.path / "config.json").read_text())
    except (OSError, ValueError) as err:
        raise ValueError(
            f"{m.path / 'config.json'} is not readable JSON ({err})"
        ) from None
    archs = list(config.get("architectures") or [])
    if not any(a.endswith("ForImageClassification") for a in archs):
        raise ValueError(
            f"{m.path} holds {', '.join(archs) or config.get('model_type')}, a "
            "backbone without image-classification head, and the accuracy tables "
            "explain class scores: save an AutoModelForImageClassification there"
        )
    return m


def spec(word: str) -> ModelSpec:
    """The :class:`ModelSpec` of a local model (built lazily by the pipeline)."""
    m = check(word)
    fingerprint = _fingerprint(m.path)
    if m.kind == "timm":
        build, info = _timm(m)
    else:
        build, info = _hf(m)
    o = m.options
    return ModelSpec(
        name=m.label,
        build=build,
        architecture=info["architecture"],
        training=o.get("training", "supervised"),
        weights="pretrained",
        cam_layer=o.get("cam_layer", info["cam_layer"]),
        attention_layers=o.get("attention_layers", info["attention_layers"]),
        cam_layout=info.get("cam_layout", {}) if "cam_layer" not in o else {},
        preprocessing=info["preprocessing"],
        fingerprint={"local": m.word, **fingerprint},
        family=o.get("family", ""),
        lrp=info["lrp"],
    )


def _fingerprint(path: Path) -> Dict[str, Any]:
    files = sorted(path.iterdir()) if path.is_dir() else [path]
    return {"files": [[p.name, p.stat().st_size] for p in files if p.is_file()]}


def _rgb(values: Any) -> Tuple[float, float, float]:
    """Per-channel mean or std as three floats (one value: the same for all)."""
    v = [float(x) for x in (values if hasattr(values, "__len__") else [values])]
    if len(v) == 1:
        v = v * 3
    if len(v) != 3:
        raise ValueError(f"expected 3 per-channel values, got {values!r}")
    return (v[0], v[1], v[2])


def _lrp_skip_reason(model: nn.Module) -> str:
    """Why the LRP methods do not apply to ``model`` (shown when the main job
    skips them), or ``""``: the family adapter's own answer."""
    from captum_ssl.attr._core import AttributionInputError
    from captum_ssl.attr._families.base import lrp_adapter

    try:
        lrp_adapter(model)
    except AttributionInputError as err:
        return str(err)
    return ""


# ---------------------------------------------------------------------- timm


def _timm(m: LocalModel) -> Tuple[Any, Dict[str, Any]]:
    import timm
    import torch
    from timm.models import get_pretrained_cfg

    from captum_ssl.attr._attention.capture import SELF, attention_kind
    from captum_ssl.models import Preprocessing

    cfg = get_pretrained_cfg(m.arch)
    with torch.device("meta"):  # layer names only, no memory, no weights
        probe: Any = timm.create_model(m.arch, pretrained=False)
    vit = hasattr(probe, "patch_embed") and hasattr(probe, "blocks")
    selfattn = [n for n, mod in probe.named_modules() if attention_kind(mod) == SELF]
    if vit and selfattn and all(n.startswith("blocks.") for n in selfattn):
        cam_layer, attention = "blocks.-1.norm1", "blocks.*.attn"
    else:
        cam_layer, attention = probe.feature_info[-1]["module"], ""
    size = cfg.input_size[-1] if cfg is not None else 224
    crop_pct = (cfg.crop_pct or 1.0) if cfg is not None else 0.875
    interp = cfg.interpolation if cfg is not None else "bicubic"
    pre = Preprocessing(
        int(round(size / crop_pct)),
        size,
        interp if interp in ("bilinear", "bicubic") else "bicubic",
        _rgb(cfg.mean if cfg is not None else (0.485, 0.456, 0.406)),
        _rgb(cfg.std if cfg is not None else (0.229, 0.224, 0.225)),
    )
    lrp = _lrp_skip_reason(probe)

    def build() -> nn.Module:
        overlay = dict(file=str(m.path))
        try:
            return timm.create_model(
                m.arch, pretrained=True, pretrained_cfg_overlay=overlay
            ).eval()
        except (RuntimeError, KeyError, ValueError, OSError) as err:
            first = str(err).strip().splitlines()[0][:300]
            raise ValueError(
                f"--models {m.word}: {m.path} does not load into timm's "
                f"{m.arch} ({type(err).__name__}: {first}). Is it that model's "
                "checkpoint?"
            ) from None

    return build, dict(
        architecture=f"{m.arch} (timm)",
        cam_layer=cam_layer,
        attention_layers=attention,
        preprocessing=pre,
        lrp=lrp,
    )


# ------------------------------------------------------------- Hugging Face


#: CAM layer of a Hugging Face vision classifier that no ViT family adapter
#: covers (ResNet, ConvNeXt: their last stage; ``{base}`` is the model's
#: ``base_model_prefix``); the ViT families name theirs (``norm_layer()``)
_HF_CNN_CAM_LAYER = "{base}.encoder.stages.-1"
_RESAMPLE = {2: "bilinear", 3: "bicubic"}


def _side(size: Any) -> int:
    if isinstance(size, int):
        return size
    size = dict(size)
    for key in ("shortest_edge", "height"):
        if size.get(key):
            return int(size[key])
    raise ValueError(f"unreadable image size {size!r} in preprocessor_config.json")


def _hf(m: LocalModel) -> Tuple[Any, Dict[str, Any]]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoConfig, AutoImageProcessor

    from captum_ssl.models import Preprocessing

    try:
        config = AutoConfig.from_pretrained(m.path, local_files_only=True)
        proc = AutoImageProcessor.from_pretrained(m.path, local_files_only=True)
    except (OSError, ValueError, KeyError) as err:
        first = str(err).strip().splitlines()[0][:300]
        raise ValueError(f"{m.path} cannot be read by transformers: {first}") from None
    archs = list(config.architectures)
    import torch
    from transformers import AutoModelForImageClassification

    from captum_ssl.attr._families.base import find_adapter
    from captum_ssl.models import get_layer

    with torch.device("meta"):  # module names only, no weights
        skeleton = AutoModelForImageClassification.from_config(config)
    adapter = find_adapter(skeleton)  # the ViT family's own answers, if any
    if adapter is not None:
        cam = adapter.norm_layer() or ""
        attention = _pattern([site.name for site in adapter.attention_sites()])
        lrp = _lrp_skip_reason(skeleton)
    else:  # a CNN (ResNet, ConvNeXt): its last stage, no attention, no LRP
        cam = _HF_CNN_CAM_LAYER.format(base=skeleton.base_model_prefix)
        attention, lrp = "", f"{archs[0]} is no Vision Transformer"
    try:
        get_layer(skeleton, cam)
    except ValueError:
        cam = ""
    if not cam and "cam_layer" not in m.options:
        raise ValueError(
            f"no CAM layer known for this {config.model_type} model; pass one "
            "with cam_layer=<dotted path>"
        )
    side = _side(getattr(proc, "size", 224))
    crop = (
        getattr(proc, "crop_size", None) if getattr(proc, "do_center_crop", 0) else None
    )
    crop_side = _side(crop) if crop else side
    crop_pct = getattr(proc, "crop_pct", None)
    if crop is None and crop_pct and side < 384:
        # ConvNeXt's processor: shorter side to size / crop_pct, crop to size
        side, crop_side = int(side / crop_pct), side
    resample = getattr(proc, "resample", 2)
    pre = Preprocessing(
        side,
        crop_side,
        _RESAMPLE.get(int(resample), "bicubic"),
        _rgb(proc.image_mean),
        _rgb(proc.image_std),
    )

    layout: Dict[str, Any] = {}
    tokens = None if adapter is None else adapter.layout((pre.crop, pre.crop))
    if tokens is not None:  # class (+ distillation, register) tokens, grid
        layout = dict(
            grid=tokens.patch_grid, num_prefix_tokens=tokens.num_prefix_tokens
        )

    def build() -> nn.Module:
        # the model itself: the methods and metrics read its ModelOutput's
        # logits (captum_ssl._outputs.model_output)
        from transformers import AutoModelForImageClassification as Auto

        return Auto.from_pretrained(m.path, local_files_only=True).eval()

    return build, dict(
        architecture=f"{archs[0]} (Hugging Face)",
        cam_layer=cam,
        cam_layout=layout,
        attention_layers=attention,
        preprocessing=pre,
        lrp=lrp,
    )


def _pattern(names: List[str]) -> str:
    """The ``*`` pattern of dotted names that differ in one part
    (``vit.layers.0.attention``, ``vit.layers.1.attention`` ->
    ``vit.layers.*.attention``); "" for none."""
    split = [n.split(".") for n in names]
    if not split or len({len(p) for p in split}) != 1:
        return ""
    return ".".join(parts[0] if len(set(parts)) == 1 else "*" for parts in zip(*split))
