"""One vocabulary (issue 21): the main job's metric names are the Python
names, methods may be given by their Python class, the old metric spellings
still work with one note, and ``--list`` prints readable tables."""

from __future__ import annotations

import re

import pytest

import captum_ssl.metrics as CM
from benchmarks.evaluation import methods as M
from benchmarks.evaluation.options import OptionError, check_method, check_metric


def test_metric_names_are_the_python_function_names():
    for name, d in M.METRICS.items():
        assert name == d.fn_name and callable(getattr(CM, name))
    for word in M.QUICK_METRICS + M.THESIS_METRICS + M.ALL_METRICS:
        assert M.parse_spec(word)[0] in M.METRICS


def test_old_metric_spellings_mean_the_same_call_with_one_note(capsys):
    M._NOTED.clear()
    assert M.metric_word("deletion:step=448") == "deletion_auc:step=448"
    assert M.metric_word("road_lerf") == "road:order=lerf"
    assert (
        M.metric_word("negative_perturbation:batch_size=8")
        == "perturbation_auc:mode=negative,batch_size=8"
    )
    M.metric_word("deletion")
    err = capsys.readouterr().err
    assert err.count("'deletion' is now called 'deletion_auc'") == 1
    assert "'road_lerf' is now called 'road:order=lerf'" in err
    for old, (new, fixed) in M.METRIC_ALIASES.items():
        name, opts = M.metric_spec(old)
        assert (name, opts) == (new, fixed)
        assert M.metric_function(name) is getattr(CM, new)
    # the direction follows the options the old name stood for
    assert M.metric_direction(*M.metric_spec("road_lerf")) is True
    assert M.metric_direction(*M.metric_spec("road_morf")) is False
    assert M.metric_direction(*M.metric_spec("negative_perturbation")) is True
    assert M.metric_direction(*M.metric_spec("positive_perturbation")) is False
    check_metric("road_lerf:noise=0.02")  # options are checked on the new name
    with pytest.raises(OptionError, match="old spellings: deletion"):
        check_metric("deletions")


def test_methods_by_short_name_or_python_class():
    assert M.method_word("LayerGradCam") == "gradcam"
    assert M.method_word("AttentionRollout:discard_ratio=0.9") == (
        "rollout:discard_ratio=0.9"
    )
    assert M.method_word("Saliency+smoothgrad") == "saliency+smoothgrad"
    assert M.method_word("gradcam") == "gradcam"
    check_method("LayerScoreCam:max_channels=8")
    with pytest.raises(OptionError, match="unknown option bogus"):
        check_method("LayerGradCam:bogus=1")


def test_list_prints_methods_metrics_and_models_as_tables(tmp_path, capsys):
    from benchmarks.run import main

    assert main(["--list", "--metrics", "deletion", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()

    def row(pattern: str) -> bool:
        return any(re.fullmatch(pattern, line) for line in lines)

    assert row(r"scorecam\s+captum_ssl\.attr\.LayerScoreCam\s+forward per channel")
    assert row(r"saliency\s+captum\.attr\.Saliency\s+gradient")
    assert row(
        r"deletion_auc\s+captum_ssl\.metrics\.deletion_auc\(step=224, "
        r"substrate=zero\)\s+lower\s+225"
    )
    assert row(r"road\s+captum_ssl\.metrics\.road\(order=morf\)\s+lower\s+10")
    assert row(r"efficientnet_lite0\s+EfficientNet-Lite0\s+supervised\s+present.*")
    assert row(r"res_50\s+ResNet-50\s+supervised\s+(present|missing: resnet50-.*)")
    assert "  metrics: deletion_auc\n" in out  # the old name, resolved
    # one row per method, not one long line
    assert sum(bool(re.match(r"\w+\s+captum(_ssl)?\.attr\.", s)) for s in lines) > 30
