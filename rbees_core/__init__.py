"""rbees: turn the GPUs and CPUs of a few home machines into one LLM inference service.

The kernel: hook specifications (:mod:`rbees_core.hookspecs`), the plugin manager factory
(:mod:`rbees_core.plugins`), config, errors, wire types, and the six programs.

"CONTRACT section N" in a docstring is section N of the wire contract, docs/contract.md in the
repository; docs/plugins.md is the reference of the hooks for plugin authors.
"""

__version__ = "0.1.0"
