"""The header of a GGUF file: its scalar and string metadata and, when asked, how many
elements its tensors hold, read without touching the tensors.

The ``gguf`` package parses every value and tensor record (seconds for a small model); a
memory estimate or a chat template needs a handful of values. Used by the backends (the
llama.cpp backend's estimate and template checks, the torch backend's estimate, which
follows the element count because transformers dequantizes). Lengths in the file are
checked against its size, so a damaged header is a :class:`ModelLoadError`, never a
``MemoryError`` from a 2**63-byte read.
"""

from __future__ import annotations

import math
import os
import struct
from pathlib import Path
from typing import Any, BinaryIO

import attrs

from rbees_core.errors import ModelLoadError

__all__ = ["GgufHeader", "read_header"]

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
            10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


@attrs.frozen
class GgufHeader:
    """What :func:`read_header` found."""

    version: int
    #: scalar and string values by key (arrays are skipped)
    metadata: dict[str, Any]
    tensor_count: int
    #: elements of all tensors together; None unless asked for
    elements: int | None = None
    #: bytes of each tensor's data by name (from the offsets of the tensor records and the
    #: file's size, so any quantization type counts); None unless asked for
    tensor_bytes: dict[str, int] | None = None

    def layer_split(self) -> tuple[int, int, int]:
        """``(layers, bytes of one repeating layer, bytes of everything else)`` of the
        tensor data: the repeating layers are the ``blk.N.`` tensors (their mean, when they
        differ), everything else (token embeddings, output, norms) is the rest. ``(0, 0,
        all)`` for a file without ``blk.`` tensors; needs :attr:`tensor_bytes`."""
        sizes = self.tensor_bytes or {}
        blocks: dict[int, int] = {}
        rest = 0
        for name, size in sizes.items():
            head, _, tail = name.partition(".")
            index, _, _ = tail.partition(".")
            if head == "blk" and index.isdigit():
                blocks[int(index)] = blocks.get(int(index), 0) + size
            else:
                rest += size
        if not blocks:
            return 0, 0, rest
        layer = sum(blocks.values()) // len(blocks)
        return len(blocks), layer, rest + sum(blocks.values()) - layer * len(blocks)

    def arch_int(self, key: str) -> int | None:
        """``<general.architecture>.<key>`` as an int (None when absent or not a number)."""
        arch = str(self.metadata.get("general.architecture", "llama"))
        raw = self.metadata.get(f"{arch}.{key}")
        return int(raw) if isinstance(raw, int | float) and not isinstance(raw, bool) else None


class _Reader:
    def __init__(self, f: BinaryIO, size: int) -> None:
        self.f, self.size = f, size

    def scalar(self, fmt: str) -> Any:
        want = struct.calcsize(fmt)
        data = self.f.read(want)
        if len(data) != want:
            raise EOFError("cut short")
        return struct.unpack(fmt, data)[0]

    def length(self, each: int = 1) -> int:
        """A count of ``each``-byte items that must fit in what is left of the file."""
        n = self.scalar("<Q")
        if n * each > self.size - self.f.tell():
            raise ValueError(f"a length of {n} runs past the end of the file")
        return int(n)

    def string(self, keep: bool = True) -> str | None:
        n = self.length()
        if not keep:
            self.f.seek(n, 1)
            return None
        return self.f.read(n).decode("utf-8", errors="replace")

    def value(self, kind: int) -> Any:
        """A scalar or string value; arrays are skipped (None)."""
        if kind in _SCALARS:
            return self.scalar(_SCALARS[kind])
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            item = self.scalar("<I")
            if item in _SCALARS:
                self.f.seek(struct.calcsize(_SCALARS[item]) * self.length(
                    struct.calcsize(_SCALARS[item])), 1)
            else:
                for _ in range(self.length()):
                    if item == _STRING:
                        self.string(keep=False)
                    else:
                        self.value(item)
            return None
        raise ValueError(f"unknown GGUF value type {kind}")


def _sizes(offsets: list[tuple[int, str]], end_of_records: int, file_size: int,
           meta: dict[str, Any]) -> dict[str, int]:
    """Each tensor's bytes: from its offset to the next one (the last one: to the end of
    the file), the data starting at the next multiple of ``general.alignment``. A file cut
    short in its data is not refused here (its tensors past the end count 0): the worker's
    load fails with the loader's own words."""
    align = int(meta.get("general.alignment") or 32) or 32
    start = -(-end_of_records // align) * align
    ordered = sorted(offsets)
    out: dict[str, int] = {}
    for i, (offset, name) in enumerate(ordered):
        end = ordered[i + 1][0] if i + 1 < len(ordered) else file_size - start
        out[name] = max(0, end - offset)  # a file cut short: its loader says so
    return out


def read_header(path: str | Path, *, elements: bool = False, tensors: bool = False
                ) -> GgufHeader:
    """The header of the GGUF file at ``path``; with ``elements`` the tensor records are
    read too, for :attr:`GgufHeader.elements`, with ``tensors`` for
    :attr:`GgufHeader.tensor_bytes`. Raises :class:`ModelLoadError` for a file
    that is not GGUF, is too old (version 1), or is damaged or cut short."""
    details = {"path": str(path)}
    try:
        with open(path, "rb") as f:
            r = _Reader(f, os.fstat(f.fileno()).st_size)
            if f.read(4) != b"GGUF":
                raise ModelLoadError(f"{path} is not a GGUF file", details=details)
            version = r.scalar("<I")
            if version < 2:
                raise ModelLoadError(f"{path}: GGUF version {version} is too old",
                                     details=details)
            count, kv_count = r.scalar("<Q"), r.scalar("<Q")
            meta: dict[str, Any] = {}
            for _ in range(kv_count):
                key = r.string()
                value = r.value(r.scalar("<I"))
                if value is not None:
                    meta[str(key)] = value
            total = None
            sizes = None
            if elements or tensors:
                total = 0
                offsets: list[tuple[int, str]] = []
                for _ in range(count):
                    name = str(r.string(keep=tensors))  # name
                    dims = [r.scalar("<Q") for _ in range(r.scalar("<I"))]
                    r.scalar("<I")  # type
                    offsets.append((r.scalar("<Q"), name))
                    total += math.prod(dims)
                if tensors:
                    sizes = _sizes(offsets, f.tell(), r.size, meta)
            return GgufHeader(version=version, metadata=meta, tensor_count=count,
                              elements=total if elements else None, tensor_bytes=sizes)
    except (EOFError, ValueError, struct.error, OverflowError) as exc:
        raise ModelLoadError(f"{path}: damaged GGUF header ({exc})", details=details) from exc
