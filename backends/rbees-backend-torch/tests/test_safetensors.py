"""A Hugging Face folder (config.json + safetensors) served by a real torch worker."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from rbees_backend_torch.backend import TorchBackend

from rbees_core.testing import WorkerHandle

StartWorker = Callable[..., WorkerHandle]


@pytest.fixture(scope="module")
def safetensors_folder(smollm2_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The embedded GGUF, dequantized by transformers and saved as a Hugging Face folder.

    transformers refuses to save a model it loaded from GGUF (it counts as quantized), so the
    dequantized weights move into a plain model built from the same config.
    """
    import copy

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = tmp_path_factory.mktemp("smollm2-safetensors")
    source = {"gguf_file": smollm2_gguf.name, "local_files_only": True}
    tokenizer = AutoTokenizer.from_pretrained(str(smollm2_gguf.parent), **source)
    model = AutoModelForCausalLM.from_pretrained(str(smollm2_gguf.parent), dtype=torch.float32,
                                                 **source)
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config)  # type: ignore[no-untyped-call]
    plain.load_state_dict(model.state_dict())
    plain.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_a_safetensors_folder_serves_the_same_text(
        safetensors_folder: Path, start_torch_worker: StartWorker,
        gguf_worker: WorkerHandle) -> None:
    assert (safetensors_folder / "config.json").is_file()
    assert list(safetensors_folder.glob("*.safetensors"))
    worker = start_torch_worker(model=str(safetensors_folder), worker_id="torch-st")
    ready = httpx.get(f"{worker.url}/v2/ready").json()
    assert ready["backend"] == "torch" and ready["model"] == str(safetensors_folder)
    body = {"prompt": "Once upon a time", "max_tokens": 16, "temperature": 0.9, "top_k": 40,
            "seed": 99}
    frames = worker.execute({"job_id": "st-1", **body})
    assert frames[0][1] == "started" and frames[-1][1] == "end"
    text = "".join(d["t"] for _, e, d in frames if e == "token")
    assert text.strip()
    # Same weights and seed in another process (loaded from the GGUF): the same text.
    assert gguf_worker.text({"job_id": "st-gguf-1", **body}) == text
    # The pool's preflight estimate, from the headers alone, is what the worker holds.
    estimate = TorchBackend().estimate_memory(str(safetensors_folder), device="cpu", slots=1,
                                              ctx=None)
    assert estimate is not None
    loaded = estimate.weights_bytes + estimate.kv_cache_bytes
    assert abs(loaded - ready["memory_bytes"]) < 0.001 * ready["memory_bytes"]
