"""Captum's generic checks over every layer CAM (issue 19), in Captum's style.

A config list (``CONFIG``, the schema of ``captum.testing.attr.helpers.
test_config``: name, algorithms, model, layer, attribute_args) drives three
checks, so that the list and the checks can move upstream with the methods:

* targets: a batch explained with per-sample targets (list, tensor, ``(B,
  1)`` tensor) equals each sample explained alone, and one target given as
  an int, a one-element tensor, a tuple or a list of equal entries gives the
  same maps (Captum's ``tests/attr/test_targets.py`` idea);
* hook removal: no forward, pre-forward or backward hook is left on any
  module, parameters keep ``requires_grad`` and modules their mode, after a
  normal call, after a target that raises mid-call (``(9999,) * 20``, caught
  as ``AssertionError`` as in Captum) and after a layer whose forward raises
  (Captum's ``tests/attr/test_hook_removal.py`` modes);
* Captum parity: ``captum_ssl.attr.LayerGradCam`` equals
  ``captum.attr.LayerGradCam`` on every config and option Captum's own
  ``LayerGradCam`` tests and ``test_config`` use (layer input and output,
  ReLU, no channel sum, several inputs and outputs, frozen parameters), and
  on 1-D, 2-D and 3-D CNNs and linear layers.

The configs are Captum's own test models (``captum.testing.helpers.
basic_models``, the ``LayerGradCam`` entries of Captum's shipped
``test_config``), 1-D / 3-D CNNs and this project's CNN and ViT.
"""

from __future__ import annotations

import copy
import warnings
from typing import Any, Dict, List, Optional

import pytest
import torch
from captum.attr import LayerGradCam as CaptumLayerGradCam
from captum.testing.attr.helpers.test_config import config as captum_config
from captum.testing.helpers.basic_models import (
    BasicModel_ConvNet,
    BasicModel_ConvNet_One_Conv,
    BasicModel_MultiLayer,
)
from conftest import TinyCNN, make_tiny_vit
from torch import nn

import captum_ssl.attr as A

GRADIENT_CAMS = [
    A.LayerGradCam,
    A.LayerGradCamPlusPlus,
    A.LayerXGradCam,
    A.LayerHiResCam,
    A.LayerGradCamElementWise,
    A.LayerLayerCam,
    A.LayerEigenGradCam,
    A.LayerSmoothGradCamPlusPlus,
    A.LayerShapleyCam,
    A.LayerFinerCam,
]
ACTIVATION_CAMS = [
    A.LayerEigenCam,
    A.LayerScoreCam,
    A.LayerISCam,
    A.LayerSSCam,
    A.LayerAblationCam,
    A.LayerReciproCam,
    A.LayerClassActivationMap,
    A.LayerFEM,
    A.LayerKPCACam,
    A.LayerRandomCam,
    A.DeepFeatureFactorization,
]
#: every single-layer CAM class of the package
LAYER_CAMS = GRADIENT_CAMS + ACTIVATION_CAMS
#: methods whose equation needs several positions: they refuse (B, C) layers
NEEDS_POSITIONS = {
    A.LayerEigenGradCam,
    A.LayerEigenCam,
    A.LayerScoreCam,
    A.LayerISCam,
    A.LayerSSCam,
    A.LayerReciproCam,
    A.LayerFEM,
    A.LayerKPCACam,
}
#: methods that draw random numbers (SmoothGrad noise, SS-CAM noise, random
#: weights) or describe the batch as a whole (DFF factorises all samples
#: together): a sample explained alone legitimately differs
BATCH_DEPENDENT = {
    A.LayerSmoothGradCamPlusPlus,
    A.LayerSSCam,
    A.LayerRandomCam,
    A.DeepFeatureFactorization,
}
#: constructor options keeping each method small and deterministic
INIT: Dict[type, Dict[str, Any]] = {
    A.LayerISCam: {"num_samples": 2},
    A.LayerSSCam: {"num_samples": 2},
    A.LayerSmoothGradCamPlusPlus: {"num_samples": 2},
}
ATTRIBUTE: Dict[type, Dict[str, Any]] = {
    A.DeepFeatureFactorization: {"n_components": 2},
    A.LayerFinerCam: {"comparison_categories": (1,)},
}


class ConvNet1d(nn.Module):
    """A 1-D CNN (time series, audio): Conv1d -> ReLU -> pool -> linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(3, 6, 3, padding=1)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.relu(self.conv(x)).mean(dim=2))


class ConvNet3d(nn.Module):
    """A 3-D CNN (volumes, video): Conv3d -> ReLU -> pool -> linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv3d(2, 6, 3, padding=1)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.relu(self.conv(x)).mean(dim=(2, 3, 4)))


class ImageWithConv1d(nn.Module):
    """An image model with a Conv1d inside (ECA-style channel attention): its
    ``(B, 1, C)`` output and the ``(B, 6, L)`` signal branch are channels-first
    maps, never ViT tokens."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.seq = nn.Conv1d(8, 6, 3, padding=1)
        self.fc = nn.Linear(6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = torch.relu(self.conv(x)).flatten(2)  # (B, 8, H * W)
        return self.fc(torch.relu(self.seq(f)).mean(dim=2))


def _seeded(model: nn.Module) -> nn.Module:
    return model.eval()


def _config() -> List[Dict[str, Any]]:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    cnn = _seeded(TinyCNN())
    vit = make_tiny_vit(depth=2)
    return [
        {
            "name": "captum_basic_conv",
            "model": _seeded(BasicModel_ConvNet()),
            "layer": "conv2",
            "attribute_args": {
                "inputs": torch.randn(4, 1, 10, 10, generator=g),
                "target": [0, 1, 1, 3],
            },
            "fc": "fc1",
        },
        {
            "name": "captum_basic_linear",
            "model": _seeded(BasicModel_MultiLayer()),
            "layer": "linear1",
            "attribute_args": {
                "inputs": torch.randn(4, 3, generator=g),
                "target": torch.tensor([0, 1, 0, 1]),
            },
            "fc": "linear2",
        },
        {
            "name": "conv1d",
            "model": _seeded(ConvNet1d()),
            "layer": "conv",
            "attribute_args": {
                "inputs": torch.randn(3, 3, 12, generator=g),
                "target": [1, 4, 2],
            },
            "fc": "fc",
        },
        {
            "name": "conv1d_in_image_model",
            "model": _seeded(ImageWithConv1d()),
            "layer": "seq",
            "attribute_args": {
                "inputs": torch.randn(2, 3, 4, 5, generator=g),
                "target": torch.tensor([[3], [0]]),
            },
            "fc": "fc",
        },
        {
            "name": "conv3d",
            "model": _seeded(ConvNet3d()),
            "layer": "conv",
            "attribute_args": {
                "inputs": torch.randn(2, 2, 4, 5, 3, generator=g),
                "target": [0, 3],
            },
            "fc": "fc",
        },
        {
            "name": "project_cnn",
            "model": cnn,
            "layer": "features.4",
            "attribute_args": {
                "inputs": torch.randn(3, 3, 16, 16, generator=g),
                "target": [0, 2, 4],
            },
            "fc": "fc",
        },
        {
            "name": "project_vit",
            "model": vit,
            "layer": "blocks.1.norm1",
            "attribute_args": {
                "inputs": torch.randn(2, 3, 32, 32, generator=g),
                "target": [6, 1],
            },
            "fc": "head",
        },
    ]


CONFIG = _config()


#: methods that mask the input with the layer's upsampled maps: the input
#: must have the layer's number of spatial dimensions
MASKS_INPUT = {A.LayerScoreCam, A.LayerISCam, A.LayerSSCam}


def _applies(cls: type, cfg: Dict[str, Any]) -> bool:
    layer = cfg["model"].get_submodule(cfg["layer"])
    if cls in NEEDS_POSITIONS and isinstance(layer, nn.Linear):
        return False
    return not (cls in MASKS_INPUT and cfg["name"] == "conv1d_in_image_model")


def _method(cls: type, model: nn.Module, layer: nn.Module, cfg: Dict[str, Any]):
    kw = dict(INIT.get(cls, {}))
    if cls is A.LayerClassActivationMap:
        kw["fc"] = model.get_submodule(cfg["fc"])
    if cls is A.DeepFeatureFactorization:
        kw["classifier"] = model.get_submodule(cfg["fc"])
    return cls(model, layer, **kw)


def _attribute(method, cls: type, **args: Any) -> torch.Tensor:
    options = dict(ATTRIBUTE.get(cls, {}))
    if cls is A.DeepFeatureFactorization:  # the same NMF start in every call
        options["generator"] = torch.Generator().manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. zero gradients of a random net
        return method.attribute(**{**options, **args})


#: configs on which every target form is tried (one rule for all methods:
#: a pooled layer, a 1-D and a 2-D CNN suffice, and keep the test fast)
FORMS_ON = ("captum_basic_linear", "conv1d", "project_cnn")


def _close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-5) -> None:
    """Equal up to ``tol`` of the larger map's scale (float32 sums of large
    activations, e.g. Captum's ``100 * randn`` inputs)."""
    assert a.shape == b.shape
    scale = max(1.0, float(b.abs().max()), float(a.abs().max()))
    assert float((a - b).abs().max()) <= tol * scale, (a, b)


CASES = [
    pytest.param(cls, cfg, id=f"{cfg['name']}-{cls.__name__}")
    for cfg in CONFIG
    for cls in LAYER_CAMS
    if _applies(cls, cfg)
]


# ------------------------------------------------------------------ targets
@pytest.mark.parametrize("cls,cfg", CASES)
def test_targets(cls, cfg):
    """Per-sample targets on a batch equal each sample alone; one target in
    every form Captum accepts gives the same maps."""
    model = cfg["model"]
    method = _method(cls, model, model.get_submodule(cfg["layer"]), cfg)
    args = dict(cfg["attribute_args"])
    x, targets = args.pop("inputs"), args.pop("target")
    per_sample = [int(t) for t in torch.as_tensor(targets).flatten()]
    batch = _attribute(method, cls, inputs=x, target=targets, **args)
    assert batch.shape[0] == x.shape[0] and batch.device == x.device
    if cls not in BATCH_DEPENDENT:
        for i, t in enumerate(per_sample):
            alone = _attribute(method, cls, inputs=x[i : i + 1], target=t, **args)
            _close(alone, batch[i : i + 1])
    if cfg["name"] not in FORMS_ON:
        return
    t = per_sample[0]
    forms = [t, (t,), torch.tensor(t), torch.tensor([t]), [t] * len(x)]
    forms += [torch.full((len(x),), t), torch.full((len(x), 1), t)]
    if cls in BATCH_DEPENDENT - {A.DeepFeatureFactorization}:
        return  # random draws: the forms are checked for errors only
    reference = _attribute(method, cls, inputs=x, target=t, **args)
    for form in forms:
        out = _attribute(method, cls, inputs=x, target=form, **args)
        _close(out, reference)


# -------------------------------------------------------------- hook removal
class ErrorModule(nn.Module):
    """Stands in for the explained layer and raises in its forward."""

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        raise AssertionError("Raising error on execution")


def _state(model: nn.Module) -> List[Any]:
    return [
        (
            len(m._forward_hooks),
            len(m._forward_pre_hooks),
            len(m._backward_hooks),
            m.training,
        )
        for m in model.modules()
    ] + [p.requires_grad for p in model.parameters()]


@pytest.mark.parametrize("mode", ["normal", "incorrect_target", "invalid_module"])
@pytest.mark.parametrize("cls", LAYER_CAMS, ids=lambda c: c.__name__)
def test_hook_removal(cls, mode):
    """No hook left, parameters and modes restored, also when the target
    selection or the forward raises mid-call (an ``AssertionError``, as
    Captum)."""
    cfg = next(c for c in CONFIG if c["name"] == "project_cnn")
    model = copy.deepcopy(cfg["model"])
    layer: Optional[nn.Module] = model.get_submodule(cfg["layer"])
    if mode == "invalid_module":
        layer = ErrorModule()
        model.features[4] = layer
    method = _method(cls, model, layer, cfg)
    model.train()  # the call switches to eval and must switch back
    before = _state(model)
    args = dict(cfg["attribute_args"])
    if mode == "incorrect_target":
        args["target"] = (9999,) * 20
    if mode == "normal":
        _attribute(method, cls, **args)
    else:
        with pytest.raises(AssertionError):
            _attribute(method, cls, **args)
    assert _state(model) == before


# ------------------------------------------------------------ Captum parity
def _grad_cam_configs() -> List[Any]:
    """Captum's own LayerGradCam configs (its shipped test_config)."""
    out = []
    for cfg in captum_config:
        if CaptumLayerGradCam not in cfg["algorithms"] or "layer" not in cfg:
            continue
        if cfg.get("noise_tunnel") or cfg.get("dp_delta"):
            continue
        out.append(pytest.param(cfg, id=cfg["name"]))
    return out


def _same(ours: Any, theirs: Any) -> None:
    ours = ours if isinstance(ours, tuple) else (ours,)
    theirs = theirs if isinstance(theirs, tuple) else (theirs,)
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


OPTIONS = [
    {},
    {"attribute_to_layer_input": True},
    {"relu_attributions": True},
    {"attr_dim_summation": False},
]


@pytest.mark.parametrize("options", OPTIONS, ids=str)
@pytest.mark.parametrize("cfg", _grad_cam_configs())
def test_grad_cam_equals_captum_on_captums_configs(cfg, options):
    model = copy.deepcopy(cfg["model"]).eval()
    layers = cfg["layer"] if isinstance(cfg["layer"], list) else [cfg["layer"]]
    for name in layers:
        layer = model.get_submodule(name)
        args = {**cfg["attribute_args"], **options}
        torch.manual_seed(0)
        theirs = CaptumLayerGradCam(model, layer).attribute(**args)
        ours = A.LayerGradCam(model, layer).attribute(**args)
        _same(ours, theirs)


def _extra_parity_cases() -> List[Any]:
    one = BasicModel_ConvNet_One_Conv().eval()
    frozen = BasicModel_ConvNet_One_Conv().eval()
    for p in frozen.parameters():
        p.requires_grad_(False)
    img = torch.arange(16.0).view(1, 1, 4, 4)
    cases = [
        ("one_conv", one, "conv1", img),
        ("one_conv_relu", one, "relu1", img),
        ("one_conv_frozen", frozen, "conv1", img),
        ("one_conv_two_inputs", one, "conv1", (img, torch.ones(1, 1, 4, 4))),
        ("multi_output_layer", BasicModel_MultiLayer(multi_input_module=True).eval()),
    ]
    cases[-1] += ("multi_relu", torch.tensor([[0.0, 6.0, 0.0]]))
    for cfg in CONFIG:
        if cfg["name"] != "project_vit":  # Captum has no token layout
            x = cfg["attribute_args"]["inputs"]
            cases.append((cfg["name"], cfg["model"], cfg["layer"], x))
    return [pytest.param(*c, id=c[0]) for c in cases]


@pytest.mark.parametrize("options", OPTIONS, ids=str)
@pytest.mark.parametrize("name,model,layer_name,x", _extra_parity_cases())
def test_grad_cam_equals_captum_on_every_rank(name, model, layer_name, x, options):
    """1-D, 2-D, 3-D CNNs, linear layers, several inputs / outputs, frozen
    parameters: switching the import changes no result."""
    layer = model.get_submodule(layer_name)
    args = {"inputs": x, "target": 0, **options}
    _same(
        A.LayerGradCam(model, layer).attribute(**args),
        CaptumLayerGradCam(model, layer).attribute(**args),
    )


# ------------------------------------------------------------------ layouts
def test_three_d_outputs_are_tokens_only_where_the_model_declares_them():
    """A Conv1d output (B, 64, 100), alone or inside an image model, is a
    channels-first map; a ViT's (B, N, C) stays a token grid; ``layout=``
    makes any 3-D output tokens."""
    conv = nn.Sequential(nn.Conv1d(3, 64, 1), nn.Flatten(), nn.Linear(6400, 4))
    x = torch.randn(2, 3, 100)
    for cls in (A.LayerGradCam, A.LayerEigenCam):
        assert cls(conv.eval(), conv[0]).attribute(x, target=1).shape == (2, 1, 100)
    image = ImageWithConv1d().eval()
    grad = A.LayerGradCam(image, image.seq).attribute(torch.randn(2, 3, 4, 5), 1)
    assert grad.shape == (2, 1, 20)
    vit = make_tiny_vit(depth=1)
    assert A.LayerGradCam(vit, vit.blocks[0].norm1).attribute(
        torch.randn(2, 3, 32, 32), target=1
    ).shape == (2, 1, 4, 4)
    tokens = nn.Sequential(nn.Linear(8, 8), nn.Flatten(), nn.Linear(17 * 8, 3))
    lay = A.TokenLayout(grid=(4, 4), num_prefix_tokens=1)
    out = A.LayerGradCam(tokens.eval(), tokens[0], layout=lay).attribute(
        torch.randn(2, 17, 8), target=0
    )
    assert out.shape == (2, 1, 4, 4)


@pytest.mark.parametrize("cls", sorted(NEEDS_POSITIONS, key=lambda c: c.__name__))
def test_methods_without_a_pooled_form_refuse_pooled_layers(cls):
    """The documented refusal (docs/cam_ranks.md): a (B, C) layer has one
    position; the error names the fix."""
    model = BasicModel_MultiLayer().eval()
    method = cls(model, model.linear1, **INIT.get(cls, {}))
    with pytest.raises(A.AttributionInputError, match="earlier layer|gradient CAM"):
        method.attribute(torch.randn(2, 3), target=0)


# ------------------------------------------------------ viewing and metrics
@pytest.mark.parametrize(
    "cfg", [c for c in CONFIG if c["name"] in ("conv1d", "conv3d", "project_cnn")]
)
def test_maps_of_every_rank_upsample_as_captums_interpolate(cfg):
    """``captum_ssl.viz.upsample`` and the metrics' map preparation take a
    1-D, 2-D or 3-D layer map to the input's size as Captum's
    ``LayerAttribution.interpolate`` (linear / bilinear / trilinear)."""
    from captum.attr import LayerAttribution

    from captum_ssl.metrics._common import prepare_maps
    from captum_ssl.viz import to_heatmap, upsample

    model = cfg["model"]
    x = cfg["attribute_args"]["inputs"]
    layer = model.get_submodule(cfg["layer"])
    cam = A.LayerGradCam(model, layer).attribute(x, target=0)
    size = tuple(x.shape[2:])
    mode = {1: "linear", 2: "bilinear", 3: "trilinear"}[len(size)]
    # a smaller layer map of the same aspect ratio (each side one shorter),
    # so that the resize does real work
    small = torch.nn.functional.interpolate(
        cam, size=[max(1, s - 1) for s in cam.shape[2:]], mode="area"
    )
    expected = LayerAttribution.interpolate(small, size, interpolate_mode=mode)
    torch.testing.assert_close(upsample(small, x), expected)
    torch.testing.assert_close(prepare_maps(small, x), expected)
    heat = to_heatmap(small, x)
    assert heat.shape == (x.shape[0], 1, *size)
    assert float(heat.amin()) >= 0 and float(heat.amax()) <= 1


# ---------------------------------------------------------------- signatures
@pytest.mark.parametrize("cls", GRADIENT_CAMS, ids=lambda c: c.__name__)
def test_gradient_cams_share_captums_signature(cls):
    """Every gradient CAM takes Captum's arguments in Captum's order, plus
    ``create_graph``: with it the map equals the default one and a loss on it
    reaches the parameters before the layer."""
    import inspect

    names = list(inspect.signature(cls.attribute).parameters)[1:8]
    assert names == [
        "inputs",
        "target",
        "additional_forward_args",
        "attribute_to_layer_input",
        "relu_attributions",
        "attr_dim_summation",
        "grad_kwargs",
    ]
    cfg = next(c for c in CONFIG if c["name"] == "project_cnn")
    model = copy.deepcopy(cfg["model"])
    method = _method(cls, model, model.features[4], cfg)
    x = cfg["attribute_args"]["inputs"][:2]
    kw = {"target": [0, 2], "grad_kwargs": {"retain_graph": True}}
    if cls is A.LayerSmoothGradCamPlusPlus:
        kw["noise"] = torch.randn(2, *x.shape, generator=torch.Generator())
    plain = _attribute(method, cls, inputs=x, **kw)
    live = _attribute(method, cls, inputs=x, create_graph=True, **kw)
    _close(live.detach(), plain, 1e-4)
    live.pow(2).sum().backward()
    assert model.features[0].weight.grad is not None


@pytest.mark.parametrize("cls", LAYER_CAMS, ids=lambda c: c.__name__)
def test_a_tuple_target_longer_than_the_output_is_an_assertion_error(cls):
    """Captum asserts on a target indexing more dimensions than the output
    has; here too, with a message naming the fix (no raw RuntimeError)."""
    cfg = next(c for c in CONFIG if c["name"] == "project_cnn")
    model = cfg["model"]
    method = _method(cls, model, model.get_submodule(cfg["layer"]), cfg)
    x = cfg["attribute_args"]["inputs"][:2]
    for target in [(1, 0), [(1, 0), (2, 0)]]:
        with pytest.raises(AssertionError, match="one index per output dimension"):
            _attribute(method, cls, inputs=x, target=target)


# ------------------------------------------------------- several outputs
class TwoMaps(nn.Module):
    """A layer whose forward returns two tensors (two convolution branches)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> Any:
        return self.a(x), self.b(x)


class TwoOutputNet(nn.Module):
    """The two outputs of ``pair`` are used together after it; ``pair.a`` and
    ``pair.b`` are the model variants that expose one output each (the same
    model, the layer returning that output alone)."""

    def __init__(self) -> None:
        super().__init__()
        self.pair = TwoMaps()
        self.fc = nn.Linear(4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.pair(x)
        return self.fc((torch.relu(a) + 0.5 * torch.relu(b) * a).mean(dim=(2, 3)))


#: methods whose random draws (Random-CAM's weights, SS-CAM's mask noise,
#: DFF's NMF start) come from ``generator`` output after output: explained
#: one output at a time, the same generator is passed on from output 0 to 1
GENERATOR_CAMS = {A.LayerRandomCam, A.LayerSSCam, A.DeepFeatureFactorization}


def _several_outputs_args(cls: type, x: torch.Tensor) -> Dict[str, Any]:
    kw: Dict[str, Any] = {"inputs": x, "target": [1, 3]}
    if cls is A.LayerSmoothGradCamPlusPlus:  # one noise for every output
        kw["noise"] = torch.randn(2, *x.shape, generator=torch.Generator())
    return kw


@pytest.mark.parametrize("cls", LAYER_CAMS, ids=lambda c: c.__name__)
def test_a_layer_with_two_outputs_gives_one_map_per_output(cls):
    """Every layer CAM on a layer returning two tensors returns a tuple of two
    maps; map ``i`` equals the method on the submodule that returns output
    ``i`` alone (the other output as the model computes it); no hook is
    left; ``LayerGradCam`` equals Captum's on the two-output layer."""
    torch.manual_seed(0)
    model = TwoOutputNet().eval()
    x = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(2))
    cfg = {"fc": "fc"}
    kw = _several_outputs_args(cls, x)
    if cls in GENERATOR_CAMS:  # the draws of output 0, then those of output 1
        kw["generator"] = torch.Generator().manual_seed(0)
    before = _state(model)
    both = _attribute(_method(cls, model, model.pair, cfg), cls, **kw)
    assert _state(model) == before
    assert isinstance(both, tuple) and len(both) == 2
    if cls in GENERATOR_CAMS:
        kw["generator"] = torch.Generator().manual_seed(0)
    one_by_one = [
        _attribute(_method(cls, model, model.get_submodule(name), cfg), cls, **kw)
        for name in ("pair.a", "pair.b")
    ]
    for ours, alone in zip(both, one_by_one):
        assert ours.shape == (2, 1, 6, 6)
        _close(ours, alone)
    if cls is A.LayerGradCam:
        _same(both, CaptumLayerGradCam(model, model.pair).attribute(**kw))
    assert _state(model) == before


# ------------------------------------------------- JIT and DataParallel
#: Captum's ``JITCompareMode`` (tests/attr/test_jit.py)
JIT_MODES = [
    "cpu_jit_trace",
    "cpu_jit_script",
    "data_parallel_jit_trace",
    "data_parallel_jit_script",
]
#: Captum's ``DataParallelCompareMode`` (tests/attr/test_data_parallel.py)
DP_MODES = ["cpu_cuda", "data_parallel_default", "data_parallel_alt_dev_ids"]
NO_CUDA = "Captum runs this mode on CUDA only (it needs a GPU: no CUDA here)"
#: the configs the JIT and DataParallel checks run on (a pooled layer, 1-D,
#: 2-D and 3-D CNNs, a ViT: every layout rule once)
PARALLEL_ON = ("captum_basic_linear", "conv1d", "conv3d", "project_cnn", "project_vit")


def _same_draws(cls: type, x: torch.Tensor) -> Dict[str, Any]:
    """Options making two calls draw the same random numbers."""
    if cls is A.LayerSmoothGradCamPlusPlus:
        return {"noise": torch.randn(2, *x.shape, generator=torch.Generator())}
    if cls in GENERATOR_CAMS - {A.DeepFeatureFactorization}:
        return {"generator": torch.Generator().manual_seed(0)}
    return {}


def _on(device: str, value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(_on(device, v) for v in value)
    if isinstance(value, dict):
        return {k: _on(device, v) for k, v in value.items()}
    return value


def _jit(model: nn.Module, x: torch.Tensor, mode: str) -> nn.Module:
    if mode.startswith("data_parallel") and not torch.cuda.is_available():
        pytest.skip(NO_CUDA)
    if mode.startswith("data_parallel"):
        model = model.cuda()
    if mode.endswith("script"):
        return torch.jit.script(model)
    return torch.jit.trace(model, (x.to(next(model.parameters()).device),))


def _submodule(model: nn.Module, name: str) -> nn.Module:
    """``model.get_submodule(name)``, also on a ScriptModule (which lacks it)."""
    for part in name.split("."):
        model = getattr(model, part)
    return model


def _cam_on(
    cls: type,
    forward_func: Any,
    layer: nn.Module,
    eager: nn.Module,
    cfg: Dict[str, Any],
    device_ids: Optional[List[int]] = None,
):
    """``cls`` on ``forward_func`` with ``eager``'s classifier where the class
    needs one (CAM, DFF), so wrapped and compiled models get the same."""
    kw: Dict[str, Any] = {**INIT.get(cls, {}), "device_ids": device_ids}
    if cls is A.LayerClassActivationMap:
        kw["fc"] = eager.get_submodule(cfg["fc"])
    if cls is A.DeepFeatureFactorization:
        kw["classifier"] = eager.get_submodule(cfg["fc"])
    return cls(forward_func, layer, **kw)


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit is deprecated
@pytest.mark.filterwarnings("ignore:The .grad attribute:UserWarning")  # tracing
@pytest.mark.parametrize("mode", JIT_MODES)
@pytest.mark.parametrize("cls", LAYER_CAMS, ids=lambda c: c.__name__)
def test_jit(cls, mode):
    """Captum's ``test_jit.py`` runs only non-layer methods on JIT models
    (its ``JIT_SUPPORTED`` list: IntegratedGradients, FeatureAblation,
    Saliency, ...): a layer method reads the layer with a Python hook, and the
    compiled forward of a traced or scripted model calls its submodules
    without hooks. So Captum tests no layer method on a JIT model, and the
    same holds here. What is checked instead, in Captum's modes (the
    ``data_parallel_jit_*`` modes on CUDA only, as in Captum):

    * a layer inside the compiled model is refused with an ``AssertionError``
      (Captum's ``LayerGradCam`` raises one too) whose message names the fix,
      and no hook is left;
    * with everything after the layer compiled (an eager layer followed by a
      traced / scripted head, one ``forward_func``), the map equals the eager
      model's.
    """
    cfg = next(c for c in CONFIG if c["name"] == "project_cnn")
    model = copy.deepcopy(cfg["model"])
    x = cfg["attribute_args"]["inputs"][:2]
    jit_model = _jit(copy.deepcopy(model), x, mode)
    device = next(jit_model.parameters()).device
    model, x = model.to(device), x.to(device)
    args = {"inputs": x, "target": [0, 2]}
    inner = _submodule(jit_model, cfg["layer"])
    before = _state(jit_model)
    # Captum: AssertionError (traced: the hook never runs) or RuntimeError
    # (scripted: the hook is refused); here one error that is both
    with pytest.raises((AssertionError, RuntimeError)):
        CaptumLayerGradCam(jit_model, inner).attribute(**args)
    with pytest.raises(A.CompiledLayerError, match="TorchScript.*eager model") as err:
        _attribute(_cam_on(cls, jit_model, inner, model, cfg), cls, **args)
    assert isinstance(err.value, AssertionError) and isinstance(err.value, RuntimeError)
    assert _state(jit_model) == before

    head = nn.Sequential(model.pool, nn.Flatten(), model.fc)
    features = model.features(x)
    mixed = nn.Sequential(model.features, _jit(head, features, mode)).eval()
    layer = model.get_submodule(cfg["layer"])
    args.update(_on(device, _same_draws(cls, x)))
    eager = _attribute(_cam_on(cls, model, layer, model, cfg), cls, **args)
    args.update(_on(device, _same_draws(cls, x)))
    compiled = _attribute(_cam_on(cls, mixed, layer, model, cfg), cls, **args)
    _close(compiled, eager, 1e-4)


DP_CASES = [
    pytest.param(cls, cfg, mode, id=f"{cfg['name']}-{mode}-{cls.__name__}")
    for cfg in CONFIG
    if cfg["name"] in PARALLEL_ON
    for mode in DP_MODES
    for cls in LAYER_CAMS
    if _applies(cls, cfg)
]


@pytest.mark.parametrize("cls,cfg,mode", DP_CASES)
def test_data_parallel(cls, cfg, mode, monkeypatch):
    """Captum's ``test_data_parallel.py`` modes over the layer CAMs: the same
    maps on the CPU and on CUDA (``cpu_cuda``), with the model wrapped in
    ``nn.DataParallel`` (``data_parallel_default``; the layer taken from the
    wrapped model, as Captum), and with ``forward_func=dp.forward`` and the
    CAM's ``device_ids`` (``data_parallel_alt_dev_ids``, the device order
    ``[0, n-1, ..., 1]``). Captum runs all three on CUDA only. Here
    ``data_parallel_default`` also runs on the CPU, where ``DataParallel``
    without a GPU calls the wrapped model directly: it checks that every CAM
    sees through the wrapper (layout, classifier, prefix caching, eval
    mode). ``cpu_cuda`` and ``data_parallel_alt_dev_ids`` need a GPU
    (``device_ids`` name CUDA devices) and are skipped without one."""
    cuda = torch.cuda.is_available()
    if mode != "data_parallel_default" and not cuda:
        pytest.skip(NO_CUDA)
    device = "cuda" if cuda else "cpu"
    # full float32 convolutions on the GPU too (cuDNN uses TF32 by default;
    # torch's float32 matrix products do not)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    model = copy.deepcopy(cfg["model"]).to("cpu" if mode == "cpu_cuda" else device)
    layer = model.get_submodule(cfg["layer"])
    if mode == "cpu_cuda":
        model_2 = copy.deepcopy(model).to(device)
        method_2 = _cam_on(
            cls, model_2, model_2.get_submodule(cfg["layer"]), model_2, cfg
        )
    elif mode == "data_parallel_default":
        method_2 = _cam_on(cls, nn.DataParallel(model), layer, model, cfg)
    else:
        ids = [0] + list(range(torch.cuda.device_count() - 1, 0, -1))
        dp = nn.DataParallel(model, device_ids=ids)
        method_2 = _cam_on(cls, dp.forward, layer, model, cfg, device_ids=ids)
    method_1 = _cam_on(cls, model, layer, model, cfg)
    x = cfg["attribute_args"]["inputs"]
    args_1 = _on(str(next(model.parameters()).device), cfg["attribute_args"])
    args_2 = _on(device, cfg["attribute_args"])
    # the same random draws in both calls (CPU generators: device-independent)
    ours_1 = _attribute(method_1, cls, **args_1, **_on(device, _same_draws(cls, x)))
    ours_2 = _attribute(method_2, cls, **args_2, **_on(device, _same_draws(cls, x)))
    assert ours_2.device == args_2["inputs"].device
    _close(ours_2.cpu(), ours_1.cpu(), 1e-4 if device == "cpu" else 1e-3)


@pytest.mark.parametrize("cls", LAYER_CAMS, ids=lambda c: c.__name__)
def test_constructor_takes_captums_layer_arguments(cls):
    """``(forward_func, layer, device_ids=None)`` first, as Captum's layer
    methods (``device_ids`` is what ``data_parallel_alt_dev_ids`` passes)."""
    import inspect

    params = list(inspect.signature(cls.__init__).parameters.values())[1:4]
    assert [p.name for p in params] == ["forward_func", "layer", "device_ids"]
    assert params[2].default is None
