"""Shared fixtures: every test session writes its outputs into one temporary runs folder."""
import os

import pytest


@pytest.fixture(scope="session", autouse=True)
def echoes_runs(tmp_path_factory):
    "Point ECHOES_RUNS at a session-wide temporary folder, so tests never touch the project's runs/."
    path = tmp_path_factory.mktemp("runs")
    old = os.environ.get("ECHOES_RUNS")
    os.environ["ECHOES_RUNS"] = str(path)
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    yield path
    if old is None:
        os.environ.pop("ECHOES_RUNS", None)
    else:
        os.environ["ECHOES_RUNS"] = old


@pytest.fixture
def runs(tmp_path, monkeypatch):
    "A fresh runs folder for one test, so that its caches never leak into another's."
    r = tmp_path / "runs"
    monkeypatch.setenv("ECHOES_RUNS", str(r))
    return r


@pytest.fixture(autouse=True)
def fresh_tracking_uri():
    "Tests that point MLflow's fluent API at their own store must not leave the next test talking to it."
    import mlflow
    yield
    mlflow.set_tracking_uri(None)  # also clears $MLFLOW_TRACKING_URI
