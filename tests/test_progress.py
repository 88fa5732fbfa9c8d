"""No silent waits (issue 21): every long call prints progress when asked, the
main job's first line comes early, and Score-CAM's channel knob is exact."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

import captum_ssl.attr as A
import captum_ssl.metrics as M

ROOT = Path(__file__).resolve().parent.parent


def _bar_lines(err: str, name: str) -> list:
    """The lines of a tqdm bar named ``name`` that reached 100%."""
    return [
        part
        for part in err.replace("\r", "\n").splitlines()
        if part.startswith(name) and "100%" in part
    ]


@pytest.mark.parametrize(
    "name, call",
    [
        ("Score-CAM", lambda m, x, t: A.LayerScoreCam(m, m.features[4]).attribute(
            x, target=t, show_progress=True)),
        ("Ablation-CAM", lambda m, x, t: A.LayerAblationCam(
            m, m.features[4]).attribute(x, target=t, show_progress=True)),
        ("perturbed images", lambda m, x, t: M.deletion_auc(
            m, x, torch.rand(3, 1, 4, 4), t, step=64, show_progress=True)),
        ("perturbed images", lambda m, x, t: M.insertion_auc(
            m, x, torch.rand(3, 1, 4, 4), t, step=64, show_progress=True)),
        ("perturbed images", lambda m, x, t: M.perturbation_auc(
            m, x, torch.rand(3, 1, 4, 4), t, show_progress=True)),
        ("ROAD", lambda m, x, t: M.road(
            m, x, torch.rand(3, 1, 4, 4), t, percentages=(0.2, 0.5),
            show_progress=True)),
    ],
)  # fmt: skip
def test_costly_calls_print_progress(tiny_cnn, images, capsys, name, call):
    targets = [1, 3, 0]
    out = call(tiny_cnn, images, targets)
    err = capsys.readouterr().err
    assert _bar_lines(err, name), err[-500:]
    assert torch.isfinite(out).all()


def test_progress_option_changes_no_value(tiny_cnn, images, capsys):
    cam = A.LayerScoreCam(tiny_cnn, tiny_cnn.features[4])
    a = cam.attribute(images, target=[1, 3, 0], show_progress=True)
    b = cam.attribute(images, target=[1, 3, 0])
    torch.testing.assert_close(a, b)
    maps = torch.rand(3, 1, 4, 4)
    d1 = M.deletion_auc(tiny_cnn, images, maps, [1, 3, 0], step=64, show_progress=True)
    capsys.readouterr()
    d2 = M.deletion_auc(tiny_cnn, images, maps, [1, 3, 0], step=64)
    torch.testing.assert_close(d1, d2)
    assert capsys.readouterr().err == ""  # no bar unless asked


def test_score_cam_max_channels_is_softmax_over_the_highest_variance_channels(
    tiny_cnn, images
):
    """Faster Score-CAM: the k channels of highest activation variance per image
    are scored; the weights are the softmax over those k, zero elsewhere."""
    layer, targets, k = tiny_cnn.features[4], [1, 3, 0], 5
    acts = tiny_cnn.features(images).detach()
    chosen = acts.flatten(2).var(dim=2).topk(k, dim=1).indices
    weights = torch.zeros(3, acts.shape[1])
    with torch.no_grad():
        for b in range(3):
            s = []
            for c in chosen[b]:
                up = nn.functional.interpolate(
                    acts[b : b + 1, c : c + 1], size=(32, 32), mode="bilinear",
                    align_corners=True,
                )  # fmt: skip
                lo, hi = up.amin(), up.amax()
                masked = images[b : b + 1] * (up - lo) / (hi - lo + 1e-8)
                s.append(tiny_cnn(masked)[0, targets[b]])
            weights[b, chosen[b]] = torch.stack(s).softmax(0)
    expected = (weights[:, :, None, None] * acts).sum(1, keepdim=True)
    cam = A.LayerScoreCam(tiny_cnn, layer)
    out = cam.attribute(images, target=targets, max_channels=k)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-4)
    # as many channels as the layer has: the paper's Score-CAM
    full = cam.attribute(images, target=targets)
    every = cam.attribute(images, target=targets, max_channels=acts.shape[1])
    torch.testing.assert_close(every, full)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="max_channels must be an integer"):
            cam.attribute(images, target=targets, max_channels=bad)


def test_heartbeat_names_the_step_when_nothing_else_was_said(monkeypatch):
    from benchmarks.evaluation import pipeline as P

    monkeypatch.setattr(P, "QUIET_SECONDS", 0.2)
    lines: list = []
    with P.Progress(lines.append, total=4) as progress:
        progress.now("scoring the masks")
        time.sleep(0.8)
        progress.tick()
        progress.say("one step done" + progress.status())
        time.sleep(0.8)
    quiet = [s for s in lines if s.startswith("  ... scoring the masks")]
    assert quiet and "time left estimated after the first step" in quiet[0]
    assert "[1/4 steps" in lines[lines.index(next(s for s in lines if "one step" in s))]
    assert "s left)" in lines[-1] and "about" in lines[-1]  # estimate once measured
    n = len(lines)
    time.sleep(0.5)
    assert len(lines) == n  # the thread stopped with the block


def test_main_job_first_line_comes_early_with_an_estimate_later(tmp_path):
    """Time to the first line of ``python -m benchmarks.run`` in a subprocess
    (loading included); 10 s is the aim on 2 quiet cores, the bound here is
    loose for a busy CI machine. The run is stopped once a line estimates the
    time left."""
    cmd = [
        sys.executable, "-u", "-m", "benchmarks.run", "--out", str(tmp_path),
        "--limit", "2", "--batch-size", "1", "--methods", "gradcam",
        "--metrics", "average_drop", "--no-figures",
    ]  # fmt: skip
    env = dict(os.environ, HF_HUB_OFFLINE="1", MPLBACKEND="Agg")
    start = time.perf_counter()
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True,
    )  # fmt: skip
    seen = []
    try:
        for line in proc.stdout:  # type: ignore[union-attr]
            seen.append((time.perf_counter() - start, line.rstrip()))
            if "s left]" in line and "about" in line:
                break
    finally:
        proc.kill()
        proc.wait()
    assert seen, "no output at all"
    first_s, first = seen[0]
    assert first_s < 60, f"first line after {first_s:.1f} s: {first}"
    assert any("about" in s and "s left]" in s for _, s in seen), seen[-5:]
    gaps = [b - a for (a, _), (b, _) in zip(seen, seen[1:])]
    print(f"first line after {first_s:.1f} s; longest silence {max(gaps or [0]):.1f} s")
