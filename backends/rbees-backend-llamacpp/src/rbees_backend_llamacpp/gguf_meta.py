"""Read the key/value metadata of a GGUF file without reading its tensors.

The ``gguf`` package parses every tensor record too (seconds for a small model); the memory
estimate (:meth:`rbees_backend_llamacpp.backend.LlamaCppBackend.estimate_memory`, run by the
pool's preflight) needs a handful of integers, so this reads only the header and the metadata
section.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any, BinaryIO

from rbees_core.errors import ModelLoadError

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
            10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


def _read(f: BinaryIO, fmt: str) -> Any:
    size = struct.calcsize(fmt)
    data = f.read(size)
    if len(data) != size:
        raise EOFError
    return struct.unpack(fmt, data)[0]


def _string(f: BinaryIO) -> str:
    length = _read(f, "<Q")
    return f.read(length).decode("utf-8", errors="replace")


def _skip_or_read(f: BinaryIO, kind: int, keep: bool) -> Any:
    if kind in _SCALARS:
        return _read(f, _SCALARS[kind])
    if kind == _STRING:
        length = _read(f, "<Q")
        if keep:
            return f.read(length).decode("utf-8", errors="replace")
        f.seek(length, 1)
        return None
    if kind == _ARRAY:
        item, count = _read(f, "<I"), _read(f, "<Q")
        if item in _SCALARS:
            f.seek(struct.calcsize(_SCALARS[item]) * count, 1)
        else:
            for _ in range(count):
                _skip_or_read(f, item, False)
        return None
    raise ValueError(f"unknown GGUF value type {kind}")


def read_metadata(path: str | Path) -> dict[str, Any]:
    """Scalar and string metadata of a GGUF file (arrays are skipped)."""
    try:
        with open(path, "rb") as f:
            if f.read(4) != b"GGUF":
                raise ModelLoadError(f"{path} is not a GGUF file")
            version = _read(f, "<I")
            if version < 2:
                raise ModelLoadError(f"{path}: GGUF version {version} is too old")
            _read(f, "<Q")  # tensor count
            kv_count = _read(f, "<Q")
            meta: dict[str, Any] = {}
            for _ in range(kv_count):
                key = _string(f)
                kind = _read(f, "<I")
                value = _skip_or_read(f, kind, True)
                if value is not None:
                    meta[key] = value
            return meta
    except (EOFError, ValueError, struct.error) as exc:
        raise ModelLoadError(f"{path}: damaged GGUF metadata ({exc})") from exc
