"""The tutorial (docs/tutorial.py) runs as documented, and what the docs tell a
newcomer to do works offline and leaves ``git status`` clean."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _env():
    env = dict(os.environ, HF_HUB_OFFLINE="1", MPLBACKEND="Agg")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return env


@pytest.mark.slow
def test_tutorial_runs_end_to_end(tmp_path):
    """Real EfficientNet-Lite0, a bundled photo, a random-init ViT, a metric and
    the main job on two images (the tutorial asserts its own claims)."""
    res = subprocess.run(
        [sys.executable, "docs/tutorial.py", "--out", str(tmp_path)],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    for step in ("1. ", "2. ", "3. ", "4. ", "5. "):
        assert f"\n{step}" in "\n" + res.stdout
    assert (tmp_path / "tutorial_maps.png").stat().st_size > 0
    md = (tmp_path / "main_job" / "accuracy.md").read_text()
    assert "| gradcam |" in md and "average_drop" in md


def test_docs_never_ask_timm_to_download():
    """``pretrained=True`` downloads (and fails offline): no doc example uses it."""
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        assert "pretrained=True" not in path.read_text(), path


def test_metrics_doc_states_the_quick_step_the_main_job_uses():
    from benchmarks.evaluation import methods as M

    (quick,) = [m for m in M.QUICK_METRICS if m.startswith("deletion_auc")]
    step = int(quick.split("step=")[1])
    text = (ROOT / "docs" / "metrics.md").read_text()
    assert f"deletion_auc:step={step}" in text
    passes = M.METRICS["deletion_auc"].passes({"step": step}, 224 * 224)
    assert re.search(rf"{step // 224} rows\s+per step \({passes} passes\)", text)


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
@pytest.mark.parametrize("layout", ["links inside", "copies inside"])
def test_linked_sample_photos_keep_git_status_clean(layout, tmp_path):
    """The project's .gitignore, in a scratch repository holding the project's
    tracked files under storage/: linking the photos either way shows nothing."""
    repo = tmp_path / "repo"
    tracked = subprocess.run(
        ["git", "ls-files", "storage", ".gitignore"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    ).stdout.split()
    if ".gitignore" not in tracked:
        pytest.skip("not a git checkout")
    assert "storage/imagenet_1000samples/README.md" in tracked
    for rel in tracked:
        (repo / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / rel, repo / rel)
    git = ["git", "-c", "user.email=t@t", "-c", "user.name=t"]
    subprocess.run(git + ["init", "-q"], cwd=repo, check=True)
    subprocess.run(git + ["add", "-A"], cwd=repo, check=True)
    subprocess.run(git + ["commit", "-qm", "init"], cwd=repo, check=True)
    photos = tmp_path / "imagenet-samples"
    photos.mkdir()
    for name in ("n01440764_tench.JPEG", "n01443537_goldfish.JPEG"):
        (photos / name).write_bytes(b"jpeg")
    folder = repo / "storage" / "imagenet_1000samples"
    for f in photos.iterdir():
        if layout == "links inside":
            (folder / f.name).symlink_to(f)
        else:
            shutil.copy(f, folder / f.name)
    status = subprocess.run(
        ["git", "status", "--porcelain"], cwd=repo, capture_output=True, text=True
    ).stdout
    assert status == "", status
