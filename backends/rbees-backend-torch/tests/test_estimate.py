"""The memory estimate the pool's preflight asks the torch backend for, without torch."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
from rbees_backend_torch.backend import TorchBackend

from rbees_core.backend import OVERHEAD_BYTES
from rbees_core.errors import ModelLoadError

CONFIG = {"num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 8,
          "num_key_value_heads": 2, "max_position_embeddings": 1024}


def write_folder(folder: Path, shapes: dict[str, list[int]], config: dict[str, object]
                 ) -> Path:
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    header = json.dumps({"__metadata__": {"format": "pt"}, **{
        name: {"dtype": "F32", "shape": shape, "data_offsets": [0, 0]}
        for name, shape in shapes.items()}}).encode()
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header)
    return folder


def test_a_folder_counts_its_parameters_and_every_slot_s_cache(tmp_path: Path) -> None:
    folder = write_folder(tmp_path / "m", {"embed": [100, 64], "proj": [64, 64]}, CONFIG)
    backend = TorchBackend()
    cpu = backend.estimate_memory(str(folder), device="cpu", slots=3, ctx=None)
    assert cpu is not None
    assert cpu.weights_bytes == (100 * 64 + 64 * 64) * 4  # float32 on cpu
    # K and V, 2 layers, 2 kv heads of 64 / 8 dims, min(1024, 4096) tokens, 3 slots
    assert cpu.kv_cache_bytes == 2 * 2 * 2 * 8 * 4 * 1024 * 3
    assert cpu.total_bytes == cpu.weights_bytes + cpu.kv_cache_bytes + OVERHEAD_BYTES
    cuda = backend.estimate_memory(str(folder / "model.safetensors"), device="cuda:1",
                                   slots=1, ctx=256)
    assert cuda is not None and cuda.weights_bytes == cpu.weights_bytes // 2
    assert cuda.kv_cache_bytes == 2 * 2 * 2 * 8 * 2 * 256


def test_a_gguf_file_counts_its_dequantized_tensors(smollm2_gguf: Path) -> None:
    """The embedded SmolLM2: 134,515,008 elements; 30 layers, 3 of 9 heads of 64 dims for K
    and V, trained on 8192 tokens."""
    backend = TorchBackend()
    cpu = backend.estimate_memory(str(smollm2_gguf), device="cpu", slots=2, ctx=None)
    assert cpu is not None and cpu.weights_bytes == 134_515_008 * 4
    assert cpu.kv_cache_bytes == 2 * 30 * 3 * 64 * 4 * 4096 * 2
    cuda = backend.estimate_memory(str(smollm2_gguf), device="cuda", slots=1, ctx=100_000)
    assert cuda is not None and cuda.weights_bytes == 134_515_008 * 2
    assert cuda.kv_cache_bytes == 2 * 30 * 3 * 64 * 2 * 8192  # capped at the trained 8192


def test_what_it_cannot_tell_is_none_and_a_broken_header_an_error(tmp_path: Path) -> None:
    backend = TorchBackend()
    assert backend.estimate_memory(str(tmp_path), device="cpu", slots=1, ctx=None) is None
    (tmp_path / "w.bin").write_bytes(b"x")
    assert backend.estimate_memory(str(tmp_path / "w.bin"), device="cpu", slots=1,
                                   ctx=None) is None
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    with pytest.raises(ModelLoadError, match="damaged GGUF header"):
        backend.estimate_memory(str(gguf), device="cpu", slots=1, ctx=None)
    folder = write_folder(tmp_path / "bad", {}, CONFIG)
    (folder / "model.safetensors").write_bytes(b"\xff" * 4)
    with pytest.raises(ModelLoadError, match="unreadable safetensors header"):
        backend.estimate_memory(str(folder), device="cpu", slots=1, ctx=None)
