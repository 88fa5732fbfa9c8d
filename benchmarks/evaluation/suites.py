"""The accuracy pipeline as an asv suite (``asv run`` reports it as ``track_*``).

``benchmarks.run`` runs the pipeline directly (this module is not a
``bench_*`` file, so the plain runner does not collect it); asv imports every
module of ``benchmarks/`` and finds it. The pipeline runs once per asv
process (``setup_cache``) into ``storage/quant_results/asv/`` and resumes from
that store on later runs of the same code version. ``BENCH_IMAGES`` and
``BENCH_FULL`` apply as in the plain runner.
"""

from __future__ import annotations

import os
from pathlib import Path

from benchmarks.evaluation import methods as M

OUT = Path(__file__).resolve().parents[2] / "storage" / "quant_results" / "asv"
FULL = os.environ.get("BENCH_FULL", "") != ""


class EvaluationAccuracy:
    """Mean metric value per method on EfficientNet-Lite0 (real weights)."""

    group = "accuracy"
    timeout = 1800
    params = [
        M.THESIS_METHODS[:7] if FULL else M.QUICK_METHODS,
        M.THESIS_METRICS if FULL else M.QUICK_METRICS,
    ]
    param_names = ["method", "metric"]

    def setup_cache(self) -> dict:
        from benchmarks.evaluation.cli import QUICK_LIMIT
        from benchmarks.evaluation.pipeline import DB_NAME, EvalConfig, run
        from benchmarks.evaluation.store import ResultStore
        from benchmarks.evaluation.tables import build_tables

        limit = os.environ.get("BENCH_IMAGES")
        cfg = EvalConfig(
            models=[M.registry_model("efficientnet_lite0")],
            methods=list(self.params[0]),
            metrics=list(self.params[1]),
            out=OUT,
            limit=int(limit) if limit else (None if FULL else QUICK_LIMIT),
            figures=False,
            log=lambda s: None,
        )
        plan = run(cfg)
        with ResultStore(OUT / DB_NAME) as store:
            tabs = build_tables(store, plan)
        seconds = {r["method"]: r["total_s_per_image"] for r in tabs["timing"]}
        return {
            (r["method"], r["metric"]): (r["mean"], r["ci95"], seconds[r["method"]])
            for r in tabs["per_model"]
        }

    def _get(self, cache: dict, method: str, metric: str) -> tuple:
        if (method, metric) not in cache:
            raise NotImplementedError(f"{method} x {metric}: no result")
        return cache[method, metric]

    def track_mean(self, cache: dict, method: str, metric: str) -> float:
        return self._get(cache, method, metric)[0]

    track_mean.unit = "metric value"

    def track_ci95(self, cache: dict, method: str, metric: str) -> float:
        return self._get(cache, method, metric)[1]

    track_ci95.unit = "95% CI half-width"

    def track_seconds_per_image(self, cache: dict, method: str, metric: str) -> float:
        """Attribution plus all metrics of the run, per image."""
        return self._get(cache, method, metric)[2]

    track_seconds_per_image.unit = "s"
