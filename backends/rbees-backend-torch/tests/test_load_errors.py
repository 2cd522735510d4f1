"""Load failures map to the rbees error tree before (or instead of) reading weights."""

from __future__ import annotations

from pathlib import Path

import pytest
from rbees_backend_torch import TorchBackend

from rbees_core.errors import BackendUnavailableError, ModelLoadError


def _load(path: Path | str, device: str = "cpu") -> object:
    return TorchBackend().load(str(path), device=device, slots=1, ctx=None, threads=None,
                               progress=lambda stage, fraction: None)


def _missing_kind() -> str:
    available = TorchBackend.available_devices()
    return next(kind for kind in ("mps", "cuda") if kind not in available)


@pytest.mark.parametrize("device", ["missing-kind", "cuda:99", "cpu:1", "cuda:x", "tpu"])
def test_unusable_device_is_backend_unavailable(smollm2_gguf: Path, device: str) -> None:
    device = _missing_kind() if device == "missing-kind" else device
    with pytest.raises(BackendUnavailableError) as info:
        _load(smollm2_gguf, device)
    assert info.value.code == "BACKEND_UNAVAILABLE"
    assert info.value.details["device"] == device


def test_a_file_that_is_not_gguf_is_a_load_error(tmp_path: Path) -> None:
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"this is not a GGUF file" * 10)
    with pytest.raises(ModelLoadError) as info:
        _load(bad)
    assert info.value.code == "MODEL_LOAD_FAILED"
    assert "broken.gguf" in info.value.message


def test_a_folder_without_weights_is_a_load_error(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelLoadError, match="safetensors"):
        _load(tmp_path)


def test_a_folder_transformers_cannot_read_is_a_load_error(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text('{"model_type": "no-such-architecture"}')
    (tmp_path / "model.safetensors").write_bytes(b"\0" * 16)
    with pytest.raises(ModelLoadError, match="transformers could not load"):
        _load(tmp_path)
