"""rbees_core.gguf: the one reader of GGUF headers (both backends' estimates, templates)."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from rbees_core.errors import ModelLoadError
from rbees_core.gguf import read_header


def test_the_smollm2_header(smollm2_path: str) -> None:
    header = read_header(smollm2_path, elements=True)
    assert header.version == 3
    assert header.metadata["general.architecture"] == "llama"
    assert header.arch_int("block_count") == 30
    assert header.arch_int("embedding_length") == 576
    assert header.arch_int("attention.head_count_kv") == 3
    assert header.arch_int("no.such.key") is None
    assert "<|im_start|>" in header.metadata["tokenizer.chat_template"]
    assert "tokenizer.ggml.tokens" not in header.metadata  # arrays are skipped
    assert header.tensor_count == 272
    assert header.elements is not None and 134e6 < header.elements < 135e6  # "135M"
    assert read_header(smollm2_path).elements is None  # tensors not read unless asked


def _header(*kv: bytes, tensors: int = 0) -> bytes:
    return b"GGUF" + struct.pack("<IQQ", 3, tensors, len(kv)) + b"".join(kv)


def _string(text: bytes, length: int | None = None) -> bytes:
    return struct.pack("<Q", len(text) if length is None else length) + text


@pytest.mark.parametrize(("data", "says"), [
    (b"GGML" + bytes(20), "is not a GGUF file"),
    (b"GGUF" + struct.pack("<IQQ", 1, 0, 0), "version 1 is too old"),
    (_header(_string(b"k") + struct.pack("<I", 8) + _string(b"v", 2**63 - 1)), "damaged"),
    (_header(_string(b"k", 2**62)), "damaged"),
    (_header(_string(b"k") + struct.pack("<I", 9) + struct.pack("<IQ", 6, 2**60)), "damaged"),
    (_header(_string(b"k") + struct.pack("<I", 77)), "unknown GGUF value type 77"),
    (_header(_string(b"k") + struct.pack("<I", 4)), "cut short"),
    (_header(tensors=1) + _string(b"t", 9), "damaged"),
])
def test_a_damaged_header_is_a_model_load_error(tmp_path: Path, data: bytes, says: str) -> None:
    """Never a MemoryError from a length of 2**63, nor a struct.error: a pool marks such a
    file failed (MODEL_LOAD_FAILED) instead of retrying it forever."""
    path = tmp_path / "bad.gguf"
    path.write_bytes(data)
    with pytest.raises(ModelLoadError, match=says) as info:
        read_header(path, elements=True)
    assert info.value.details == {"path": str(path)}


def test_tensor_bytes_split_the_smollm2_file_into_its_layers(smollm2_path: str) -> None:
    """Every tensor's data, from the record offsets: together the file less its header; 30
    ``blk.N.`` layers of the same size, and the rest (embeddings, norms) apart."""
    import os

    header = read_header(smollm2_path, tensors=True)
    assert header.tensor_bytes is not None and len(header.tensor_bytes) == 272
    data = sum(header.tensor_bytes.values())
    assert 0.95 * os.path.getsize(smollm2_path) < data < os.path.getsize(smollm2_path)
    layers, layer, rest = header.layer_split()
    assert layers == 30
    assert layers * layer + rest == data
    assert 2_000_000 < layer < 2_500_000
    assert header.elements is None  # not asked for


def test_layer_split_of_a_file_without_blocks() -> None:
    from rbees_core.gguf import GgufHeader

    plain = GgufHeader(version=3, metadata={}, tensor_count=2,
                       tensor_bytes={"token_embd.weight": 10, "output.weight": 5})
    assert plain.layer_split() == (0, 0, 15)
    uneven = GgufHeader(version=3, metadata={}, tensor_count=3, tensor_bytes={
        "blk.0.a": 10, "blk.1.a": 11, "output_norm.weight": 1})
    assert uneven.layer_split() == (2, 10, 2)  # the mean layer; the remainder is the rest
