"""Shared fixtures: every test session writes its outputs into one temporary runs folder."""
import os
import socket
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


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


@pytest.fixture(scope="session")
def repo_root():
    return ROOT


def free_port() -> int:
    "A TCP port on 127.0.0.1 that is free right now."
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
