"""``report.html`` of the main job: every image x method overlay from the maps
at native resolution, predictions with wrong ones marked, curves, sortable
tables with directions, the settings; then the page in a real headless
Chromium (no console errors, every image resolves, sorting by a click works,
a screenshot kept). Real EfficientNet-Lite0 on 3 bundled photos, 3 methods,
coarse metrics."""

from __future__ import annotations

import csv
import html
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks.evaluation import pipeline as P
from benchmarks.evaluation.store import ResultStore

ROOT = Path(__file__).resolve().parent.parent
#: where the browser test keeps its screenshot (git-ignored)
ARTIFACTS = ROOT / "storage" / "quant_results" / "test_artifacts"
METHODS = ["gradcam", "eigencam", "saliency"]
METRICS = ["average_drop", "deletion_auc:step=12544"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from benchmarks.run import main

    out = tmp_path_factory.mktemp("report")
    args = [
        "--limit", "3", "--models", "efficientnet_lite0", "--methods", *METHODS,
        "--metrics", *METRICS, "--batch-size", "3", "--device", "cpu",
        "--metric-batch-size", "8", "--threads", "1", "--out", str(out),
    ]  # fmt: skip
    assert main(args) == 0
    return out


def _per_image(out: Path):
    with open(out / "accuracy_per_image.csv") as f:
        return list(csv.DictReader(f))


def test_report_shows_every_image_method_native_map_and_prediction(run):
    page = (run / "report.html").read_text()
    rows = _per_image(run)
    images = list(dict.fromkeys(r["image"] for r in rows))
    assert len(images) == 3
    # self-contained: pictures are data URIs, nothing is fetched
    srcs = re.findall(r'<img src="([^"]*)"', page)
    assert srcs and all(s.startswith("data:image/") for s in srcs)
    assert not re.search(r'(src|href)="(https?:|//)', page)
    # every image x method overlay, each titled with its map's native size
    with ResultStore(run / P.DB_NAME) as store:
        native = {
            (r["method"], r["image"]): r["map"].shape
            for r in store.maps()
            if store.spec(r["key"])["map_size"] == "native"
        }
    assert len(native) == len(images) * len(METHODS)
    for (method, image), (h, w) in native.items():
        assert f'alt="{method} on {image}" title="{method}, map {h}x{w}"' in page
    assert native["gradcam", images[0]] == (7, 7)  # the layer's grid
    assert native["saliency", images[0]] == (224, 224)  # input resolution
    # prediction and probability under each image; wrong ones marked in red
    preds = {r["image"]: r for r in rows}
    from captum_ssl.data import class_name

    source = P.ImageSource(None, 3)  # the run's photos: ImageNet samples or bundled
    accepted = {}
    for batch in source.batches(None, source.names, 8):
        accepted.update(zip(batch.names, batch.accepted))
    wrong = 0
    for image in images:
        p = preds[image]
        name = html.escape(class_name(int(p["predicted"])).split(",")[0][:23])
        assert f"pred: {name}" in page
        assert f"({float(p['predicted_probability']):.2f})" in page
        wrong += int(p["predicted"]) not in accepted[image]
    assert page.count('<td class="wrong">') == wrong
    assert f"{wrong} wrong predictions" in page
    # tables: sortable, with each metric's direction; curves; settings
    assert page.count('<table class="sortable">') >= 3
    assert "average_drop ↓" in page and "deletion_auc:step=12544 ↓" in page
    assert 'alt="curve efficientnet lite0 deletion auc step 12544"' in page
    assert "<th>command</th><td>python -m benchmarks.run --limit 3" in page
    assert page.count("Cost") >= 1 and "attribution_forward_passes" in page
    assert len(page) < 2_000_000  # thumbnails, not full-size pictures


def test_stored_curves_are_the_deletion_values(run):
    from captum_ssl.metrics._common import normalized_auc

    with ResultStore(run / P.DB_NAME) as store:
        curves = {(r["key"], r["image"]): r["curve"] for r in store.curves()}
        values = {
            (r["key"], r["image"]): r["value"]
            for r in store.results()
            if r["metric"] == "deletion_auc:step=12544"
        }
    assert set(curves) == set(values) and len(values) == 3 * len(METHODS)
    for k, c in curves.items():
        assert len(c) == 224 * 224 // 12544 + 1  # 4 steps and the intact image
        auc = float(normalized_auc(torch.from_numpy(c[None]))[0])
        assert auc == pytest.approx(values[k], abs=1e-6)
        # the trapezoid rule, written out
        assert values[k] == pytest.approx(np.trapezoid(c, dx=1 / (len(c) - 1)))


def test_browser_skips_with_a_reason_where_it_cannot_be_installed(monkeypatch):
    from tests import browser

    monkeypatch.setattr(browser.shutil, "which", lambda name: None)
    monkeypatch.setattr(browser.os, "geteuid", lambda: 1000)
    exe, why = browser.chromium()
    assert exe is None and "needs root and apt-get" in why and "chromium" in why


def test_report_in_headless_chromium(run):
    from tests.browser import Browser, chromium

    exe, why = chromium()
    if exe is None:
        pytest.skip(why)
    with Browser(exe) as b:
        b.open(run / "report.html")
        assert b.eval("document.title").startswith("captum_ssl")
        broken = b.eval(
            "Array.from(document.images).filter(i => !i.complete || "
            "i.naturalWidth === 0).map(i => i.alt)"
        )
        n_images = b.eval("document.images.length")
        assert n_images >= 3 * (len(METHODS) + 1) and broken == []
        # sort the accuracy table by its first metric column: a real click
        sel = (
            "Array.from(document.querySelectorAll('table.sortable')).find(t => "
            "t.tHead.textContent.includes('average_drop'))"
        )
        b.eval(f"{sel}.id = 'acc'")
        values = (
            "Array.from(document.querySelectorAll('#acc tbody tr')).map(r => "
            "parseFloat(r.children[1].getAttribute('data-v')))"
        )
        methods = (
            "Array.from(document.querySelectorAll('#acc tbody tr')).map(r => "
            "r.children[0].textContent)"
        )
        before = b.eval(values)
        assert len(before) == len(METHODS)
        b.click("#acc th:nth-child(2)")
        assert b.eval(values) == sorted(before)
        sort = "acc.querySelector('th:nth-child(2)').getAttribute('aria-sort')"
        assert b.eval(sort) == "ascending"
        b.click("#acc th:nth-child(2)")
        assert b.eval(values) == sorted(before, reverse=True)
        b.click("#acc th:nth-child(1)")  # text column
        assert b.eval(methods) == sorted(METHODS)
        shot = b.screenshot(ARTIFACTS / "report.png")
        assert b.errors == [], b.errors
    from PIL import Image

    with Image.open(shot) as im:
        assert im.size[0] >= 800 and im.size[1] > 2000
    shutil.copy(run / "report.html", ARTIFACTS / "report.html")


def test_store_migrates_old_maps_and_keeps_tiny_values(tmp_path):
    import sqlite3

    path = tmp_path / "old.sqlite"
    conn = sqlite3.connect(path)  # a maps table as written before the scale
    conn.execute(
        "CREATE TABLE maps (key TEXT NOT NULL, image TEXT NOT NULL, model TEXT "
        "NOT NULL, method TEXT NOT NULL, height INTEGER NOT NULL, width INTEGER "
        "NOT NULL, data BLOB NOT NULL, PRIMARY KEY (key, image))"
    )
    old = np.arange(6, dtype=np.float16).reshape(2, 3)
    conn.execute(
        "INSERT INTO maps VALUES (?,?,?,?,?,?,?)",
        ("k", "img", "m", "gradcam", 2, 3, old.tobytes()),
    )
    conn.commit()
    conn.close()
    with ResultStore(path) as store:
        (row,) = store.maps(["k"])
        np.testing.assert_array_equal(row["map"], old.astype(np.float32))
        # gradients far below float16's range keep their shape
        tiny = np.array([[[1e-9, 3e-9], [0.0, -2e-9]]])
        assert not np.float16(1e-9)  # what plain float16 would store
        store.add_maps("t", "m", "saliency", ["img"], tiny)
        (row,) = store.maps(["t"])
        np.testing.assert_allclose(row["map"], tiny[0], rtol=1e-3)


def test_report_of_a_supervised_and_self_supervised_pair(tmp_path):
    from tests.test_evaluation import config, tiny_spec

    sup = tiny_spec("tiny_sup", "supervised", 0)
    ssl = tiny_spec("tiny_ssl", "self-supervised", 1)
    cfg = config(tmp_path, [sup, ssl], limit=3, metrics=METRICS, figures=True)
    plan = P.run(cfg)
    page = P.report(cfg, plan)["html"].read_text()
    assert "Supervised vs self-supervised" in page and "Agreement of" in page
    for model, training in (("tiny_sup", "supervised"), ("tiny_ssl", "self-")):
        assert f"<h3>{model} (TinyCNN, {training}" in page  # its overlays
        assert f'alt="curve {model.replace("_", " ")} deletion' in page
    assert page.count('alt="gradcam on ') == 2 * 3
