"""The command groups of ``rbees-pool``, each a builtin plugin implementing
:func:`rbees_core.hookspecs.rbees_register_cli` for ``program="rbees-pool"``:
``status``, ``models``, ``worker``, ``git``. Heavy imports stay inside the commands.
"""
