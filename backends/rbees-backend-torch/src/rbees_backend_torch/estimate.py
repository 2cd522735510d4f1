"""The memory a model will hold once loaded, from its headers alone: a Hugging Face folder
(``config.json`` and the safetensors headers) or a GGUF file (its metadata and tensor shapes).

Imported by :meth:`rbees_backend_torch.backend.TorchBackend.estimate_memory` (the pool's
preflight); imports neither torch nor transformers. The numbers mirror what
:class:`rbees_backend_torch.model.TorchModel` reports once loaded: every parameter in the
device's dtype, and a K and V cache of ``min(max_position_embeddings, ctx or 4096)`` tokens
per slot.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Any

from rbees_core.backend import MemoryEstimate
from rbees_core.errors import ModelLoadError

DEFAULT_CTX_CAP = 4096
#: Bytes per element of the dtype the model is loaded in, by device kind (see
#: ``rbees_backend_torch.model._dtype``: float32 on cpu, 16 bits on cuda and mps).
ELEMENT_BYTES = {"cpu": 4, "cuda": 2, "mps": 2}


def safetensors_parameters(path: Path) -> int:
    """Elements of every tensor in one ``.safetensors`` file (its JSON header only)."""
    try:
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header: dict[str, Any] = json.loads(f.read(length))
    except (OSError, struct.error, ValueError) as exc:
        raise ModelLoadError(f"{path}: unreadable safetensors header ({exc})",
                             details={"path": str(path)}) from exc
    return sum(math.prod(entry["shape"]) for name, entry in header.items()
               if name != "__metadata__")


def folder_estimate(folder: Path, *, kind: str, slots: int, ctx: int | None
                    ) -> MemoryEstimate | None:
    """The estimate for a folder with ``config.json`` and ``*.safetensors``; None for
    anything else."""
    files = sorted(folder.glob("*.safetensors"))
    if not (folder / "config.json").is_file() or not files:
        return None
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{folder}/config.json is not readable JSON ({exc})",
                             details={"path": str(folder)}) from exc
    text = config.get("text_config") or config
    element = ELEMENT_BYTES.get(kind, 4)
    heads = int(text.get("num_attention_heads") or 1)
    kv_heads = int(text.get("num_key_value_heads") or heads)
    head_dim = int(text.get("head_dim") or int(text.get("hidden_size") or 0) // heads)
    layers = int(text.get("num_hidden_layers") or 0)
    n_ctx = min(int(text.get("max_position_embeddings") or DEFAULT_CTX_CAP),
                ctx or DEFAULT_CTX_CAP)
    weights = sum(safetensors_parameters(f) for f in files) * element
    kv_token = 2 * layers * kv_heads * head_dim * element
    return MemoryEstimate(weights_bytes=weights, kv_cache_bytes=kv_token * n_ctx * slots,
                          kv_token_bytes=kv_token, slots=slots, ctx=n_ctx)


def gguf_estimate(path: Path, *, kind: str, slots: int, ctx: int | None) -> MemoryEstimate:
    """The estimate for a GGUF file, which transformers dequantizes into the device's dtype:
    every element of its tensors, and the cache its metadata describes."""
    from rbees_core.gguf import read_header

    header = read_header(path, elements=True)
    elements = header.elements or 0

    def value(key: str, default: int) -> int:
        return header.arch_int(key) or default

    element = ELEMENT_BYTES.get(kind, 4)
    heads = value("attention.head_count", 1)
    kv_heads = value("attention.head_count_kv", heads)
    head_dim = value("attention.key_length", value("embedding_length", 0) // heads)
    n_ctx = min(value("context_length", DEFAULT_CTX_CAP), ctx or DEFAULT_CTX_CAP)
    kv_token = 2 * value("block_count", 0) * kv_heads * head_dim * element
    return MemoryEstimate(weights_bytes=elements * element,
                          kv_cache_bytes=kv_token * n_ctx * slots, kv_token_bytes=kv_token,
                          slots=slots, ctx=n_ctx)
