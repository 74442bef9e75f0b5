"""Atomic output files and safe model files.

Every output goes to a temporary name in the destination folder and is renamed at the end, so a
failed command never leaves a partial file (docs/data_format.md). Model files are tensors and plain containers
only, loaded with ``weights_only=True``: opening a model never runs code from the file.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import signal
import tempfile
import threading
from pathlib import Path
from typing import Any, Iterator

from . import keys
from .errors import InputError


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that every cleanup runs (exit 143, not 130)."""


def interrupt_for(signum: int) -> KeyboardInterrupt:
    return Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


class SignalFlag:
    """Hold SIGINT and SIGTERM while a block runs: the first sets ``signum`` for the block to
    act on at a safe point, a second interrupts at once. Inside another SignalFlag it does
    nothing (the outer block acts on the signal), nor outside the main thread (signals are
    delivered to the main thread only)."""

    _active = 0

    def __init__(self):
        self.signum: int | None = None
        self._old: dict = {}

    def __enter__(self) -> "SignalFlag":
        if SignalFlag._active == 0 and threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        SignalFlag._active += 1
        return self

    def _handle(self, signum, frame):
        if self.signum is not None:
            raise interrupt_for(signum)
        self.signum = signum

    def __exit__(self, *exc):
        SignalFlag._active -= 1
        for sig, handler in self._old.items():
            signal.signal(sig, handler)

    def raise_if_set(self) -> None:
        if self.signum is not None:
            raise interrupt_for(self.signum)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` only if the block succeeds.

    Parent folders are created as needed. On any error the temporary file is removed and ``path``
    is left as it was. A signal during the block is held and raised before the rename, so a
    library that swallows KeyboardInterrupt (h5py in its callbacks) cannot make an interrupted
    write look finished.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + suffix, dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        with SignalFlag() as flag:
            yield tmp_path
        flag.raise_if_set()
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_path, 0o666 & ~umask)  # mkstemp makes 0600; outputs get the usual mode
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_files(paths: list) -> Iterator[dict]:
    """Several outputs that appear together or not at all: yield {path: temporary path}; the
    renames happen only once every file has been written."""
    paths = [Path(p) for p in paths]
    with contextlib.ExitStack() as stack:
        tmps = {p: stack.enter_context(atomic_path(p, "".join(p.suffixes[-1:]))) for p in paths}
        yield tmps


def write_h5ad(adata, path: str | os.PathLike) -> None:
    """Write an AnnData atomically (compressed CSR stays CSR)."""
    with atomic_path(path, ".h5ad") as tmp:
        adata.write_h5ad(tmp)


def plain(obj, json_safe: bool = False):
    """Numbers, strings, lists and dicts only: what weights_only loading and JSON accept.
    ``json_safe`` also turns NaN and infinities into None."""
    import numpy as np

    if isinstance(obj, dict):
        return {str(k): plain(v, json_safe) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, np.ndarray)):
        return [plain(v, json_safe) for v in (obj.tolist() if isinstance(obj, np.ndarray) else obj)]
    if isinstance(obj, (np.floating, np.integer, np.bool_)):
        obj = obj.item()
    if json_safe and isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save_model(payload: dict[str, Any], path: str | os.PathLike) -> None:
    """Save a model payload (tensors and plain containers only) atomically."""
    import torch

    missing = [k for k in keys.MODEL_KEYS if k not in payload]
    if missing:
        raise ValueError(f"model payload lacks {missing}")
    with atomic_path(path, ".pt") as tmp:
        torch.save(payload, tmp)


def load_model(path: str | os.PathLike, mode: str | None = None) -> dict[str, Any]:
    """Load and check a model file; a file that is not a complete advcli model is an InputError."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise InputError(f"Model file '{path}' does not exist.")
    if path.stat().st_size == 0:
        raise InputError(f"Model file '{path}' is empty (0 bytes): was it copied completely?")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated, corrupt, not a torch file, or pickled classes
        if "Unsupported global" in str(exc):
            raise InputError(
                f"'{path}' holds Python objects, not only tensors and plain containers. advcli "
                "opens model files with torch.load(weights_only=True) so that opening one never "
                "runs code from it; this file was not written by `advcli fit`.") from None
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:120]
        raise InputError(
            f"'{path}' is not a readable advcli model file ({first}). Was it written by "
            "`advcli fit` and copied completely?") from None
    if not isinstance(payload, dict) or payload.get("format") != keys.MODEL_FORMAT:
        raise InputError(f"'{path}' is a torch file but not an advcli model file.")
    missing = [k for k in keys.MODEL_KEYS if k not in payload]
    if missing:
        raise InputError(f"Model file '{path}' is incomplete: it lacks {', '.join(missing)}.")
    expected = {"format_version": int, "mode": str, "config": dict, "genes": list,
                "encoding": dict, "state": dict}
    wrong = [k for k, kind in expected.items() if not isinstance(payload[k], kind)
             or (kind is int and isinstance(payload[k], bool))]
    if wrong or payload["mode"] not in keys.MODES:
        raise InputError(f"Model file '{path}' is damaged: "
                         f"{', '.join(wrong) or 'mode'} has the wrong type or value.")
    if payload["format_version"] > keys.FORMAT_VERSION:
        raise InputError(
            f"Model file '{path}' has format version {payload['format_version']}, newer than this "
            f"advcli reads ({keys.FORMAT_VERSION}); upgrade advcli.")
    if mode is not None and payload["mode"] != mode:
        raise InputError(
            f"Model file '{path}' holds a model of mode {payload['mode']}, but one of mode "
            f"{mode} is needed here.")
    return payload
