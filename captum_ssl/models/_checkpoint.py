"""Reading checkpoint files safely and reporting why one does not fit a model.

Every file is read with ``torch.load(..., weights_only=True)``: tensors, plain
containers and a short allow-list of harmless types (``argparse.Namespace`` and
numpy scalars, which official training scripts store next to the weights).
Nothing here touches the network.
"""

from __future__ import annotations

import argparse
import hashlib
import pickle
import zipfile
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Tuple

import torch
from torch import Tensor, nn


class CheckpointError(RuntimeError):
    """Base class of the errors raised while loading model weights."""


class MissingCheckpointError(CheckpointError, FileNotFoundError):
    """A checkpoint file is not where the registry expects it."""


class CorruptCheckpointError(CheckpointError):
    """A checkpoint file exists but is truncated or is not a PyTorch file."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint holds objects that weights-only unpickling refuses."""


class ChecksumError(CheckpointError):
    """A checkpoint file's SHA-256 differs from the expected one."""


class CheckpointMismatchError(CheckpointError):
    """A checkpoint is a valid file, but of another model (keys or shapes differ)."""


def _safe_globals() -> List[Any]:
    """Harmless non-tensor types official checkpoints hold besides the weights."""
    allowed: List[Any] = [argparse.Namespace]
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy is a dependency
        return allowed
    try:
        from numpy._core.multiarray import scalar
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import scalar
    allowed.append(np.dtype)
    # numpy 2 pickles name numpy._core, numpy 1 pickles numpy.core
    allowed.append(scalar)
    allowed.append((scalar, "numpy.core.multiarray.scalar"))
    allowed.extend(
        getattr(np.dtypes, name)
        for name in ("Float64DType", "Float32DType", "Int64DType", "Int32DType")
        if hasattr(np, "dtypes") and hasattr(np.dtypes, name)
    )
    return allowed


def sha256sum(path: Path, chunk: int = 1 << 20) -> str:
    """The hex SHA-256 digest of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def check_sha256(path: Path, expected: str, source: str = "") -> None:
    """Raise :class:`ChecksumError` unless the file's SHA-256 starts with ``expected``.

    ``expected`` may be a full digest or a prefix (torch.hub file names carry the
    first 8 hex digits, e.g. ``resnet50-0676ba61.pth``).
    """
    actual = sha256sum(path)
    if not actual.startswith(expected.lower()):
        hint = f" Download it again from {source}." if source else ""
        raise ChecksumError(
            f"{path}: SHA-256 {actual} does not match the expected {expected}; the "
            f"file is damaged or is another release.{hint}"
        )


def read_checkpoint(path: Path, source: str = "") -> Any:
    """Load a checkpoint file on the CPU with weights-only unpickling.

    Args:
        path (Path): the file.
        source (str, optional): where the file can be downloaded (used in errors).

    Returns:
        The unpickled object (usually a dict of tensors or a dict holding one).

    Raises:
        MissingCheckpointError: no such file.
        CorruptCheckpointError: empty, truncated or not a PyTorch file.
        UnsafeCheckpointError: the file holds objects that are not weights.
    """
    path = Path(path)
    where = f" Download it from {source}" if source else ""
    if not path.is_file():
        raise MissingCheckpointError(f"checkpoint not found: {path}.{where}")
    size = path.stat().st_size
    if size == 0:
        raise CorruptCheckpointError(f"{path} is empty (0 bytes).{where}")
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        text = str(err)
        if "Weights only load failed" in text and (
            "Unsupported global" in text or "GLOBAL" in text
        ):
            first = text.strip().splitlines()[0]
            raise UnsafeCheckpointError(
                f"{path} holds Python objects other than weights, which safe "
                f"(weights-only) loading refuses: {first} ... If you trust the file, "
                f"re-save only its tensors (torch.save(state_dict, path)) and load "
                f"that."
            ) from err
        raise CorruptCheckpointError(
            f"{path} ({size} bytes) is truncated or corrupt: {_first_line(err)}.{where}"
        ) from err
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as err:
        raise CorruptCheckpointError(
            f"{path} ({size} bytes) is truncated or corrupt: {_first_line(err)}.{where}"
        ) from err


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def unwrap(obj: Any, keys: Iterable[str] = ("state_dict", "model")) -> Dict[str, Any]:
    """The state dict inside a checkpoint: ``obj[k]`` for the first ``k`` present."""
    if isinstance(obj, Mapping):
        for key in keys:
            inner = obj.get(key)
            if isinstance(inner, Mapping):
                return dict(inner)
        return dict(obj)
    raise CheckpointMismatchError(
        f"expected a dict of tensors, found a {type(obj).__name__}"
    )


def strip_prefix(state: Mapping[str, Any], *prefixes: str) -> Dict[str, Any]:
    """Remove each prefix (e.g. ``"module."``) from the keys that start with it."""
    out = {}
    for key, value in state.items():
        for prefix in prefixes:
            if key.startswith(prefix):
                key = key[len(prefix) :]
        out[key] = value
    return out


def _summary(keys: List[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    more = f", ... ({len(keys) - limit} more)" if len(keys) > limit else ""
    return f"{shown}{more}"


def mismatch_report(
    model: nn.Module,
    state: Mapping[str, Any],
    ignore_missing: Tuple[str, ...] = (),
) -> Tuple[List[str], List[str], List[str]]:
    """Missing keys, unexpected keys and shape mismatches of ``state`` for ``model``."""
    expected = model.state_dict()
    missing = [
        k
        for k in expected
        if k not in state
        and not k.endswith("num_batches_tracked")
        and not k.startswith(ignore_missing or ("\0",))
    ]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
        for k, v in state.items()
        if k in expected and isinstance(v, Tensor) and v.shape != expected[k].shape
    ]
    return missing, unexpected, shapes


def load_state(
    model: nn.Module,
    state: Mapping[str, Any],
    what: str,
    ignore_missing: Tuple[str, ...] = (),
) -> None:
    """``model.load_state_dict(state)`` with one clear error listing every problem.

    Args:
        model (nn.Module): the freshly built architecture.
        state (Mapping): converted state dict.
        what (str): description of the file(s) for the error message.
        ignore_missing (tuple[str, ...], optional): key prefixes allowed to be
                    missing (e.g. the classifier of a headless model).

    Raises:
        CheckpointMismatchError: keys missing, unexpected, or of another shape.
    """
    missing, unexpected, shapes = mismatch_report(model, state, ignore_missing)
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys ({_summary(missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys ({_summary(unexpected)})")
        if shapes:
            parts.append(f"{len(shapes)} shape mismatches ({_summary(shapes, 4)})")
        raise CheckpointMismatchError(
            f"{what} does not fit {type(model).__name__}: " + "; ".join(parts) + ". "
            "Is it the file of another model or release?"
        )
    model.load_state_dict(state, strict=False)


def state_dict_of(obj: Any, what: str) -> Dict[str, Tensor]:
    """Keep the tensors of a state dict, or fail with a clear error."""
    state = unwrap(obj)
    tensors = {k: v for k, v in state.items() if isinstance(v, Tensor)}
    if not tensors:
        raise CheckpointMismatchError(
            f"{what} holds no tensors (top-level keys: {_summary(list(state))})"
        )
    return tensors
