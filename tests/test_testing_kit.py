"""The test kit ships in the rbees distribution: the pytest plugin and a contract suite per
plugin kind, importable by a third party's tests."""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path

import setuptools

ROOT = Path(__file__).resolve().parent.parent
SUITES = {"rbees_core.testing.backend": "BackendContract",
          "rbees_core.testing.transport": "TransportContract",
          "rbees_core.testing.scheduler": "snapshot"}


def test_the_distribution_packages_the_test_kit() -> None:
    packages = setuptools.find_packages(str(ROOT), include=["rbees_core*"])
    assert "rbees_core.testing" in packages
    kit = ROOT / "rbees_core" / "testing"
    for module in SUITES:
        assert (kit / f"{module.rpartition('.')[2]}.py").is_file()


def test_each_suite_imports_and_its_tests_are_collected_by_name() -> None:
    for module, name in SUITES.items():
        found = getattr(importlib.import_module(module), name)
        if inspect.isclass(found):
            tests = [n for n in dir(found) if n.startswith("test_")]
            assert len(tests) >= 5, (module, tests)
            assert not found.__name__.startswith("Test"), "collected as a test by itself"
