"""Models, attribution methods and metrics of the evaluation, by name.

A method or metric is named on the command line as ``name`` or
``name:option=value,option=value`` (values are Python literals), e.g.
``rollout:discard_ratio=0.9`` or ``deletion_auc:step=448``. Captum's gradient
methods take a NoiseTunnel variant as a suffix: ``saliency+smoothgrad``,
``integrated_gradients+vargrad:nt_samples=16``. The options, with their
defaults filled in, are part of each result's config key, except the speed
options (:data:`SPEED_OPTIONS`: chunk and batch sizes, progress bars), which
never change a value and so are left out of labels and keys.
"""

from __future__ import annotations

import ast
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

# ----------------------------------------------------------------- parsing


def parse_spec(text: str) -> Tuple[str, Dict[str, Any]]:
    """``"name:a=1,b='x'"`` -> ``("name", {"a": 1, "b": "x"})``; ``true`` /
    ``false`` in any case are booleans."""
    name, _, rest = text.partition(":")
    opts: Dict[str, Any] = {}
    if rest:
        for part in rest.split(","):
            if "=" not in part:
                raise ValueError(
                    f"{text!r}: options are written name:option=value,option=value"
                )
            k, v = part.split("=", 1)
            if v.strip().lower() in ("true", "false"):  # any case, as a shell user
                opts[k.strip()] = v.strip().lower() == "true"
                continue
            try:
                opts[k.strip()] = ast.literal_eval(v.strip())
            except (ValueError, SyntaxError):
                opts[k.strip()] = v.strip()
    return name.strip(), opts


#: options that change speed or memory only, never a value
SPEED_OPTIONS = (
    "perturbations_per_eval",
    "show_progress",
    "internal_batch_size",
    "nt_samples_batch_size",
    "batch_size",
)


def identity(opts: Dict[str, Any]) -> Dict[str, Any]:
    """The options that identify a method or metric (no speed options)."""
    return {k: v for k, v in opts.items() if k not in SPEED_OPTIONS}


def spec_label(name: str, opts: Dict[str, Any], defaults: Dict[str, Any]) -> str:
    """Display name: the name plus the options that differ from the defaults
    (speed options left out)."""
    changed = {
        k: v for k, v in identity(opts).items() if defaults.get(k, object()) != v
    }
    if not changed:
        return name
    return name + ":" + ",".join(f"{k}={v}" for k, v in sorted(changed.items()))


# ------------------------------------------------------------------ models


@dataclass
class ModelSpec:
    r"""A model to evaluate, with what the pipeline needs to know about it.

    Args:
        name (str): display / registry name.
        build (callable): ``() -> nn.Module`` in eval mode.
        architecture (str): architecture family (supervised and self-supervised
                    models of one family are compared).
        training (str): ``"supervised"`` or ``"self-supervised"``.
        weights (str): ``"pretrained"`` or ``"random"``; random-weight models
                    only ever appear in timing tables.
        cam_layer (str): dotted path of the CAM layer.
        attention_layers (str): dotted pattern of attention modules ("" if none).
        cam_layout (dict): ``TokenLayout`` keyword arguments for the CAM layer.
        preprocessing (Any): the image preprocessing (a registry
                    ``Preprocessing``), passed to the data loaders.
        fingerprint (dict): what identifies the weights (files, sizes).
        family (str): the family whose supervised and self-supervised models
                    the tables pair (``"vit_s"``, ...); "" pairs by
                    ``architecture``.
        lrp (str): why the LRP methods do not apply to this model ("" when
                    they may: a ViT whose family adapter has LRP rules, as
                    ``lrp_adapter`` in ``captum_ssl/attr/_families`` says).
        class_row (str): why the methods that return the class token's row
                    (the attention methods except LeGrad, TransformerAttribution,
                    PartialLRP) do not apply: the head never reads the class
                    token (e.g. timm ``global_pool='avg'``); "" when they do.
        target (str): "" for a classifier (class scores); for a headless
                    backbone (``build`` returns it wrapped, see
                    :data:`BACKBONE_TARGETS`) ``"view"``: the cosine
                    similarity of each image's embedding to its horizontally
                    flipped view's (``EmbeddingSimilarity``), ``"norm"``: the
                    embedding's L2 norm (``EmbeddingNorm``).
    """

    name: str
    build: Callable[[], nn.Module]
    architecture: str
    training: str
    weights: str
    cam_layer: str
    attention_layers: str = ""
    cam_layout: Dict[str, Any] = field(default_factory=dict)
    preprocessing: Any = None
    fingerprint: Dict[str, Any] = field(default_factory=dict)
    family: str = ""
    lrp: str = ""
    target: str = ""
    class_row: str = ""

    @property
    def is_vit(self) -> bool:
        return bool(self.attention_layers)

    @property
    def is_cnn(self) -> bool:
        return not self.attention_layers and not self.cam_layout

    def key_spec(self) -> Dict[str, Any]:
        p = self.preprocessing
        pre = None if p is None else p.as_dict()
        return dict(
            name=self.name,
            weights=self.weights,
            cam_layer=self.cam_layer,
            attention_layers=self.attention_layers,
            cam_layout=self.cam_layout,
            preprocessing=pre,
            fingerprint=self.fingerprint,
            **({"target": self.target} if self.target else {}),
        )


#: what a headless backbone's score is (``ModelSpec.target``), as the
#: captions, logs and docs say it
BACKBONE_TARGETS = {
    "view": "cosine similarity to its flipped view",
    "norm": "embedding norm",
}


def backbone_caption(target: str, value: float) -> str:
    """The caption under an image explained by a backbone's score (where a
    classifier's shows its predicted class)."""
    short = {"view": "sim. to flipped view", "norm": "embedding norm"}
    return f"{short[target]}: {value:.2f}"


def backbone_model(backbone: nn.Module, target: str, side: int) -> nn.Module:
    """A headless ``backbone`` wrapped so that its output is the score of
    ``target`` (:data:`BACKBONE_TARGETS`): ``EmbeddingNorm``, or an
    ``EmbeddingSimilarity`` whose references :func:`backbone_targets` sets
    for each batch (here a placeholder of the embedding's size, found with
    one forward pass of a ``side`` x ``side`` image)."""
    from captum_ssl.models import EmbeddingNorm, EmbeddingSimilarity
    from captum_ssl.models._targets import _flat

    if target == "norm":
        return EmbeddingNorm(backbone)
    if target != "view":
        raise ValueError(f"target={target}: write target=view or target=norm")
    with torch.no_grad():
        dims = _flat(backbone(torch.zeros(1, 3, side, side))).shape[1]
    return EmbeddingSimilarity(backbone, torch.ones(1, dims))


def backbone_targets(model: nn.Module, spec: ModelSpec, x: Tensor) -> Tensor:
    """The targets of a batch ``x`` for a headless backbone (``spec.target``
    set; ``model`` from :func:`backbone_model`): ``"view"`` sets the
    references to the embeddings of the flipped images (computed once from
    the clean batch, fixed while the metrics perturb it) and returns each
    image's own index; ``"norm"``: 0 for every image."""
    n = x.shape[0]
    if spec.target == "view":
        from captum_ssl.models import reference_embeddings

        model.set_references(  # type: ignore[operator]
            reference_embeddings(model.backbone, x.flip(-1), batch_size=n)  # type: ignore[arg-type]
        )
        return torch.arange(n, device=x.device)
    return torch.zeros(n, dtype=torch.long, device=x.device)


#: methods that read a classifier (its weights, or other classes' scores),
#: which a backbone's similarity or norm does not have
NEEDS_CLASSIFIER = {
    "cam": "CAM weights the feature maps by the classifier's weights",
    "dff": "DFF labels its concepts with the classifier",
    "finercam": "Finer-CAM contrasts the target with similar classes",
}


def metric_options(
    spec: ModelSpec, name: str, opts: Dict[str, Any]
) -> Tuple[Optional[Dict[str, Any]], str]:
    """``(options, "")`` a metric runs with on a model, or ``(None, reason)``
    when it does not apply. A headless backbone's output is its score itself
    (a similarity or norm, one per reference): every metric scores it raw
    (``score="logit"``: no softmax over references, no top-1 among them);
    the ``accuracy`` metric, which is top-1 correctness, does not apply."""
    if not spec.target:
        return opts, ""
    if name == "accuracy":
        return None, (
            "top-1 accuracy needs class scores; a backbone's score is its "
            f"{BACKBONE_TARGETS[spec.target]}"
        )
    return {**opts, "score": "logit"}, ""


def registry_model(name: str, random_weights: bool = False) -> ModelSpec:
    """A registry model: its official weights, or random ones (timing only)."""
    from captum_ssl.models import checkpoint_paths, entry, load

    e = entry(name)
    if random_weights:

        def build() -> nn.Module:
            torch.manual_seed(0)
            return e.build().eval()

        fingerprint: Dict[str, Any] = {"random_seed": 0}
    else:
        paths = checkpoint_paths(name)
        fingerprint = {
            role: [Path(p).name, Path(p).stat().st_size] for role, p in paths.items()
        }

        def build() -> nn.Module:
            return load(name)

    return ModelSpec(
        name=name,
        build=build,
        architecture=e.architecture,
        training=e.training,
        weights="random" if random_weights else "pretrained",
        cam_layer=e.cam_layer,
        attention_layers=e.attention_layers,
        cam_layout=dict(e.cam_layout),
        preprocessing=e.preprocessing,
        fingerprint=fingerprint,
        family=e.family,
    )


def missing_files_message(names: List[str]) -> str:
    """Which files to download, and where, for registry models not present."""
    from captum_ssl.models import describe

    lines = []
    for name in names:
        info = describe(name)
        for f in info["files"]:
            if not f["present"] or f.get("problem"):
                where = Path(f["expected"])
                try:
                    where = where.relative_to(Path.cwd())
                except ValueError:
                    pass
                bad = f" (present, but {f['problem']})" if f.get("problem") else ""
                lines.append(
                    f"  {name}: {f['role']} file {f['filename']}{bad} -> "
                    f"{where}\n      download from {f['source']}"
                )
    if not lines:
        return ""
    return (
        "These models are left out of the accuracy tables (no pretrained weights); "
        "to include them download (see docs/models_table.md):\n" + "\n".join(lines)
    )


# ----------------------------------------------------------------- methods

Explain = Callable[[Tensor, Tensor], Tensor]

CAMS = {
    "gradcam": "LayerGradCam",
    "gradcampp": "LayerGradCamPlusPlus",
    "xgradcam": "LayerXGradCam",
    "hirescam": "LayerHiResCam",
    "gradcam_elementwise": "LayerGradCamElementWise",
    "layercam": "LayerLayerCam",
    "eigencam": "LayerEigenCam",
    "eigengradcam": "LayerEigenGradCam",
    "scorecam": "LayerScoreCam",
    "ablationcam": "LayerAblationCam",
    "cam": "LayerClassActivationMap",
    "fem": "LayerFEM",
    "finercam": "LayerFinerCam",
    "kpcacam": "LayerKPCACam",
    "shapleycam": "LayerShapleyCam",
    "randomcam": "LayerRandomCam",
    "dff": "DeepFeatureFactorization",
    "iscam": "LayerISCam",
    "sscam": "LayerSSCam",
    "smoothgradcampp": "LayerSmoothGradCamPlusPlus",
    "reciprocam": "LayerReciproCam",
}
#: CAMs built differently from one layer: every bias (FullGrad), several
#: layers (RefineCAM), a wrapped CAM on crops (SESS), the image alone (Sobel)
OTHER_CAMS = {
    "fullgrad": "FullGrad",
    "refinecam": "LayerRefineCam",
    "sess": "SESS",
    "sobelcam": "SobelCam",
}
PERTURBATION_CAMS = {"scorecam", "ablationcam", "sess", "iscam", "sscam", "reciprocam"}
ATTENTION = {
    "raw_attention": "RawAttention",
    "rollout": "AttentionRollout",
    "grad_rollout": "GradientAttentionRollout",
    "generic_attention": "GenericAttention",
    "attention_flow": "AttentionFlow",
    "legrad": "LeGrad",
}
#: relevance propagation for ViTs (issue 9)
#: methods whose map is the class token's row (of attention or its relevance)
CLASS_ROW = (
    "raw_attention",
    "rollout",
    "grad_rollout",
    "generic_attention",
    "attention_flow",
    "transformer_attribution",
    "partial_lrp",
)
LRP_METHODS = {
    "transformer_attribution": "TransformerAttribution",
    "partial_lrp": "PartialLRP",
    "transformer_lrp": "TransformerLRP",
    "attnlrp": "AttnLRP",
    "cp_lrp": "AttnLRP",
}
GRADIENT = {
    "saliency": "Saliency",
    "input_x_gradient": "InputXGradient",
    "guided_backprop": "GuidedBackprop",
    "deconvolution": "Deconvolution",
    "integrated_gradients": "IntegratedGradients",
    "guided_gradcam": "GuidedGradCam",
}
NOISE_TUNNELS = ("smoothgrad", "smoothgrad_sq", "vargrad")
#: a quick, representative default set
QUICK_METHODS = ["gradcam", "gradcampp", "eigencam", "saliency"]
#: the thesis's method set
THESIS_METHODS = [
    "gradcam",
    "gradcampp",
    "xgradcam",
    "hirescam",
    "layercam",
    "eigencam",
    "eigengradcam",
    "scorecam",
    "ablationcam",
    "raw_attention",
    "rollout",
    "grad_rollout",
    "generic_attention",
]


#: what one map costs: "gradient" (forward + backward passes), "forward per
#: channel" / "forward per mask" (one forward, or the part after the layer, per
#: channel or per mask), "none" (activations of one forward pass only)
COST_CLASS = {
    "gradcam": "gradient",
    "gradcampp": "gradient",
    "xgradcam": "gradient",
    "hirescam": "gradient",
    "gradcam_elementwise": "gradient",
    "layercam": "gradient",
    "eigencam": "none",
    "eigengradcam": "gradient",
    "scorecam": "forward per channel",
    "ablationcam": "forward per channel",
    "cam": "none",
    "iscam": "forward per channel",
    "sscam": "forward per channel",
    "smoothgradcampp": "gradient",
    "reciprocam": "forward per mask",
    "raw_attention": "none",
    "rollout": "none",
    "grad_rollout": "gradient",
    "generic_attention": "gradient",
    "attention_flow": "none",
    "legrad": "gradient",
    "saliency": "gradient",
    "input_x_gradient": "gradient",
    "guided_backprop": "gradient",
    "deconvolution": "gradient",
    "integrated_gradients": "gradient",
    "guided_gradcam": "gradient",
    "fullgrad": "gradient",
    "fem": "none",
    "finercam": "gradient",
    "kpcacam": "none",
    "shapleycam": "gradient",
    "sess": "forward per mask",
    "refinecam": "gradient",
    "sobelcam": "none",
    "randomcam": "none",
    "dff": "none",
    "transformer_attribution": "gradient",
    "partial_lrp": "gradient",
    "transformer_lrp": "gradient",
    "attnlrp": "gradient",
    "cp_lrp": "gradient",
}


def cost_class(name: str) -> str:
    """The cost class of a method (NoiseTunnel variants: their base's)."""
    return COST_CLASS[name.partition(":")[0].partition("+")[0]]


def method_names() -> List[str]:
    base = (
        list(CAMS)
        + list(OTHER_CAMS)
        + list(ATTENTION)
        + list(LRP_METHODS)
        + list(GRADIENT)
    )
    return base + [f"{g}+{nt}" for g in GRADIENT for nt in NOISE_TUNNELS]


def method_word(text: str) -> str:
    """A ``--methods`` word given by its Python class name (``LayerGradCam``,
    ``AttentionRollout``, ``Saliency+smoothgrad``) written with the short name
    the tables use (``gradcam``, ``rollout``, ``saliency+smoothgrad``)."""
    head, colon, rest = text.partition(":")
    base, plus, nt = head.partition("+")
    by_class: Dict[str, str] = {}
    for table in (CAMS, OTHER_CAMS, ATTENTION, LRP_METHODS, GRADIENT):
        for short, cls in table.items():
            by_class.setdefault(cls, short)
    base = by_class.get(base.strip(), base)
    return base + plus + nt + colon + rest


def method_defaults(name: str) -> Dict[str, Any]:
    """Options of a method with their defaults (part of the config key)."""
    base, _, nt = name.partition("+")
    if base in CAMS:
        # perturbation CAMs: the library's automatic chunk size
        d: Dict[str, Any] = {"relu_attributions": True}
        if base == "dff":
            d["n_components"] = 8
        return d
    if base in OTHER_CAMS:
        if base == "refinecam":
            return {"layers": None, "base": "gradcampp"}
        if base == "sess":
            return {"base": "gradcam", "num_scales": 4, "batch_size": 32}
        return {}
    if base in ATTENTION:
        d = {}
        if base in ("raw_attention", "rollout", "grad_rollout", "attention_flow"):
            d["head_fusion"] = "mean"
        if base == "raw_attention":
            d["power"] = 1.0
        if base in ("rollout", "grad_rollout"):
            d["discard_ratio"] = 0.0
        return d
    if base in LRP_METHODS:
        if base in ("attnlrp", "cp_lrp"):
            return {"cp": base == "cp_lrp", "epsilon": 1e-6, "at": "patches"}
        return {"start_layer": 0} if base == "transformer_attribution" else {}
    if base in GRADIENT:
        # (B, 3, H, W) input maps become (B, 1, H, W) by |.| summed over channels
        d = {"reduce": "abs_sum"}
        if base == "integrated_gradients":
            d.update(n_steps=32, internal_batch_size=64)
        if nt:
            d.update(nt_samples=8, stdevs=0.5, nt_samples_batch_size=8)
        return d
    raise ValueError(f"unknown method {name!r}; known: {', '.join(method_names())}")


def applies(name: str, model: ModelSpec) -> Optional[str]:
    """None if the method applies to the model, else the reason it does not."""
    base = name.partition("+")[0]
    if base in ATTENTION and not model.is_vit:
        return "attention methods need a ViT with class-token attention layers"
    if base in LRP_METHODS and (not model.is_vit or "XCiT" in model.architecture):
        return "LRP rules cover timm ViT / DeiT / CaiT (not XCiT, Swin or CNNs)"
    if base in LRP_METHODS and model.lrp:
        return model.lrp
    if base in CLASS_ROW and model.class_row:
        return (
            f"{model.class_row}, so the class token's row, which this method "
            "returns, explains nothing the head outputs (AttnLRP, "
            "TransformerLRP and LeGrad apply)"
        )
    if base in ("guided_gradcam", "cam") and not model.is_cnn:
        return f"{base} needs a convolutional (B, C, H, W) CAM layer"
    if base in NEEDS_CLASSIFIER and model.target:
        return (
            f"{NEEDS_CLASSIFIER[base]}; this headless backbone is explained by "
            f"its {BACKBONE_TARGETS[model.target]}"
        )
    return None


def build_method(
    name: str, opts: Dict[str, Any], model: nn.Module, spec: ModelSpec
) -> Explain:
    """``explain(x, target) -> (B, 1, h, w)`` maps for a method and a model."""
    import captum.attr as CA

    import captum_ssl.attr as A
    from captum_ssl.models import get_layer

    base, _, nt = name.partition("+")
    if nt and (base not in GRADIENT or nt not in NOISE_TUNNELS):
        raise ValueError(
            f"{name!r}: NoiseTunnel variants ({', '.join(NOISE_TUNNELS)}) apply to "
            f"the gradient methods {', '.join(GRADIENT)}"
        )
    opts = {**method_defaults(name), **opts}
    layout = A.TokenLayout(**spec.cam_layout) if spec.cam_layout else None

    if base in CAMS:
        layer = get_layer(model, spec.cam_layer)
        cam = getattr(A, CAMS[base])(model, layer, layout=layout)
        kw = dict(opts)

        def explain(x: Tensor, t: Tensor) -> Tensor:
            return cam.attribute(x, target=t, **kw)

        return explain

    if base in OTHER_CAMS:
        return _other_cam(base, dict(opts), model, spec, layout)

    if base in ATTENTION:
        kw = dict(opts)
        if base == "raw_attention":
            layers = kw.pop("layers", -1)
            attr = A.RawAttention(model, layers=layers)
        else:
            attr = getattr(A, ATTENTION[base])(model)

        def explain(x: Tensor, t: Tensor) -> Tensor:
            return attr.attribute(x, target=t, **kw)

        return explain

    if base in LRP_METHODS:
        lrp = getattr(A, LRP_METHODS[base])(model)
        lrp_kw = dict(opts)

        def explain(x: Tensor, t: Tensor) -> Tensor:
            return lrp.attribute(x, target=t, **lrp_kw)

        return explain

    kw = dict(opts)
    reduce = kw.pop("reduce")
    nt_keys = ("nt_samples", "stdevs", "nt_samples_batch_size")
    nt_kw = {k: kw.pop(k) for k in nt_keys if k in kw}
    if base == "guided_gradcam":
        attr = CA.GuidedGradCam(model, get_layer(model, spec.cam_layer))
    else:
        attr = getattr(CA, GRADIENT[base])(model)
    if nt:
        tunnel = CA.NoiseTunnel(attr)

        def run(x: Tensor, t: Tensor) -> Tensor:
            return tunnel.attribute(x, nt_type=nt, target=t, **nt_kw, **kw)

    else:

        def run(x: Tensor, t: Tensor) -> Tensor:
            return attr.attribute(x, target=t, **kw)

    def explain(x: Tensor, t: Tensor) -> Tensor:
        maps = run(x.clone().requires_grad_(), t).detach()
        if reduce == "abs_sum":
            return maps.abs().sum(dim=1, keepdim=True)
        if reduce == "sum":
            return maps.sum(dim=1, keepdim=True)
        raise ValueError(f"reduce must be 'abs_sum' or 'sum', got {reduce!r}")

    return explain


def _previous_layer(path: str) -> Optional[str]:
    """The layer one step earlier: the last integer component decreased
    (``blocks.-1.norm1`` -> ``blocks.-2.norm1``), else the last component's
    trailing number (``layer4`` -> ``layer3``); None if there is none."""
    import re

    parts = path.split(".")
    for i in reversed(range(len(parts))):
        if re.fullmatch(r"-?\d+", parts[i]):
            parts[i] = str(int(parts[i]) - 1)
            return ".".join(parts)
    for i in reversed(range(len(parts))):
        m = re.search(r"\d+$", parts[i])
        if m and int(m.group()) > 0:
            parts[i] = parts[i][: m.start()] + str(int(m.group()) - 1)
            return ".".join(parts)
    return None


def _other_cam(
    base: str, kw: Dict[str, Any], model: nn.Module, spec: ModelSpec, layout: Any
) -> Explain:
    import captum_ssl.attr as A
    from captum_ssl.models import get_layer

    if base == "fullgrad":
        attr: Any = A.FullGrad(model)
    elif base == "sobelcam":
        attr = A.SobelCam(model)
    elif base == "refinecam":
        paths = kw.pop("layers") or [
            p for p in (_previous_layer(spec.cam_layer), spec.cam_layer) if p
        ]
        layers = [get_layer(model, p) for p in paths]
        cls = getattr(A, CAMS[kw.pop("base")])
        attr = A.LayerRefineCam(model, layers, layout=layout, base_method=cls)
    else:  # sess
        cls = getattr(A, CAMS[kw.pop("base")])
        attr = A.SESS(cls(model, get_layer(model, spec.cam_layer), layout=layout))

    def explain(x: Tensor, t: Tensor) -> Tensor:
        return attr.attribute(x, target=t, **kw)

    return explain


# ----------------------------------------------------------------- metrics


@dataclass(frozen=True)
class MetricDef:
    fn_name: str
    defaults: Dict[str, Any]
    passes: Callable[[Dict[str, Any], int], int]  # forward passes per image


def _rise_passes(o: Dict[str, Any], hw: int) -> int:
    return -(-hw // int(o["step"])) + 1


#: metrics by their Python name (``captum_ssl.metrics.<name>``); the options
#: given are part of the label where they differ from these defaults
METRICS: Dict[str, MetricDef] = {
    "deletion_auc": MetricDef(
        "deletion_auc", {"step": 224, "substrate": "zero"}, _rise_passes
    ),
    "insertion_auc": MetricDef(
        "insertion_auc", {"step": 224, "substrate": "blur"}, _rise_passes
    ),
    "average_drop": MetricDef("average_drop", {}, lambda o, hw: 2),
    "average_increase": MetricDef("average_increase", {}, lambda o, hw: 2),
    "class_probability": MetricDef("class_probability", {}, lambda o, hw: 1),
    "accuracy": MetricDef("accuracy", {}, lambda o, hw: 1),
    "perturbation_auc": MetricDef(
        "perturbation_auc", {"mode": "positive"}, lambda o, hw: 10
    ),
    "road": MetricDef("road", {"order": "morf"}, lambda o, hw: 10),
}
#: the old command-line spellings (kept for one release, with a note):
#: old name -> (Python name, the options the old name stood for)
METRIC_ALIASES: Dict[str, Tuple[str, Dict[str, Any]]] = {
    "deletion": ("deletion_auc", {}),
    "insertion": ("insertion_auc", {}),
    "masked_probability": ("class_probability", {}),
    "masked_accuracy": ("accuracy", {}),
    "positive_perturbation": ("perturbation_auc", {"mode": "positive"}),
    "negative_perturbation": ("perturbation_auc", {"mode": "negative"}),
    "road_morf": ("road", {"order": "morf"}),
    "road_lerf": ("road", {"order": "lerf"}),
}
_NOTED: set = set()


def metric_word(text: str, note: bool = True) -> str:
    """A ``--metrics`` word with an old spelling replaced by the Python name
    (``deletion:step=448`` -> ``deletion_auc:step=448``, ``road_lerf`` ->
    ``road:order=lerf``); a note on stderr, once per old name and process
    (none with ``note=False``: option checks stay one line)."""
    name, _, rest = text.partition(":")
    if name.strip() not in METRIC_ALIASES:
        return text
    new, fixed = METRIC_ALIASES[name.strip()]
    opts = ",".join(f"{k}={v}" for k, v in fixed.items())
    word = new + (":" if opts or rest else "") + ",".join(o for o in (opts, rest) if o)
    if note and name not in _NOTED:
        _NOTED.add(name)
        import sys

        shown = new + (f":{opts}" if opts else "")
        print(
            f"note: metric {name!r} is now called {shown!r}, as in "
            "captum_ssl.metrics; the old name still works in this release",
            file=sys.stderr,
        )
    return word


def metric_spec(text: str) -> Tuple[str, Dict[str, Any]]:
    """:func:`parse_spec` of a metric word, old spellings resolved."""
    return parse_spec(metric_word(text))


#: the thesis's metrics (its step sizes)
THESIS_METRICS = ["average_drop", "average_increase", "deletion_auc", "insertion_auc"]
#: quick default: coarse deletion/insertion (32 rows of 224 px per step)
QUICK_METRICS = [
    "average_drop",
    "average_increase",
    "deletion_auc:step=7168",
    "insertion_auc:step=7168",
]
#: ``--metrics all``: every metric and direction except ROAD (a sparse solve
#: per image and fraction on the CPU)
ALL_METRICS = [
    "deletion_auc",
    "insertion_auc",
    "average_drop",
    "average_increase",
    "class_probability",
    "accuracy",
    "perturbation_auc:mode=positive",
    "perturbation_auc:mode=negative",
]


def metric_function(name: str) -> Callable:
    import captum_ssl.metrics as M

    if name not in METRICS:
        raise ValueError(f"unknown metric {name!r}; known: {', '.join(METRICS)}")
    return getattr(M, METRICS[name].fn_name)


def metric_direction(name: str, opts: Dict[str, Any]) -> bool:
    """True when higher is better."""
    import captum_ssl.metrics as M

    full = {**METRICS[name].defaults, **opts}
    return M.higher_is_better(metric_function(name), **full)


# --------------------------------------------------------------- versions


def code_version() -> Dict[str, str]:
    """Package version, git commit (if any) and a hash of the sources that
    compute results (``captum_ssl/``, this module and ``pipeline.py``)."""
    import captum_ssl

    root = Path(captum_ssl.__file__).resolve().parent
    h = hashlib.sha256()
    here = Path(__file__).resolve().parent
    files = sorted(root.rglob("*.py")) + [here / "methods.py", here / "pipeline.py"]
    for p in files:
        h.update(f"{p.parent.name}/{p.name}".encode())
        h.update(p.read_bytes())
    commit = ""
    try:
        import subprocess

        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=root.parent,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return dict(
        version=getattr(captum_ssl, "__version__", "0"),
        source_sha256=h.hexdigest()[:16],
        commit=commit,
        torch=torch.__version__,
    )
