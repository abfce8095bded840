from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    derandomize=True,
    deadline=None,
    max_examples=150,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.register_profile(
    "dev", deadline=None, max_examples=60, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))


@pytest.fixture
def registry():
    from blktx.plugins import default_registry

    return default_registry()


@pytest.fixture(autouse=True)
def private_journal(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Never touch the user's own journal nor the machine's claims: every test gets
    a fresh journal and lock folder."""
    monkeypatch.setenv("BLKTX_JOURNAL", str(tmp_path_factory.mktemp("journal") / "journal.sqlite"))
    monkeypatch.setenv("BLKTX_LOCK_DIR", str(tmp_path_factory.mktemp("locks")))
