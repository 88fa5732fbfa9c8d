"""The accuracy pipeline of ``python -m benchmarks.run``: model x method x
metric over images into a resumable SQLite store, tables and figures from it.

Modules: ``store`` (SQLite results), ``methods`` (models, methods and metrics
by name), ``pipeline`` (running, resuming, distributing), ``tables``,
``figures``, ``report`` (``report.html``), ``explain`` (``--explain``),
``cli`` (the runner's options).
"""
