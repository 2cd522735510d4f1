"""Configuration: TOML file, environment, flags.

Precedence is flag > environment (``RBEES_*``) > file > default. The file is
``$RBEES_CONFIG`` or ``$XDG_CONFIG_HOME/rbees/config.toml`` (``~/.config/rbees/config.toml``);
a missing default file is fine, a missing named file is an error. Sections are attrs classes
validated with :func:`rbees_core.schema.from_mapping`, so a bad value fails fast with its TOML
path.
"""

from __future__ import annotations

import os
import stat
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs

from rbees_core.errors import ConfigError, InvalidParamsError
from rbees_core.schema import field, from_mapping

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def _xdg(variable: str, default: str) -> Path:
    """``$<variable>`` when it is an absolute path (the XDG base-directory rule: a relative
    one is ignored), else ``~/<default>``."""
    value = os.environ.get(variable, "")
    return Path(value) if value and os.path.isabs(value) else Path.home() / default


def rbees_home() -> Path:
    """The data directory (models, workers' records, the database, logs): ``$RBEES_HOME``,
    else ``$XDG_DATA_HOME/rbees``, else ``~/.local/share/rbees``."""
    home = os.environ.get("RBEES_HOME")
    return Path(home) if home else _xdg("XDG_DATA_HOME", ".local/share") / "rbees"


def config_dir() -> Path:
    """Where the config file lives by default: ``$XDG_CONFIG_HOME/rbees``, else
    ``~/.config/rbees``."""
    return _xdg("XDG_CONFIG_HOME", ".config") / "rbees"


def runtime_dir() -> Path:
    """Where the daemons' pid and url files (and ``rbees up``'s cluster.json) live.

    ``$RBEES_HOME/run`` when ``RBEES_HOME`` is set (each home keeps its daemons beside its
    data, so several homes run side by side), else ``$XDG_RUNTIME_DIR/rbees`` (a tmpfs the
    login session owns: its files go at logout and at reboot, so no pid file outlives its
    process's boot), else ``<data directory>/run``. A pid file that does outlive its process
    is harmless anyway: nothing signals its pid before :func:`rbees_core.processes.find`
    checks the process's start time."""
    if os.environ.get("RBEES_HOME"):
        return rbees_home() / "run"
    runtime = os.environ.get("XDG_RUNTIME_DIR", "")
    if runtime and os.path.isabs(runtime):
        return Path(runtime) / "rbees"
    return rbees_home() / "run"


def read_token_file(path: str) -> str | None:
    """The token in ``path`` (stripped); a file readable by group or others is refused."""
    p = Path(path).expanduser()
    try:
        mode = p.stat().st_mode
    except OSError as exc:
        raise ConfigError(f"token file {path}: {exc.strerror}") from exc
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(f"token file {path} is readable by group or others; chmod 600 it")
    return p.read_text(encoding="utf-8").strip() or None


def load_token(token_file: str | None) -> str | None:
    """The API token: ``--api-token-file``, else ``RBEES_API_TOKEN_FILE``, else
    ``RBEES_API_TOKEN``. A file readable by group or others is refused."""
    path = token_file or os.environ.get("RBEES_API_TOKEN_FILE")
    if path:
        return read_token_file(path)
    return os.environ.get("RBEES_API_TOKEN") or None


def auth_headers() -> dict[str, str]:
    """This environment's API token as an ``Authorization`` header (none without a token):
    what every client of a daemon or of a worker started here sends."""
    token = load_token(None)
    return {"Authorization": f"Bearer {token}"} if token else {}


def config_path(explicit: str | None = None) -> tuple[Path, bool]:
    """The config file to read and whether it was asked for by name."""
    if explicit:
        return Path(explicit), True
    env = os.environ.get("RBEES_CONFIG")
    if env:
        return Path(env), True
    return config_dir() / "config.toml", False


@attrs.frozen
class WorkerConfig:
    """``[worker]``: defaults for rbees-workerd."""

    slots: int = field(default=1, minimum=1, maximum=64)
    ctx: int | None = field(default=None, minimum=16, maximum=1_048_576)
    threads: int | None = field(default=None, minimum=1, maximum=1024)
    drain_timeout_s: float = field(default=30.0, minimum=0, maximum=3600)
    ready_callback_timeout_s: float = field(default=10.0, minimum=0.1, maximum=600)
    chat_template_file: str | None = field(
        default=None, max_length=4096,
        doc="a Jinja chat template that replaces the model's own (as llama-server's "
            "--chat-template-file), for every model the workers of this host run")


@attrs.frozen
class PoolConfig:
    """``[pool]``: this host's pool (rbees-pool and pool-managerd)."""

    checkout: str | None = field(
        default=None, max_length=4096,
        doc="git checkout that `rbees-pool git ...` operates on")
    models_dir: str | None = field(
        default=None, max_length=4096,
        doc="where downloaded models live (default: $RBEES_HOME/models)")
    catalog_file: str | None = field(
        default=None, max_length=4096,
        doc="extra model catalog TOML; its entries add to (or replace) the builtin ones")
    max_load_failures: int = field(
        default=3, minimum=1, maximum=100,
        doc="failed loads in a row that mark a model failed on this pool (no more starts "
            "until `rbees models retry` or a new download)")
    memory_limit: str | None = field(
        default=None, pattern=r"^[0-9]+(\.[0-9]+)? *([KMGT]i?B?|B)?$", max_length=32,
        doc="most memory this pool offers its workers on each device (RAM or GPU), as "
            "bytes or with a unit (`12GiB`, `512MiB`, `8GB`); the rest of the machine is "
            "left alone. Default: all of it (--memory-limit, RBEES_POOL_MEMORY_LIMIT)")
    rpc: bool = field(
        default=False,
        doc="serve this pool's devices to sharded workers of other pools over llama.cpp's "
            "RPC backend (POST /v2/rpc/start); the servers bind loopback only and are "
            "reached through an authenticated tunnel (README, \"Sharding\"; RBEES_POOL_RPC)")

    def memory_limit_bytes(self) -> int | None:
        """``memory_limit`` in bytes (``12GiB`` -> 12 * 2**30; ``8GB`` -> 8 * 10**9), or
        None when not set."""
        return None if self.memory_limit is None else parse_bytes(self.memory_limit)

    def models_path(self) -> Path:
        """``models_dir`` or ``$RBEES_HOME/models``."""
        return Path(self.models_dir).expanduser() if self.models_dir else rbees_home() / "models"

    def checkout_path(self) -> Path:
        """``checkout``; :class:`ConfigError` when it is not set."""
        if not self.checkout:
            raise ConfigError("pool.checkout: not set (set [pool] checkout = PATH in the config "
                              "file, RBEES_POOL_CHECKOUT, or pass --checkout)")
        return Path(self.checkout).expanduser()


@attrs.frozen
class SchedulerConfig:
    """``[scheduler]``: the placement policy of rbees-orcd and ``rbees jobs submit``."""

    policy: str = field(
        default="least-loaded", pattern=r"^[a-z][a-z0-9-]{0,63}$",
        doc='a registered policy: least-loaded, most-free-memory, round-robin, binpack, '
            'spread, or "script" for the Starlark script named by `script`')
    script: str | None = field(
        default=None, max_length=4096, doc='the policy script of policy = "script"')
    budget_ms: float = field(
        default=50.0, minimum=1, maximum=1000,
        doc="time one script decision may take before the default policy decides")
    memory_mb: int = field(
        default=256, minimum=16, maximum=65536, doc="memory cap of the script's sandbox")


@attrs.frozen
class PlacementConfig:
    """``[placement]``: the workers rbees-orcd starts (slots, context, CPU cores).

    A worker started by the scheduler gets ``cpu_slots`` (on the CPU) or ``gpu_slots`` (on a
    GPU) slots of ``ctx`` tokens each; the pool lowers the slots until the model, and the KV
    cache of every slot, fits in the device's free memory. A CPU worker takes ``cpu_threads``
    cores of its pool (default: every core no other worker holds), a GPU worker one core for
    its host thread; cores are accounted like memory (docs/scheduling.md, "Slots and cores").
    """

    cpu_slots: int = field(
        default=4, minimum=1, maximum=64,
        doc="slots of a worker started on a CPU: concurrent requests it batches")
    gpu_slots: int = field(
        default=8, minimum=1, maximum=64,
        doc="slots of a worker started on a GPU")
    ctx: int | None = field(
        default=None, minimum=16, maximum=1_048_576,
        doc="context per slot, in tokens (default: the model's trained context, at most "
            "4096)")
    cpu_threads: int | None = field(
        default=None, minimum=1, maximum=1024,
        doc="cores (and threads) of a worker started on a CPU (default: every core of its "
            "pool that no other worker holds)")
    interactive_slots: int = field(
        default=1, minimum=0, maximum=64,
        doc="slots of every worker (of more slots than this) that batch-priority jobs "
            "leave free, so an interactive request starts at once while a batch runs; 0: "
            "batch jobs may fill every slot")

    def defaults(self) -> dict[str, Any]:
        """The ``worker_defaults`` of a scheduling snapshot (:mod:`rbees_core.scheduling`)."""
        return {"cpu": {"slots": self.cpu_slots, "ctx": self.ctx, "threads": self.cpu_threads},
                "gpu": {"slots": self.gpu_slots, "ctx": self.ctx, "threads": 1}}


@attrs.frozen
class OrchestratorConfig:
    """``[orchestrator]``: rbees-orcd's queue, heartbeats, idle workers and streams.

    Read by ``rbees-orcd`` (:mod:`rbees_core.programs.orcd`), whose flags beat these; each
    key has its ``RBEES_ORCHESTRATOR_<KEY>`` variable.
    """

    queue_capacity: int = field(
        default=1024, minimum=1, maximum=10_000_000,
        doc="queued jobs at most (--queue-capacity)")
    queue_policy: str = field(
        default="reject", pattern=r"^(reject|drop-oldest-batch)$",
        doc="a full queue: reject the new job (429) or drop the oldest batch job "
            "(--queue-policy)")
    promote_after_s: float = field(
        default=300.0, minimum=0, maximum=86_400,
        doc="a batch job waiting longer moves to the interactive lane")
    heartbeat_interval_s: float = field(
        default=5.0, minimum=0.1, maximum=3600,
        doc="the pools' heartbeat interval (--heartbeat-interval)")
    heartbeat_grace: int = field(
        default=3, minimum=1, maximum=100,
        doc="missed heartbeats after which a pool is unavailable")
    offline_after_s: float = field(
        default=60.0, minimum=1, maximum=86_400,
        doc="seconds of silence after which a pool is offline (nothing is placed there)")
    idle_timeout_s: float = field(
        default=300.0, minimum=1, maximum=604_800,
        doc="an idle worker (any pool's) is stopped after this long when keep_alive "
            "is unset and its latest job gave none (--idle-timeout)")
    keep_alive: str | None = field(
        default=None, max_length=32,
        doc='how long an idle worker stays loaded when its latest job gave no keep_alive, '
            'in Ollama\'s forms ("5m", "30s", "0", "-1" = forever); default: '
            'idle_timeout_s (--keep-alive, RBEES_KEEP_ALIVE)')
    max_queue_wait_s: float = field(
        default=600.0, minimum=0.1, maximum=86_400,
        doc="an OpenAI request not started after this long in the queue gets 503 with "
            "Retry-After (--max-queue-wait)")
    sse_ping_interval_s: float = field(
        default=15.0, minimum=0, maximum=3600,
        doc="seconds of silence after which a stream gets an SSE ': ping'; 0: never "
            "(--sse-ping-interval, RBEES_SSE_PING_INTERVAL)")
    decision_retention: str = field(
        default="7d", pattern=r"^(forever|(\d+(\.\d*)?[smhdw])+|\d+(\.\d*)?)$",
        doc='how long each scheduling decision keeps the snapshot it was made from, for '
            '`rbees scheduler replay` ("7d", "24h", "2w", seconds, "forever"; "0": none '
            'kept); the decision itself stays for `rbees jobs why`')


@attrs.frozen
class FileSourceConfig:
    """``[sources.file]``: the directories that ``file:`` references (and plain paths)
    given to a pool may name (:mod:`rbees_core.pool.file_roots`)."""

    roots: list[str] = field(
        factory=list, max_items=64, item_max_length=4096,
        doc="directories `file:` refs may name, besides the models directory (always "
            "allowed); a ref is checked after resolving symlinks and `..`")


@attrs.frozen
class HfSourceConfig:
    """``[sources.hf]``: the Hugging Face source (plugins/rbees-source-hf) and the user's
    Hugging Face cache (``HF_HUB_CACHE``, ``HF_HOME/hub``, ``~/.cache/huggingface/hub``)."""

    use_hf_cache: bool = field(
        default=True,
        doc="take an hf: file from the user's Hugging Face cache when it is there, instead "
            "of downloading it again (RBEES_SOURCES_HF_USE_HF_CACHE)")
    download_to_hf_cache: bool = field(
        default=False,
        doc="download hf: files into that cache (shared with transformers and other tools) "
            "instead of the models directory (RBEES_SOURCES_HF_DOWNLOAD_TO_HF_CACHE)")


@attrs.frozen
class SourcesConfig:
    """``[sources.*]``: settings of the model sources."""

    file: FileSourceConfig = field(factory=FileSourceConfig)
    hf: HfSourceConfig = field(factory=HfSourceConfig)


@attrs.frozen
class TlsConfig:
    """``[tls]``: the daemons' certificate and the CA their clients trust (rbees_core.tls)."""

    cert: str | None = field(
        default=None, max_length=4096,
        doc="PEM certificate chain a daemon serves HTTPS with (--tls-cert, RBEES_TLS_CERT)")
    key: str | None = field(
        default=None, max_length=4096,
        doc="its PEM private key, not readable by others (--tls-key, RBEES_TLS_KEY)")
    ca_file: str | None = field(
        default=None, max_length=4096,
        doc="PEM CA certificates that clients verify daemons with, instead of the system "
            "store (--ca-file, RBEES_CA_FILE)")


@attrs.frozen
class Config:
    """The whole config file. Unknown sections are errors, like unknown keys."""

    worker: WorkerConfig = field(factory=WorkerConfig)
    pool: PoolConfig = field(factory=PoolConfig)
    scheduler: SchedulerConfig = field(factory=SchedulerConfig)
    placement: PlacementConfig = field(factory=PlacementConfig)
    sources: SourcesConfig = field(factory=SourcesConfig)
    orchestrator: OrchestratorConfig = field(factory=OrchestratorConfig)
    tls: TlsConfig = field(factory=TlsConfig)


_UNITS = {"": 1, "B": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4,
          "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}


def parse_bytes(text: str) -> int:
    """``"12GiB"`` -> bytes (``KiB``/``K`` powers of 1024, ``KB`` powers of 1000). Raises
    :class:`ConfigError` for anything else."""
    import re

    match = re.fullmatch(r"([0-9]+(?:\.[0-9]+)?) *([KMGT]i?B?|B)?", text.strip())
    if match is None:
        raise ConfigError(f"{text!r} is not an amount of memory (say 12GiB, 512MiB, 8GB)")
    unit = (match.group(2) or "").replace("iB", "").replace("i", "")
    return int(float(match.group(1)) * _UNITS[unit])


def _paths(value: str) -> list[str]:
    """A list of directories in one variable, separated like ``PATH`` (``:``)."""
    return [p for p in value.split(os.pathsep) if p]


def _bool(value: str) -> bool:
    """``1/true/yes/on`` or ``0/false/no/off`` (any case); a ConfigError otherwise."""
    lowered = value.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{value!r} is not a boolean (say true or false)")


#: variable -> (section, dotted for a nested one; key; how its text becomes the value)
_ENV: dict[str, tuple[str, str, Callable[[str], Any]]] = {
    "RBEES_WORKER_SLOTS": ("worker", "slots", int),
    "RBEES_WORKER_CTX": ("worker", "ctx", int),
    "RBEES_WORKER_THREADS": ("worker", "threads", int),
    "RBEES_WORKER_CHAT_TEMPLATE_FILE": ("worker", "chat_template_file", str),
    "RBEES_POOL_CHECKOUT": ("pool", "checkout", str),
    "RBEES_POOL_MODELS_DIR": ("pool", "models_dir", str),
    "RBEES_POOL_CATALOG_FILE": ("pool", "catalog_file", str),
    "RBEES_POOL_MAX_LOAD_FAILURES": ("pool", "max_load_failures", int),
    "RBEES_POOL_MEMORY_LIMIT": ("pool", "memory_limit", str),
    "RBEES_TLS_CERT": ("tls", "cert", str),
    "RBEES_TLS_KEY": ("tls", "key", str),
    "RBEES_CA_FILE": ("tls", "ca_file", str),
    "RBEES_POOL_RPC": ("pool", "rpc", _bool),
    "RBEES_SCHEDULER_POLICY": ("scheduler", "policy", str),
    "RBEES_SCHEDULER_SCRIPT": ("scheduler", "script", str),
    "RBEES_PLACEMENT_CPU_SLOTS": ("placement", "cpu_slots", int),
    "RBEES_PLACEMENT_GPU_SLOTS": ("placement", "gpu_slots", int),
    "RBEES_PLACEMENT_CTX": ("placement", "ctx", int),
    "RBEES_PLACEMENT_CPU_THREADS": ("placement", "cpu_threads", int),
    "RBEES_PLACEMENT_INTERACTIVE_SLOTS": ("placement", "interactive_slots", int),
    "RBEES_SOURCES_FILE_ROOTS": ("sources.file", "roots", _paths),
    "RBEES_SOURCES_HF_USE_HF_CACHE": ("sources.hf", "use_hf_cache", _bool),
    "RBEES_SOURCES_HF_DOWNLOAD_TO_HF_CACHE": ("sources.hf", "download_to_hf_cache", _bool),
    **{f"RBEES_ORCHESTRATOR_{key.upper()}": ("orchestrator", key, kind) for key, kind in (
        ("queue_capacity", int), ("queue_policy", str), ("promote_after_s", float),
        ("heartbeat_interval_s", float), ("heartbeat_grace", int),
        ("offline_after_s", float), ("idle_timeout_s", float), ("keep_alive", str),
        ("max_queue_wait_s", float),
        ("sse_ping_interval_s", float), ("decision_retention", str))},
}


def load_config(explicit: str | None = None, *, flags: dict[str, dict[str, Any]] | None = None,
                environ: dict[str, str] | None = None) -> Config:
    """Read, merge and validate the configuration.

    ``flags`` holds values given on the command line (``{"worker": {"slots": 4}}``); None
    values are ignored. Raises :class:`ConfigError` naming the file and the key.
    """
    path, named = config_path(explicit)
    data: dict[str, Any] = {}
    if path.exists():
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    elif named:
        raise ConfigError(f"{path}: config file does not exist")
    env = os.environ if environ is None else environ
    for name, (section, key, kind) in _ENV.items():
        if name in env:
            try:
                value: Any = kind(env[name])
            except ValueError as exc:
                raise ConfigError(f"{name}: must be {kind.__name__}, got {env[name]!r}") from exc
            table = data
            for part in section.split("."):
                table = table.setdefault(part, {})
            table[key] = value
    for section, values in (flags or {}).items():
        for key, value in values.items():
            if value is not None:
                data.setdefault(section, {})[key] = value
    try:
        return from_mapping(Config, data)
    except InvalidParamsError as exc:
        raise ConfigError(f"{path}: {exc.message}", details={"key": exc.field}) from exc
