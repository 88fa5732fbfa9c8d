"""A user's own models in the main job's tables: ``--models timm:NAME=PATH`` (a
timm architecture with a local checkpoint file) and ``--models hf:PATH`` (a
Hugging Face folder written here with ``save_pretrained``), through the whole
main job to the family table; their bad paths as one-line errors."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import benchmarks.run as R
from benchmarks.evaluation import local
from tests.test_main_job import _args

transformers = pytest.importorskip("transformers")


def _timm_file(folder: Path) -> tuple:
    import timm

    torch.manual_seed(0)
    source = timm.create_model("test_vit", pretrained=False).eval()
    path = folder / "my_test_vit.pth"
    torch.save(source.state_dict(), path)
    return source, path


def _hf_folder(folder: Path, classifier: bool = True) -> tuple:
    from transformers import (
        ViTConfig,
        ViTForImageClassification,
        ViTImageProcessor,
        ViTModel,
    )

    config = ViTConfig(
        image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
        num_attention_heads=2, intermediate_size=64, num_labels=1000,
    )  # fmt: skip
    torch.manual_seed(1)
    model = (ViTForImageClassification if classifier else ViTModel)(config).eval()
    model.save_pretrained(folder)
    proc = ViTImageProcessor(size={"height": 32, "width": 32}, resample=3)
    proc.save_pretrained(folder)
    return model, proc


def test_local_timm_and_hf_models_join_the_family_tables(tmp_path, capsys):
    source, path = _timm_file(tmp_path)
    hf_dir = tmp_path / "my-hf-vit"
    hf_model, _ = _hf_folder(hf_dir)
    timm_word = f"timm:test_vit={path},label=my_vit,family=vit_s,training=supervised"
    hf_word = f"hf:{hf_dir},label=my_hf,family=vit_s,training=self-supervised"
    # the specs load the files themselves, not random weights
    t, h = local.spec(timm_word), local.spec(hf_word)
    assert (t.name, t.family, t.cam_layer, t.attention_layers, t.lrp) == (
        "my_vit", "vit_s", "blocks.-1.norm1", "blocks.*.attn", ""
    )  # fmt: skip
    assert t.preprocessing.crop == 160 and t.preprocessing.mean == (0.5,) * 3
    assert (h.preprocessing.crop, h.preprocessing.interpolation) == (32, "bicubic")
    # the family adapter's answers: CAM layer, attention layers, layout, LRP
    assert (h.cam_layer, h.attention_layers, h.lrp) == (
        "vit.layers.-1.layernorm_before", "vit.layers.*.attention", ""
    )  # fmt: skip
    assert h.cam_layout == {"grid": (4, 4), "num_prefix_tokens": 1}
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():  # the Hugging Face model itself, not a wrapper
        built = h.build()
        assert type(built) is type(hf_model)
        assert torch.equal(built(x).logits, hf_model(pixel_values=x).logits)
        y = torch.randn(1, 3, 160, 160)
        assert torch.equal(t.build()(y), source(y))

    out = tmp_path / "out"
    argv = _args(out, "--threads", "1")
    i = argv.index("efficientnet_lite0")
    argv[i : i + 1] = [timm_word, hf_word]
    vit_methods = ["raw_attention", "generic_attention", "attnlrp"]
    i = argv.index("--methods") + 1
    argv[i : i + 1] = ["gradcam", *vit_methods]
    assert R.main(argv) == 0
    text = capsys.readouterr().out
    assert "my_vit (test_vit (timm), supervised)" in text
    assert "my_hf (ViTForImageClassification (Hugging Face), self-supervised)" in text
    # the family table pairs them; the ViT methods ran on both models
    assert "\nViT-S:\n" in text and "my_hf - my_vit  gradcam" in text
    assert "skip my_hf" not in text, text
    tabs = json.loads((out / "accuracy.json").read_text())
    rows: dict = {}
    for r in tabs["per_model"]:
        rows.setdefault((r["model"], r["method"]), []).append(r)
    for model in ("my_vit", "my_hf"):
        for method in ("gradcam", *vit_methods):  # every metric: finite values
            for r in rows[(model, method)]:
                assert r["n"] == 2 and r["nonfinite"] == 0, r
                assert math.isfinite(r["mean"]), r
    (cmp,) = {
        (r["family"], r["supervised"], r["self_supervised"]) for r in tabs["comparison"]
    }
    assert cmp == ("ViT-S", "my_vit", "my_hf")


BAD = [
    ("timm:test_vit={tmp}/nothing.pth", ["no such checkpoint file"]),
    ("timm:test_vit={tmp}", ["is a folder", "hf:PATH"]),
    ("timm:vit_smol_patch16={tmp}/a.pth", ["not a timm model name"]),
    ("timm:test_vit", ["timm:NAME=PATH"]),
    ("timm:test_vit={tmp}/a.pth,target=norm", ["headless backbone", "target="]),
    ("timm:test_vit={tmp}/a.pth,target=cls", ["target=view", "target=norm"]),
    ("timm:test_vit={tmp}/a.pth,family=vit_s", ["training=supervised"]),
    ("timm:test_vit={tmp}/a.pth,colour=red", ["unknown option", "family"]),
    ("hf:{tmp}/no-such-folder", ["no such folder", "save_pretrained"]),
    ("hf:{tmp}/a.pth", ["a file", "model folder"]),
    ("hf:{tmp}", ["no config.json", "save_pretrained"]),
    ("hf:{tmp}/text", ["BertModel", "neither an image classifier", "Dinov2Model"]),
]


def test_two_models_of_one_name_are_refused(tmp_path, capsys):
    (tmp_path / "a.pth").write_bytes(b"x")
    words = [f"timm:test_vit={tmp_path}/a.pth,label=res_50", "res_50"]
    assert R.main(["--models", *words, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "two models named res_50" in err
    assert "label=NAME" in err


@pytest.mark.parametrize("word, words", BAD, ids=[b[0][:30] for b in BAD])
def test_bad_local_model_one_line(word, words, tmp_path, capsys):
    (tmp_path / "a.pth").write_bytes(b"x")
    if "/text" in word:
        _refused_hf("text", tmp_path / "text")
    word = word.format(tmp=tmp_path)
    capsys.readouterr()  # save_pretrained's progress bar is not the job's
    assert R.main(["--models", word, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"python -m benchmarks.run: error: --models {word}: ")
    for w in words:
        assert w in err, (w, err)
    assert not (tmp_path / "out").exists()


def _tiny_hf(kind: str, folder: Path) -> None:
    import transformers as T

    vit = dict(
        image_size=28, patch_size=14, hidden_size=32, num_hidden_layers=1,
        num_attention_heads=2, intermediate_size=32, num_labels=1000,
    )  # fmt: skip
    if kind == "convnext":
        config = T.ConvNextConfig(num_labels=1000, hidden_sizes=[8] * 4, depths=[1] * 4)
        T.ConvNextForImageClassification(config).save_pretrained(folder)
        T.ConvNextImageProcessor(size={"shortest_edge": 64}).save_pretrained(folder)
        return
    config_cls, model_cls = {
        "dinov2": (T.Dinov2Config, T.Dinov2ForImageClassification),
        "dinov2_with_registers": (
            T.Dinov2WithRegistersConfig,
            T.Dinov2WithRegistersForImageClassification,
        ),
        "deit": (T.DeiTConfig, T.DeiTForImageClassification),
    }[kind]
    model_cls(config_cls(**vit)).save_pretrained(folder)
    T.BitImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 28, "width": 28},
        do_center_crop=True, resample=3,
    ).save_pretrained(folder)  # fmt: skip


@pytest.mark.parametrize(
    "kind, prefix, grid",
    [("dinov2", 1, 2), ("dinov2_with_registers", 5, 2), ("deit", 2, 2),
     ("convnext", None, 2)],
)  # fmt: skip
def test_hf_layers_layout_and_preprocessing_are_found(kind, prefix, grid, tmp_path):
    from benchmarks.evaluation import methods as M

    _tiny_hf(kind, tmp_path / kind)
    s = local.spec(f"hf:{tmp_path / kind}")
    if prefix is None:  # ConvNeXt: (B, C, H, W) stage; shorter side / crop_pct
        assert s.cam_layout == {}
        assert (s.preprocessing.resize, s.preprocessing.crop) == (73, 64)
    else:
        assert s.cam_layout == {"grid": (grid, grid), "num_prefix_tokens": prefix}
        assert (s.preprocessing.resize, s.preprocessing.crop) == (32, 28)
        assert s.preprocessing.interpolation == "bicubic"
    size = s.preprocessing.crop
    model, x, t = s.build(), torch.randn(2, 3, size, size), torch.tensor([1, 2])
    vit = ["raw_attention", "generic_attention", "attnlrp"]
    for method in ["gradcam"] + (vit if prefix is not None else []):
        assert M.applies(method, s) is None, method
        maps = M.build_method(method, {}, model, s)(x, t)
        assert maps.shape == (2, 1, grid, grid), method
        assert torch.isfinite(maps).all(), method
    if prefix is None:  # a CNN: no attention layers, the ViT methods skipped
        assert s.attention_layers == "" and M.applies("attnlrp", s)
        assert M.applies("raw_attention", s)


# ------------------------------------------------------ headless backbones


def _refused_hf(kind: str, folder: Path) -> None:
    """A text model (neither a classifier nor a backbone the job explains),
    or a ViT-MAE backbone saved as Hugging Face saves it (mask_ratio 0.75)."""
    import transformers as T

    small = dict(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32,
    )  # fmt: skip
    if kind == "text":
        T.BertModel(T.BertConfig(vocab_size=50, **small)).save_pretrained(folder)
    else:
        config = T.ViTMAEConfig(image_size=28, patch_size=14, **small)
        T.ViTMAEModel(config).save_pretrained(folder)
    T.ViTImageProcessor(size={"height": 28, "width": 28}).save_pretrained(folder)


def test_vit_mae_folder_is_explained_with_every_patch(tmp_path):
    """A saved ViT-MAE (mask_ratio 0.75: patches dropped at random) is built
    with mask_ratio 0, its documented feature-extraction setting, which the
    tables' label states; its maps are then deterministic."""
    from captum_ssl.attr import LayerGradCam, RawAttention
    from captum_ssl.models import get_layer

    _refused_hf("mae", tmp_path / "mae")
    spec = local.spec(f"hf:{tmp_path / 'mae'}")
    assert "mask_ratio=0 (all patches)" in spec.architecture
    model = spec.build()
    assert model.backbone.config.mask_ratio == 0.0
    x = torch.randn(2, 3, 28, 28)
    target = torch.arange(2)
    model.set_references(torch.randn(2, model.references.shape[1]))
    layer = get_layer(model, spec.cam_layer)
    for explainer in (RawAttention(model), LayerGradCam(model, layer)):
        first = explainer.attribute(x, target=target)
        torch.testing.assert_close(explainer.attribute(x, target=target), first)
        assert torch.isfinite(first).all()


def _backbones(folder: Path) -> dict:
    """A headless timm checkpoint (``num_classes=0``: no head weights), Hugging
    Face ``Dinov2Model`` and ``ViTModel`` folders; name -> (path, model)."""
    import timm
    import transformers as T

    torch.manual_seed(2)
    vit = timm.create_model("test_vit", num_classes=0).eval()
    torch.save(vit.state_dict(), folder / "headless.pth")
    small = dict(
        image_size=28, patch_size=14, hidden_size=32, num_hidden_layers=2,
        num_attention_heads=2, intermediate_size=32,
    )  # fmt: skip
    out = {"timm": (folder / "headless.pth", vit)}
    for kind, model in (
        ("dinov2", T.Dinov2Model(T.Dinov2Config(**small))),
        ("vit", T.ViTModel(T.ViTConfig(**small))),
    ):
        model.eval().save_pretrained(folder / kind)
        T.BitImageProcessor(
            size={"shortest_edge": 32}, crop_size={"height": 28, "width": 28},
            do_center_crop=True, resample=3,
        ).save_pretrained(folder / kind)  # fmt: skip
        out[kind] = (folder / kind, model)
    return out


def test_headless_backbones_join_the_family_tables(tmp_path, capsys):
    folders = _backbones(tmp_path)
    words = [
        f"timm:test_vit={folders['timm'][0]},label=bb_timm,family=vit_s,"
        "training=supervised",
        f"hf:{folders['dinov2'][0]},label=bb_dino,family=vit_s,"
        "training=self-supervised",
        f"hf:{folders['vit'][0]},label=bb_vit,target=norm,family=vit_s,"
        "training=self-supervised",
    ]
    specs = [local.spec(w) for w in words]
    assert [s.target for s in specs] == ["view", "view", "norm"]
    assert [s.cam_layer for s in specs] == [
        "backbone.blocks.-1.norm1",
        "backbone.encoder.layer.-1.norm1",
        "backbone.layers.-1.layernorm_before",
    ]
    # the checkpoint without head weights is loaded strictly, as it was saved
    model = specs[0].build()
    assert type(model).__name__ == "EmbeddingSimilarity"
    source = folders["timm"][1]
    for k, v in source.state_dict().items():
        assert torch.equal(model.backbone.state_dict()[k], v), k

    out = tmp_path / "out"
    argv = _args(out, "--threads", "1", "--no-figures")
    i = argv.index("efficientnet_lite0")
    argv[i : i + 1] = words
    methods = ["gradcam", "raw_attention", "generic_attention", "attnlrp", "legrad"]
    i = argv.index("--methods") + 1
    argv[i : i + 1] = methods
    argv[argv.index("--metrics") + 1 : argv.index("--batch-size")] = [
        "average_drop", "deletion_auc:step=196", "accuracy",
    ]  # fmt: skip
    assert R.main(argv) == 0
    text = capsys.readouterr().out
    assert "bb_dino (Dinov2Model (Hugging Face), headless: cosine similarity" in text
    assert "bb_vit (ViTModel (Hugging Face), headless: embedding norm" in text
    # what needs class scores is skipped; LRP and LeGrad explain the score
    for name in ("bb_timm", "bb_dino", "bb_vit"):
        assert f"skip {name} / attnlrp" not in text, text
        assert f"skip {name} / legrad" not in text, text
        assert f"skip {name} / accuracy: top-1 accuracy needs class scores" in text
    tabs = json.loads((out / "accuracy.json").read_text())
    rows: dict = {}
    for r in tabs["per_model"]:
        rows.setdefault((r["model"], r["method"]), []).append(r)
    for name in ("bb_timm", "bb_dino", "bb_vit"):
        for method in methods:
            got = {r["metric"] for r in rows[(name, method)]}
            assert got == {"average_drop", "deletion_auc:step=196"}
            for r in rows[(name, method)]:
                assert r["n"] == 2 and r["nonfinite"] == 0, r
                assert math.isfinite(r["mean"]), r
    images = {r["model"]: r for r in tabs["images"]}
    for name in ("bb_timm", "bb_dino"):  # no class predicted, no top-1
        assert images[name]["labelled"] == 0
        assert -1 <= images[name]["probability"] <= 1  # a cosine similarity
    pairs = {(r["supervised"], r["self_supervised"]) for r in tabs["comparison"]}
    assert pairs == {("bb_timm", "bb_dino"), ("bb_timm", "bb_vit")}
    with open(out / "accuracy_per_image.csv", newline="") as f:
        per_image = list(csv.DictReader(f))
    assert per_image and all(r["predicted"] == "" for r in per_image)


def test_backbone_target_is_the_flipped_views_embedding(tmp_path):
    from benchmarks.evaluation import figures
    from benchmarks.evaluation import pipeline as P
    from benchmarks.evaluation.report import _overlays
    from benchmarks.evaluation.store import ResultStore
    from captum_ssl.attr import LayerGradCam, TokenLayout
    from captum_ssl.models import EmbeddingSimilarity, reference_embeddings
    from captum_ssl.viz import as_map
    from tests.test_evaluation import config

    folder, _ = _backbones(tmp_path)["dinov2"]
    spec = local.spec(f"hf:{folder},label=bb_dino")
    cfg = config(tmp_path / "out", [spec], ("gradcam",), ["average_drop"], limit=2)
    plan, _ = P.evaluate(cfg)
    # by hand: the backbone as saved, its embedding of the flipped images
    backbone = transformers.Dinov2Model.from_pretrained(folder).eval()
    names = plan.source.names
    (batch,) = plan.source.batches(spec.preprocessing, names, 2)
    x = batch.images
    refs = reference_embeddings(backbone, x.flip(-1))
    model = EmbeddingSimilarity(backbone, refs)
    with torch.no_grad():
        sims = model(x)
    target = torch.arange(2)
    cam = LayerGradCam(
        model, backbone.encoder.layer[-1].norm1,
        layout=TokenLayout(grid=(2, 2), num_prefix_tokens=1),
    )  # fmt: skip
    maps = cam.attribute(x, target=target, relu_attributions=True)  # the default
    expected = as_map(maps)[:, 0].detach().numpy()
    with ResultStore(tmp_path / "out" / P.DB_NAME) as store:
        score = {
            r["image"]: r["value"] for r in store.results([plan.model_keys["bb_dino"]])
        }
        stored = {
            r["image"]: r["map"]
            for r in store.maps([plan.native_keys["bb_dino", "gradcam"]])
        }
        sections = figures.stored_overlays(store, plan)
    for i, name in enumerate(batch.names):
        assert score[name] == pytest.approx(float(sims[i, i]), abs=1e-5)
        tol = 2e-3 * float(abs(expected).max())  # maps are stored as float16
        np.testing.assert_allclose(stored[name], expected[i], atol=tol)
    assert abs(float(sims[0, 0]) - 1) > 1e-4  # not the image's own embedding
    # the caption is the similarity, never a class; the note says why
    (section,) = sections
    assert [r.prediction for r in section.rows] == [
        f"sim. to flipped view: {score[n]:.2f}" for n in batch.names
    ]
    html = _overlays(section, "jet")
    assert "headless backbone, explained by its cosine similarity" in html
    assert "pred:" not in html and 'class="wrong"' not in html


def test_headless_timm_architecture_is_a_backbone(tmp_path):
    (tmp_path / "a.pth").write_bytes(b"x")  # its config has no classifier
    m = local.check(f"timm:vit_small_patch14_dinov2={tmp_path}/a.pth")
    assert m.headless
    assert not local.check(f"timm:test_vit={tmp_path}/a.pth").headless


def test_explain_shows_a_backbones_similarity_not_classes(tmp_path, capsys):
    from PIL import Image

    from captum_ssl.data import bundled_photos

    folder, _ = _backbones(tmp_path)["dinov2"]
    photo = bundled_photos(None, n=1)
    path = tmp_path / "photo.jpg"
    pixels = (photo.raw[0].permute(1, 2, 0).numpy() * 255).astype("uint8")
    Image.fromarray(pixels).save(path)
    args = ["--explain", str(path), "--models", f"hf:{folder},label=bb_dino"]
    args += ["--methods", "gradcam", "legrad", "--out", str(tmp_path), "--no-figures"]
    capsys.readouterr()
    assert R.main(args) == 0
    out = capsys.readouterr().out
    assert "photo.jpg / bb_dino: cosine similarity to its flipped view 0." in out
    assert "top-5" not in out
    page = (tmp_path / "explain" / "photo.html").read_text()
    assert 'alt="gradcam on bb_dino"' in page and 'alt="legrad on bb_dino"' in page
    assert "sim. to flipped view: 0." in page and "pred:" not in page


def test_average_pooled_timm_model_skips_only_the_class_row_methods(tmp_path):
    """timm EVA02's default head averages the patch tokens: the class token's
    row explains nothing (attention methods, TransformerAttribution,
    PartialLRP are skipped with the reason), AttnLRP and TransformerLRP
    propagate through the average and run, as LeGrad does."""
    import timm

    from benchmarks.evaluation import methods as M

    torch.manual_seed(0)
    model = timm.create_model("eva02_tiny_patch14_224", pretrained=False)
    assert model.global_pool == "avg"
    path = tmp_path / "eva.pth"
    torch.save(model.state_dict(), path)
    spec = local.spec(f"timm:eva02_tiny_patch14_224={path}")
    assert spec.lrp == "" and "global_pool='avg'" in spec.class_row
    for name in ("raw_attention", "rollout", "transformer_attribution", "partial_lrp"):
        assert "the class token's row" in M.applies(name, spec), name
    for name in ("attnlrp", "cp_lrp", "transformer_lrp", "legrad", "gradcam"):
        assert M.applies(name, spec) is None, name
