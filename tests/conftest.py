"""Shared fixtures: where the shared conformance suite lives."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"
NMTESTS = SHARED / "conformance" / "nmtests-dosing"


@pytest.fixture(scope="session")
def nmtests_dir() -> Path:
    """The NONMEM dosing suite; missing is a failure in CI (CI=true), a skip elsewhere."""
    if not (NMTESTS / "1001.csv").is_file():
        msg = f"NONMEM conformance suite not found at {NMTESTS}"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(msg)
        pytest.skip(msg)
    return NMTESTS


# Hypothesis: reproducible examples in CI (a failure there must be reproducible); locally
# random as usual.
from hypothesis import settings  # noqa: E402

settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI", "").lower() == "true":
    settings.load_profile("ci")
