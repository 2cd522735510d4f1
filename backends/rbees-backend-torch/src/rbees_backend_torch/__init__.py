"""rbees plugin: the PyTorch backend. Importing this module imports neither torch nor the
backend class (:mod:`rbees_backend_torch.backend`): a program that asks for backends does."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rbees_core.hookspecs import hookimpl
from rbees_core.plugins import lazy_exports

if TYPE_CHECKING:
    from rbees_backend_torch.backend import TorchBackend

__all__ = ["TorchBackend"]
__getattr__ = lazy_exports(__name__, {"TorchBackend": "rbees_backend_torch.backend"})


@hookimpl
def rbees_register_backends() -> list[type[TorchBackend]]:
    from rbees_backend_torch.backend import TorchBackend

    return [TorchBackend]
