"""Hook specifications: every extension point of rbees.

A plugin is a module or object with functions decorated by :data:`hookimpl`, registered under
the entry-point group ``rbees`` (or builtin in a program). Hooks are synchronous and cheap:
they register classes or make decisions; I/O lives in async methods of the registered
objects. Call hooks with keywords only; a hook grows only by gaining arguments.

``program`` arguments name the calling program: ``rbees``, ``rbees-pool``, ``rbees-orcd``,
``pool-managerd``, ``rbees-workerd`` or ``bdd-runner``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    import typer
    from starlette.routing import BaseRoute

    from rbees_core.backend import Backend
    from rbees_core.interfaces import GpuInventory, ModelSource, Scheduler, Transport

PROJECT = "rbees"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def rbees_register_backends() -> list[type[Backend]]:  # type: ignore[empty-body]
    """Register inference backend classes.

    Called by: ``rbees-workerd`` at start-up (to find ``--backend``), the pool's worker
    preflight (which also asks the backend's memory estimate) and ``rbees plugins``, through
    :func:`rbees_core.plugins.backends`.

    Returns: a list of :class:`rbees_core.backend.Backend` subclasses, each with a unique
    ``name``. All results are flattened; two classes with one name are a
    :class:`rbees_core.errors.PluginError`.
    """


@hookspec
def rbees_register_model_sources() -> list[type[ModelSource]]:  # type: ignore[empty-body]
    """Register model source classes (``pkg:``, ``file:``, ``hf:``).

    Called by: :func:`rbees_core.models.resolve_model` whenever a model reference is turned
    into a local path (worker start, pool preflight, downloads), and the model catalog
    (:mod:`rbees_core.catalog`), where each source checks its references and its own keys.

    Returns: a list of :class:`rbees_core.interfaces.ModelSource` subclasses, unique by
    ``scheme``; flattened.
    """


@hookspec
def rbees_register_transports() -> list[type[Transport]]:  # type: ignore[empty-body]
    """Register transports that reach a pool host (its typed pool client).

    Called by: ``rbees pool ... --host H``, ``rbees hosts check|add|list`` and ``rbees jobs
    submit`` without a daemon (M0), through :func:`rbees_core.plugins.transports`; hosts.toml
    is read with each transport's ``host_fields``.

    Returns: a list of :class:`rbees_core.transport.Transport` subclasses, unique by
    ``name`` (``ssh``, ``http``, ``local``); flattened. A host's ``transport`` setting picks
    one, made with the host's :class:`rbees_core.transport.HostConfig` by
    :func:`rbees_core.hosts.open_transport`. A transport declares its own settings of the
    host table as an attrs type (``host_fields``), and either implements ``run`` (the pool
    client then runs ``rbees-pool ... --format json`` through it) or overrides
    ``pool_client`` (a :class:`rbees_core.pool_client.PoolClient`).
    """


@hookspec
def rbees_register_gpu_inventories() -> list[type[GpuInventory]]:  # type: ignore[empty-body]
    """Register device inventory probes (``cpu``, ``nvml``, ``metal``).

    Called by: ``rbees-pool status``, pool-managerd's ``/v2/state`` and the worker preflight,
    through :func:`rbees_core.plugins.gpu_inventories`.

    Returns: a list of :class:`rbees_core.interfaces.GpuInventory` subclasses, unique by
    ``name``; flattened. A probe whose library is missing reports no devices, never raises.
    """


@hookspec
def rbees_register_schedulers() -> list[type[Scheduler]]:  # type: ignore[empty-body]
    """Register placement policies.

    Called by: ``rbees-orcd`` at start-up and ``rbees scheduler ...``, through
    :func:`rbees_core.plugins.schedulers`.

    Returns: a list of :class:`rbees_core.interfaces.Scheduler` subclasses, unique by
    ``name``; flattened.
    """


@hookspec
def rbees_register_cli(app: typer.Typer, program: str, pm: pluggy.PluginManager) -> None:
    """Add commands or command groups to a CLI.

    Called by: ``rbees`` and ``rbees-pool`` once, while building their typer app, before
    parsing arguments.

    Arguments: ``app`` the program's root :class:`typer.Typer`; ``program`` its name;
    ``pm`` the program's plugin manager, for commands that look up registered classes
    (implementations may leave it out of their signature). Add sub-apps with
    ``app.add_typer`` or commands with ``app.command``; import heavy libraries inside the
    commands. Returns nothing.
    """


@hookspec
def rbees_register_routes(program: str) -> list[BaseRoute]:  # type: ignore[empty-body]
    """Add HTTP routes to a daemon.

    Called by: each daemon's app factory once, before the app is built.

    Arguments: ``program`` the daemon's name. Returns: starlette routes; flattened and
    appended after the builtin routes.
    """


@hookspec
def rbees_startup(program: str, state: Any) -> None:
    """A daemon has started serving.

    Called by: each daemon's lifespan, after its own start-up, in registration order.

    Arguments: ``program``; ``state`` the daemon's state object (the worker's
    :class:`rbees_core.programs.workerd.WorkerState`). Returns nothing; an exception aborts
    the start.
    """


@hookspec
def rbees_shutdown(program: str, state: Any) -> None:
    """A daemon is stopping, after draining.

    Called by: each daemon's lifespan on exit. Arguments as :func:`rbees_startup`. Returns
    nothing; exceptions are logged and do not stop the shutdown.
    """
