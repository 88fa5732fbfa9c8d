"""The results store: one SQLite file per output folder (stdlib ``sqlite3``).

Every finished (model, method, metric, image) value is committed at once, so
a killed run loses nothing it finished and the same command resumes where it
stopped. Rows are keyed by a *config key*: a hash of the code version and of
every option that changes the value (model and its preprocessing, method and
its options, metric and its options, data source). A new code version or a
changed option gives new keys, so old and new rows never mix; tables read the
keys of the current run only.

Several processes (``torchrun`` ranks) may write into the same file: the
database runs in WAL mode with a busy timeout and every write is retried
while the database is locked.

A non-finite value is never stored as a finished number: its ``value`` is
NULL and its ``status`` says ``'nan'``, ``'inf'`` or ``'-inf'`` (``'ok'``
otherwise), so tables count such rows instead of averaging over them. A
damaged or truncated file raises :class:`StoreError`, naming the file and
the fix (:func:`check_file` checks it before a run starts).
"""

from __future__ import annotations

import hashlib
import json
import math
import sqlite3
import time
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

SCHEMA = """
CREATE TABLE IF NOT EXISTS configs (
    key TEXT PRIMARY KEY,
    kind TEXT NOT NULL,          -- 'result', 'map' or 'timing'
    spec TEXT NOT NULL,          -- JSON of everything the key hashes
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS results (
    key TEXT NOT NULL,
    image TEXT NOT NULL,
    model TEXT NOT NULL,
    method TEXT NOT NULL,
    metric TEXT NOT NULL,
    target INTEGER,
    label INTEGER,
    value REAL,
    rank INTEGER,
    created REAL NOT NULL,
    status TEXT NOT NULL DEFAULT 'ok',  -- 'ok', 'nan', 'inf' or '-inf'
    PRIMARY KEY (key, image)
);
CREATE TABLE IF NOT EXISTS maps (
    key TEXT NOT NULL,
    image TEXT NOT NULL,
    model TEXT NOT NULL,
    method TEXT NOT NULL,
    height INTEGER NOT NULL,
    width INTEGER NOT NULL,
    data BLOB NOT NULL,           -- float16, row-major (height, width)
    scale REAL NOT NULL DEFAULT 1.0,  -- the map is data * scale
    PRIMARY KEY (key, image)
);
CREATE TABLE IF NOT EXISTS curves (
    key TEXT NOT NULL,            -- the key of the metric's result
    image TEXT NOT NULL,
    points INTEGER NOT NULL,
    data BLOB NOT NULL,           -- float32 scores, one per curve point
    PRIMARY KEY (key, image)
);
CREATE TABLE IF NOT EXISTS timings (
    key TEXT NOT NULL,
    batch TEXT NOT NULL,          -- the images of the batch, joined by '|'
    model TEXT NOT NULL,
    method TEXT NOT NULL,
    metric TEXT NOT NULL,         -- '' for the attribution itself
    images INTEGER NOT NULL,
    seconds REAL NOT NULL,
    forward_seconds REAL NOT NULL,
    peak_mib REAL,
    device TEXT NOT NULL,
    weights TEXT NOT NULL,        -- 'pretrained' or 'random'
    rank INTEGER,
    PRIMARY KEY (key, batch)
);
"""


class StoreError(RuntimeError):
    """The results store cannot be read; the message names the file and the fix."""


def _damaged(path: Path, err: Exception) -> StoreError:
    return StoreError(
        f"{path}: the results store is damaged ({err}); move it away "
        f"(mv {path} {path}.bad) to start a new store, or pass another --out"
    )


def check_file(path) -> None:
    """Raise :class:`StoreError` when ``path`` is not a readable, intact SQLite
    database (``PRAGMA quick_check``). Reads only; a busy database passes."""
    path = Path(path)
    try:
        conn = sqlite3.connect(str(path), timeout=5)
        try:
            rows = conn.execute("PRAGMA quick_check").fetchall()
        finally:
            conn.close()
    except sqlite3.OperationalError as err:
        if "locked" in str(err) or "busy" in str(err):
            return  # another process is writing: it is readable
        raise _damaged(path, err) from None
    except sqlite3.DatabaseError as err:
        raise _damaged(path, err) from None
    problems = [r[0] for r in rows if r[0] != "ok"]
    if problems:
        raise _damaged(path, "; ".join(problems[:2]))


def config_key(spec: Dict[str, Any]) -> str:
    """A short stable hash of a JSON-serialisable spec."""
    text = json.dumps(spec, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


class ResultStore:
    r"""Results of the evaluation pipeline in ``<folder>/results.sqlite``.

    Args:
        path (path): the database file (created if absent).
        timeout (float, optional): seconds to wait for a lock held by another
                    process before retrying. Default: 60

    Examples::

        >>> store = ResultStore(out / "results.sqlite")
        >>> key = store.register("result", spec)
        >>> store.done(key)                   # images already finished
        >>> store.add_results(key, rows)      # committed at once
    """

    def __init__(self, path, timeout: float = 60.0) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.timeout = timeout
        self.conn = sqlite3.connect(str(self.path), timeout=timeout)
        try:
            self._retry(lambda c: c.execute("PRAGMA journal_mode=WAL"))
            self._retry(lambda c: c.executescript(SCHEMA))
            for table, column in (
                ("results", "status TEXT NOT NULL DEFAULT 'ok'"),
                ("maps", "scale REAL NOT NULL DEFAULT 1.0"),
            ):  # a store written before the column: add it
                info = self.conn.execute(f"PRAGMA table_info({table})")
                if column.split()[0] not in [r[1] for r in info]:
                    self._retry(
                        lambda c, t=table, col=column: c.execute(
                            f"ALTER TABLE {t} ADD COLUMN {col}"
                        )
                    )
        except sqlite3.DatabaseError as err:
            self.conn.close()
            if isinstance(err, sqlite3.OperationalError) and "locked" in str(err):
                raise
            raise _damaged(self.path, err) from None

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> ResultStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------ writing
    def _retry(self, fn, attempts: int = 20):
        for i in range(attempts):
            try:
                with self.conn:  # one transaction: committed or rolled back
                    return fn(self.conn)
            except sqlite3.OperationalError as err:
                if "full" in str(err):  # SQLITE_FULL: rolled back, store intact
                    raise self._disk_full() from None
                if "locked" not in str(err) and "busy" not in str(err):
                    raise
                if i == attempts - 1:
                    raise
                time.sleep(0.05 * (i + 1))
        return None

    def _disk_full(self) -> StoreError:
        """The one-line error of a write that found the disk full."""
        import shutil

        folder = self.path.parent
        free = shutil.disk_usage(folder).free
        size = self.path.stat().st_size if self.path.exists() else 0
        need = max(64 << 20, size // 4)  # new pages, the WAL and its checkpoint
        return StoreError(
            f"{folder}: the disk is full ({free / 2**20:.1f} MiB free) while "
            f"writing {self.path.name}; free at least {need / 2**20:.0f} MiB there "
            "(or pass another --out) and run the same command again: the store "
            "is intact and the run resumes where it stopped"
        )

    def register(self, kind: str, spec: Dict[str, Any]) -> str:
        """Record a config and return its key."""
        key = config_key(spec)
        text = json.dumps(spec, sort_keys=True, default=str)
        self._retry(
            lambda c: c.execute(
                "INSERT OR IGNORE INTO configs VALUES (?, ?, ?, ?)",
                (key, kind, text, time.time()),
            )
        )
        return key

    def add_results(
        self,
        key: str,
        model: str,
        method: str,
        metric: str,
        rows: Iterable[Tuple[str, int, int, float]],
        rank: int = 0,
    ) -> None:
        """Commit ``(image, target, label, value)`` rows of one config at once.

        A row already present is kept (``INSERT OR IGNORE``): a value is never
        computed into the store twice. A non-finite value is stored as NULL
        with its status (``'nan'``, ``'inf'``, ``'-inf'``).
        """
        now = time.time()
        data = [
            (key, img, model, method, metric, int(t), int(lab), *_num(v), rank, now)
            for img, t, lab, v in rows
        ]
        self._retry(
            lambda c: c.executemany(
                "INSERT OR IGNORE INTO results (key, image, model, method, metric, "
                "target, label, value, status, rank, created) "
                "VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                data,
            )
        )

    def add_maps(
        self, key: str, model: str, method: str, images: Sequence[str], maps
    ) -> None:
        """Store ``(B, h, w)`` maps as float16 for agreement and figures.

        Each map is kept as ``data * scale`` with ``scale`` its largest
        absolute value (when finite and non-zero), so values far outside
        float16's range (tiny gradients, large relevances) keep their shape."""
        arr = np.asarray(maps, dtype=np.float32)
        data = []
        for i, img in enumerate(images):
            peak = float(np.abs(arr[i]).max()) if arr[i].size else 0.0
            scale = peak if np.isfinite(peak) and peak > 0 else 1.0
            blob = (arr[i] / scale).astype(np.float16).tobytes()
            data.append(
                (key, img, model, method, arr.shape[1], arr.shape[2], blob, scale)
            )
        self._retry(
            lambda c: c.executemany(
                "INSERT OR IGNORE INTO maps (key, image, model, method, height, "
                "width, data, scale) VALUES (?,?,?,?,?,?,?,?)",
                data,
            )
        )

    def add_curves(self, key: str, images: Sequence[str], curves) -> None:
        """Store one perturbation curve per image (``(B, points)``, float32)
        under the key of the metric's result."""
        arr = np.asarray(curves, dtype=np.float32)
        data = [
            (key, img, arr.shape[1], arr[i].tobytes()) for i, img in enumerate(images)
        ]
        self._retry(
            lambda c: c.executemany(
                "INSERT OR IGNORE INTO curves VALUES (?,?,?,?)", data
            )
        )

    def add_timing(self, key: str, batch: Sequence[str], **fields: Any) -> None:
        row = (
            key,
            "|".join(batch),
            fields["model"],
            fields["method"],
            fields.get("metric", ""),
            len(batch),
            float(fields["seconds"]),
            float(fields["forward_seconds"]),
            fields.get("peak_mib"),
            fields["device"],
            fields["weights"],
            fields.get("rank", 0),
        )
        self._retry(
            lambda c: c.execute(
                "INSERT OR REPLACE INTO timings VALUES (?,?,?,?,?,?,?,?,?,?,?,?)", row
            )
        )

    # ------------------------------------------------------------ reading
    def done(self, key: str, table: str = "results") -> set:
        """Images already stored for a config."""
        sql = f"SELECT image FROM {table} WHERE key = ?"
        return {r[0] for r in self._query(sql, (key,))}

    def results(self, keys: Optional[Sequence[str]] = None) -> List[Dict[str, Any]]:
        """Result rows (of the given config keys only, if given); ``value`` is
        None where ``status`` is not ``'ok'``."""
        sql = (
            "SELECT key, image, model, method, metric, target, label, value, rank, "
            "status FROM results"
        )
        names = ["key", "image", "model", "method", "metric", "target", "label"]
        names += ["value", "rank", "status"]
        return [dict(zip(names, r)) for r in self._select(sql, keys)]

    def maps(self, keys: Optional[Sequence[str]] = None) -> List[Dict[str, Any]]:
        sql = "SELECT key, image, model, method, height, width, data, scale FROM maps"
        out = []
        for key, img, model, method, h, w, blob, scale in self._select(sql, keys):
            m = np.frombuffer(blob, dtype=np.float16).reshape(h, w).astype(np.float32)
            m = m * np.float32(scale)
            out.append(dict(key=key, image=img, model=model, method=method, map=m))
        return out

    def curves(self, keys: Optional[Sequence[str]] = None) -> List[Dict[str, Any]]:
        """``{key, image, curve}`` rows (``curve``: float32 array)."""
        sql = "SELECT key, image, points, data FROM curves"
        return [
            dict(key=k, image=img, curve=np.frombuffer(blob, np.float32).copy())
            for k, img, n, blob in self._select(sql, keys)
        ]

    def timings(self, keys: Optional[Sequence[str]] = None) -> List[Dict[str, Any]]:
        sql = (
            "SELECT key, batch, model, method, metric, images, seconds, "
            "forward_seconds, peak_mib, device, weights, rank FROM timings"
        )
        names = ["key", "batch", "model", "method", "metric", "images", "seconds"]
        names += ["forward_seconds", "peak_mib", "device", "weights", "rank"]
        return [dict(zip(names, r)) for r in self._select(sql, keys)]

    def spec(self, key: str) -> Optional[Dict[str, Any]]:
        rows = self._query("SELECT spec FROM configs WHERE key = ?", (key,))
        return json.loads(rows[0][0]) if rows else None

    def _select(self, sql: str, keys: Optional[Sequence[str]]):
        if keys is None:
            return self._query(sql)
        keys = list(keys)
        out = []
        for i in range(0, len(keys), 500):
            chunk = keys[i : i + 500]
            marks = ",".join("?" * len(chunk))
            out += self._query(f"{sql} WHERE key IN ({marks})", chunk)
        return out

    def _query(self, sql: str, params: Sequence[Any] = ()) -> List[tuple]:
        """Rows of a read; a damaged file raises :class:`StoreError`."""
        try:
            return self.conn.execute(sql, params).fetchall()
        except sqlite3.DatabaseError as err:
            if isinstance(err, sqlite3.OperationalError) and "locked" in str(err):
                raise
            raise _damaged(self.path, err) from None


def _num(v: Any) -> Tuple[Optional[float], str]:
    """``(value, status)``: non-finite values become ``(None, 'nan' | 'inf' |
    '-inf')``."""
    v = float(v)
    if math.isfinite(v):
        return v, "ok"
    return None, "nan" if v != v else ("inf" if v > 0 else "-inf")
