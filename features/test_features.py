"""Binds the feature files to pytest: every scenario of ``RBEES_BDD_FEATURES`` (paths relative
to this folder, separated by ``os.pathsep``; default: all of them)."""

from __future__ import annotations

import os

from pytest_bdd import scenarios

scenarios(*(os.environ.get("RBEES_BDD_FEATURES") or ".").split(os.pathsep))
