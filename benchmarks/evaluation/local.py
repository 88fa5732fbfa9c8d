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
``local_files_only=True``.

A classifier (a timm checkpoint with its head, a Hugging Face
``...ForImageClassification``) is explained by its class scores. A headless
backbone (a timm architecture whose pretrained config has no classifier, or a
checkpoint without the classifier's weights; a Hugging Face ``ViTModel``,
``Dinov2Model``, ``CLIPVisionModel``, ...) is explained the way the library
explains self-supervised backbones: ``target=view`` (default) the cosine
similarity of each image's embedding to its horizontally flipped view's
(``EmbeddingSimilarity``), ``target=norm`` the embedding's L2 norm
(``EmbeddingNorm``); see ``methods.BACKBONE_TARGETS``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

from torch import nn

from benchmarks.evaluation.methods import (
    BACKBONE_TARGETS,
    ModelSpec,
    backbone_model,
)

KINDS = ("timm", "hf")
OPTIONS = ("label", "family", "training", "cam_layer", "attention_layers", "target")
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
    #: a headless backbone (set by :func:`check`)
    headless: bool = False

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
    target = options.get("target")
    if target is not None and target not in BACKBONE_TARGETS:
        raise ValueError(
            f"target={target}: write target=view (similarity to the flipped "
            "view) or target=norm (embedding norm)"
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
        m.headless = _timm_headless(m)
        return _target_check(m)
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
    m.headless = not any(a.endswith("ForImageClassification") for a in archs)
    if m.headless:
        _hf_backbone(m)  # refused here, before any work, if not supported
    return _target_check(m)


def _target_check(m: LocalModel) -> LocalModel:
    if "target" in m.options and not m.headless:
        raise ValueError(
            f"target={m.options['target']} is for a headless backbone; this "
            "model ends in a classifier and is explained by its class scores "
            "(leave target= out)"
        )
    return m


def _checkpoint_keys(path: Path) -> Optional[List[str]]:
    """The parameter names in a checkpoint file as timm reads them (wrapper
    dicts and ``module.`` prefixes removed; tensors not read), or None when
    the file cannot be read this way (timm's loader then says why)."""
    from timm.models import load_state_dict

    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), "pt") as f:
                return list(f.keys())
        return list(load_state_dict(str(path), device="meta"))
    except Exception:  # unreadable: timm's own loader reports it at build
        return None


def _timm_headless(m: LocalModel) -> bool:
    """Whether timm's ``m.arch`` with the checkpoint ``m.path`` is a headless
    backbone: its pretrained config has no classifier, or the file holds no
    weights of the classifier the config names."""
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(m.arch)
    if cfg is None:
        return False
    if not cfg.num_classes:
        return True
    named = cfg.classifier
    heads = [named] if isinstance(named, str) else list(named or [])
    keys = _checkpoint_keys(m.path)
    if keys is None or not heads:
        return False
    return not any(k.startswith(f"{h}.") for h in heads for k in keys)


def spec(word: str) -> ModelSpec:
    """The :class:`ModelSpec` of a local model (built lazily by the pipeline)."""
    m = check(word)
    fingerprint = _fingerprint(m.path)
    if m.kind == "timm":
        build, info = _timm(m)
    else:
        build, info = _hf(m)
    o = m.options
    target = o.get("target", "view") if m.headless else ""
    if target:  # every table names what the backbone is explained by
        info["architecture"] += f", headless: {BACKBONE_TARGETS[target]}"
        side = info["preprocessing"].crop
        build = partial(_backbone, build, target, side)
        cam_path = lambda p: f"backbone.{p}" if p else p  # noqa: E731
        info.update(
            cam_layer=cam_path(info["cam_layer"]),
            attention_layers=cam_path(info["attention_layers"]),
        )
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
        target=target,
        class_row=info.get("class_row", ""),
    )


def _backbone(build: Callable[[], nn.Module], target: str, side: int) -> nn.Module:
    """The headless model wrapped so that it outputs its target's score."""
    return backbone_model(build(), target, side).eval()


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


def _class_row_skip_reason(model: nn.Module) -> str:
    """Why the class token's row explains nothing of ``model`` (no class
    token, or a head that never reads it), or ``""``: the family adapter's
    own answer (``class_row_unread``)."""
    from captum_ssl.attr._families.base import find_adapter

    adapter = find_adapter(model)
    return "" if adapter is None else adapter.class_row_unread() or ""


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
    # a headless backbone: no classifier, so that the file loads strictly
    heads: Dict[str, Any] = dict(num_classes=0) if m.headless else {}
    with torch.device("meta"):  # layer names only, no memory, no weights
        probe: Any = timm.create_model(m.arch, pretrained=False, **heads)
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
    class_row = _class_row_skip_reason(probe)

    def build() -> nn.Module:
        overlay = dict(file=str(m.path), **heads)
        try:
            return timm.create_model(
                m.arch, pretrained=True, pretrained_cfg_overlay=overlay, **heads
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
        class_row=class_row,
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


#: what a Hugging Face backbone folder may hold (the refusal names them)
HF_BACKBONES = (
    "ViTModel, DeiTModel, Dinov2Model, Dinov2WithRegistersModel, "
    "CLIPVisionModel, ViTMAEModel, or a ResNet / ConvNeXt model"
)


def _hf_parts(m: LocalModel) -> Tuple[Any, Any, Dict[str, Any]]:
    """``(config, auto class, {cam, attention, lrp})`` of a Hugging Face
    folder, from a skeleton on the meta device (module names only, no
    weights); a ``ValueError`` naming the fix for a backbone this job cannot
    explain (a text model, ViT-MAE, ...)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoConfig, AutoModel, AutoModelForImageClassification

    from captum_ssl.attr._core import AttributionInputError
    from captum_ssl.attr._families.base import find_adapter
    from captum_ssl.models import get_layer

    try:
        config = AutoConfig.from_pretrained(m.path, local_files_only=True)
    except (OSError, ValueError, KeyError) as err:
        first = str(err).strip().splitlines()[0][:300]
        raise ValueError(f"{m.path} cannot be read by transformers: {first}") from None
    if getattr(config, "mask_ratio", 0.0):  # ViT-MAE: every patch, in order
        config.mask_ratio = 0.0  # (its documented setting for feature extraction)
    archs = list(config.architectures or [config.model_type])
    refused = (
        f"{m.path} holds {archs[0]}, neither an image classifier nor a vision "
        f"backbone this job explains ({HF_BACKBONES}): save an "
        "AutoModelForImageClassification or one of these backbones there"
        + (
            " (CLIP's image tower: CLIPVisionModel.from_pretrained(PATH)"
            ".save_pretrained(NEW_PATH))"
            if config.model_type == "clip"
            else ""
        )
    )
    auto = AutoModel if m.headless else AutoModelForImageClassification
    try:
        with torch.device("meta"):  # module names only, no weights
            skeleton = auto.from_config(config)
    except ValueError:
        raise ValueError(refused) from None
    adapter = find_adapter(skeleton)  # the ViT family's own answers, if any
    if adapter is not None:
        try:
            cam = adapter.norm_layer() or ""
            attention = _pattern([site.name for site in adapter.attention_sites()])
        except AttributionInputError as err:  # ViT-MAE: its own fix
            raise ValueError(f"{archs[0]}: {err}") from None
        lrp = _lrp_skip_reason(skeleton)
    else:  # a CNN (ResNet, ConvNeXt): its last stage, no attention, no LRP
        base = skeleton.base_model_prefix
        base = base if hasattr(skeleton, base) else ""
        cam = _HF_CNN_CAM_LAYER.format(base=base).lstrip(".")
        attention, lrp = "", f"{archs[0]} is no Vision Transformer"
    try:
        get_layer(skeleton, cam)
    except ValueError:
        if m.headless:
            raise ValueError(refused) from None
        cam = ""
    if not cam and "cam_layer" not in m.options:
        raise ValueError(
            f"no CAM layer known for this {config.model_type} model; pass one "
            "with cam_layer=<dotted path>"
        )
    return (
        config,
        auto,
        dict(cam=cam, attention=attention, lrp=lrp, skeleton=skeleton, arch=archs[0]),
    )


def _hf_backbone(m: LocalModel) -> None:
    """A Hugging Face backbone folder this job explains, or the refusal."""
    _hf_parts(m)


def _hf(m: LocalModel) -> Tuple[Any, Dict[str, Any]]:
    from transformers import AutoImageProcessor

    from captum_ssl.attr._families.base import find_adapter
    from captum_ssl.models import Preprocessing

    config, auto, parts = _hf_parts(m)
    try:
        proc = AutoImageProcessor.from_pretrained(m.path, local_files_only=True)
    except (OSError, ValueError, KeyError) as err:
        first = str(err).strip().splitlines()[0][:300]
        raise ValueError(f"{m.path} cannot be read by transformers: {first}") from None
    cam, attention, lrp = parts["cam"], parts["attention"], parts["lrp"]
    adapter = find_adapter(parts["skeleton"])
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
        # logits (captum_ssl._outputs.model_output); a backbone's output is
        # read by EmbeddingSimilarity / EmbeddingNorm (pooler_output)
        return auto.from_pretrained(m.path, config=config, local_files_only=True).eval()

    mae = ", mask_ratio=0 (all patches)" if hasattr(config, "mask_ratio") else ""
    return build, dict(
        architecture=f"{parts['arch']} (Hugging Face{mae})",
        cam_layer=cam,
        cam_layout=layout,
        attention_layers=attention,
        preprocessing=pre,
        lrp=lrp,
        class_row=_class_row_skip_reason(parts["skeleton"]),
    )


def _pattern(names: List[str]) -> str:
    """The ``*`` pattern of dotted names that differ in one part
    (``vit.layers.0.attention``, ``vit.layers.1.attention`` ->
    ``vit.layers.*.attention``); "" for none."""
    split = [n.split(".") for n in names]
    if not split or len({len(p) for p in split}) != 1:
        return ""
    return ".".join(parts[0] if len(set(parts)) == 1 else "*" for parts in zip(*split))
