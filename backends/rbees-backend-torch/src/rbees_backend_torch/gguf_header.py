"""The header of a GGUF file, read for the memory estimate: its scalar metadata and how many
elements its tensors hold, without reading the tensors.

transformers dequantizes a GGUF file into the device's dtype, so what it costs follows from
the element count, not from the file's size. The ``gguf`` package parses every value and
array (seconds for a small model); this skips what the estimate does not need.
"""

from __future__ import annotations

import math
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


def _value(f: BinaryIO, kind: int) -> Any:
    """A scalar or string value; arrays are skipped (None)."""
    if kind in _SCALARS:
        return _read(f, _SCALARS[kind])
    if kind == _STRING:
        return f.read(_read(f, "<Q")).decode("utf-8", errors="replace")
    if kind == _ARRAY:
        item, count = _read(f, "<I"), _read(f, "<Q")
        if item in _SCALARS:
            f.seek(struct.calcsize(_SCALARS[item]) * count, 1)
        elif item == _STRING:
            for _ in range(count):
                f.seek(_read(f, "<Q"), 1)
        else:
            for _ in range(count):
                _value(f, item)
        return None
    raise ValueError(f"unknown GGUF value type {kind}")


def read_header(path: str | Path) -> tuple[dict[str, Any], int]:
    """``(metadata, elements)``: the scalar and string metadata, and the elements of all
    tensors. Raises :class:`ModelLoadError` for a file that is not GGUF or is cut short."""
    try:
        with open(path, "rb") as f:
            if f.read(4) != b"GGUF":
                raise ModelLoadError(f"{path} is not a GGUF file", details={"path": str(path)})
            if _read(f, "<I") < 2:
                raise ModelLoadError(f"{path}: GGUF version 1 is too old",
                                     details={"path": str(path)})
            tensors, kv_count = _read(f, "<Q"), _read(f, "<Q")
            meta: dict[str, Any] = {}
            for _ in range(kv_count):
                key = f.read(_read(f, "<Q")).decode("utf-8", errors="replace")
                value = _value(f, _read(f, "<I"))
                if value is not None:
                    meta[key] = value
            elements = 0
            for _ in range(tensors):
                f.seek(_read(f, "<Q"), 1)  # name
                dims = [_read(f, "<Q") for _ in range(_read(f, "<I"))]
                f.seek(4 + 8, 1)  # type, offset
                elements += math.prod(dims)
            return meta, elements
    except (EOFError, ValueError, struct.error) as exc:
        raise ModelLoadError(f"{path}: damaged GGUF header ({exc})",
                             details={"path": str(path)}) from exc
