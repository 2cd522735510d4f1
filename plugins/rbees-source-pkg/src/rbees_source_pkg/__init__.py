"""rbees plugin: resolve ``pkg:PACKAGE[/FILE]`` to a model file inside an installed package."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import ClassVar

from rbees_core.hookspecs import hookimpl
from rbees_core.interfaces import ModelSource

MODEL_SUFFIXES = (".gguf", ".safetensors")


class PackageSource(ModelSource):
    name: ClassVar[str] = "pkg"
    scheme: ClassVar[str] = "pkg"

    @classmethod
    def validate_ref(cls, rest: str, field: str = "model") -> None:
        if not rest.partition("/")[0].isidentifier():
            from rbees_core.errors import InvalidParamsError

            raise InvalidParamsError(field, f"pkg:{rest} is not pkg:PACKAGE[/FILE] (PACKAGE: "
                                            "an importable name)")

    def resolve(self, ref: str) -> str | None:
        package, _, file = ref.partition("/")
        if not package.isidentifier():
            return None
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            return None
        root = Path(next(iter(spec.submodule_search_locations)))
        if file:
            path = (root / file).resolve()
            return str(path) if path.is_file() and root.resolve() in path.parents else None
        ggufs = sorted(root.glob("*.gguf"))
        return str(ggufs[0]) if len(ggufs) == 1 else None


@hookimpl
def rbees_register_model_sources() -> list[type[ModelSource]]:
    return [PackageSource]
