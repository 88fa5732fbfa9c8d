"""Low precision (issue 22): every exported attribution method, with a
bfloat16 or float16 model and inputs, gives the map that float32 gives on
the same weights, or refuses naming the dtype and ``model.float()``.

The methods and their models come from the bad-input matrix
(``tests/test_bad_input_matrix.py``), whose
``test_every_exported_method_is_in_the_matrix`` keeps ``METHODS`` equal to
``captum_ssl.attr.__all__``: a new method cannot join without a row here.

The reference is float32 on the *same* weights and inputs (the low-precision
model and inputs cast back to float32), so the comparison measures the
method's arithmetic, not the rounding of the model: with rounded weights some
maps move (Chefer's rules are sensitive to them) whatever precision the
method computes in. Both dtypes run on the CPU (torch 2.14 has CPU kernels
for half-precision convolutions and matrix products).
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from test_bad_input_matrix import METHODS, inputs, run

from captum_ssl.attr import AttributionInputError

#: Pearson correlation over the batch that a map computed in low precision
#: must reach. Correct computations give >= 0.988 here (TransformerLRP in
#: bfloat16); rollout / flow / DFF's NMF / Smooth Grad-CAM++'s cubes computed
#: in bfloat16 or float16 gave 0.60-0.96 or NaN.
BOUND = 0.97

#: methods that refuse a dtype: the map cannot be given correctly
REFUSED = {torch.bfloat16: {"TransformerAttribution"}}

DTYPES = [torch.bfloat16, torch.float16]


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.flatten().double(), b.flatten().double()
    a, b = a - a.mean(), b - b.mean()
    return float((a @ b) / (a.norm() * b.norm()))


def test_refused_rows_are_methods():
    for names in REFUSED.values():
        assert names <= set(METHODS), sorted(names - set(METHODS))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(METHODS))
def test_low_precision_map_matches_float32_or_is_refused(name, dtype):
    spec = METHODS[name]
    low = spec.model().to(dtype)
    same = copy.deepcopy(low).float()  # float32 on the same weights
    x = inputs(name).to(dtype)
    method = spec.make(low, spec.layer(low))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if name in REFUSED.get(dtype, set()):
            with pytest.raises(AttributionInputError) as err:
                run(spec, method, x)
            assert str(dtype) in str(err.value) and "model.float()" in str(err.value)
            return
        ref = run(spec, spec.make(same, spec.layer(same)), x.float())
        got = run(spec, method, x)
    assert got.shape == ref.shape and got.device == x.device
    assert got.is_floating_point() and torch.isfinite(got).all()
    r = pearson(got, ref)
    assert r >= BOUND, f"{name} in {dtype}: correlation {r:.4f} with float32"
