"""Two explanations of one model at the same time (issue 23).

Calls on one model from several threads must give the results they give
alone, and leave the model exactly as it was (flags, instance attributes,
hooks, modes, parameters), also when a call raises; calls on different
models run in parallel; the wait is bounded and never deadlocks.
"""

from __future__ import annotations

import multiprocessing
import threading
import time
import warnings
from typing import Any, Callable, Dict, List, Tuple

import numpy as np
import pytest
import torch
from captum.attr import NoiseTunnel
from conftest import make_tiny_vit
from torch import nn

from captum_ssl.attr import (
    AttentionRollout,
    AttnLRP,
    AttributionInputError,
    ConcurrentCallError,
    GenericAttention,
    LayerAblationCam,
    LayerEigenCam,
    LayerGradCam,
    LayerGradCamPlusPlus,
    LayerScoreCam,
    LeGrad,
    RawAttention,
    TokenLayout,
    TransformerAttribution,
    model_lock,
)
from captum_ssl.attr._core import eval_mode
from captum_ssl.attr._prefix import record_layer
from captum_ssl.metrics import deletion_auc, explanation_consistency, insertion_auc
from captum_ssl.metrics._quantus import numpy_compat

THREADS = 8
ROUNDS = 20
JOIN_S = 60.0  # per thread and round: far above a round's few milliseconds


class BNCNN(nn.Module):
    """conv-bn-relu -> pool -> conv-bn-relu -> global pool -> linear."""

    def __init__(self) -> None:
        super().__init__()
        self.block1 = nn.Sequential(
            nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU()
        )
        self.pool = nn.MaxPool2d(2)
        self.block2 = nn.Sequential(
            nn.Conv2d(6, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()
        )
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.block2(self.pool(self.block1(x)))
        return self.fc(h.mean(dim=(2, 3)))


def model_state(model: nn.Module) -> Dict[str, Any]:
    """Everything a call may change: parameters and buffers, each module's
    instance attributes (names and plain values: flags such as
    ``fused_attn``, ``training``; a left-behind ``forward``), its hook
    dicts, the parameters' ``requires_grad``, torch's global module hooks."""
    from torch.nn.modules import module as torch_module

    modules = {}
    for name, m in model.named_modules():
        attrs = {}
        for key, value in m.__dict__.items():
            if "hook" in key and isinstance(value, dict):
                attrs[key] = list(value)
            elif isinstance(value, (bool, int, float, str, type(None))):
                attrs[key] = value
            elif not isinstance(value, dict):
                attrs[key] = type(value).__name__  # e.g. a patched forward
            else:
                attrs[key] = sorted(value)  # _parameters, _buffers, _modules
        modules[name] = attrs
    glob = {
        k: len(v)
        for k, v in vars(torch_module).items()
        if k.startswith("_global_") and isinstance(v, dict)
    }
    return {
        "tensors": {k: v.clone() for k, v in model.state_dict().items()},
        "modules": modules,
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "global_hooks": glob,
        "numpy_names": [n for n in ("trapz", "NaN") if hasattr(np, n)],
    }


def assert_same_state(before: Dict[str, Any], after: Dict[str, Any]) -> None:
    assert after["modules"] == before["modules"]
    assert after["requires_grad"] == before["requires_grad"]
    assert after["global_hooks"] == before["global_hooks"]
    assert after["numpy_names"] == before["numpy_names"]
    assert after["tensors"].keys() == before["tensors"].keys()
    for k, v in before["tensors"].items():
        assert torch.equal(after["tensors"][k], v), k


def cnn_calls(cnn: nn.Module, x: torch.Tensor) -> List[Tuple[str, Callable]]:
    t = [1, 3]
    cam = LayerGradCam(cnn, cnn.block2)
    maps = cam.attribute(x, target=t)
    nt = NoiseTunnel(LayerGradCam(cnn, cnn.block2))
    return [
        ("gradcam", lambda: cam.attribute(x, target=t)),
        (
            "gradcam++ block1",
            lambda: LayerGradCamPlusPlus(cnn, cnn.block1).attribute(x, target=t),
        ),
        ("eigencam", lambda: LayerEigenCam(cnn, cnn.block2).attribute(x)),
        # prefix-cached perturbations (proven replay, global recording hooks)
        (
            "ablationcam",
            lambda: LayerAblationCam(cnn, cnn.block2).attribute(
                x, target=t, perturbations_per_eval=4
            ),
        ),
        ("scorecam", lambda: LayerScoreCam(cnn, cnn.block1).attribute(x, target=t)),
        (
            "noisetunnel",
            lambda: nt.attribute(
                x, nt_type="smoothgrad", nt_samples=2, stdevs=0.0, target=t
            ),
        ),
        ("deletion", lambda: deletion_auc(cnn, x, maps, t, step=64)),
        # a metric that runs a method inside (nested calls of one thread)
        ("consistency", lambda: explanation_consistency(cnn, x, cam, t)),
        ("bad target", lambda: cam.attribute(x, target=99)),
    ]


def vit_calls(vit: nn.Module, x: torch.Tensor) -> List[Tuple[str, Callable]]:
    t = [2, 4]
    norm = vit.blocks[-1].norm1
    maps = GenericAttention(vit).attribute(x, target=t)
    grid = TokenLayout(grid=(4, 4), num_prefix_tokens=1)
    return [
        ("raw attention", lambda: RawAttention(vit).attribute(x)),
        ("rollout", lambda: AttentionRollout(vit).attribute(x)),
        ("generic attention", lambda: GenericAttention(vit).attribute(x, target=t)),
        ("legrad", lambda: LeGrad(vit).attribute(x, target=t)),
        ("attnlrp", lambda: AttnLRP(vit).attribute(x, target=t)),
        (
            "transformer attribution",
            lambda: TransformerAttribution(vit).attribute(x, target=t),
        ),
        ("gradcam", lambda: LayerGradCam(vit, norm).attribute(x, target=t)),
        # a plain function around the model: the same lock as the model's
        (
            "gradcam lambda",
            lambda: LayerGradCam(lambda inp: vit(inp), norm, layout=grid).attribute(
                x, target=t
            ),
        ),
        ("ablationcam", lambda: LayerAblationCam(vit, norm).attribute(x, target=t)),
        ("insertion", lambda: insertion_auc(vit, x, maps, t, step=256)),
        ("bad target", lambda: RawAttention(vit).attribute(x, target=99)),
    ]


def run_alone(call: Callable) -> Any:
    try:
        return call()
    except AttributionInputError as err:
        return err


def same(got: Any, want: Any) -> bool:
    if isinstance(want, Exception):
        return type(got) is type(want) and str(got) == str(want)
    if isinstance(got, Exception):
        return False
    return torch.allclose(got, want, rtol=1e-5, atol=1e-6, equal_nan=True)


@pytest.fixture(scope="module")
def setups():
    torch.manual_seed(0)
    cnn = BNCNN()
    with torch.no_grad():  # non-trivial BatchNorm statistics
        cnn(torch.randn(8, 3, 16, 16) * 2 + 0.5)
    cnn.train()  # the calls switch it to eval for themselves (issue 12)
    x_cnn = torch.randn(2, 3, 16, 16)
    vit = make_tiny_vit(depth=2, num_classes=6)  # fused attention on
    x_vit = torch.randn(2, 3, 32, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TrainModeWarning
        # both Ablation-CAMs take the prefix-cached path (global recording hooks)
        for model, layer, x, t in (
            (cnn, cnn.block2, x_cnn, 1),
            (vit, vit.blocks[-1].norm1, x_vit, 2),
        ):
            with eval_mode(model):
                assert not isinstance(record_layer(model, layer, (x,), t, None), str)
        return [
            (cnn, cnn_calls(cnn, x_cnn)),
            (vit, vit_calls(vit, x_vit)),
        ]


def test_eight_threads_per_model_equal_sequential_results_and_state(setups):
    """8 threads x every method family on a CNN and a ViT at once, 20 rounds:
    every result equals the call run alone, no thread hangs, and both models
    are exactly as before (the CNN stays in training mode)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TrainModeWarning from every call
        alone = [[run_alone(c) for _, c in calls] for _, calls in setups]
        before = [model_state(m) for m, _ in setups]
        assert any(m.training for m in setups[0][0].modules())
        assert setups[1][0].blocks[0].attn.fused_attn is True
        failures: List[str] = []
        start = time.monotonic()
        for r in range(ROUNDS):
            threads = []
            for (_, calls), want in zip(setups, alone):
                for i in range(THREADS):
                    k = (r * THREADS + i) % len(calls)

                    def work(name=calls[k][0], call=calls[k][1], want=want[k], r=r):
                        got = run_alone(call)
                        if not same(got, want):
                            failures.append(f"round {r} {name}: {got!r:.200}")

                    threads.append(threading.Thread(target=work, daemon=True))
            for th in threads:
                th.start()
            for th in threads:
                th.join(JOIN_S)
            assert not any(th.is_alive() for th in threads), f"hang in round {r}"
        elapsed = time.monotonic() - start
    assert not failures, failures[:5]
    for (model, _), state in zip(setups, before):
        assert_same_state(state, model_state(model))
    assert elapsed < 25 * JOIN_S


def test_a_second_call_waits_for_the_first(tiny_cnn, images):
    """A call from another thread starts only once the holder's block ends."""
    cam = LayerGradCam(tiny_cnn, tiny_cnn.features[3])
    want = cam.attribute(images, target=1)
    entered, release = threading.Event(), threading.Event()
    done: List[float] = []

    def holder() -> None:
        with model_lock(tiny_cnn):
            entered.set()
            release.wait(30)

    def caller() -> None:
        got = cam.attribute(images, target=1)
        done.append(time.monotonic())
        assert torch.allclose(got, want)

    h = threading.Thread(target=holder)
    h.start()
    assert entered.wait(30)
    c = threading.Thread(target=caller)
    c.start()
    time.sleep(0.2)
    assert not done  # still waiting for the holder
    released = time.monotonic()
    release.set()
    h.join(30)
    c.join(30)
    assert done and done[0] >= released


def test_bounded_wait_raises_naming_concurrency_and_the_fix(tiny_cnn, images):
    """``model_lock(model, timeout)`` bounds the wait of a call; the error names
    concurrency and the fix; a wrapper and a lambda share the model's lock."""
    entered, release = threading.Event(), threading.Event()

    def holder() -> None:
        with model_lock(tiny_cnn):
            entered.set()
            release.wait(30)

    h = threading.Thread(target=holder, name="explainer-1")
    h.start()
    try:
        assert entered.wait(30)
        wrapper = nn.Sequential(nn.Identity(), tiny_cnn)
        for forward in (tiny_cnn, wrapper, lambda inp: tiny_cnn(inp)):
            t0 = time.monotonic()
            with pytest.raises(ConcurrentCallError) as err:
                with model_lock(forward, timeout=0.1):
                    LayerGradCam(forward, tiny_cnn.features[3]).attribute(
                        images, target=1
                    )
            assert time.monotonic() - t0 < 10
            msg = str(err.value)
            assert "another thread (explainer-1)" in msg
            assert "copy.deepcopy(model)" in msg
        # another model is not held: no wait
        other = make_tiny_vit(depth=1)
        with model_lock(other, timeout=0.1):
            RawAttention(other).attribute(torch.randn(1, 3, 32, 32))
    finally:
        release.set()
        h.join(30)
    with model_lock(tiny_cnn, timeout=1.0):  # free again
        pass


def test_nested_calls_of_one_thread_do_not_wait(tiny_cnn, images):
    """Re-entrant: a call inside ``model_lock`` (and a metric running a method)
    proceeds at once, even with a zero timeout."""
    cam = LayerGradCam(tiny_cnn, tiny_cnn.features[3])
    with model_lock(tiny_cnn, timeout=0.0):
        with model_lock(lambda inp: tiny_cnn(inp), timeout=0.0):
            maps = cam.attribute(images, target=[0, 1, 2])
            assert explanation_consistency(tiny_cnn, images, cam, 1).shape == (3,)
    assert maps.shape == (3, 1, 16, 16)


def test_a_raising_call_restores_the_model_while_others_run(tiny_vit):
    """A call that raises inside the forward pass (the model's hooks, flags and
    patched forwards are in place) gives the model back exactly as it was."""
    x = torch.randn(2, 3, 32, 32)
    before = model_state(tiny_vit)

    def broken(_m: nn.Module, _a: Any, _o: Any) -> None:
        if threading.current_thread().name == "broken":
            raise RuntimeError("boom")

    handle = tiny_vit.blocks[-1].register_forward_hook(broken)
    errors: List[str] = []
    want = GenericAttention(tiny_vit).attribute(x, target=1)

    def work(call: Callable) -> None:
        try:
            got = call()
            if not torch.allclose(got, want):
                errors.append("wrong")
        except RuntimeError as err:
            errors.append(str(err))

    calls = [
        lambda: AttnLRP(tiny_vit).attribute(x, target=1),
        lambda: GenericAttention(tiny_vit).attribute(x, target=1),
    ]
    threads = [
        threading.Thread(target=work, args=(calls[0],), name="broken"),
        *[threading.Thread(target=work, args=(calls[1],)) for _ in range(3)],
    ]
    for th in threads:
        th.start()
    for th in threads:
        th.join(JOIN_S)
    handle.remove()
    assert errors == ["boom"]
    assert_same_state(before, model_state(tiny_vit))


def test_numpy_compat_names_survive_other_threads_exits():
    """Quantus' numpy names: one thread's exit never removes them while
    another thread's block runs; none are left afterwards."""
    present = [n for n in ("trapz", "NaN") if hasattr(np, n)]
    seen: List[bool] = []

    def work() -> None:
        for _ in range(20):
            with numpy_compat():
                time.sleep(0.001)
                seen.append(hasattr(np, "trapz") and hasattr(np, "NaN"))

    threads = [threading.Thread(target=work) for _ in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(JOIN_S)
    assert all(seen) and len(seen) == 80
    assert [n for n in ("trapz", "NaN") if hasattr(np, n)] == present


def _child(model: nn.Module, queue: Any) -> None:
    try:
        with model_lock(model, timeout=5.0):
            queue.put("ok")
    except Exception as err:  # noqa: BLE001 - reported to the parent
        queue.put(repr(err))


@pytest.mark.skipif(
    "fork" not in multiprocessing.get_all_start_methods(), reason="no fork"
)
def test_forked_worker_starts_without_the_parents_locks(tiny_cnn):
    """A process forked while another thread holds the model's lock (a
    DataLoader worker) explains its own copy without waiting."""
    entered, release = threading.Event(), threading.Event()

    def holder() -> None:
        with model_lock(tiny_cnn):
            entered.set()
            release.wait(30)

    h = threading.Thread(target=holder)
    h.start()
    try:
        assert entered.wait(30)
        ctx = multiprocessing.get_context("fork")
        queue = ctx.Queue()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # fork + threads
            proc = ctx.Process(target=_child, args=(tiny_cnn, queue))
            proc.start()
        result = queue.get(timeout=30)
        proc.join(30)
    finally:
        release.set()
        h.join(30)
    assert result == "ok"
