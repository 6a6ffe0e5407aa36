"""Files: atomic writes and loads that never unpickle arbitrary objects.

Every pymeta file (learned-optimizer weights, optimizer state, meta-training checkpoints) is
a ``torch.save`` of plain containers (dict, list, tuple), numbers, strings and tensors, read
back with ``torch.load(..., weights_only=True)``: a file that holds anything else (a pickled
class, a function call) is refused before any of its code can run.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
from typing import Any

import torch

__all__ = ["FileFormatError", "atomic_save", "safe_load"]


class FileFormatError(ValueError):
    """A pymeta file that cannot be read: truncated, corrupt, not a pymeta file of the
    expected kind, or one that holds objects other than tensors and plain containers."""


CHECKSUM_KEY = "sha256"


def _feed(h, obj: Any) -> None:
    """Hashes a tree of plain containers and tensors (tensors by dtype, shape and bytes)."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(obj, dict):
        h.update(b"{")
        for k in sorted(obj, key=repr):
            _feed(h, k)
            _feed(h, obj[k])
        h.update(b"}")
    elif isinstance(obj, (list, tuple)):
        h.update(b"[" if isinstance(obj, list) else b"(")
        for v in obj:
            _feed(h, v)
        h.update(b"]")
    else:
        h.update(f"{type(obj).__name__}:{obj!r};".encode())


def checksum(obj: Any) -> str:
    h = hashlib.sha256()
    _feed(h, obj)
    return h.hexdigest()


def atomic_save(obj: dict, path: str | os.PathLike) -> None:
    """``torch.save(obj, path)`` that either fully replaces ``path`` or leaves it as it was:
    it writes a temporary file in the same folder, flushes it to disk, then ``os.replace``s
    (atomic on POSIX and Windows). A crash or an exception mid-write leaves the old file.
    A SHA-256 of the contents is stored with them (torch's zip reader does not check the
    data's CRCs), so ``safe_load`` also catches flipped bytes inside tensor data."""
    path = os.fspath(path)
    obj = {**obj, CHECKSUM_KEY: checksum({k: v for k, v in obj.items() if k != CHECKSUM_KEY})}
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        # mkstemp makes the file private (0600); give it the old file's mode, or 0644
        os.chmod(tmp, os.stat(path).st_mode & 0o777 if os.path.exists(path) else 0o644)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def safe_load(path: str | os.PathLike, what: str, kind: str | None = None) -> dict:
    """Loads a pymeta file with ``weights_only=True`` onto the CPU. ``kind``: the expected
    value of its ``"format"`` entry. Raises FileNotFoundError, or FileFormatError with the
    reason."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"pymeta: {what} file {path!r} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, bad pickle, a forbidden global, ...
        lines = [l.strip() for l in str(e).splitlines() if l.strip()]
        why = next((l for l in lines if "WeightsUnpickler error" in l), lines[0] if lines else "")
        raise FileFormatError(
            f"pymeta: cannot read {what} from {path!r}: the file is truncated or corrupt, or "
            f"holds objects other than tensors and plain containers (which are never "
            f"unpickled) [{type(e).__name__}: {why}]") from e
    if not isinstance(obj, dict):
        raise FileFormatError(f"pymeta: {path!r} is not a {what} file (it holds a "
                              f"{type(obj).__name__}, not a dict)")
    if CHECKSUM_KEY in obj:
        stored = obj.pop(CHECKSUM_KEY)
        if stored != checksum(obj):
            raise FileFormatError(f"pymeta: cannot read {what} from {path!r}: the file is "
                                  f"corrupt (its contents do not match their SHA-256)")
    if kind is not None and obj.get("format") != kind:
        raise FileFormatError(f"pymeta: {path!r} is not a {what} file (format "
                              f"{obj.get('format')!r}, expected {kind!r})")
    return obj
