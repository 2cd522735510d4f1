"""The torch backend class: which devices it can use here, and the entry to loading."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

from rbees_core.backend import Backend, LoadedModel, MemoryEstimate, split_device
from rbees_core.errors import BackendUnavailableError


def _torch() -> Any:
    try:
        import torch
    except ImportError as exc:  # pragma: no cover - the dependency is declared
        raise BackendUnavailableError(f"torch is not importable: {exc}") from exc
    return torch


class TorchBackend(Backend):
    """PyTorch through transformers: cpu always; cuda and mps when torch can use them.

    Loads a GGUF file (dequantized by transformers) or a Hugging Face folder holding
    ``config.json`` and ``*.safetensors``. Slots are decoded one after the other, each with
    its own KV cache.
    """

    name: ClassVar[str] = "torch"
    devices: ClassVar[tuple[str, ...]] = ("cpu", "cuda", "mps")
    batched: ClassVar[bool] = False

    @classmethod
    def available_devices(cls) -> list[str]:
        torch = _torch()
        found = ["cpu"]
        if torch.cuda.is_available():
            found.append("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            found.append("mps")
        return found

    def estimate_memory(self, path: str, *, device: str, slots: int, ctx: int | None
                        ) -> MemoryEstimate | None:
        """Every parameter in the device's dtype and the K and V cache of every slot, as
        :class:`~rbees_backend_torch.model.TorchModel` will report them once loaded: from
        ``config.json`` and the safetensors headers of a Hugging Face folder, or from the
        metadata and tensor shapes of a GGUF file (which transformers dequantizes). None
        for anything else."""
        from rbees_backend_torch.estimate import folder_estimate, gguf_estimate

        kind, _ = split_device(device, self.name)
        p = Path(path)
        if p.is_file() and p.suffix == ".gguf":
            return gguf_estimate(p, kind=kind, slots=slots, ctx=ctx)
        folder = p.parent if p.is_file() and p.suffix == ".safetensors" else p
        if not folder.is_dir():
            return None
        return folder_estimate(folder, kind=kind, slots=slots, ctx=ctx)

    def load(
        self,
        path: str,
        *,
        device: str,
        slots: int,
        ctx: int | None,
        threads: int | None,
        progress: Callable[[str, float], None],
    ) -> LoadedModel:
        kind, index = split_device(device, self.name)
        available = self.available_devices()
        details = {"backend": self.name, "device": device}
        if kind not in available:
            raise BackendUnavailableError(
                f"device {kind!r} is not usable by torch here (available: {', '.join(available)})",
                details=details)
        if kind == "cuda":
            count = int(_torch().cuda.device_count())
            if index >= count:
                raise BackendUnavailableError(
                    f"device {device!r} does not exist here ({count} CUDA device(s))",
                    details=details)
        elif index:
            raise BackendUnavailableError(f"device {kind!r} takes no index", details=details)
        from rbees_backend_torch.model import TorchModel

        return TorchModel(path, device=f"cuda:{index}" if kind == "cuda" else kind,
                          slots=slots, ctx=ctx, threads=threads, progress=progress)
