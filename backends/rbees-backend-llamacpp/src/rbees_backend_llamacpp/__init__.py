"""rbees plugin: the llama.cpp backend. Importing this module imports neither llama_cpp nor
the backend class (:mod:`rbees_backend_llamacpp.backend`): a program that asks for backends
does."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rbees_core.hookspecs import hookimpl
from rbees_core.plugins import lazy_exports

if TYPE_CHECKING:
    from rbees_backend_llamacpp.backend import LlamaCppBackend

__all__ = ["LlamaCppBackend"]
__getattr__ = lazy_exports(__name__, {"LlamaCppBackend": "rbees_backend_llamacpp.backend"})


@hookimpl
def rbees_register_backends() -> list[type[LlamaCppBackend]]:
    from rbees_backend_llamacpp.backend import LlamaCppBackend

    return [LlamaCppBackend]
