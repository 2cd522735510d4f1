"""The http transport: a host's pool-managerd, through the kernel's
:class:`rbees_core.pool_client.http.HttpPoolClient` (see the package doc)."""

from __future__ import annotations

from typing import ClassVar

import attrs

from rbees_core.config import read_token_file
from rbees_core.errors import InvalidParamsError
from rbees_core.pool_client.http import HttpPoolClient
from rbees_core.schema import field
from rbees_core.transport import HostConfig, Transport


@attrs.frozen
class HttpHostFields:
    """The http transport's fields of a ``[hosts.NAME]`` table."""

    url: str | None = field(default=None, max_length=512, pattern=r"https?://[^\s]+",
                            doc="pool-managerd's base URL")
    token_file: str | None = field(default=None, max_length=4096,
                                   doc="file holding the API token (mode 600)")

    def check(self) -> None:
        if not self.url:
            raise InvalidParamsError("url", "the http transport needs --url")

    def where(self) -> str:
        return self.url or "-"


class HttpTransport(Transport):
    """pool-managerd's API at the host's ``url``, with the token of ``token_file``."""

    name: ClassVar[str] = "http"
    host_fields: ClassVar[type[HttpHostFields]] = HttpHostFields
    fields: HttpHostFields

    def __init__(self, host: HostConfig) -> None:
        super().__init__(host)
        self.url = (self.fields.url or "").rstrip("/")
        self._client: HttpPoolClient | None = None

    def pool_client(self) -> HttpPoolClient:
        """The host's pool-managerd as a typed client, made on first use (the token file is
        read then: :class:`rbees_core.errors.ConfigError` if it cannot be)."""
        if self._client is None:
            token_file = self.fields.token_file
            self._client = HttpPoolClient(
                self.url, name=self.host.name,
                token=read_token_file(token_file) if token_file else None,
                connect_timeout_s=self.host.connect_timeout_s,
                auth_hint=token_file or "no --token-file set")
        return self._client

    async def aclose(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()
