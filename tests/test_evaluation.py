"""The accuracy pipeline of ``benchmarks.run``: store, resume, keys, tables,
honesty, torchrun, CLI. Real EfficientNet-Lite0 on 2-4 bundled photos with
coarse metric steps; a tiny CNN stands in for a supervised / self-supervised
pair where the statistics are tested."""

from __future__ import annotations

import functools
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats

from benchmarks.evaluation import methods as M
from benchmarks.evaluation import pipeline as P
from benchmarks.evaluation import tables as T
from benchmarks.evaluation.store import ResultStore
from tests.conftest import TinyCNN

ROOT = Path(__file__).resolve().parent.parent
COARSE = ["average_drop", "deletion_auc:step=12544"]  # 5 deletion steps at 224 px


def effnet_spec() -> M.ModelSpec:
    return M.registry_model("efficientnet_lite0")


def tiny_spec(name: str, training: str, seed: int, weights="pretrained"):
    """A 1000-class tiny CNN standing in for a model of family 'TinyCNN'."""
    from captum_ssl.models import entry

    def build():
        torch.manual_seed(seed)
        return TinyCNN(num_classes=1000).eval()

    return M.ModelSpec(
        name=name,
        build=build,
        architecture="TinyCNN",
        training=training,
        weights=weights,
        cam_layer="features.3",
        preprocessing=entry("efficientnet_lite0").preprocessing,
        fingerprint={"seed": seed},
    )


def config(out, models, methods=("gradcam",), metrics=COARSE, limit=3, **kw):
    kw.setdefault("figures", False)
    return P.EvalConfig(
        models=list(models),
        methods=list(methods),
        metrics=list(metrics),
        out=Path(out),
        limit=limit,
        batch_size=2,
        metric_batch_size=8,
        device="cpu",
        log=lambda s: None,
        **kw,
    )


def stored(out) -> dict:
    with ResultStore(Path(out) / P.DB_NAME) as s:
        return {
            (r["model"], r["method"], r["metric"], r["image"]): r["value"]
            for r in s.results()
            if r["method"] != "(image)"
        }


# ----------------------------------------------------------------- store


def test_kill_and_resume_loses_nothing_and_computes_nothing_twice(
    tmp_path, monkeypatch
):
    calls = []
    real = M.metric_function

    def counting(name):
        fn = real(name)

        @functools.wraps(fn)
        def wrapped(model, x, maps, target, **opts):
            calls.append((name, x.shape[0]))
            return fn(model, x, maps, target, **opts)

        return wrapped

    monkeypatch.setattr(M, "metric_function", counting)
    specs = [effnet_spec()]
    cfg = config(tmp_path, specs, methods=["gradcam", "saliency"], fail_after=3)
    with pytest.raises(KeyboardInterrupt):
        P.run(cfg)
    first = stored(tmp_path)
    first_images = sum(n for _, n in calls)
    assert len(first) == first_images > 0  # every finished value was committed
    calls.clear()
    P.run(config(tmp_path, specs, methods=["gradcam", "saliency"]))
    final = stored(tmp_path)
    # 3 images x 2 methods x 2 metrics, each computed exactly once overall
    assert len(final) == 12
    assert first_images + sum(n for _, n in calls) == 12
    assert all(final[k] == v for k, v in first.items())  # kept, not recomputed
    calls.clear()
    P.run(config(tmp_path, specs, methods=["gradcam", "saliency"]))
    assert calls == []  # a finished run resumes to nothing


def test_keys_separate_options_and_code_versions(tmp_path, monkeypatch):
    specs = [effnet_spec()]
    a = config(tmp_path, specs, metrics=["deletion_auc:step=12544"], limit=2)
    plan_a = P.run(a)
    b = config(tmp_path, specs, metrics=["deletion_auc:step=25088"], limit=2)
    plan_b = P.run(b)
    ka = plan_a.result_keys["efficientnet_lite0", "gradcam", "deletion_auc:step=12544"]
    kb = plan_b.result_keys["efficientnet_lite0", "gradcam", "deletion_auc:step=25088"]
    assert ka != kb
    # a new code version: new keys, nothing reused or mixed into its tables
    version = M.code_version()
    monkeypatch.setattr(
        M, "code_version", lambda: {**version, "source_sha256": "another"}
    )
    c = config(tmp_path, specs, metrics=["deletion_auc:step=12544"], limit=1)
    plan_c = P.run(c)
    kc = plan_c.result_keys["efficientnet_lite0", "gradcam", "deletion_auc:step=12544"]
    assert kc != ka
    with ResultStore(tmp_path / P.DB_NAME) as s:
        tabs = T.build_tables(s, plan_c)
        assert [r["n"] for r in tabs["per_model"]] == [1]
        assert len(s.results([ka])) == 2 and len(s.results([kc])) == 1
        # preprocessing is part of the key too
        spec = effnet_spec()
        spec.preprocessing = spec.preprocessing.__class__(224, 224, "bilinear")
        plan_d = P.make_plan(config(tmp_path, [spec], limit=1), s)
        assert plan_d.model_keys["efficientnet_lite0"] not in plan_a.model_keys.values()


# ---------------------------------------------------------------- tables


def test_statistics_match_direct_computation(tmp_path):
    sup = tiny_spec("tiny_sup", "supervised", 0)
    ssl = tiny_spec("tiny_ssl", "self-supervised", 1)
    cfg = config(tmp_path, [sup, ssl], limit=4, metrics=["average_drop"])
    plan = P.run(cfg)
    values = stored(tmp_path)
    with ResultStore(tmp_path / P.DB_NAME) as s:
        tabs = T.build_tables(s, plan, top_k=0.2)
        small = list(plan.map_keys.values())  # the agreement's maps
        maps = {(r["model"], r["image"]): r["map"] for r in s.maps(small)}
    images = sorted({k[3] for k in values})
    a = np.array([values["tiny_sup", "gradcam", "average_drop", i] for i in images])
    b = np.array([values["tiny_ssl", "gradcam", "average_drop", i] for i in images])
    row = next(r for r in tabs["per_model"] if r["model"] == "tiny_sup")
    half = stats.t.ppf(0.975, len(a) - 1) * a.std(ddof=1) / math.sqrt(len(a))
    assert row["mean"] == pytest.approx(a.mean())
    assert row["ci95"] == pytest.approx(half)
    assert row["direction"] == "lower is better"
    (cmp,) = tabs["comparison"]
    assert (cmp["supervised"], cmp["self_supervised"]) == ("tiny_sup", "tiny_ssl")
    assert cmp["diff"] == pytest.approx((b - a).mean())
    assert cmp["t_p"] == pytest.approx(stats.ttest_rel(b, a).pvalue)
    assert cmp["wilcoxon_p"] == pytest.approx(stats.wilcoxon(b, a).pvalue)
    (agr,) = tabs["agreement"]
    with warnings.catch_warnings():  # scipy warns on a constant map (see below)
        warnings.simplefilter("ignore", stats.ConstantInputWarning)
        rho = [
            stats.spearmanr(
                maps["tiny_sup", i].ravel(), maps["tiny_ssl", i].ravel()
            ).statistic
            for i in images
        ]
    # a constant map (possible for a tiny random model on a real photo) has no
    # rank correlation: captum_ssl.metrics.spearman scores it 0 (scipy: NaN)
    rho = np.nan_to_num(rho, nan=0.0)
    assert agr["spearman"] == pytest.approx(np.mean(rho), abs=1e-5)
    k = round(0.2 * maps["tiny_sup", images[0]].size)
    ious = []
    for i in images:
        sa = set(np.argsort(-maps["tiny_sup", i].ravel(), kind="stable")[:k])
        sb = set(np.argsort(-maps["tiny_ssl", i].ravel(), kind="stable")[:k])
        ious.append(len(sa & sb) / len(sa | sb))
    assert agr["top20_iou"] == pytest.approx(np.mean(ious), abs=0.05)
    paths = T.write_tables(tabs, tmp_path / "tables")
    md = paths["md"].read_text()
    assert "Supervised vs self-supervised" in md and "tiny_ssl" in md
    assert paths["comparison"].read_text().count("\n") == 2  # header + 1 row
    from benchmarks.evaluation.figures import bar_charts

    bar, svg = bar_charts(tabs, tmp_path / "figures")  # sup and SSL side by side
    assert bar.name == "bar_average_drop.png" and bar.stat().st_size > 0
    assert svg.name == "bar_average_drop.svg" and svg.stat().st_size > 0


def test_models_without_weights_never_reach_accuracy_tables(tmp_path, monkeypatch):
    from benchmarks.evaluation.cli import select_models

    monkeypatch.setenv("CAPTUM_SSL_WEIGHTS_DIR", str(tmp_path / "empty"))
    specs, notes, absent = select_models(["res_50", "moco_v3_res_50"], [])
    assert specs == [] and absent == ["res_50", "moco_v3_res_50"]
    text = "\n".join(notes)
    assert "linear-1000ep.pth.tar" in text and str(tmp_path / "empty") in text
    assert "dl.fbaipublicfiles.com/moco-v3" in text
    specs, _, _ = select_models(None, [])
    assert [s.name for s in specs] == ["efficientnet_lite0"]
    # random weights: run for timing, labelled, never in accuracy tables
    rand = tiny_spec("tiny_random", "self-supervised", 2, weights="random")
    plan = P.run(config(tmp_path, [tiny_spec("tiny_sup", "supervised", 0), rand]))
    with ResultStore(tmp_path / P.DB_NAME) as s:
        tabs = T.build_tables(s, plan)
    assert {r["model"] for r in tabs["per_model"]} == {"tiny_sup"}
    assert tabs["comparison"] == [] and tabs["agreement"] == []
    assert {r["model"] for r in tabs["images"]} == {"tiny_sup"}
    timing = {r["model"]: r["weights"] for r in tabs["timing"]}
    assert timing["tiny_random"] == "random weights (timing only)"
    assert "tiny_random" in T.markdown(tabs).split("## Timing")[1]


def test_methods_build_and_reject(tiny_vit):
    spec = M.ModelSpec(
        "vit", lambda: tiny_vit, "ViT", "supervised", "random", "blocks.-1.norm1",
        attention_layers="blocks.*.attn",
    )  # fmt: skip
    assert M.applies("rollout", spec) is None
    assert M.applies("guided_gradcam", spec) is not None
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([1, 2])
    for name in ["gradcam", "rollout", "saliency+smoothgrad"]:
        opts = {"nt_samples": 2} if "+" in name else {}
        maps = M.build_method(name, opts, tiny_vit, spec)(x, t)
        assert maps.shape[:2] == (2, 1)
    with pytest.raises(ValueError, match="NoiseTunnel"):
        M.build_method("gradcam+vargrad", {}, tiny_vit, spec)
    with pytest.raises(ValueError, match="unknown method"):
        M.method_defaults("gradcan")
    assert M.parse_spec("rollout:discard_ratio=0.9,head_fusion=max") == (
        "rollout",
        {"discard_ratio": 0.9, "head_fusion": "max"},
    )


# ------------------------------------------------------------- distributed


def _cli(out, extra=(), figures=False):
    return [
        "--suite", "accuracy", "--models", "efficientnet_lite0", "--methods",
        "gradcam", "--metrics", *COARSE, "--limit", "4", "--batch-size", "2",
        "--device", "cpu", "--metric-batch-size", "8", "--out", str(out), *extra,
    ] + ([] if figures else ["--no-figures"])  # fmt: skip


def test_torchrun_two_processes_equals_one(tmp_path):
    from benchmarks.run import main

    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2"]
    cmd += ["--standalone", "-m", "benchmarks.run", *_cli(tmp_path / "dist")]
    done = subprocess.run(
        cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert main(_cli(tmp_path / "single")) == 0
    dist, single = stored(tmp_path / "dist"), stored(tmp_path / "single")
    assert set(dist) == set(single) and len(single) == 8
    for k, v in single.items():
        assert dist[k] == pytest.approx(v, abs=1e-5), k
    with ResultStore(tmp_path / "dist" / P.DB_NAME) as s:
        assert {r["rank"] for r in s.results()} == {0, 1}  # both ranks worked
    assert (tmp_path / "dist" / "accuracy.md").is_file()  # rank 0 reported


# -------------------------------------------------------------------- CLI


def test_cli_list_and_report_only(tmp_path, capsys):
    from benchmarks.run import main

    assert main(["--list", "--suite", "accuracy", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "accuracy pipeline" in out and "efficientnet_lite0" in out
    assert main(_cli(tmp_path, ["--limit", "2", "--saliency"])) == 0
    assert len(list((tmp_path / "saliency").rglob("*.png"))) == 2
    (tmp_path / "accuracy.md").unlink()
    assert main(_cli(tmp_path, ["--limit", "2", "--report-only"], figures=True)) == 0
    md = (tmp_path / "accuracy.md").read_text()
    assert "| gradcam |" in md and "average_drop ↓" in md
    figs = {p.name for p in (tmp_path / "figures").iterdir()}
    assert {"efficientnet_lite0_overlays.png", "bar_average_drop.png"} <= figs


def test_vit_layer_figure(tiny_vit, tmp_path):
    from benchmarks.evaluation.figures import vit_layer_figure

    spec = M.ModelSpec(
        "tiny_vit", lambda: tiny_vit, "ViT", "supervised", "pretrained",
        "blocks.-1.norm1", attention_layers="blocks.*.attn",
    )  # fmt: skip
    torch.manual_seed(0)
    batch = P.Batch(
        torch.randn(2, 3, 32, 32), torch.rand(2, 3, 32, 32), torch.tensor([1, 2]),
        ["a", "b"],
    )  # fmt: skip
    path = vit_layer_figure(tiny_vit, batch, spec, tmp_path, torch.device("cpu"))
    from PIL import Image

    with Image.open(path) as im:  # image + 3 layers + rollout per row, 2 rows
        assert im.size[0] > 2 * im.size[1]
