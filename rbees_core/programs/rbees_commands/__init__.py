"""Command groups of ``rbees``, each a builtin plugin (see ``rbees_cli.BUILTINS``)."""
