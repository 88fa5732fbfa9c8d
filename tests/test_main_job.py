"""The main job as a newcomer meets it (``python -m benchmarks.run``): the
accuracy tables first and printed, the files it writes (per-image CSV,
figures as PNG + SVG), ``--explain``, a readable timing report, threads in
the store keys, reuse on a second run. Real EfficientNet-Lite0 on 2 photos,
one method, coarse metrics."""

from __future__ import annotations

import csv
import re
import warnings
from pathlib import Path

import pytest
from PIL import Image

from benchmarks.evaluation import pipeline as P
from tests.test_evaluation import COARSE, config, tiny_spec


def _args(out, *extra):
    return [
        "--limit", "2", "--models", "efficientnet_lite0", "--methods",
        "gradcam:relu_attributions=False", "--metrics", *COARSE, "--batch-size",
        "2", "--device", "cpu", "--metric-batch-size", "8", "--out", str(out),
        *extra,
    ]  # fmt: skip


class UnreadableImageWarning(UserWarning):
    """Stands in for ``captum_ssl.data.UnreadableImageWarning`` (matched by name)."""


def test_default_run_prints_tables_files_and_reuses(tmp_path, capsys, monkeypatch):
    from benchmarks.run import main

    source_init = P.ImageSource.__init__

    def init(self, *a, **kw):  # a photo that cannot be read, as the loader warns
        warnings.warn(
            "broken.JPEG cannot be read: skipped", UnreadableImageWarning, stacklevel=2
        )
        source_init(self, *a, **kw)

    monkeypatch.setattr(P.ImageSource, "__init__", init)
    # the CLI records the warning and passes it on to `warnings.showwarning`;
    # here that display is swallowed (no warning in the test run's summary)
    # and the record is asserted in the printed output below
    monkeypatch.setattr(warnings, "showwarning", lambda *a, **kw: None)
    assert main(_args(tmp_path, "--saliency", "--threads", "1")) == 0
    out = capsys.readouterr().out
    # --limit alone runs the accuracy pipeline only, never the timing suites
    assert not list(tmp_path.glob("results*.jsonl")) and "timing suites" not in out
    # printed: mean ± CI with direction, the cost table, files, wall time
    label = "gradcam:relu_attributions=False"
    assert re.search(rf"{re.escape(label)}\s+\d\.\d+ ± \d\.\d+", out)
    assert "average_drop ↓" in out and "Cost on cpu" in out
    assert "forward passes" in out and "Wall time:" in out
    listed = out.split("Files written:\n")[1].splitlines()
    files = [Path(x.strip()) for x in listed[: [x[:2] for x in listed].index("Sk")]]
    assert files and all(p.exists() for p in files)
    assert "Skipped 1 unreadable photo(s): broken.JPEG" in out
    md = (tmp_path / "accuracy.md").read_text()
    assert "broken.JPEG cannot be read" in md and "1 CPU threads" in md
    assert "Left out (no pretrained weights)" in out or "res_50" not in out
    # the per-image CSV: one row per model, method, metric and image
    with open(tmp_path / "accuracy_per_image.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * len(COARSE)
    assert {r["metric"] for r in rows} == {"average_drop", COARSE[1]}
    assert all(r["predicted"] and float(r["predicted_probability"]) > 0 for r in rows)
    # figures: PNG + SVG, >= 160 px per map at 150 dpi; saliency folders plain
    fig = tmp_path / "figures" / "efficientnet_lite0_overlays.png"
    assert fig.with_suffix(".svg").is_file()
    with Image.open(fig) as im:
        assert im.size[0] >= 2 * 160 and im.size[1] >= 2 * 160
    assert (tmp_path / "figures" / "bar_average_drop.svg").is_file()
    folders = [p.name for p in (tmp_path / "saliency" / "efficientnet_lite0").iterdir()]
    assert folders == ["gradcam_relu_attributions_False"]
    # the same command again computes nothing and says so
    assert main(_args(tmp_path, "--threads", "1")) == 0
    again = capsys.readouterr().out
    assert "reusing 4 of 4 metric values" in again and "batch 1/" not in again


def test_thread_count_and_device_are_part_of_every_key(tmp_path):
    from benchmarks.evaluation.store import ResultStore

    spec = tiny_spec("tiny", "supervised", 0)
    keys = []
    for threads in (1, 2):
        cfg = config(tmp_path, [spec], threads=threads)
        with ResultStore(tmp_path / P.DB_NAME) as store:
            keys.append(set(P.make_plan(cfg, store).keys()))
    assert keys[0].isdisjoint(keys[1])


def test_explain_writes_one_figure_and_prints_top_classes(tmp_path, capsys):
    from benchmarks.run import main
    from captum_ssl.data import bundled_photos

    photo = bundled_photos(None, n=1)
    path = tmp_path / f"{photo.names[0]}.jpg"
    Image.fromarray((photo.raw[0].permute(1, 2, 0).numpy() * 255).astype("uint8")).save(
        path
    )
    args = ["--explain", str(path), "--models", "efficientnet_lite0"]
    args += ["--methods", "gradcam", "eigencam", "--out", str(tmp_path)]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "top-5 classes" in out
    assert len(re.findall(r"^\s+0\.\d{3}\s+\d+\s+\w", out, re.M)) == 5
    fig = tmp_path / "explain" / f"{path.stem}.png"
    assert fig.is_file() and fig.with_suffix(".svg").is_file()
    with Image.open(fig) as im:  # image + 2 methods, >= 160 px each
        assert im.size[0] >= 3 * 160
    # the same page as the main job's report, for this photo
    page = (tmp_path / "explain" / f"{path.stem}.html").read_text()
    for method in ("gradcam", "eigencam"):
        assert f'alt="{method} on efficientnet_lite0"' in page
    assert "top classes" in page and page.count("<img") == 3
    (tmp_path / "broken.jpg").write_text("not an image")
    with pytest.raises(SystemExit, match="cannot read .*broken.jpg"):
        main(["--explain", str(tmp_path / "broken.jpg"), "--out", str(tmp_path)])


def test_timing_report_reads_without_asv_vocabulary(tmp_path, capsys):
    from benchmarks.run import main

    args = ["--suite", "timing", "--bench", "models", "--filter", "DataThroughput"]
    assert main([*args, "--out", str(tmp_path)]) == 0
    md = (tmp_path / "results.md").read_text()
    assert not re.search(r"\b(track|time|peakmem)_", md), md
    assert "images per second [images/s]" in md and "Measured on" in md
    assert "CPU threads" in md and "Images per second read" in md
    assert "Files written:" in capsys.readouterr().out


def test_help_states_the_real_defaults(capsys):
    from benchmarks.evaluation.cli import QUICK_LIMIT
    from benchmarks.run import main

    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    assert f"default {QUICK_LIMIT};" in " ".join(text.split())
    assert "moco_v3_res_50 \\\n" in text  # the example's line continuation


def test_printed_tables_show_the_family_difference(tmp_path):
    from benchmarks.evaluation import tables as T
    from benchmarks.evaluation.store import ResultStore
    from benchmarks.evaluation.summary import tables_text

    sup = tiny_spec("tiny_sup", "supervised", 0)
    ssl = tiny_spec("tiny_ssl", "self-supervised", 1)
    plan = P.run(config(tmp_path, [sup, ssl], limit=3, metrics=["average_drop"]))
    with ResultStore(tmp_path / P.DB_NAME) as store:
        tabs = T.build_tables(store, plan)
    text = tables_text(tabs)
    (cmp,) = tabs["comparison"]
    assert "Self-supervised vs supervised" in text
    line = next(x for x in text.splitlines() if x.startswith("tiny_ssl - tiny_sup"))
    assert f"{cmp['diff']:.3f} ± {cmp['diff_ci95']:.3f}" in line
    assert "average_drop ↓" in line and cmp["better"] in line.split()[-1]
    assert max(len(x) for x in text.splitlines()) <= 120  # fits a terminal


def test_family_differences_pair_within_each_family(tmp_path):
    import dataclasses

    import numpy as np

    from benchmarks.evaluation import tables as T
    from benchmarks.evaluation.store import ResultStore
    from benchmarks.evaluation.summary import tables_text
    from tests.test_evaluation import stored

    # one architecture, two families: pairing by architecture would cross them
    def spec(name, training, seed, family):
        return dataclasses.replace(tiny_spec(name, training, seed), family=family)

    specs = [
        spec("a_sup", "supervised", 0, "vit_s"),
        spec("b_sup", "supervised", 1, "resnet50"),
        spec("a_ssl", "self-supervised", 2, "vit_s"),
        spec("b_ssl1", "self-supervised", 3, "resnet50"),
        spec("b_ssl2", "self-supervised", 4, "resnet50"),
    ]
    plan = P.run(config(tmp_path, specs, limit=3, metrics=["average_drop"]))
    with ResultStore(tmp_path / P.DB_NAME) as store:
        tabs = T.build_tables(store, plan)
    pairs = [
        (r["family"], r["supervised"], r["self_supervised"]) for r in tabs["comparison"]
    ]
    assert pairs == [
        ("ViT-S", "a_sup", "a_ssl"),
        ("ResNet-50", "b_sup", "b_ssl1"),
        ("ResNet-50", "b_sup", "b_ssl2"),
    ]
    values = stored(tmp_path)
    for r in tabs["comparison"]:
        images = sorted(i for (m, _, _, i) in values if m == r["supervised"])
        d = [
            values[r["self_supervised"], "gradcam", "average_drop", i]
            - values[r["supervised"], "gradcam", "average_drop", i]
            for i in images
        ]
        assert r["n"] == 3 and np.isclose(r["diff"], np.mean(d))
    text = tables_text(tabs)
    assert "\nViT-S:\n" in text and "\nResNet-50:\n" in text
    resnet = text.split("\nResNet-50:\n")[1].split("Cost on")[0]
    assert "b_ssl2 - b_sup" in resnet and "a_ssl" not in resnet


def test_vit_s_family_runs_cams_attention_and_lrp(tmp_path, monkeypatch):
    """DeiT-S and DINOv2 with registers (its probe wrapper) through the
    pipeline: CAMs, attention and LRP on both (nothing skipped); the pair
    lands in the ViT-S family."""
    import dataclasses
    import functools

    from benchmarks.evaluation import methods as M
    from benchmarks.evaluation import tables as T
    from benchmarks.evaluation.store import ResultStore
    from captum_ssl import models as zoo
    from tests.test_models import write_official

    monkeypatch.setenv(zoo.WEIGHTS_ENV, str(tmp_path))
    specs = []
    for name in ("deit_small", "dinov2_vit_small_reg"):
        _, kwargs, size = write_official(name, tmp_path)
        spec = M.registry_model(name)
        pre = zoo.Preprocessing(size, size, "bicubic")
        build = functools.partial(zoo.load, name, tmp_path, **kwargs)
        specs.append(dataclasses.replace(spec, build=build, preprocessing=pre))
    methods = ["gradcam", "raw_attention", "attnlrp"]
    plan = P.run(config(tmp_path / "out", specs, methods, ["average_drop"], 2))
    assert not plan.skipped
    with ResultStore(tmp_path / "out" / P.DB_NAME) as store:
        tabs = T.build_tables(store, plan)
    rows = {(r["model"], r["method"]) for r in tabs["per_model"]}
    assert rows == {
        (n, m) for n in ("deit_small", "dinov2_vit_small_reg") for m in methods
    }
    assert {r["family"] for r in tabs["comparison"]} == {"ViT-S"}
    assert {r["method"] for r in tabs["comparison"]} == set(methods)
