"""rbees plugin: resolve ``file:PATH`` to a local model file or folder."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from rbees_core.hookspecs import hookimpl
from rbees_core.interfaces import ModelSource


class FileSource(ModelSource):
    name: ClassVar[str] = "file"
    scheme: ClassVar[str] = "file"

    def resolve(self, ref: str) -> str | None:
        path = Path(ref).expanduser()
        return str(path.resolve()) if path.exists() else None


@hookimpl
def rbees_register_model_sources() -> list[type[ModelSource]]:
    return [FileSource]
