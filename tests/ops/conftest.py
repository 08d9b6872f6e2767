"""``nobody_python``: how the tests that drop privileges to ``nobody`` run qops as that
user, wherever the checkout lives (see tests/reachable.py)."""

from __future__ import annotations

import shutil
from collections.abc import Iterator

import pytest

from tests.conftest import IN_CI
from tests.reachable import ReachablePython, make_folder, reachable_python


@pytest.fixture(scope="session")
def nobody_python() -> Iterator[ReachablePython]:
    """An interpreter and a world-readable copy of qops that user nobody can run (made
    once per test session, i.e. per xdist worker; removed at its end)."""
    folder = make_folder("qops-pylib-")
    try:
        found = reachable_python("nobody", folder)
        if isinstance(found, str):
            if IN_CI:
                pytest.fail(found, pytrace=False)
            pytest.skip(found)
        yield found
    finally:
        shutil.rmtree(folder, ignore_errors=True)
