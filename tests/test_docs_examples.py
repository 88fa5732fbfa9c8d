"""Every fenced ```python block of README.md and docs/*.md runs as written.

Blocks are found automatically, so a block added anywhere in those files is
executed too. Each block runs on its own (a fresh namespace, in a temporary
folder, seeded), so it must define its inputs. An HTML comment on the line
just before a block adapts the run, in ways a reader can see:

``<!-- docs-test: weights=random -->``
    ``captum_ssl.models.load(name, ...)`` builds the same architecture with
    random weights instead of reading ``storage/pretrained_weights/`` (for
    the examples of models whose checkpoints must be downloaded).
``<!-- docs-test: size=64 -->``
    photos from ``captum_ssl.data`` (``bundled_photos``, ``image_batches``)
    come at 64 x 64 pixels: same code, fewer FLOPs (CNN examples only).
``<!-- docs-test: replace OLD -> NEW -->``
    the text ``OLD`` (which must occur in the block) becomes ``NEW``: fewer
    epochs, seeds or fractions for an example whose real cost is long.

Items are separated by ``;``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Dict, List, Tuple

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
BLOCK = re.compile(
    r"(?:<!--\s*docs-test:(?P<opts>[^\n]*?)-->[ \t]*\n)?"
    r"^```python[ \t]*\n(?P<code>.*?)^```",
    re.S | re.M,
)


def doc_files() -> List[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("**/*.md"))]


def blocks() -> List[Tuple[str, str, str]]:
    """(id, options, code) of every python block, in file order."""
    found = []
    for path in doc_files():
        text = path.read_text(encoding="utf-8")
        for m in BLOCK.finditer(text):
            line = text.count("\n", 0, m.start("code"))
            rel = path.relative_to(ROOT).as_posix()
            found.append((f"{rel}:{line}", m.group("opts") or "", m.group("code")))
    return found


def parse_options(text: str) -> Dict[str, object]:
    """``weights=random; size=64; replace A -> B`` -> a dict (replace: pairs)."""
    opts: Dict[str, object] = {"replace": []}
    for item in (s.strip() for s in text.split(";")):
        if not item:
            continue
        if item.startswith("replace "):
            old, sep, new = item[len("replace ") :].partition(" -> ")
            assert sep, f"docs-test: write `replace OLD -> NEW`, got {item!r}"
            opts["replace"].append((old, new))  # type: ignore[union-attr]
        elif item == "weights=random":
            opts["weights"] = "random"
        elif item.startswith("size="):
            opts["size"] = int(item[len("size=") :])
        else:
            raise AssertionError(f"unknown docs-test option {item!r}")
    return opts


def _random_weights(monkeypatch) -> None:
    import captum_ssl.models as zoo
    from captum_ssl.models import _api
    from captum_ssl.models._targets import headless

    def load(name, weights_dir=None, *, head=True, files=None, check_hash=False, **kw):
        e = zoo.entry(name)
        torch.manual_seed(0)
        model = e.build(**kw)
        if not head:
            headless(model)
        model.eval()
        model.zoo_entry = e
        return model

    monkeypatch.setattr(zoo, "load", load)
    monkeypatch.setattr(_api, "load", load)


def _small_photos(monkeypatch, size: int) -> None:
    import torch.nn.functional as F

    import captum_ssl.data as data

    def shrink(photos):
        def resize(t):
            return F.interpolate(t, size=(size, size), mode="bilinear")

        return photos._replace(images=resize(photos.images), raw=resize(photos.raw))

    bundled, batches = data.bundled_photos, data.image_batches

    def bundled_photos(*args, **kwargs):
        return shrink(bundled(*args, **kwargs))

    def image_batches(*args, **kwargs):
        for photos in batches(*args, **kwargs):
            yield shrink(photos)

    monkeypatch.setattr(data, "bundled_photos", bundled_photos)
    monkeypatch.setattr(data, "image_batches", image_batches)


ALL = blocks()


def test_the_docs_have_examples_and_every_marker_is_understood():
    assert len(ALL) >= 10, [b[0] for b in ALL]
    for where, opts, code in ALL:
        for old, _ in parse_options(opts)["replace"]:
            assert old in code, f"{where}: docs-test replace: {old!r} not in block"


@pytest.mark.parametrize("where, opts, code", ALL, ids=[b[0] for b in ALL])
def test_example_runs_as_written(where, opts, code, tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    options = parse_options(opts)
    for old, new in options["replace"]:
        code = code.replace(old, new)
    if options.get("weights") == "random":
        _random_weights(monkeypatch)
    if "size" in options:
        _small_photos(monkeypatch, int(options["size"]))
    monkeypatch.chdir(tmp_path)  # files an example writes land here
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.manual_seed(0)
    namespace = {"__name__": "__docs_example__"}
    try:
        exec(compile(code, where, "exec"), namespace)
    finally:
        plt.close("all")
    assert os.getcwd() == str(tmp_path)
