"""``rbees keys create|list|revoke|rotate|usage`` and ``rbees pools join-token``.

API keys live in rbees-orcd's store (only their salted hashes: :mod:`rbees_core.auth`);
these commands ask rbees-orcd over HTTP with this environment's credential (the operator
token file, or an admin key in ``RBEES_API_TOKEN_FILE``). ``create`` and ``rotate`` print
the key once, on stdout alone, so that ``rbees keys create ci --scope inference > ci.key``
keeps it; nothing shows it again.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from rbees_core.hookspecs import hookimpl
from rbees_core.programs.cli_common import FormatOption, OutputFormat, emit, print_json

KEY_COLUMNS = ("name", "scopes", "models", "rpm", "expires", "state")


def _row(key: dict[str, Any]) -> dict[str, Any]:
    now = time.time()
    expires = key.get("expires_at")
    state = "revoked" if key.get("revoked_at") else \
        "expired" if expires is not None and expires <= now else "live"
    return {**key, "scopes": ",".join(key.get("scopes") or []),
            "models": ",".join(key.get("models") or []) or "*",
            "rpm": key.get("rpm") or "-",
            "expires": "never" if expires is None else
            time.strftime("%Y-%m-%d %H:%M", time.gmtime(expires)), "state": state}


def _split(values: list[str] | None) -> list[str]:
    return [v.strip() for value in values or [] for v in value.split(",") if v.strip()]


def create(
    name: Annotated[str, typer.Argument(help="A name for the key (jobs and usage carry it)")],
    scope: Annotated[list[str], typer.Option("--scope", help="inference, read or admin; "
                                             "repeat or separate with commas")],
    models: Annotated[list[str] | None, typer.Option(
        "--models", help="Only these models (ids, comma-separated); default: any")] = None,
    expires: Annotated[str | None, typer.Option(
        "--expires", help="Lifetime: 30d, 12h, 90m, 3600s; default: never")] = None,
    rpm: Annotated[int | None, typer.Option("--rpm", min=1,
                                            help="Requests per minute at most")] = None,
    max_jobs: Annotated[int | None, typer.Option(
        "--max-jobs", min=1, help="Jobs queued or running at once, at most")] = None,
    tpm: Annotated[int | None, typer.Option(
        "--tpm", min=1, help="Tokens (prompt and completion) per minute, at most")] = None,
    fmt: FormatOption = OutputFormat.text,
) -> None:
    """Make an API key and print it once (stdout); its settings go to stderr."""
    from rbees_core.programs.rbees_commands.jobs import _request

    body: dict[str, Any] = {"name": name, "scopes": _split(scope)}
    if models:
        body["models"] = _split(models)
    if expires is not None:
        body["expires_in"] = expires
    if rpm is not None:
        body["rpm"] = rpm
    if max_jobs is not None:
        body["max_jobs"] = max_jobs
    if tpm is not None:
        body["tpm"] = tpm
    _, answer = _request("POST", "/v2/keys", json=body)
    if fmt is OutputFormat.json:
        print_json(answer)
        return
    print(answer["key"])
    row = _row(answer)
    print(f"key {name}: scopes {row['scopes']}, models {row['models']}, expires "
          f"{row['expires']}, rpm {row['rpm']}; it is shown only now", file=sys.stderr)


def list_keys(fmt: FormatOption = OutputFormat.text) -> None:
    """The API keys (never the keys themselves), revoked ones included."""
    from rbees_core.programs.rbees_commands.jobs import _request

    _, answer = _request("GET", "/v2/keys")
    keys = answer.get("keys", [])
    if fmt is OutputFormat.json:
        print_json(keys)
    else:
        emit([_row(k) for k in keys], fmt, KEY_COLUMNS)


def revoke(name: Annotated[str, typer.Argument(help="The key's name")],
           fmt: FormatOption = OutputFormat.text) -> None:
    """Revoke a key: its next request gets 401."""
    from rbees_core.programs.rbees_commands.jobs import _request

    _, answer = _request("POST", f"/v2/keys/{name}/revoke")
    if fmt is OutputFormat.json:
        print_json(answer)
    else:
        print(f"revoked {name}")


def rotate(name: Annotated[str, typer.Argument(help="The key's name")],
           fmt: FormatOption = OutputFormat.text) -> None:
    """Give a key a new secret (same scopes and limits) and print it once; the old one
    stops working at once."""
    from rbees_core.programs.rbees_commands.jobs import _request

    _, answer = _request("POST", f"/v2/keys/{name}/rotate")
    if fmt is OutputFormat.json:
        print_json(answer)
    else:
        print(answer["key"])


def usage(since: Annotated[str | None, typer.Option(
              "--since", help="From this UTC day on (YYYY-MM-DD)")] = None,
          fmt: FormatOption = OutputFormat.text) -> None:
    """Requests, prompt and completion tokens per key, model and day (final jobs)."""
    from rbees_core.programs.rbees_commands.jobs import _request

    _, answer = _request("GET", "/v2/usage", params={"since": since} if since else None)
    emit(answer.get("usage", []), fmt, ("day", "key", "model", "requests", "prompt_tokens",
                                        "completion_tokens"))


def join_token(pool_id: Annotated[str, typer.Argument(help="The pool id it is for")],
               revoke: Annotated[bool, typer.Option(
                   "--revoke", help="Revoke the pool's current join token at once and "
                                    "print its new one")] = False) -> None:
    """Print the join token of POOL_ID: pool-managerd --join-token-file takes it; it allows
    that pool's heartbeats and nothing else. With --revoke the old one stops working at
    once (its heartbeats get 401; the pool must be restarted with the new one)."""
    from rbees_core.programs.rbees_commands.jobs import _request

    path = f"/v2/pools/{pool_id}/join-token" + ("/revoke" if revoke else "")
    _, answer = _request("POST", path)
    print(answer["join_token"])
    if revoke:
        print(f"revoked the old join token of {pool_id}; restart its pool-managerd with the "
              "new one (printed on stdout)", file=sys.stderr)


def tls_issue(
    name: Annotated[str, typer.Argument(help="The host: files NAME.pem and NAME.key")],
    dns: Annotated[list[str] | None, typer.Option(
        "--dns", help="A name clients use for the host (repeat); default: NAME")] = None,
    ip: Annotated[list[str] | None, typer.Option(
        "--ip", help="An address clients use for the host (repeat)")] = None,
    out: Annotated[str | None, typer.Option(
        "--out", help="Directory for the files (with a copy of ca.pem); default: the "
                      "data directory's tls/")] = None,
) -> None:
    """Issue a certificate for another host of the lab from this data directory's CA (made
    when missing, as `rbees up --tls` does). Copy NAME.pem, NAME.key and ca.pem to that
    host and start its pool-managerd with --tls-cert NAME.pem --tls-key NAME.key
    --ca-file ca.pem."""
    import ipaddress

    from rbees_core.api.common import ID_PATTERN
    from rbees_core.config import rbees_home
    from rbees_core.errors import InvalidParamsError, RbeesError
    from rbees_core.schema import check_string
    from rbees_core.tls import TLS_DIR
    from rbees_core.tls_ca import issue, trust_hint

    check_string(name, "NAME", {"pattern": ID_PATTERN})  # a file name: no "/" nor ".."
    for address in ip or []:
        try:
            ipaddress.ip_address(address)
        except ValueError as exc:
            raise InvalidParamsError("--ip", str(exc)) from None
    try:
        issued = issue(rbees_home() / TLS_DIR, name, dns or [name], ip or [],
                       out=Path(out) if out else None)
    except ValueError as exc:  # the addresses are fine: a name x509 refuses
        raise InvalidParamsError("--dns", str(exc)) from None
    except OSError as exc:
        raise RbeesError(f"cannot write the certificate: {exc.strerror or exc}: "
                         f"{exc.filename or out or rbees_home() / TLS_DIR}") from None
    print(f"{issued.cert}\n{issued.key}")
    print(f"names: {', '.join(issued.names + issued.addresses)}", file=sys.stderr)
    print(trust_hint(issued.ca), file=sys.stderr)


@hookimpl
def rbees_register_cli(app: typer.Typer, program: str) -> None:
    if program != "rbees":
        return
    group = typer.Typer(name="keys", help="API keys of rbees-orcd (admin scope).",
                        no_args_is_help=True)
    group.command("create")(create)
    group.command("list")(list_keys)
    group.command("revoke")(revoke)
    group.command("rotate")(rotate)
    group.command("usage")(usage)
    app.add_typer(group)
    pools = typer.Typer(name="pools", help="Pools' credentials.", no_args_is_help=True)
    pools.command("join-token")(join_token)
    app.add_typer(pools)
    tls = typer.Typer(name="tls", help="The home lab's CA and certificates.",
                      no_args_is_help=True)
    tls.command("issue")(tls_issue)
    app.add_typer(tls)
