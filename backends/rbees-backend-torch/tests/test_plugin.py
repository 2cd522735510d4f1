from __future__ import annotations

import subprocess
import sys

import pluggy
from rbees_backend_torch import TorchBackend

from rbees_core import plugins


def test_registered_through_its_entry_point(rbees_pm: pluggy.PluginManager) -> None:
    assert plugins.backends(rbees_pm)["torch"] is TorchBackend
    assert "backend-torch" in {info.name for info in plugins.list_plugins(rbees_pm)}


def test_importing_the_plugin_does_not_import_torch() -> None:
    code = ("import sys, rbees_backend_torch; "
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]"


def test_cpu_is_always_available() -> None:
    available = TorchBackend.available_devices()
    assert available[0] == "cpu"
    assert set(available) <= set(TorchBackend.devices)
    assert TorchBackend.batched is False
