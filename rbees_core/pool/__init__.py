"""pool-core: what ``rbees-pool`` and pool-managerd share on one host.

- :mod:`rbees_core.pool.models`: models on disk under ``[pool] models_dir``: list, info,
  verify, remove, and downloads through a model source that can fetch (the catalog they
  read is the kernel's, :mod:`rbees_core.catalog`).
- :mod:`rbees_core.pool.inventory`: devices from every GPU inventory plugin, as
  :class:`rbees_core.api.pool.GpuEntry` / ``CpuEntry``.
- :mod:`rbees_core.pool.git`: the pool's git checkout and its submodules.
- :mod:`rbees_core.pool.workers`: worker lifecycle; the preflight asks the worker's backend
  for its memory estimate (:meth:`rbees_core.backend.Backend.estimate_memory`).
- :mod:`rbees_core.pool.daemon`: pool-managerd's service; :mod:`rbees_core.pool.via_daemon`:
  the files this host's pool-managerd leaves (pid, url, log) and ``rbees-pool worker``
  through it when it runs.

Modules here stay cheap to import; network and hashing happen inside functions.
"""
