"""Fixtures of the calibration tests; their helpers are in calibration_helpers.py."""

import pytest
from calibration_helpers import make_tiny_unet


@pytest.fixture
def tiny_unet():
    return make_tiny_unet()
