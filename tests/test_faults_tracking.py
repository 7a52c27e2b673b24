"""Faults on the tracking side, each the real thing: the MLflow server SIGKILLed in the middle of a training run
(restarted soon, or only after the run gave up), two trainings racing on a new store, and a full disk under
ECHOES_RUNS while checkpointing."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from services import MLflowServer

from echoes.tracking import client

BIN = Path(sys.executable).parent
EPOCHS = 12


def train(runs: Path, uri: str, run_name: str, retries: int, *extra: str, wait: bool = True):
    "`echoes train` of a GRU on the built-in dataset against `uri`, as a user runs it."
    env = {**os.environ, "ECHOES_RUNS": str(runs), "MLFLOW_HTTP_REQUEST_MAX_RETRIES": str(retries),
           "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10", "OMP_NUM_THREADS": "1"}
    cmd = [str(BIN / "echoes"), "train", "--model", "gru", "--epochs", str(EPOCHS), "--patience", "0",
           "--hidden-size", "32", "--tracking-uri", uri, "--run-name", run_name, "--log-model", "False", *extra]
    if wait: return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def steps(uri: str, run_name: str, metric: str = "train_loss") -> tuple[str | None, list[int]]:
    c = client(uri)
    exp = c.get_experiment_by_name("synthetic")
    if exp is None: return None, []
    rs = c.search_runs([exp.experiment_id], f"tags.`mlflow.runName` = '{run_name}'")
    if not rs: return None, []
    return rs[0].info.run_id, sorted(m.step for m in c.get_metric_history(rs[0].info.run_id, metric))


def wait_for_epochs(p, uri: str, run_name: str, n: int, timeout: float = 300) -> None:
    t_end = time.time() + timeout
    while time.time() < t_end:
        assert p.poll() is None, p.communicate()[1][-3000:]
        try:
            if len(steps(uri, run_name)[1]) >= n: return
        except Exception: pass  # noqa: BLE001  the store may be busy; ask again
        time.sleep(0.3)
    raise TimeoutError(f"{run_name}: fewer than {n} epochs logged in {timeout} s")


@pytest.fixture
def server(tmp_path):
    srv = MLflowServer(f"sqlite:///{tmp_path / 'server.db'}", str(tmp_path / "artifacts"), log_dir=tmp_path)
    yield srv
    srv.stop()


@pytest.mark.slow
def test_server_killed_and_restarted_mid_run(tmp_path, server):
    "The server dies after two epochs and is back within the client's retries: the run finishes, every epoch once."
    runs = tmp_path / "runs"
    train(runs, server.url, "warm-up", 0, "--epochs", "1")  # builds the dataset's caches first
    p = train(runs, server.url, "survivor", 8, wait=False)
    wait_for_epochs(p, server.url, "survivor", 2)
    os.killpg(server.proc.pid, signal.SIGKILL); server.proc.wait()
    time.sleep(2)
    server.start()
    out, err = p.communicate(timeout=600)
    assert p.returncode == 0, err[-3000:]
    run_id, logged = steps(server.url, "survivor")
    assert logged == list(range(1, EPOCHS + 1)), logged  # nothing lost, nothing twice
    assert client(server.url).get_run(run_id).info.status == "FINISHED"


@pytest.mark.slow
def test_server_gone_then_resume(tmp_path, server):
    "The server dies for longer than the retries: one clear line, exit 2; once it is back, the same command resumes."
    runs = tmp_path / "runs"
    train(runs, server.url, "warm-up", 0, "--epochs", "1")
    p = train(runs, server.url, "patient", 1, wait=False)
    wait_for_epochs(p, server.url, "patient", 3)
    os.killpg(server.proc.pid, signal.SIGKILL); server.proc.wait()
    out, err = p.communicate(timeout=300)
    assert p.returncode == 2, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("echoes train: error:") and server.url in last and "resume" in last, last
    assert "Traceback" not in err
    server.start()
    run_id, before = steps(server.url, "patient")
    again = train(runs, server.url, "patient", 2)
    assert again.returncode == 0, again.stderr[-3000:]
    run_id2, logged = steps(server.url, "patient")
    assert run_id2 == run_id and logged == list(range(1, EPOCHS + 1)), (before, logged)
    assert "resuming from" in again.stderr  # from the checkpoint, not from scratch
    assert client(server.url).get_run(run_id).info.status == "FINISHED"


def test_two_trainings_race_on_a_new_store(tmp_path):
    "Two `echoes train` started together on an empty runs folder: both finish, two runs in one store."
    runs = tmp_path / "runs"
    env = {**os.environ, "ECHOES_RUNS": str(runs), "OMP_NUM_THREADS": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    cmds = [[str(BIN / "echoes"), "train", "--model", "mean", "--run-name", f"racer{i}", "--log-model", "False"]
            for i in range(2)]
    ps = [subprocess.Popen(c, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for c in cmds]
    for p in ps:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
    uri = f"sqlite:///{runs / 'mlflow.db'}"
    assert {steps(uri, f"racer{i}")[0] is not None for i in range(2)} == {True}


@pytest.fixture
def small_disk(tmp_path):
    "A 40 MB tmpfs, unmounted afterwards; skipped where mounting is not allowed."
    d = tmp_path / "small"
    d.mkdir()
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=40m", "tmpfs", str(d)], capture_output=True, text=True)
    if p.returncode: pytest.skip(f"cannot mount a tmpfs here: {p.stderr.strip()}")
    yield d
    subprocess.run(["umount", "-l", str(d)], check=False)


def test_full_disk_while_checkpointing(tmp_path, small_disk):
    "A checkpoint that does not fit: one clear line, exit 2; the next run trusts nothing half-written."
    env = {**os.environ, "ECHOES_RUNS": str(small_disk), "OMP_NUM_THREADS": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    # 2 classes of 16x16 frames: caches of ~8 MB fit, a checkpoint of ~90 MB (weights, AdamW moments) does not
    cmd = [str(BIN / "echoes"), "train", "--model", "gru", "--hidden-size", "1024", "--epochs", "2", "--classes", "2",
           "--frame-size", "16", "--run-name", "big", "--log-model", "False"]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 2, p.stderr[-3000:]
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("echoes train: error:") and "no space left" in last.lower(), last
    assert "Traceback" not in p.stderr
    leftovers = [q for q in small_disk.rglob("*") if q.name.endswith((".part", ".partial"))]
    assert not [q for q in leftovers if q.is_file() and q.suffix == ".part"], leftovers  # atomic writes cleaned up
    # the same command on a roomy disk holding a copy of what the full one left: it runs, from scratch where needed
    roomy = tmp_path / "roomy"
    subprocess.run(["cp", "-a", str(small_disk), str(roomy)], check=True)
    q = subprocess.run(cmd, env={**env, "ECHOES_RUNS": str(roomy)}, capture_output=True, text=True, timeout=600)
    assert q.returncode == 0, q.stderr[-3000:]
    uri = f"sqlite:///{roomy / 'mlflow.db'}"
    run_id, logged = steps(uri, "big")
    assert logged == [1, 2] and client(uri).get_run(run_id).info.status == "FINISHED"

