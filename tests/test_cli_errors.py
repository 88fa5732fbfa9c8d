"""The main job's bad options and bad stores: one line naming the option (or
path) and the fix, exit status 2, before any model or data is loaded.

A table of cases: a new option check is one more line in ``CASES``.
"""

from __future__ import annotations

import functools
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import benchmarks.run as R
from benchmarks.evaluation import methods as M
from benchmarks.evaluation import pipeline as P
from benchmarks.evaluation.store import ResultStore, StoreError, check_file

ROOT = Path(__file__).resolve().parent.parent


def _no_cuda_device() -> str:
    """A CUDA device this machine does not have."""
    return f"cuda:{torch.cuda.device_count()}" if torch.cuda.is_available() else "cuda"


# (argv, words the one-line message must contain)
CASES = [
    (["--limit", "-1"], ["--limit", "at least 1", "leave --limit out"]),
    (["--limit", "0"], ["--limit", "at least 1"]),
    (["--batch-size", "0"], ["--batch-size", "at least 1"]),
    (["--metric-batch-size", "-3"], ["--metric-batch-size"]),
    (["--images", "0"], ["--images"]),
    (["--repeat", "0"], ["--repeat"]),
    (["--device", "cuda-ish"], ["--device cuda-ish", "not a torch device"]),
    (
        ["--suite", "timing", "--device", _no_cuda_device()],
        ["--device", "--device cpu"],
    ),
    (["--suite", "accuracy", "--device", _no_cuda_device()], ["--device cpu"]),
    (["--methods", "foo"], ["unknown method 'foo'", "gradcam", "rollout"]),
    (["--methods", "gradcam", "foo"], ["unknown method 'foo'"]),
    (["--methods", "saliency+smoothgrad_x"], ["NoiseTunnel", "vargrad"]),
    (["--methods", "gradcam:bogus=1"], ["gradcam:bogus=1", "bogus", "relu_"]),
    (["--methods", "rollout:bogus=1"], ["bogus", "discard_ratio"]),
    (["--methods", "gradcam:relu"], ["name:option=value"]),
    (["--methods", "scorecam:perturbations_per_eval=0"], ["perturbations_per_eval"]),
    (["--methods", "ablationcam:perturbations_per_eval=2.5"], [">= 1"]),
    (["--metrics", "deletionn"], ["unknown metric 'deletionn'", "insertion"]),
    (["--metrics", "deletion_auc:stepp=3"], ["stepp", "step, substrate"]),
    (["--models", "resnet"], ["unknown model", "res_50", "efficientnet_lite0"]),
    (["--random-weights", "vit"], ["--random-weights vit", "deit_base"]),
    (["--bench", "camz"], ["--bench camz", "cams", "evaluation"]),
    (["--filter", "(["], ["--filter", "regular expression"]),
    (["--data", "{tmp}/no-such-folder"], ["--data", "no such folder"]),
    # issue 22: tracebacks or silently wrong runs before
    (["--threads", "0"], ["--threads", "at least 1", "leave --threads out"]),
    (["--threads", "-1"], ["--threads", "at least 1"]),
    (["--data", "{tmp}/empty"], ["--data", "no <wnid>_<name>.JPEG"]),
    (["--data", "{tmp}/a-file"], ["--data", "is a file, not a folder"]),
    (["--methods", "raw_attention:head_fusion=maen"], ["mean, max, min", "mean?"]),
    (["--methods", "gradcam:relu_attributions=yes"], ["true or false", "'yes'"]),
    (["--metrics", "deletion:step=0"], ["step must be an integer >= 1"]),
    (["--metrics", "deletion:substrate=blurr"], ["zero, blur", "blur?"]),
    (["--metrics", "road_morf:order=morff"], ["morf, lerf"]),
    (["--out", "{tmp}/a-file"], ["a-file", "is a file", "pass a folder"]),
    (["--out", "{tmp}/a-file/sub"], ["a-file", "is a file"]),
    (["--out", "{tmp}/bad-store"], ["results.sqlite", "damaged", "mv "]),
]


@pytest.fixture
def nothing_runs(monkeypatch):
    """Any model build, image read, suite or pipeline run fails the test."""
    import benchmarks._runner as runner
    import benchmarks.evaluation.cli as cli
    import captum_ssl.models as zoo

    def forbidden(*a, **k):
        raise AssertionError("work started before the options were checked")

    monkeypatch.setattr(zoo, "load", forbidden)
    monkeypatch.setattr(P.ImageSource, "__init__", forbidden)
    monkeypatch.setattr(runner, "run_suites", forbidden)
    monkeypatch.setattr(cli, "run_pipeline", forbidden)


def _bad_store(path: Path) -> None:
    path.mkdir()
    (path / P.DB_NAME).write_bytes(b"not a database " * 300)


@pytest.mark.parametrize("argv, words", CASES, ids=lambda v: " ".join(v)[:40])
def test_bad_option_one_line_before_any_work(
    argv, words, tmp_path, capsys, nothing_runs
):
    (tmp_path / "a-file").write_text("x")
    (tmp_path / "empty").mkdir()
    _bad_store(tmp_path / "bad-store")
    argv = [a.format(tmp=tmp_path) for a in argv]
    if not any(a == "--out" for a in argv):
        argv += ["--out", str(tmp_path / "out")]
    assert R.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("python -m benchmarks.run: error: ")
    for w in words:
        assert w.format(tmp=tmp_path) in err, (w, err)
    assert not (tmp_path / "out").exists()  # nothing written either


def test_read_only_output_folder(tmp_path, capsys, nothing_runs):
    if os.geteuid() == 0:  # root writes through permissions: a read-only fs
        folder = Path("/sys")
        try:
            os.close(os.open(folder / ".probe", os.O_CREAT | os.O_WRONLY))
            pytest.skip("no read-only folder for root here")
        except OSError:
            out = folder / "captum_ssl_out"
    else:
        folder = tmp_path / "ro"
        folder.mkdir()
        folder.chmod(stat.S_IRUSR | stat.S_IXUSR)
        out = folder / "out"
    try:
        for target in (out, folder):
            assert R.main(["--suite", "accuracy", "--out", str(target)]) == 2
            err = capsys.readouterr().err.strip()
            assert len(err.splitlines()) == 1
            assert f"--out {target}" in err and "cannot write" in err
            assert "writable folder" in err
    finally:
        if folder != Path("/sys"):
            folder.chmod(stat.S_IRWXU)


def test_cli_subprocess_device_cuda_without_gpu(tmp_path):
    """The real command line: one line on stderr, exit 2, no traceback."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "benchmarks.run", "--out", str(tmp_path)]
    res = subprocess.run(
        cmd + ["--device", _no_cuda_device()],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 2
    assert res.stdout == "" and "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    assert "--device" in res.stderr


def test_timing_suites_that_all_fail_exit_non_zero(tmp_path, monkeypatch, capsys):
    """Per-suite errors never end in exit 0 with empty tables."""
    import benchmarks._runner as runner

    class BrokenSuite:
        params = [1]
        param_names = ["n"]

        def setup(self, n):
            raise RuntimeError("device went away")

        def time_nothing(self, n):
            pass

    monkeypatch.setattr(runner, "discover", lambda areas=None: [BrokenSuite])
    rc = R.main(["--suite", "timing", "--out", str(tmp_path)])
    captured = capsys.readouterr()
    assert rc == 1
    assert "device went away" in captured.out  # the suite's own error is shown
    assert "no timing suite produced a measurement" in captured.err
    assert not (tmp_path / "results.md").exists()


# ------------------------------------------------------------------- store


def _filled_store(path: Path) -> str:
    with ResultStore(path) as s:
        key = s.register("result", {"what": "test"})
        rows = [(f"img{i:05d}", 1, 1, i / 7) for i in range(3000)]
        s.add_results(key, "m", "gradcam", "deletion", rows)
        s.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return key


def _zero_page(path: Path) -> None:
    with open(path, "r+b") as f:
        f.seek(4096 * 5)
        f.write(b"\0" * 4096)


def _truncate(path: Path) -> None:
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)


def _garbage(path: Path) -> None:
    path.write_bytes(os.urandom(8192))


@pytest.mark.parametrize("damage", [_zero_page, _truncate, _garbage])
def test_damaged_store_is_named_with_the_fix(damage, tmp_path, capsys, nothing_runs):
    db = tmp_path / P.DB_NAME
    _filled_store(db)
    check_file(db)  # intact: passes
    damage(db)
    with pytest.raises(StoreError, match="mv .*results.sqlite .*results.sqlite.bad"):
        check_file(db)
    assert R.main(["--suite", "accuracy", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(db) in err and "damaged" in err


def test_damaged_store_errors_name_the_path_when_opened_or_read(tmp_path):
    db = tmp_path / P.DB_NAME
    _garbage(db)
    with pytest.raises(StoreError, match=str(db)):
        ResultStore(db)
    db2 = tmp_path / "b" / P.DB_NAME
    key = _filled_store(db2)
    _truncate(db2)
    with pytest.raises(StoreError, match=str(db2)):
        with ResultStore(db2) as store:
            store.results([key])


def test_store_marks_non_finite_values_and_tables_count_them(tmp_path, monkeypatch):
    """NaN / Inf are stored as NULL with their status; the per-model table
    averages the finite values and says how many were not finite."""
    from benchmarks.evaluation import tables as T
    from tests.test_evaluation import config, tiny_spec

    real = M.metric_function
    calls = []

    def nan_for_some(name):
        fn = real(name)

        @functools.wraps(fn)
        def wrapped(model, x, maps, target, **opts):
            v = fn(model, x, maps, target, **opts).clone()
            calls.append(1)
            v[0] = float("nan") if len(calls) == 1 else float("inf")
            return v

        return wrapped

    monkeypatch.setattr(M, "metric_function", nan_for_some)
    sup = tiny_spec("tiny_sup", "supervised", 0)
    ssl = tiny_spec("tiny_ssl", "self-supervised", 1)
    plan = P.run(config(tmp_path, [sup, ssl], limit=4, metrics=["average_drop"]))
    with ResultStore(tmp_path / P.DB_NAME) as s:
        key = plan.result_keys["tiny_sup", "gradcam", "average_drop"]
        rows = s.results([key])
        tabs = T.build_tables(s, plan)
    status = sorted(r["status"] for r in rows)
    assert status == ["inf", "nan", "ok", "ok"]  # two batches of two images
    assert all(r["value"] is None for r in rows if r["status"] != "ok")
    finite = [r["value"] for r in rows if r["status"] == "ok"]
    row = next(r for r in tabs["per_model"] if r["model"] == "tiny_sup")
    assert row["nonfinite"] == len(rows) - len(finite) > 0
    assert row["n"] == len(finite)
    assert row["mean"] == pytest.approx(sum(finite) / len(finite))
    md = T.markdown(tabs)
    assert f"({row['nonfinite']} non-finite)" in md
    # the paired comparison leaves out the images where either value is not
    # finite, and says how many
    (cmp,) = tabs["comparison"]
    assert cmp["n"] + cmp["nonfinite"] == len(rows)
    assert cmp["nonfinite"] >= row["nonfinite"]
    assert f"| {cmp['n']} ({cmp['nonfinite']} non-finite) |" in md


def test_every_registered_method_name_passes_validation():
    """Every name the registry knows (CAMs, the other CAMs, attention, LRP,
    gradient methods and their NoiseTunnel variants) is accepted by the option
    check, and the unknown-method error lists them all."""
    from benchmarks.evaluation import methods as M
    from benchmarks.evaluation.options import OptionError, check_method

    for name in M.method_names():
        check_method(name)
    with pytest.raises(OptionError) as err:
        check_method("no_such_method")
    for name in M.method_names():
        if "+" not in name:
            assert name in str(err.value)


def test_disk_full_is_one_line_naming_the_folder_and_the_store_stays_intact(
    tmp_path, capsys, monkeypatch
):
    """Before: a ``sqlite3.OperationalError`` traceback. The disk is made
    full for SQLite with ``max_page_count`` (SQLITE_FULL, as a full disk)."""
    path = tmp_path / P.DB_NAME
    store = ResultStore(path)
    key = store.register("result", {"m": 1})
    store.add_results(key, "m", "gradcam", "deletion", [("a", 1, 1, 0.5)])
    pages = store.conn.execute("PRAGMA page_count").fetchone()[0]
    store.conn.execute(f"PRAGMA max_page_count = {pages}")
    rows = [(f"img{i}", 1, 1, 0.25) for i in range(5000)]
    with pytest.raises(StoreError, match=rf"{tmp_path}: the disk is full.*MiB free"):
        store.add_results(key, "m", "gradcam", "deletion", rows)
    store.close()
    check_file(path)  # intact, with the rows written before
    again = ResultStore(path)
    assert [r["image"] for r in again.results()] == ["a"]
    again.add_results(key, "m", "gradcam", "deletion", rows)  # the rerun completes
    assert len(again.results()) == 5001
    again.close()

    def full(_args):
        raise StoreError(f"{tmp_path}: the disk is full (0.0 MiB free) ...")

    monkeypatch.setattr(R, "_main", full)
    assert R.main(["--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "the disk is full" in err
