"""rbees plugin: the PyTorch backend. Importing this module does not import torch."""

from __future__ import annotations

from rbees_backend_torch.backend import TorchBackend
from rbees_core.hookspecs import hookimpl

__all__ = ["TorchBackend"]


@hookimpl
def rbees_register_backends() -> list[type[TorchBackend]]:
    return [TorchBackend]
