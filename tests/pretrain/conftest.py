"""Fixtures of the stage-0 tests."""

import pytest


@pytest.fixture(scope="session")
def stage0_root(tmp_path_factory):
    return tmp_path_factory.mktemp("stage0")
