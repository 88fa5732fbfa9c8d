"""Loading models of the zoo from their official files; listing what is present."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Union

from torch import nn

from ._checkpoint import (
    CheckpointError,
    CheckpointMismatchError,
    MissingCheckpointError,
    check_sha256,
    incomplete_reason,
    load_state,
    read_checkpoint,
)
from ._registry import REGISTRY, CheckpointFile, ModelEntry
from ._targets import headless

PathLike = Union[str, "os.PathLike[str]"]

#: environment variable overriding the default weights folder
WEIGHTS_ENV = "CAPTUM_SSL_WEIGHTS_DIR"
PROJECT_ROOT = Path(__file__).resolve().parents[2]


def default_weights_dir() -> Path:
    """``$CAPTUM_SSL_WEIGHTS_DIR``, else ``<project>/storage/pretrained_weights``."""
    env = os.environ.get(WEIGHTS_ENV)
    if env:
        return Path(env).expanduser()
    return PROJECT_ROOT / "storage" / "pretrained_weights"


def entry(name: str) -> ModelEntry:
    """The registry entry of a model, or a clear error listing the known names."""
    if isinstance(name, ModelEntry):
        return name
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"unknown model {name!r}; known models: {', '.join(REGISTRY)}"
        ) from None


def list_models(
    weights_dir: Optional[PathLike] = None, present: bool = False
) -> List[str]:
    """Names of the registry entries (only those whose files are present if asked)."""
    if present:
        return available(weights_dir)
    return list(REGISTRY)


def _required(e: ModelEntry, head: bool) -> List[CheckpointFile]:
    return [f for f in e.files if head or f.role != "head"]


def _locate(f: CheckpointFile, folder: Path) -> Optional[Path]:
    for filename in (f.filename, *f.alternatives):
        path = folder / filename
        if path.is_file():
            return path
    if f.bundled is not None:
        try:
            path = Path(f.bundled())
        except ImportError:
            return None
        return path if path.is_file() else None
    return None


def _missing_error(
    e: ModelEntry, f: CheckpointFile, folder: Path
) -> MissingCheckpointError:
    also = f" (or {', '.join(f.alternatives)})" if f.alternatives else ""
    return MissingCheckpointError(
        f"{e.name}: {f.role} file not found: expected {folder / f.filename}{also}. "
        f"Get it from {f.source} and put it in {folder} (or pass weights_dir=, or "
        f"set ${WEIGHTS_ENV})."
    )


def checkpoint_paths(
    name: str,
    weights_dir: Optional[PathLike] = None,
    head: bool = True,
    files: Optional[Mapping[str, PathLike]] = None,
) -> Dict[str, Path]:
    """The file of each role a model needs, or :class:`MissingCheckpointError`.

    Args:
        name (str): registry name.
        weights_dir (path, optional): folder of the checkpoint files.
                    Default: :func:`default_weights_dir`
        head (bool, optional): include the classifier files. Default: True
        files (dict[str, path], optional): explicit paths by role
                    (``"weights"``, ``"backbone"``, ``"head"``) overriding the folder.
    """
    e = entry(name)
    folder = Path(weights_dir) if weights_dir is not None else default_weights_dir()
    files = dict(files or {})
    unknown = set(files) - {f.role for f in e.files}
    if unknown:
        raise ValueError(
            f"{e.name} has no file role(s) {sorted(unknown)}; its roles are "
            f"{[f.role for f in e.files]}"
        )
    out: Dict[str, Path] = {}
    for f in _required(e, head):
        if f.role in files:
            path = Path(files[f.role])
            if not path.is_file():
                raise MissingCheckpointError(
                    f"{e.name}: {f.role} file not found: {path}. Get it from "
                    f"{f.source}."
                )
        else:
            located = _locate(f, folder)
            if located is None:
                raise _missing_error(e, f, folder)
            path = located
        out[f.role] = path
    return out


def is_available(
    name: str, weights_dir: Optional[PathLike] = None, head: bool = True
) -> bool:
    """Whether every file ``load(name, head=head)`` needs is present and whole.

    An empty or partly downloaded file (:func:`incomplete_reason`) does not
    count: :func:`describe` says what is wrong with it."""
    try:
        paths = checkpoint_paths(name, weights_dir, head)
    except MissingCheckpointError:
        return False
    return all(incomplete_reason(p) is None for p in paths.values())


def available(weights_dir: Optional[PathLike] = None, head: bool = True) -> List[str]:
    r"""Registry names whose checkpoint files are present (ready to :func:`load`).

    ``efficientnet_lite0`` is always listed: its weights ship with an installed
    package. With ``head=False`` a self-supervised model whose backbone file is
    present but not its linear head is listed too (for headless use).

    Examples::

        >>> import captum_ssl.models as zoo
        >>> for name in zoo.available():
        ...     model = zoo.load(name)
    """
    return [n for n in REGISTRY if is_available(n, weights_dir, head)]


def describe(name: str, weights_dir: Optional[PathLike] = None) -> Dict[str, Any]:
    r"""Everything the registry knows about a model, and which of its files are present.

    Returns:
        dict: name, architecture, training, method, paper, preprocessing, cam_layer,
        attention_layers, family, probe (the tokens a wrapped linear probe
        reads, or None), notes, ``files`` (one dict per file: role, filename,
        source, path or None, present) and ``available``.

    Examples::

        >>> info = describe("dino_xcit_s12_16")
        >>> [(f["filename"], f["present"]) for f in info["files"]]
    """
    e = entry(name)
    folder = Path(weights_dir) if weights_dir is not None else default_weights_dir()
    files = []
    for f in e.files:
        path = _locate(f, folder)
        problem = incomplete_reason(path) if path is not None else None
        files.append(
            dict(
                role=f.role,
                filename=f.filename,
                alternatives=list(f.alternatives),
                source=f.source,
                path=str(path) if path else None,
                expected=str(folder / f.filename),
                present=path is not None,
                problem=problem,  # why a present file is unusable (None: whole)
            )
        )
    p = e.preprocessing
    return dict(
        name=e.name,
        architecture=e.architecture,
        arch=e.arch,
        training=e.training,
        method=e.method,
        paper=e.paper,
        preprocessing=p.as_dict(),
        cam_layer=e.cam_layer,
        attention_layers=e.attention_layers,
        embed_dim=e.embed_dim,
        family=e.family,
        probe=e.probe.describe() if e.probe is not None else None,
        notes=e.notes,
        files=files,
        available=all(f["present"] and not f["problem"] for f in files),
    )


def preprocess(name: str) -> Callable:
    """The evaluation transform of a model: PIL image -> normalised ``(3, H, W)``."""
    return entry(name).preprocessing.transform()


def load(
    name: str,
    weights_dir: Optional[PathLike] = None,
    *,
    head: bool = True,
    files: Optional[Mapping[str, PathLike]] = None,
    check_hash: bool = False,
    **model_kwargs: Any,
) -> nn.Module:
    r"""A model of the zoo with its official weights, in eval mode, on the CPU.

    Files are read from ``weights_dir`` (default :func:`default_weights_dir`) with
    weights-only unpickling; nothing is downloaded. Official layouts are converted
    (MoCo v3 ``module.`` prefixes, DINO / DINOv2 backbone + linear head,
    DeiT/CaiT/XCiT/Swin through timm's converters, torchvision state dicts).
    Where the official linear probe reads more than timm's pooled token (DINO
    ViTs, DINOv2), the model is a :class:`TokenLinearProbe` around the timm
    backbone, so every explanation sees the probe's real input.

    Args:
        name (str): registry name (:func:`list_models`).
        weights_dir (path, optional): folder holding the files.
        head (bool, optional): with False, return the headless backbone (its
                    output is the ``embed_dim`` embedding; self-supervised models
                    then need only their backbone file). Default: True
        files (dict[str, path], optional): explicit file paths by role.
        check_hash (bool, optional): verify the SHA-256 (prefix) recorded in the
                    registry, where there is one. Default: False
        **model_kwargs: passed to the architecture's constructor (e.g. a smaller
                    ``depth`` for tests).

    Returns:
        nn.Module: the model in eval mode; ``model.zoo_entry`` is its entry.

    Raises:
        MissingCheckpointError: a file is absent (message: expected path, source).
        CorruptCheckpointError: a file is truncated or not a PyTorch file.
        UnsafeCheckpointError: a file holds objects other than weights.
        CheckpointMismatchError: a file is of another model (missing/unexpected
                    keys, shape mismatches).
        ChecksumError: ``check_hash=True`` and the digest differs.

    Examples::

        >>> import captum_ssl.models as zoo
        >>> model = zoo.load("efficientnet_lite0")
        >>> transform = zoo.preprocess("efficientnet_lite0")
        >>> logits = model(transform(pil_image)[None])
    """
    e = entry(name)
    paths = checkpoint_paths(e.name, weights_dir, head, files)
    by_role = {f.role: f for f in e.files}
    raw = {}
    for role, path in paths.items():
        f = by_role[role]
        if check_hash and f.sha256:
            check_sha256(path, f.sha256, f.source)
        raw[role] = read_checkpoint(path, f.source)
    model = e.build(head=head, **model_kwargs)
    what = " + ".join(str(p) for p in paths.values())
    try:
        state = e.convert(raw, model)
    except CheckpointError as err:
        raise type(err)(f"{e.name}: {what}: {err}") from err
    except (KeyError, ValueError, RuntimeError, AttributeError, IndexError) as err:
        raise CheckpointMismatchError(
            f"{e.name}: {what} cannot be converted to {e.arch} ({type(err).__name__}: "
            f"{err}). Is it the file of another model?"
        ) from err
    ignore = () if head else (f"{e.classifier}.",)
    load_state(model, state, f"{e.name}: {what}", ignore_missing=ignore)
    if not head:
        headless(model)
    model.eval()
    setattr(model, "zoo_entry", e)  # noqa: B010 (not a Module attribute)
    return model


def models_table() -> str:
    r"""The zoo as a Markdown table: model, architecture, training, files, source.

    ``docs/models_table.md`` is this table (a test keeps them in sync).

    Examples::

        >>> print(models_table())
    """
    lines = [
        "| name | architecture | training | file(s) in `storage/pretrained_weights/`"
        " | download from | preprocessing | CAM layer | attention layers |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for e in REGISTRY.values():
        files = "<br>".join(
            f"`{f.filename}`"
            + (f" ({f.role})" if f.role != "weights" else "")
            + "".join(f" or `{a}`" for a in f.alternatives)
            for f in e.files
        )
        sources = "<br>".join(
            f"<{f.source}>" if f.source.startswith("http") else f"`{f.source}`"
            for f in e.files
        )
        p = e.preprocessing
        norm = "mean=std=0.5" if p.mean == (0.5, 0.5, 0.5) else "ImageNet mean/std"
        pre = f"{p.interpolation} {p.resize}, crop {p.crop}, {norm}"
        attn = f"`{e.attention_layers}`" if e.attention_layers else "-"
        train = (
            e.method if e.method.startswith(e.training) else f"{e.training}: {e.method}"
        )
        lines.append(
            f"| `{e.name}` | {e.architecture} | {train} | {files} "
            f"| {sources} | {pre} | `{e.cam_layer}` | {attn} |"
        )
    lines.append("")
    lines += [f"- `{e.name}`: {e.notes}." for e in REGISTRY.values() if e.notes]
    return "\n".join(lines) + "\n"
