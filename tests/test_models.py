"""Model zoo: official checkpoint layouts, errors, headless targets, real weights.

Every registry entry is checked the same way: a random-init model of the entry's
family is written to disk in the layout of the official release (the
inverse of the conversion, spelled out here as the releases look), loaded through
``captum_ssl.models.load`` and must reproduce the source model's outputs exactly.
Transformers use down-scaled configurations of the same architecture (same code
path, same key names) to keep the suite fast.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
from pathlib import Path
from typing import Any, Callable, Dict, Tuple

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import captum_ssl.models as zoo
from captum_ssl.attr._layout import TokenLayout, layout_for
from captum_ssl.models import (
    CheckpointMismatchError,
    ChecksumError,
    CorruptCheckpointError,
    MissingCheckpointError,
    UnsafeCheckpointError,
)
from captum_ssl.models._checkpoint import check_sha256

SHARED_HEAD = (
    Path(os.environ.get("CAPTUM_SSL_SHARED_DATA", "/work/shared/data"))
    / "checkpoints"
    / "dino_xcit_small_12_p16_linearweights.pth"
)

# down-scaled configurations of each family (same architecture class and keys)
VIT = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2)
CAIT = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2)
XCIT = dict(img_size=32, embed_dim=64, depth=2, num_heads=2)
DINOV2 = dict(img_size=28, patch_size=14, embed_dim=64, depth=2, num_heads=2)
SWIN = dict(
    img_size=64,
    window_size=2,
    embed_dim=16,
    depths=(1, 1, 2, 1),
    num_heads=(1, 2, 2, 4),
)


# ----------------------------------------------------- official layouts
def _prefixed(state: Dict[str, torch.Tensor], prefix: str) -> Dict[str, torch.Tensor]:
    return {prefix + k: v for k, v in state.items()}


def _without(state: Dict[str, torch.Tensor], prefix: str) -> Dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if not k.startswith(prefix)}


def _dino_head(weight: torch.Tensor, bias: torch.Tensor) -> Dict[str, Any]:
    # as dino_*_linearweights.pth: epoch, state_dict, optimizer, scheduler, best_acc
    return {
        "epoch": 100,
        "state_dict": {"module.linear.weight": weight, "module.linear.bias": bias},
        "optimizer": {"state": {}, "param_groups": [{"lr": 0.01, "params": [0, 1]}]},
        "scheduler": {"last_epoch": 100},
        "best_acc": 75.3,
    }


def _xcit_official(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """facebookresearch/xcit naming: ``pos_embeder.*`` and fused class-attention qkv."""
    out = {}
    for k, v in state.items():
        if k.startswith("pos_embed."):
            k = "pos_embeder." + k[len("pos_embed.") :]
        match = re.match(r"(cls_attn_blocks\.\d+\.attn)\.([qkv])\.(weight|bias)$", k)
        if match:
            if match.group(2) == "q":
                base, kind = match.group(1), match.group(3)
                out[f"{base}.qkv.{kind}"] = torch.cat(
                    [state[f"{base}.{s}.{kind}"] for s in "qkv"]
                )
            continue
        out[k] = v
    return out


def _swin_official(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """microsoft/Swin-Transformer naming: patch merging at the end of a stage,
    ``head.*``, plus the buffers the official files carry."""
    out = {}
    for k, v in state.items():
        k = re.sub(
            r"layers\.(\d+)\.downsample",
            lambda m: f"layers.{int(m.group(1)) - 1}.downsample",
            k,
        )
        out[k.replace("head.fc.", "head.")] = v
    out["layers.0.blocks.0.attn.relative_position_index"] = torch.zeros(4, 4).long()
    out["layers.2.blocks.1.attn_mask"] = torch.zeros(4, 4, 4)
    return out


def _effnet_official(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The package's lukemelas naming, taken from the real file's key order."""
    package = zoo.entry("efficientnet_lite0").files[0].bundled()
    names = list(torch.load(package, map_location="cpu", weights_only=True))
    assert len(names) == len(state)
    return dict(zip(names, state.values()))


def _backbone_state(m: nn.Module) -> Dict[str, torch.Tensor]:
    """The timm backbone's tensors of a ``TokenLinearProbe``, in timm naming."""
    return dict(m.backbone.state_dict())


def _dinov2_official(m: nn.Module) -> Dict[str, Any]:
    """facebookresearch/dinov2 files: the backbone (``mask_token``, and with
    registers ``register_tokens`` plus a class-token position that timm folds
    into its class token) and the linear head as a plain ``{weight, bias}``."""
    state = _backbone_state(m)
    dim = state["cls_token"].shape[-1]
    state["mask_token"] = torch.zeros(1, dim)
    if "reg_token" in state:
        state["register_tokens"] = state.pop("reg_token")
        # official cls + official cls position == timm's cls token, bit for bit
        cls_pos, cls = torch.randn(1, 1, dim), torch.randn(1, 1, dim)
        m.backbone.cls_token.data = cls + cls_pos
        state["cls_token"] = cls
        state["pos_embed"] = torch.cat([cls_pos, state["pos_embed"]], dim=1)
    return {
        "backbone": state,
        "head": {"weight": m.head.weight, "bias": m.head.bias},
    }


def _dino_vit_official(m: nn.Module) -> Dict[str, Any]:
    """DINO ViT files: the teacher backbone in timm naming, the linear weights."""
    return {
        "backbone": _backbone_state(m),
        "head": _dino_head(m.head.weight, m.head.bias),
    }


def _entry_build(name: str, **kw: Any) -> Callable[[], nn.Module]:
    return lambda: zoo.entry(name).build(**kw)


def _torchvision_resnet() -> nn.Module:
    import torchvision

    return torchvision.models.resnet50(weights=None)


def _timm(arch: str, **kw: Any) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import timm

        return timm.create_model(arch, pretrained=False, **kw)

    return build


# name -> (build source model, model kwargs for load, input size,
#          official files by role from the source model)
CASES: Dict[str, Tuple[Callable, Dict[str, Any], int, Callable]] = {
    "res_50": (_torchvision_resnet, {}, 64, lambda m: {"weights": m.state_dict()}),
    "moco_v3_res_50": (
        _torchvision_resnet,
        {},
        64,
        lambda m: {
            "weights": {
                "epoch": 100,
                "arch": "resnet50",
                "state_dict": _prefixed(m.state_dict(), "module."),
                "best_acc1": torch.tensor(74.6),
                "optimizer": {"state": {}, "param_groups": []},
            }
        },
    ),
    "dino_res_50": (
        _torchvision_resnet,
        {},
        64,
        lambda m: {
            "backbone": _without(m.state_dict(), "fc."),
            "head": _dino_head(m.fc.weight, m.fc.bias),
        },
    ),
    "deit_base": (
        _timm("deit_base_patch16_224", **VIT),
        VIT,
        32,
        lambda m: {"weights": {"model": m.state_dict()}},
    ),
    "moco_v3_deit_base": (
        _timm("deit_base_patch16_224", **VIT),
        VIT,
        32,
        lambda m: {
            "weights": {
                "epoch": 90,
                "arch": "vit_base",
                "state_dict": _prefixed(m.state_dict(), "module."),
            }
        },
    ),
    "deit_small": (
        _timm("deit_small_patch16_224", **VIT),
        VIT,
        32,
        lambda m: {"weights": {"model": m.state_dict()}},
    ),
    "moco_v3_vit_small": (
        _entry_build("moco_v3_vit_small", **VIT),
        VIT,
        32,
        lambda m: {
            "weights": {
                "epoch": 90,
                "arch": "vit_small",
                "state_dict": _prefixed(m.state_dict(), "module."),
            }
        },
    ),
    "dino_vit_small": (
        _entry_build("dino_vit_small", **dict(VIT, depth=4)),
        dict(VIT, depth=4),
        32,
        _dino_vit_official,
    ),
    "dino_vit_base": (
        _entry_build("dino_vit_base", **VIT),
        VIT,
        32,
        _dino_vit_official,
    ),
    "dinov2_vit_small": (
        _entry_build("dinov2_vit_small", **DINOV2),
        DINOV2,
        28,
        _dinov2_official,
    ),
    "dinov2_vit_small_reg": (
        _entry_build("dinov2_vit_small_reg", **DINOV2),
        DINOV2,
        28,
        _dinov2_official,
    ),
    "cait_s24": (
        _timm("cait_s24_224", **CAIT),
        CAIT,
        32,
        lambda m: {"weights": {"model": _prefixed(m.state_dict(), "module.")}},
    ),
    "xcit_s12_16": (
        _timm("xcit_small_12_p16_224", **XCIT),
        XCIT,
        32,
        lambda m: {"weights": {"model": _xcit_official(m.state_dict())}},
    ),
    "dino_xcit_s12_16": (
        _timm("xcit_small_12_p16_224", **XCIT),
        XCIT,
        32,
        lambda m: {
            "backbone": _xcit_official(_without(m.state_dict(), "head.")),
            "head": _dino_head(m.head.weight, m.head.bias),
        },
    ),
    "swin_base": (
        _timm("swin_base_patch4_window7_224", **SWIN),
        SWIN,
        64,
        lambda m: {"weights": {"model": _swin_official(m.state_dict())}},
    ),
    "efficientnet_lite0": (
        _timm("tf_efficientnet_lite0"),
        {},
        64,
        lambda m: {"weights": _effnet_official(m.state_dict())},
    ),
}


#: class (and register) tokens in the output of the entry's CAM layer
PREFIX_TOKENS = {
    "deit_base": 1, "moco_v3_deit_base": 1, "deit_small": 1,
    "moco_v3_vit_small": 1, "dino_vit_small": 1, "dino_vit_base": 1,
    "dinov2_vit_small": 1, "dinov2_vit_small_reg": 5,
}  # fmt: skip


def _randomize_norms(model: nn.Module) -> None:
    """Non-trivial BatchNorm statistics, so that they are checked too."""
    gen = torch.Generator().manual_seed(0)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.copy_(
                torch.randn(module.num_features, generator=gen) * 0.1
            )
            module.running_var.copy_(
                torch.rand(module.num_features, generator=gen) + 0.5
            )


def write_official(name: str, folder: Path) -> Tuple[nn.Module, Dict[str, Any], int]:
    """Random-init source model of ``name`` saved in the official layout."""
    build, kwargs, size, layout = CASES[name]
    torch.manual_seed(0)
    source = build().eval()
    _randomize_norms(source)
    files = {f.role: f.filename for f in zoo.entry(name).files}
    for role, obj in layout(source).items():
        torch.save(obj, folder / files[role])
    return source, kwargs, size


def test_every_entry_has_a_case() -> None:
    assert set(CASES) == set(zoo.list_models())


@pytest.mark.parametrize("name", list(CASES))
def test_official_layout_reproduces_source_outputs(name: str, tmp_path: Path) -> None:
    source, kwargs, size = write_official(name, tmp_path)
    model = zoo.load(name, weights_dir=tmp_path, **kwargs)
    assert not model.training
    assert model.zoo_entry is zoo.entry(name)
    torch.manual_seed(2)
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        expected, actual = source(x), model(x)
    assert actual.shape == (2, 1000)
    assert torch.equal(actual, expected)
    # every parameter and buffer is the source's
    src = source.state_dict()
    for key, value in model.state_dict().items():
        assert torch.equal(value, src[key]), key
    # the registry's CAM layer resolves and its output becomes a (B, C, h, w) grid
    e = zoo.entry(name)
    layer = zoo.get_layer(model, e.cam_layer)
    seen = []
    handle = layer.register_forward_hook(lambda m, i, o: seen.append(o))
    try:
        with torch.no_grad():
            model(x)
    finally:
        handle.remove()
    layout = layout_for(model, layer, (size, size), TokenLayout(**e.cam_layout))
    grid = layout.resolve(seen[0].shape).to_grid(seen[0])
    # every element is a grid cell except the ViT class (and register) tokens
    prefix = PREFIX_TOKENS.get(name, 0)
    assert grid.dim() == 4 and grid.shape[0] == 2
    assert seen[0].numel() - grid.numel() == 2 * grid.shape[1] * prefix
    if e.attention_layers:
        assert len(zoo.get_layers(model, e.attention_layers)) >= 1


def test_available_and_describe_follow_the_folder(tmp_path: Path) -> None:
    assert zoo.available(tmp_path) == ["efficientnet_lite0"]
    write_official("dino_res_50", tmp_path)
    assert "dino_res_50" in zoo.available(tmp_path)
    (tmp_path / "dino_resnet50_linearweights.pth").unlink()
    assert "dino_res_50" not in zoo.available(tmp_path)
    assert "dino_res_50" in zoo.available(tmp_path, head=False)
    info = zoo.describe("dino_res_50", tmp_path)
    present = {f["role"]: f["present"] for f in info["files"]}
    assert present == {"backbone": True, "head": False}
    assert info["available"] is False
    assert info["files"][1]["expected"] == str(
        tmp_path / "dino_resnet50_linearweights.pth"
    )
    assert info["files"][1]["source"].startswith("https://dl.fbaipublicfiles.com/dino")


def test_headless_backbone_needs_no_head_file(tmp_path: Path) -> None:
    source, kwargs, size = write_official("dino_xcit_s12_16", tmp_path)
    (tmp_path / "dino_xcit_small_12_p16_linearweights.pth").unlink()
    backbone = zoo.load("dino_xcit_s12_16", tmp_path, head=False, **kwargs)
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        # the embedding the DINO linear probe reads: the normed class token
        expected = source.forward_head(source.forward_features(x), pre_logits=True)
        assert torch.equal(backbone(x), expected)
    assert backbone(x).shape == (2, XCIT["embed_dim"])


def test_headless_resnet_is_the_pooled_feature(tmp_path: Path) -> None:
    source, _, _ = write_official("moco_v3_res_50", tmp_path)
    backbone = zoo.load("moco_v3_res_50", tmp_path, head=False)
    x = torch.randn(2, 3, 64, 64)
    source.fc = nn.Identity()
    with torch.no_grad():
        assert torch.equal(backbone(x), source(x))
    assert backbone(x).shape == (2, 2048)


@pytest.mark.skipif(not SHARED_HEAD.is_file(), reason="shared DINO head file absent")
def test_real_dino_xcit_linear_head_loads(tmp_path: Path) -> None:
    real = torch.load(SHARED_HEAD, map_location="cpu", weights_only=True)
    # a backbone of the real width (384) but one block, written as DINO does
    kwargs = dict(img_size=32, depth=1)
    torch.manual_seed(0)
    source = _timm("xcit_small_12_p16_224", **kwargs)().eval()
    torch.save(
        _xcit_official(_without(source.state_dict(), "head.")),
        tmp_path / "dino_xcit_small_12_p16_pretrain.pth",
    )
    model = zoo.load(
        "dino_xcit_s12_16", tmp_path, files={"head": SHARED_HEAD}, **kwargs
    )
    weight = real["state_dict"]["module.linear.weight"]
    bias = real["state_dict"]["module.linear.bias"]
    assert torch.equal(model.head.weight, weight)
    assert torch.equal(model.head.bias, bias)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        feature = source.forward_head(source.forward_features(x), pre_logits=True)
        assert torch.allclose(model(x), F.linear(feature, weight, bias), atol=1e-5)


# ----------------------------------------------------------------- errors
def test_missing_file_names_path_and_source(tmp_path: Path) -> None:
    with pytest.raises(MissingCheckpointError) as info:
        zoo.load("deit_base", weights_dir=tmp_path)
    text = str(info.value)
    assert str(tmp_path / "deit_base_patch16_224-b5f2ef4d.pth") in text
    assert (
        "https://dl.fbaipublicfiles.com/deit/deit_base_patch16_224-b5f2ef4d.pth" in text
    )
    assert isinstance(info.value, FileNotFoundError)


def test_missing_head_file_of_self_supervised_model(tmp_path: Path) -> None:
    write_official("dino_res_50", tmp_path)
    (tmp_path / "dino_resnet50_linearweights.pth").unlink()
    with pytest.raises(MissingCheckpointError, match="dino_resnet50_linearweights"):
        zoo.load("dino_res_50", tmp_path)


def test_unknown_model_lists_known_names() -> None:
    with pytest.raises(ValueError, match="known models: res_50"):
        zoo.load("resnet_51")


def test_file_of_another_model_lists_keys(tmp_path: Path) -> None:
    # a ResNet-50 state dict saved under the DeiT file name
    torch.save(
        _torchvision_resnet().state_dict(),
        tmp_path / "deit_base_patch16_224-b5f2ef4d.pth",
    )
    with pytest.raises(CheckpointMismatchError) as info:
        zoo.load("deit_base", tmp_path, **VIT)
    text = str(info.value)
    assert "missing keys" in text and "cls_token" in text
    assert "unexpected keys" in text and "layer1.0.conv1.weight" in text


def test_shape_mismatch_is_reported(tmp_path: Path) -> None:
    source = _timm("deit_base_patch16_224", **VIT, mlp_ratio=2.0)()
    torch.save(
        {"model": source.state_dict()}, tmp_path / "deit_base_patch16_224-b5f2ef4d.pth"
    )
    with pytest.raises(
        CheckpointMismatchError, match=r"shape mismatches \(blocks.0.mlp"
    ):
        zoo.load("deit_base", tmp_path, **VIT)


def test_wrong_linear_head_layout(tmp_path: Path) -> None:
    write_official("dino_res_50", tmp_path)
    torch.save(
        {"fc.weight": torch.zeros(3)}, tmp_path / "dino_resnet50_linearweights.pth"
    )
    with pytest.raises(CheckpointMismatchError, match="module.linear.weight"):
        zoo.load("dino_res_50", tmp_path)


def test_efficientnet_file_of_another_model(tmp_path: Path) -> None:
    path = tmp_path / "efficientnet-lite0-57934424.pth"
    torch.save(_timm("tf_efficientnet_lite1")().state_dict(), path)
    with pytest.raises(CheckpointMismatchError, match="another model"):
        zoo.load("efficientnet_lite0", tmp_path)


@pytest.mark.parametrize("damage", ["truncated", "empty", "garbage"])
def test_truncated_or_corrupt_file(tmp_path: Path, damage: str) -> None:
    path = tmp_path / "resnet50-0676ba61.pth"
    if damage == "truncated":
        torch.save({"w": torch.randn(1000, 100)}, path)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif damage == "empty":
        path.write_bytes(b"")
    else:
        path.write_bytes(b"<html>404 Not Found</html>" * 10)
    with pytest.raises(CorruptCheckpointError) as info:
        zoo.load("res_50", tmp_path)
    text = str(info.value)
    assert str(path) in text
    assert ("truncated or corrupt" in text) or ("empty" in text)
    assert "download.pytorch.org" in text


class _NotWeights:
    pass


def test_unsafe_objects_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "resnet50-0676ba61.pth"
    torch.save({"state_dict": {}, "hook": _NotWeights()}, path)
    with pytest.raises(UnsafeCheckpointError, match="weights-only"):
        zoo.load("res_50", tmp_path)


def test_training_args_and_numpy_scalars_are_accepted(tmp_path: Path) -> None:
    # training scripts store argparse.Namespace next to the weights
    source = _timm("deit_base_patch16_224", **VIT)().eval()
    ckpt = {
        "model": source.state_dict(),
        "args": argparse.Namespace(lr=0.1),
        "best_acc": np.float64(81.8),
    }
    torch.save(ckpt, tmp_path / "deit_base_patch16_224-b5f2ef4d.pth")
    model = zoo.load("deit_base", tmp_path, **VIT)
    assert torch.equal(model.pos_embed, source.pos_embed)


def test_sha256_check(tmp_path: Path) -> None:
    write_official("res_50", tmp_path)
    path = tmp_path / "resnet50-0676ba61.pth"
    with pytest.raises(ChecksumError, match="0676ba61"):
        zoo.load("res_50", tmp_path, check_hash=True)
    digest = zoo.sha256sum(path)

    assert digest == hashlib.sha256(path.read_bytes()).hexdigest()
    check_sha256(path, digest[:8])  # a matching prefix passes


def test_explicit_file_paths_override_the_folder(tmp_path: Path) -> None:
    other = tmp_path / "elsewhere"
    other.mkdir()
    source, _, _ = write_official("res_50", other)
    model = zoo.load(
        "res_50", tmp_path, files={"weights": other / "resnet50-0676ba61.pth"}
    )
    assert torch.equal(model.fc.weight, source.fc.weight)
    with pytest.raises(ValueError, match="no file role"):
        zoo.load("res_50", tmp_path, files={"head": other / "x.pth"})


# ----------------------------------------------------------------- layers
def test_get_layer_paths(tiny_vit: nn.Module) -> None:
    assert zoo.get_layer(tiny_vit, "blocks.-1.norm1") is tiny_vit.blocks[2].norm1
    assert zoo.get_layer(tiny_vit, "") is tiny_vit
    assert zoo.get_layers(tiny_vit, "blocks.*.attn") == [
        b.attn for b in tiny_vit.blocks
    ]
    with pytest.raises(ValueError, match="index 3 out of range"):
        zoo.get_layer(tiny_vit, "blocks.3")
    with pytest.raises(ValueError, match="no child 'nrom1'.*'norm1'"):
        zoo.get_layer(tiny_vit, "blocks.0.nrom1")


# ----------------------------------------------------- headless targets
def test_embedding_similarity_is_cosine(
    tiny_cnn: nn.Module, images: torch.Tensor
) -> None:
    backbone = zoo.headless(tiny_cnn)
    refs = zoo.reference_embeddings(backbone, images[:2])
    model = zoo.EmbeddingSimilarity(backbone, refs)
    with torch.no_grad():
        out = model(images)
        emb = backbone(images)
    expected = F.cosine_similarity(emb[:, None], refs[None], dim=-1)
    assert out.shape == (3, 2)
    assert torch.allclose(out, expected, atol=1e-6)
    assert torch.allclose(out[:2].diagonal(), torch.ones(2), atol=1e-6)
    proto = zoo.reference_embeddings(backbone, images, mean=True)
    assert proto.shape == (1, emb.shape[1])
    assert torch.allclose(proto.norm(), torch.tensor(1.0))


@pytest.mark.filterwarnings("ignore:Input Tensor 0 did not already require gradients")
def test_embedding_targets_work_through_captum(
    tiny_cnn: nn.Module, images: torch.Tensor
) -> None:
    from captum.attr import InputXGradient

    backbone = zoo.headless(tiny_cnn)
    # mirrored views as references: an image against its own embedding warns
    refs = zoo.reference_embeddings(backbone, images[:2].flip(-1))
    model = zoo.EmbeddingSimilarity(backbone, refs)
    attr = InputXGradient(model).attribute(images, target=1)
    x = images.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(model(x)[:, 1].sum(), x)
    assert torch.allclose(attr, grad * images, atol=1e-6)

    norm = zoo.EmbeddingNorm(backbone)
    with torch.no_grad():
        assert torch.allclose(norm(images)[:, 0], backbone(images).norm(dim=1))
    assert InputXGradient(norm).attribute(images, target=0).shape == images.shape


def test_embedding_similarity_checks_dimensions(tiny_cnn: nn.Module) -> None:
    backbone = zoo.headless(tiny_cnn)
    with pytest.raises(ValueError, match="same backbone"):
        zoo.EmbeddingSimilarity(backbone, torch.randn(2, 5))(torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match="R >= 1"):
        zoo.EmbeddingSimilarity(backbone, torch.randn(0, 16))


# --------------------------------------------------- real EfficientNet-Lite0
def test_efficientnet_weights_map_by_position(effnet: nn.Module) -> None:
    package = zoo.entry("efficientnet_lite0").files[0].bundled()
    real = [
        v
        for k, v in torch.load(package, map_location="cpu", weights_only=True).items()
        if not k.endswith("num_batches_tracked")
    ]
    ours = [
        v
        for k, v in effnet.state_dict().items()
        if not k.endswith("num_batches_tracked")
    ]
    assert len(real) == len(ours) == 247
    assert all(torch.equal(a, b) for a, b in zip(real, ours))
    assert "efficientnet_lite0" in zoo.available("/nonexistent")


def test_efficientnet_classifies_coffee_as_espresso(effnet: nn.Module, photos) -> None:
    i = photos.names.index("coffee")
    with torch.no_grad():
        probs = effnet(photos.images[i : i + 1]).softmax(-1)[0]
    assert photos.labels[i] == 967
    assert probs.argmax() == 967
    assert probs[967] > 0.5


def test_preprocess_transform_matches_bundled_photos(photos) -> None:
    import skimage.data
    from PIL import Image

    transform = zoo.preprocess("efficientnet_lite0")
    x = transform(Image.fromarray(skimage.data.coffee()))
    assert x.shape == (3, 224, 224)
    assert torch.allclose(x, photos.images[photos.names.index("coffee")], atol=1e-6)


def test_docs_table_is_in_sync() -> None:
    docs = Path(__file__).resolve().parents[1] / "docs" / "models_table.md"
    if not docs.is_file():
        pytest.skip("docs/models_table.md absent")
    assert zoo.models_table() in docs.read_text()


def test_loaded_model_pickles(tmp_path: Path) -> None:
    import pickle

    _, kwargs, _ = write_official("cait_s24", tmp_path)
    model = zoo.load("cait_s24", tmp_path, **kwargs)
    clone = pickle.loads(pickle.dumps(model))
    assert clone.zoo_entry.name == "cait_s24"
    assert torch.equal(clone.pos_embed, model.pos_embed)


def test_efficientnet_file_in_timm_naming_loads(tmp_path: Path) -> None:
    torch.manual_seed(0)
    source = _timm("tf_efficientnet_lite0")().eval()
    torch.save(source.state_dict(), tmp_path / "efficientnet-lite0-57934424.pth")
    model = zoo.load("efficientnet_lite0", tmp_path)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), source(x))


# ------------------------------------------------- ViT-S family specifics
def _dinov2_native_file(folder: Path, name: str, dim: int = 32) -> Dict[str, Any]:
    """A DINOv2 backbone file as released: 518 px (37 x 37 patch positions), a
    class-token position, and for ``_reg`` four register tokens."""
    torch.manual_seed(0)
    source = zoo.entry(name).build(
        head=False, img_size=518, embed_dim=dim, depth=1, num_heads=2
    )
    state = dict(source.state_dict())
    state["mask_token"] = torch.zeros(1, dim)
    if "reg_token" in state:
        state["register_tokens"] = state.pop("reg_token")
        state["pos_embed"] = torch.cat([torch.randn(1, 1, dim), state["pos_embed"]], 1)
    assert state["pos_embed"].shape == (1, 1 + 37 * 37, dim)
    files = {f.role: f.filename for f in zoo.entry(name).files}
    torch.save(state, folder / files["backbone"])
    return state


@pytest.mark.parametrize("name", ["dinov2_vit_small", "dinov2_vit_small_reg"])
def test_dinov2_position_embedding_at_224_px(name: str, tmp_path: Path) -> None:
    official = _dinov2_native_file(tmp_path, name)
    model = zoo.load(name, tmp_path, head=False, embed_dim=32, depth=1, num_heads=2)
    assert model.patch_embed.grid_size == (16, 16)  # 224 px / 14
    # the official interpolate_pos_encoding at 224 px: bicubic, no antialias,
    # scale factor (16 + 0.1) / 37 (dinov2/models/vision_transformer.py)
    pos = official["pos_embed"]
    grid = pos[:, 1:].reshape(1, 37, 37, 32).permute(0, 3, 1, 2)
    s = 16.1 / 37
    grid = F.interpolate(grid, scale_factor=(s, s), mode="bicubic", antialias=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, 256, 32)
    if name.endswith("_reg"):
        # registers carry no position; the class token's is folded into it
        assert torch.equal(model.reg_token, official["register_tokens"])
        assert model.num_prefix_tokens == 5
        assert torch.equal(model.pos_embed, grid)
        assert torch.equal(model.cls_token, official["cls_token"] + pos[:, :1])
    else:
        assert torch.equal(model.pos_embed, torch.cat([pos[:, :1], grid], 1))
        assert torch.equal(model.cls_token, official["cls_token"])
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert model(x).shape == (1, 32)


def test_dinov2_registers_are_checked(tmp_path: Path) -> None:
    # a file without registers is not the registers release
    _dinov2_native_file(tmp_path, "dinov2_vit_small")
    plain = tmp_path / "dinov2_vits14_pretrain.pth"
    plain.rename(tmp_path / "dinov2_vits14_reg4_pretrain.pth")
    with pytest.raises(CheckpointMismatchError, match="missing keys.*reg_token"):
        zoo.load(
            "dinov2_vit_small_reg", tmp_path, head=False, embed_dim=32, depth=1,
            num_heads=2,
        )  # fmt: skip


def _block_outputs(model: nn.Module, x: torch.Tensor) -> list:
    seen: list = []
    handles = [
        b.register_forward_hook(lambda m, i, o: seen.append(o))
        for b in model.backbone.blocks
    ]
    try:
        with torch.no_grad():
            logits = model(x)
    finally:
        for h in handles:
            h.remove()
    return [logits, *seen]


@pytest.mark.parametrize("name", ["dinov2_vit_small", "dinov2_vit_small_reg"])
def test_dinov2_head_is_the_official_formula(name: str, tmp_path: Path) -> None:
    write_official(name, tmp_path)
    model = zoo.load(name, tmp_path, **DINOV2)
    assert isinstance(model, zoo.TokenLinearProbe)
    x = torch.randn(2, 3, 28, 28)
    logits, *blocks = _block_outputs(model, x)
    # dinov2/hub/classifiers.py, layers=1: cat(x_norm_clstoken,
    # x_norm_patchtokens.mean(1)); registers are neither
    tokens = model.backbone.norm(blocks[-1])
    regs = 4 if name.endswith("_reg") else 0
    assert tokens.shape[1] == 1 + regs + 4
    feats = torch.cat([tokens[:, 0], tokens[:, 1 + regs :].mean(1)], dim=1)
    head = torch.load(tmp_path / zoo.entry(name).files[1].filename)
    assert model.head.weight.shape == (1000, 2 * DINOV2["embed_dim"])
    expected = F.linear(feats, head["weight"], head["bias"])
    assert torch.allclose(logits, expected, atol=1e-5)


def test_dino_vit_heads_are_the_official_formulas(tmp_path: Path) -> None:
    # ViT-S/16: class tokens of the last 4 blocks after the final norm
    _, kwargs, size = write_official("dino_vit_small", tmp_path)
    model = zoo.load("dino_vit_small", tmp_path, **kwargs)
    x = torch.randn(2, 3, size, size)
    logits, *blocks = _block_outputs(model, x)
    feats = torch.cat([model.backbone.norm(z)[:, 0] for z in blocks[-4:]], dim=-1)
    w, b = model.head.weight, model.head.bias
    assert w.shape == (1000, 4 * kwargs["embed_dim"])
    assert torch.allclose(logits, F.linear(feats, w, b), atol=1e-5)
    # ViT-B/16: eval_linear.py's avgpool_patchtokens concatenation, as written there
    _, kwargs, size = write_official("dino_vit_base", tmp_path)
    model = zoo.load("dino_vit_base", tmp_path, **kwargs)
    logits, *blocks = _block_outputs(model, x)
    last = model.backbone.norm(blocks[-1])
    output = last[:, 0]
    output = torch.cat(
        (output.unsqueeze(-1), torch.mean(last[:, 1:], dim=1).unsqueeze(-1)), dim=-1
    )
    output = output.reshape(output.shape[0], -1)
    w, b = model.head.weight, model.head.bias
    assert torch.allclose(logits, F.linear(output, w, b), atol=1e-5)
    # headless: the backbone alone, its normed class token
    backbone = zoo.load("dino_vit_base", tmp_path, head=False, **kwargs)
    with torch.no_grad():
        assert torch.equal(backbone(x), last[:, 0])


def test_describe_names_files_addresses_family_and_probe(tmp_path: Path) -> None:
    info = zoo.describe("dinov2_vit_small_reg", tmp_path)
    assert info["family"] == "vit_s" and zoo.family_name(info["family"]) == "ViT-S"
    assert (
        info["probe"] == "class token + mean of the patch tokens after the final norm"
    )
    files = {f["role"]: f for f in info["files"]}
    assert files["backbone"]["filename"] == "dinov2_vits14_reg4_pretrain.pth"
    assert files["head"]["source"] == (
        "https://dl.fbaipublicfiles.com/dinov2/dinov2_vits14/"
        "dinov2_vits14_reg4_linear_head.pth"
    )
    assert not info["available"]
    assert zoo.describe("dino_vit_small")["probe"].startswith(
        "class tokens of the last 4 blocks"
    )


def test_probe_and_head_file_must_agree(tmp_path: Path) -> None:
    _, kwargs, _ = write_official("dino_vit_small", tmp_path)
    # a probe on one class token (e.g. the XCiT file) is not the ViT-S/16 probe
    torch.save(
        _dino_head(torch.zeros(1000, 64), torch.zeros(1000)),
        tmp_path / "dino_deitsmall16_linearweights.pth",
    )
    with pytest.raises(CheckpointMismatchError, match="shape mismatches.*head"):
        zoo.load("dino_vit_small", tmp_path, **kwargs)
    bad = {"fc.weight": torch.zeros(3)}
    torch.save(bad, tmp_path / "dinov2_vits14_linear_head.pth")
    _dinov2_native_file(tmp_path, "dinov2_vit_small")
    with pytest.raises(CheckpointMismatchError, match="'weight' and 'bias'"):
        zoo.load("dinov2_vit_small", tmp_path, embed_dim=32, depth=1, num_heads=2)


def test_moco_v3_vit_small_has_twelve_heads(tmp_path: Path) -> None:
    model = zoo.entry("moco_v3_vit_small").build()
    assert {b.attn.num_heads for b in model.blocks} == {12}
    assert model.blocks[0].attn.head_dim == 32
