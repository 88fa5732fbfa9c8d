"""Reading checkpoint files safely and reporting why one does not fit a model.

Every file is read with ``torch.load(..., weights_only=True)``: tensors, plain
containers and a short allow-list of harmless types (``argparse.Namespace`` and
numpy scalars, which official training scripts store next to the weights).
Nothing here touches the network.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import io
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple, Union

import torch
from torch import Tensor, nn

PathLike = Union[str, "os.PathLike[str]"]


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


class NonFiniteWeightsError(CheckpointError):
    """A checkpoint holds NaN / Inf weights, or a negative BatchNorm variance."""


def _safe_globals() -> List[Any]:
    """Harmless non-tensor types official checkpoints hold besides the weights."""
    allowed: List[Any] = [argparse.Namespace]
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy is a dependency
        return allowed
    try:
        multiarray = importlib.import_module("numpy._core.multiarray")
    except ImportError:  # numpy < 2
        multiarray = importlib.import_module("numpy.core.multiarray")
    scalar = multiarray.scalar
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
    oversized = oversized_tensor(path)
    if oversized is not None:
        raise CorruptCheckpointError(f"{path} ({size} bytes): {oversized}.{where}")
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
            f"{path} ({size} bytes) is truncated or corrupt: {_reason(err)}.{where}"
        ) from err
    except Exception as err:  # noqa: BLE001 - any failure here is a damaged file
        raise CorruptCheckpointError(
            f"{path} ({size} bytes) is truncated or corrupt: {_reason(err)}.{where}"
        ) from err


def _reason(err: BaseException) -> str:
    """The cause in torch's message, without its advice to load the file with
    ``weights_only=False`` (unsafe, and useless for a damaged file)."""
    text = str(err).strip()
    noise = ("weights_only", "Weights only load failed", "torch.load", "error:")
    lines = [
        ln.strip()
        for ln in text.splitlines()
        if ln.strip() and not any(n in ln for n in noise)
    ]
    return lines[0].rstrip(".") if lines else type(err).__name__


_first_line = _reason  # older name


# --------------------------------------------------------------- completeness
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_ELEMENT_SIZES = {
    "DoubleStorage": 8, "FloatStorage": 4, "HalfStorage": 2, "BFloat16Storage": 2,
    "LongStorage": 8, "IntStorage": 4, "ShortStorage": 2, "CharStorage": 1,
    "ByteStorage": 1, "BoolStorage": 1, "ComplexFloatStorage": 8,
    "ComplexDoubleStorage": 16,
}  # fmt: skip


class _Inert:
    """Stands for every class a legacy checkpoint names: nothing is imported
    or run while its layout is checked."""

    qualname = ""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setitem__(self, key: Any, value: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass

    def append(self, value: Any) -> None:
        pass

    def extend(self, values: Any) -> None:
        pass


class _LayoutReader(pickle.Unpickler):
    def __init__(self, f: Any) -> None:
        super().__init__(f)
        self.storages: Dict[str, int] = {}

    def find_class(self, module: str, name: str) -> Any:
        return type(name, (_Inert,), {"qualname": f"{module}.{name}"})

    def persistent_load(self, pid: Any) -> Any:
        if isinstance(pid, tuple) and pid and pid[0] == "storage":
            kind = getattr(pid[1], "qualname", str(pid[1])).rsplit(".", 1)[-1]
            self.storages[str(pid[2])] = _ELEMENT_SIZES.get(kind, 0)
        return None


class _Storage:
    def __init__(self, key: str, element_size: int, numel: int) -> None:
        self.key, self.element_size, self.numel = key, element_size, numel


class _Node:
    """Stands for every class or function a checkpoint names; keeps what it
    was called with, so that tensors can be told apart by their names."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args = args
        self.items: Dict[Any, Any] = {}

    def __setitem__(self, key: Any, value: Any) -> None:
        self.items[key] = value

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def append(self, value: Any) -> None:
        pass

    def extend(self, values: Any) -> None:
        pass


class _SizeReader(pickle.Unpickler):
    """Reads a checkpoint's pickle without importing or running anything,
    recording each storage's declared size."""

    def find_class(self, module: str, name: str) -> Any:
        return type(name, (_Node,), {"qualname": f"{module}.{name}"})

    def persistent_load(self, pid: Any) -> Any:
        if isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage":
            kind = getattr(pid[1], "qualname", str(pid[1])).rsplit(".", 1)[-1]
            return _Storage(str(pid[2]), _ELEMENT_SIZES.get(kind, 1), int(pid[4]))
        return None


def _named_storages(obj: Any, name: str = "", depth: int = 0) -> Iterable:
    """``(tensor name, storage)`` of every storage reachable from ``obj``."""
    if depth > 50:
        return
    if isinstance(obj, _Storage):
        yield name or "(a tensor)", obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _named_storages(v, f"{name}.{k}" if name else str(k), depth + 1)
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _named_storages(v, name or f"[{i}]", depth + 1)
    elif isinstance(obj, _Node):
        # objects rebuilt with ``cls.__new__`` (NEWOBJ) skip ``__init__``
        for part in ("args", "items", "state"):
            yield from _named_storages(getattr(obj, part, None), name, depth + 1)


def oversized_tensor(path: PathLike) -> Optional[str]:
    """Why a checkpoint declares a tensor larger than the file holds for it
    (``None`` when every declared size fits).

    ``torch.load`` allocates each storage at its declared size before reading
    it, so a small file declaring a huge tensor could exhaust the memory; the
    declared sizes are read from the pickle (nothing imported or run) and
    compared with the bytes the file holds for each storage (zip format) or
    with the file's size (legacy format).
    """
    path = Path(path)
    size = path.stat().st_size
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                pkl = next(n for n in z.namelist() if n.endswith("data.pkl"))
                prefix = pkl[: -len("data.pkl")]
                root = _SizeReader(io.BytesIO(z.read(pkl))).load()
                held = {
                    n[len(prefix) + len("data/") :]: z.getinfo(n).file_size
                    for n in z.namelist()
                    if n.startswith(prefix + "data/")
                }
        else:
            with open(path, "rb") as f:
                for _ in range(3):  # magic, protocol version, sys info
                    _SizeReader(f).load()
                root = _SizeReader(f).load()
            held = None
    except Exception:  # noqa: BLE001 - unreadable: torch.load says why
        return None
    for name, st in _named_storages(root):
        declared = st.numel * st.element_size
        have = size if held is None else held.get(st.key, 0)
        if declared > have:
            return (
                f"tensor {name!r} declares {declared:,} bytes ({st.numel:,} elements) "
                f"but the file holds {have:,} bytes for it: the file is damaged or "
                "crafted, and loading it would allocate that memory; download it "
                "again"
            )
    return None


def incomplete_reason(path: PathLike) -> Optional[str]:
    """Why a checkpoint file is empty or cut short, or ``None`` when it is whole.

    Cheap (no tensor is read): a zip-format file (``torch.save`` since 1.6)
    must end with its central directory; a legacy-format file must hold every
    storage its header declares. A partly downloaded file fails both.
    """
    path = Path(path)
    size = path.stat().st_size
    if size == 0:
        return "it is empty (0 bytes)"
    if zipfile.is_zipfile(path):
        return None
    with open(path, "rb") as f:
        if f.read(4) == b"PK\x03\x04":
            return "it is a zip archive cut short (no central directory at its end)"
    try:
        with open(path, "rb") as f:
            # every pickle is read by the inert reader: nothing is imported
            if _LayoutReader(f).load() != _LEGACY_MAGIC:
                return "it is not a PyTorch checkpoint"
            _LayoutReader(f).load()  # protocol version
            _LayoutReader(f).load()  # sys info
            reader = _LayoutReader(f)
            reader.load()
            keys = _LayoutReader(f).load()
            for key in keys:
                numel = int.from_bytes(f.read(8), "little")
                f.seek(numel * reader.storages.get(str(key), 1), 1)
            if f.tell() > size:
                return f"it is cut short ({size} of at least {f.tell()} bytes)"
    except Exception as err:  # noqa: BLE001 - unreadable header: damaged
        return f"its header cannot be read ({type(err).__name__})"
    return None


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
    check_values(state, what)
    model.load_state_dict(state, strict=False)


def check_values(state: Mapping[str, Any], what: str) -> None:
    """Refuse NaN / Inf weights and negative BatchNorm variances, naming them.

    A model loaded from such a file returns NaN logits (or maps) for every
    image; the file is damaged or was saved from a diverged run.
    """
    bad = [
        k
        for k, v in state.items()
        if isinstance(v, Tensor)
        and v.is_floating_point()
        and not bool(torch.isfinite(v).all())
    ]
    negative = [
        k
        for k, v in state.items()
        if k.endswith("running_var") and isinstance(v, Tensor) and bool((v < 0).any())
    ]
    if bad or negative:
        parts = []
        if bad:
            parts.append(
                f"NaN or Inf in {len(bad)} tensors (as the model names them: "
                f"{_summary(bad)})"
            )
        if negative:
            parts.append(
                f"a negative BatchNorm variance in {len(negative)} tensors "
                f"({_summary(negative)})"
            )
        raise NonFiniteWeightsError(
            f"{what}: " + "; ".join(parts) + ". The file is damaged, or saved "
            "from a diverged run (or its tensors were swapped): download it again."
        )


def state_dict_of(obj: Any, what: str) -> Dict[str, Tensor]:
    """Keep the tensors of a state dict, or fail with a clear error."""
    state = unwrap(obj)
    tensors = {k: v for k, v in state.items() if isinstance(v, Tensor)}
    if not tensors:
        raise CheckpointMismatchError(
            f"{what} holds no tensors (top-level keys: {_summary(list(state))})"
        )
    return tensors
