"""Fixtures of the data-layer tests (helpers live in data_helpers.py)."""

import pytest

from spade.data.synthpsg import generate_synthpsg


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory):
    """A 30-image SynthPSG (seed 3) shared by the session."""
    root = str(tmp_path_factory.mktemp("synthpsg"))
    generate_synthpsg(root, 30, seed=3)
    return root
