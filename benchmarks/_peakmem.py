"""Peak memory of one ``peakmem_*`` measure in a fresh process (CPU).

``python -m benchmarks._peakmem MODULE CLASS METHOD PARAMS_JSON`` runs the
suite's ``setup`` then the method once and prints the peak resident memory
above the resident memory just before the call, in MiB (as asv measures
``peakmem_*`` in a separate process)."""

from __future__ import annotations

import gc
import importlib
import json
import sys

import torch

from benchmarks._measure import peak_memory


def main(module: str, cls: str, method: str, params_json: str) -> None:
    params = json.loads(params_json)
    suite = getattr(importlib.import_module(module), cls)()
    suite.setup(*params)
    gc.collect()
    with peak_memory(torch.device("cpu")) as mem:
        getattr(suite, method)(*params)
    print(json.dumps({"mib": mem["mib"]}))


if __name__ == "__main__":
    main(*sys.argv[1:5])
