"""rbees plugin: the llama.cpp backend. Importing this module does not import llama_cpp."""

from __future__ import annotations

from rbees_backend_llamacpp.backend import LlamaCppBackend
from rbees_core.hookspecs import hookimpl

__all__ = ["LlamaCppBackend"]


@hookimpl
def rbees_register_backends() -> list[type[LlamaCppBackend]]:
    return [LlamaCppBackend]
