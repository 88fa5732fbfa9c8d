"""Costly methods batch by default, and speed options are not part of a
method's identity in the tables and the store."""

from __future__ import annotations

import math

import pytest
import torch

from benchmarks.evaluation import methods as M
from benchmarks.evaluation import pipeline as P
from benchmarks.evaluation.store import ResultStore
from captum_ssl.attr import LayerAblationCam, LayerScoreCam
from captum_ssl.attr._core import (
    AUTO_CHUNK_CAP,
    AUTO_CHUNK_CPU_BYTES,
    AUTO_CHUNK_INPUT_COPIES,
    auto_perturbations_per_eval,
)


def _count_forwards(model):
    calls = []
    handle = model.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    return calls, handle


@pytest.mark.parametrize("cls", [LayerScoreCam, LayerAblationCam])
def test_default_chunks_equal_explicit_small_chunks(cls, tiny_cnn):
    torch.manual_seed(0)
    x = torch.rand(3, 3, 16, 16)
    target = [0, 2, 4]
    layer = tiny_cnn.features[3]
    explicit = cls(tiny_cnn, layer).attribute(
        x, target=target, perturbations_per_eval=3
    )
    cam = cls(tiny_cnn, layer)
    # full passes only: the prefix cache's own proof passes are tested in
    # test_prefix_cache.py
    cam.prefix_cache = False
    calls, handle = _count_forwards(tiny_cnn)
    try:
        default = cam.attribute(x, target=target)
    finally:
        handle.remove()
    torch.testing.assert_close(default, explicit, rtol=1e-5, atol=1e-6)
    channels = layer.out_channels
    total = x.shape[0] * channels  # one perturbed evaluation per image and channel
    # the old default (1) made `total` one-image forward passes; the automatic
    # chunk evaluates these small inputs in ceil(total / chunk) passes
    perturbed = [n for n in calls if n != x.shape[0]]
    chunk = auto_perturbations_per_eval((x,), total)
    assert chunk == min(total, AUTO_CHUNK_CAP["cpu"])
    assert len(perturbed) == math.ceil(total / chunk) < total / 8
    assert sum(perturbed) == total


def test_auto_chunk_is_bounded_by_memory_and_cap():
    small = torch.zeros(1, 3, 32, 32)
    assert auto_perturbations_per_eval((small,), 5) == 5  # never more than needed
    assert auto_perturbations_per_eval((small,), 10_000) == AUTO_CHUNK_CAP["cpu"]
    # a larger input (3 x 128 x 128 floats, counted 32 times): as many as fit
    # in the CPU budget
    large = torch.zeros(1, 3, 128, 128)
    n = auto_perturbations_per_eval((large,), 10_000)
    per_eval = AUTO_CHUNK_INPUT_COPIES * large.numel() * 4
    assert 1 <= n < AUTO_CHUNK_CAP["cpu"]
    assert n * per_eval <= AUTO_CHUNK_CPU_BYTES < (n + 1) * per_eval
    huge = torch.zeros(1, 3, 4096, 4096)  # more than the budget: one at a time
    assert auto_perturbations_per_eval((huge,), 10_000) == 1


def test_speed_options_are_not_part_of_the_identity(tmp_path):
    from tests.test_evaluation import config, tiny_spec

    spec = tiny_spec("tiny_sup", "supervised", 0)
    plain = config(tmp_path, [spec], methods=["scorecam"], metrics=["deletion_auc"])
    fast = config(
        tmp_path,
        [spec],
        methods=["scorecam:perturbations_per_eval=8,show_progress=False"],
        metrics=["deletion_auc:batch_size=16"],
    )
    other = config(
        tmp_path, [spec], methods=["scorecam:relu_attributions=False"], metrics=[]
    )
    with ResultStore(tmp_path / P.DB_NAME) as store:
        a, b = P.make_plan(plain, store), P.make_plan(fast, store)
        c = P.make_plan(other, store)
    assert list(a.methods) == list(b.methods) == ["scorecam"]
    assert list(a.metrics) == list(b.metrics) == ["deletion_auc"]
    assert a.result_keys == b.result_keys and a.map_keys == b.map_keys
    # an option that changes the map still makes its own label and key
    assert list(c.methods) == ["scorecam:relu_attributions=False"]
    assert set(c.map_keys.values()).isdisjoint(a.map_keys.values())
    # and the speed option still reaches the method
    assert b.methods["scorecam"][1]["perturbations_per_eval"] == 8
    assert "perturbations_per_eval" not in M.identity(b.methods["scorecam"][1])
