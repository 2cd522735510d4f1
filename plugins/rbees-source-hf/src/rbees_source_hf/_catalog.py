"""The keys the ``hf`` source adds to a model catalog entry (imported when a catalog is read,
not when the plugin loads)."""

from __future__ import annotations

import attrs

from rbees_core.schema import field, limits
from rbees_source_hf import _NAME, HfRef


@attrs.frozen
class HfCatalogFields:
    """The keys an ``hf:`` source adds to a model catalog entry: where the file lives on the
    hub. The entry's ``hf:`` reference must be :attr:`ref`."""

    hf_repo: str = attrs.field(metadata=limits(pattern=rf"{_NAME}/{_NAME}"))
    hf_file: str = attrs.field(metadata=limits(min_length=1, max_length=256,
                                               forbid=r"(^/|\.\.|\s)"))
    revision: str = field(default="main", pattern=r"[A-Za-z0-9_.-]{1,64}")

    @property
    def ref(self) -> str:
        """``hf:OWNER/REPO[@REVISION]/FILE`` (the revision only when it is not ``main``)."""
        return str(HfRef(repo_id=self.hf_repo, filename=self.hf_file, revision=self.revision))
