"""Tracking with real components: runs logged to a SQLite store and to a real MLflow tracking server, read back
from MLflow and from TensorBoard's event files; FAILED and KILLED endings; the executed notebook of a real
papermill CLI run; the UIs."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import nbformat
import pytest
import torch
from services import MLflowServer

from echoes.core import toy_sequences
from echoes.tracking import client, run_experiment, start_run, ui
from echoes.train import EPOCH_METRICS, TrainConfig

torch.set_num_threads(1)
FINAL = ("test_acc", "test_top5", "train_time_s", "latency_ms", "throughput_cps", "peak_mem_mb",
         "trainable_params", "total_params")
TAGS = ("echoes.model", "echoes.dataset", "echoes.git_commit", "echoes.git_dirty", "echoes.version", "echoes.host",
        "echoes.device", "echoes.data_fingerprint", "echoes.feature_cache", "echoes.skipped")


def toy(n, seed=0):
    "Class c: a bump on feature 0 at steps 3c..3c+2; only a model with memory of order tells them apart."
    return toy_sequences(n, num_classes=3, T=10, D=4, seed=seed, task="position")


class Splits:
    "The shape of echoes.data.Splits, from arrays."
    def __init__(self):
        self.train, self.val, self.test = toy(150), toy(45, seed=1), toy(60, seed=2)
        self.classes = ["early", "middle", "late"]
        self.info = {"fingerprint": "fp-123", "feature_cache": "fc-456", "encoder": "pixels",
                     "skipped": [{"path": "bad.avi", "reason": "no video stream"}]}


def cfg(**kw):
    base = dict(model="gru", dataset="synthetic", epochs=3, batch_size=32, lr=1e-2, hidden_size=16, device="cpu",
                patience=0)
    return TrainConfig(**{**base, **kw})


def artifacts(c, run_id, path=None):
    return {a.path for a in c.list_artifacts(run_id, path)}


def test_gradient_run_logged_to_mlflow_and_tensorboard():
    res = run_experiment(cfg(run_name="gru-full"), splits=Splits())
    c = client()
    r = c.get_run(res["run_id"])
    assert r.info.status == "FINISHED"
    for k in EPOCH_METRICS:
        hist = c.get_metric_history(res["run_id"], k)
        assert sorted(m.step for m in hist) == [1, 2, 3], k
    for k in (*FINAL, "best_val_acc"):
        assert k in r.data.metrics, k
        assert res[k] == pytest.approx(r.data.metrics[k]), k
    assert r.data.metrics["trainable_params"] == r.data.metrics["total_params"] > 0
    assert r.data.params["model"] == "gru" and r.data.params["epochs"] == "3" and r.data.params["hidden_size"] == "16"
    assert set(r.data.params) >= set(TrainConfig.__dataclass_fields__) - {"run_id"}
    for t in TAGS: assert t in r.data.tags, t
    assert r.data.tags["echoes.data_fingerprint"] == "fp-123" and r.data.tags["echoes.skipped"] == "1"
    assert artifacts(c, res["run_id"]) >= {"config.json", "describe.json", "per_class.json", "confusion.png",
                                           "learning_curves.png", "history.json", "data_info.json", "logs"}
    log = Path(c.download_artifacts(res["run_id"], "logs/run.log")).read_text()
    assert "epoch 3/3" in log and "finished" in log
    per_class = json.loads(Path(c.download_artifacts(res["run_id"], "per_class.json")).read_text())
    assert set(per_class) == {"early", "middle", "late"}
    cfgj = json.loads(Path(c.download_artifacts(res["run_id"], "config.json")).read_text())
    assert cfgj["model"] == "gru" and cfgj["epochs"] == 3

    # the model, pickled, with explicit requirements, loads back and predicts
    import mlflow.pytorch
    mlflow.set_tracking_uri(res["tracking_uri"])
    try: m = mlflow.pytorch.load_model(f"runs:/{res['run_id']}/model")
    finally: mlflow.set_tracking_uri(None)  # also unsets $MLFLOW_TRACKING_URI, which echoes would follow
    X = toy(4, seed=9)[0]
    assert m(torch.from_numpy(X), torch.full((4,), 10)).shape == (4, 3)

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    ea = EventAccumulator(str(Path(os.environ["ECHOES_RUNS"]) / "tb" / "synthetic" / "gru-full")).Reload()
    for k in EPOCH_METRICS:
        assert [e.step for e in ea.Scalars(k)] == [1, 2, 3], k
    vals = {e.step: e.value for e in ea.Scalars("val_acc")}
    assert vals[3] == pytest.approx(c.get_metric_history(res["run_id"], "val_acc")[-1].value)
    assert ea.Scalars("hparam/test_acc")[0].value == pytest.approx(res["test_acc"])
    assert "_hparams_/experiment" in ea.PluginTagToContent("hparams")


def test_closed_form_run_logs_ridge_and_val_acc():
    res = run_experiment(cfg(model="esn", hidden_size=50, ridge=[1e-3, 1e-1], run_name="esn-full"), splits=Splits())
    c = client()
    r = c.get_run(res["run_id"])
    assert r.info.status == "FINISHED"
    assert r.data.metrics["ridge"] in (1e-3, 1e-1)
    assert 0 <= r.data.metrics["val_acc"] <= 1
    assert r.data.metrics["trainable_params"] < r.data.metrics["total_params"]  # the reservoir is frozen
    assert r.data.params["ridge"] == "[0.001, 0.1]"
    assert "train_loss" not in r.data.metrics  # no epochs
    assert "learning_curves.png" not in artifacts(c, res["run_id"])
    describe = json.loads(Path(c.download_artifacts(res["run_id"], "describe.json")).read_text())
    assert describe["trainable_params"] + describe["frozen_params"] == describe["total_params"]


def test_resume_rules():
    c1 = cfg(epochs=2, run_name="same-name", log_model=False)
    a = run_experiment(c1, splits=Splits())
    b = run_experiment(c1, splits=Splits())  # finished: returned, not retrained
    assert a["run_id"] == b["run_id"] and a["test_acc"] == b["test_acc"]
    assert len(client().get_metric_history(a["run_id"], "train_loss")) == 2
    with pytest.raises(ValueError, match=r"lr=0.01 \(now 0.5\)"):
        run_experiment(cfg(epochs=2, run_name="same-name", lr=0.5), splits=Splits())
    with start_run(cfg(epochs=2, run_id=a["run_id"])) as run:  # by id, the same run
        assert run.id == a["run_id"] and run.finished
    with pytest.raises(ValueError, match="no MLflow run"):
        start_run(cfg(run_id="0" * 32))
    # same name in another experiment is another run
    other = run_experiment(cfg(epochs=2, run_name="same-name", experiment="elsewhere", log_model=False),
                           splits=Splits())
    assert other["run_id"] != a["run_id"] and other["experiment"] == "elsewhere"


class Exploding(torch.nn.Module):
    closed_form = False

    def __init__(self, d, c):
        super().__init__()
        self.lin = torch.nn.Linear(d, c)

    def forward(self, x, lengths):
        raise RuntimeError("CUDA out of memory (simulated)")


def test_failed_run_records_error():
    with pytest.raises(RuntimeError, match="out of memory"):
        run_experiment(cfg(run_name="explodes"), splits=Splits(), model=Exploding)
    c = client()
    exp = c.get_experiment_by_name("synthetic")
    r = c.search_runs([exp.experiment_id], "tags.`mlflow.runName` = 'explodes'")[0]
    assert r.info.status == "FAILED"
    assert r.data.tags["echoes.error"] == "RuntimeError: CUDA out of memory (simulated)"
    log = Path(c.download_artifacts(r.info.run_id, "logs/run.log")).read_text()
    assert "Traceback" in log and "out of memory" in log


SLOW_WORKER = textwrap.dedent("""
    import sys, time, numpy as np, torch
    torch.set_num_threads(1)
    from echoes.tracking import run_experiment

    class Slow(torch.nn.Module):
        closed_form = False
        def __init__(self, d, c):
            super().__init__(); self.lin = torch.nn.Linear(d, c)
        def forward(self, x, lengths):
            print("BATCH", flush=True); time.sleep(0.2); return self.lin(x.mean(1))

    g = np.random.default_rng(0); X = g.normal(size=(64, 5, 3)).astype(np.float32); y = g.integers(0, 2, 64)
    run_experiment(dict(model="gru", epochs=50, batch_size=8, device="cpu", run_name=sys.argv[1]),
                   splits=((X, y), (X, y), (X, y)), model=Slow)
""")


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupted_run_is_killed(tmp_path, sig):
    script = tmp_path / "slow.py"
    script.write_text(SLOW_WORKER)
    name = f"interrupted-{sig.name}"
    p = subprocess.Popen([sys.executable, str(script), name], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, env={**os.environ})
    try:
        for line in p.stdout:  # wait until training is under way
            if line.startswith("BATCH"): break
        p.send_signal(sig)
        _, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None: p.kill()
    assert p.returncode != 0
    c = client()
    exp = c.get_experiment_by_name("synthetic")
    r = c.search_runs([exp.experiment_id], f"tags.`mlflow.runName` = '{name}'")[0]
    assert r.info.status == "KILLED", err[-2000:]
    assert "logs" in artifacts(c, r.info.run_id)


HOLDER = textwrap.dedent("""
    import sys, time
    from echoes.tracking import start_run
    from echoes.train import TrainConfig
    with start_run(TrainConfig(model="gru", epochs=3, batch_size=32, lr=1e-2, hidden_size=16, device="cpu",
                               patience=0, run_name=sys.argv[1])) as run:
        print(run.id, flush=True)
        time.sleep(120)
""")


@pytest.mark.slow
def test_second_opener_of_a_named_run_fails_until_the_holder_dies():
    "A run open in another process is not opened twice; once that process is SIGKILLed, the run resumes."
    p = subprocess.Popen([sys.executable, "-c", HOLDER, "held"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, env={**os.environ})
    try:
        held_id = p.stdout.readline().strip()
        assert held_id, p.stderr.read()[-2000:]
        with pytest.raises(RuntimeError, match=f"'held' is already open .*locked by pid {p.pid}"):
            run_experiment(cfg(run_name="held"), splits=Splits())
        with pytest.raises(RuntimeError, match="already open"):
            run_experiment(cfg(run_id=held_id), splits=Splits())
    finally:
        p.kill(); p.wait()
    res = run_experiment(cfg(run_name="held"), splits=Splits())
    assert res["run_id"] == held_id and res["status"] == "FINISHED"
    c = client()
    exp = c.get_experiment_by_name("synthetic")
    assert len(c.search_runs([exp.experiment_id], "tags.`mlflow.runName` = 'held'")) == 1
    assert [m.step for m in c.get_metric_history(held_id, "val_acc")] == [1, 2, 3]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    d = tmp_path_factory.mktemp("mlflow-server")
    srv = MLflowServer(f"sqlite:///{d / 'server.db'}", str(d / "artifacts"), log_dir=d)
    yield srv
    srv.stop()


@pytest.mark.slow
def test_run_through_tracking_server(mlflow_server):
    uri = mlflow_server.url
    res = run_experiment(cfg(epochs=2, run_name="via-server", tracking_uri=uri), splits=Splits())
    assert res["tracking_uri"] == uri
    c = client(uri)
    r = c.get_run(res["run_id"])
    assert r.info.status == "FINISHED"
    assert sorted(m.step for m in c.get_metric_history(res["run_id"], "val_acc")) == [1, 2]
    assert "test_acc" in r.data.metrics and r.data.tags["echoes.model"] == "gru"
    assert artifacts(c, res["run_id"]) >= {"config.json", "confusion.png", "logs"}
    import mlflow.pytorch
    mlflow.set_tracking_uri(uri)
    try: assert mlflow.pytorch.load_model(f"runs:/{res['run_id']}/model") is not None
    finally: mlflow.set_tracking_uri(None)
    # the local sqlite store saw none of it
    local = client()
    assert not local.search_runs([e.experiment_id for e in local.search_experiments()],
                                 "tags.`mlflow.runName` = 'via-server'")
    # and a restart under the same name resumes the server's run
    again = run_experiment(cfg(epochs=2, run_name="via-server", tracking_uri=uri), splits=Splits())
    assert again["run_id"] == res["run_id"]


NOTEBOOK_CELLS = [
    ("parameters", "run_name = 'nb'\nepochs = 2"),
    (None, textwrap.dedent("""
        import numpy as np, torch
        torch.set_num_threads(1)
        from echoes.tracking import run_experiment, log_executed_notebook
        g = np.random.default_rng(0); X = g.normal(size=(48, 6, 3)).astype(np.float32); y = g.integers(0, 2, 48)
        res = run_experiment(dict(model="gru", epochs=epochs, batch_size=16, device="cpu", run_name=run_name,
                                  hidden_size=8, log_model=False), splits=((X, y), (X, y), (X, y)))
        print("test_acc", res["test_acc"])""")),
    (None, "logged = log_executed_notebook(res['run_id'])\nprint('LOGGED', logged)"),
]


def _write_notebook(path: Path):
    nb = nbformat.v4.new_notebook()
    for tag, src in NOTEBOOK_CELLS:
        cell = nbformat.v4.new_code_cell(src.strip())
        if tag: cell.metadata["tags"] = [tag]
        nb.cells.append(cell)
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)


@pytest.mark.slow
def test_papermill_cli_notebook_logged(tmp_path):
    src = tmp_path / "train.ipynb"
    _write_notebook(src)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    env = {**os.environ}
    papermill = str(Path(sys.executable).parent / "papermill")
    # a relative output path, resolved against papermill's working directory
    p = subprocess.run([papermill, str(src), "executed.ipynb", "-p", "run_name", "nb-file"], cwd=out_dir, env=env,
                       capture_output=True, text=True, timeout=300, check=False)
    assert p.returncode == 0, p.stderr[-3000:]
    c = client()
    exp = c.get_experiment_by_name("synthetic")
    r = c.search_runs([exp.experiment_id], "tags.`mlflow.runName` = 'nb-file'")[0]
    assert artifacts(c, r.info.run_id, "notebook") == {"notebook/executed.ipynb"}
    logged = nbformat.read(c.download_artifacts(r.info.run_id, "notebook/executed.ipynb"), as_version=4)
    # every cell before the last one is there, executed, with its outputs
    assert len(logged.cells) == 4  # papermill injected the parameters cell
    assert "injected-parameters" in logged.cells[1].metadata.get("tags", [])
    assert any("test_acc" in o.get("text", "") for o in logged.cells[2].outputs)

    # to stdout: nothing to log, and the notebook does not fail
    p = subprocess.run([papermill, str(src), "-p", "run_name", "nb-stdout"], cwd=out_dir, env=env,
                       capture_output=True, text=True, timeout=300, check=False)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "LOGGED None" in p.stdout
    r = c.search_runs([exp.experiment_id], "tags.`mlflow.runName` = 'nb-stdout'")[0]
    assert r.info.status == "FINISHED" and not artifacts(c, r.info.run_id, "notebook")


@pytest.mark.slow
def test_ui_serves_both_and_stops(tmp_path):
    client()  # make sure the store exists
    h = ui(block=False, mlflow_port=None, tb_port=None, timeout=120)
    try:
        for name, path in (("mlflow", "/health"), ("tensorboard", "/")):
            assert h.urls[name].startswith("http://127.0.0.1:")
            with urllib.request.urlopen(h.urls[name] + path, timeout=10) as r: assert r.status == 200
    finally:
        h.stop()
    assert all(p.poll() is not None for p in h.procs.values())
    time.sleep(0.5)
    for url in h.urls.values():
        with pytest.raises(OSError): urllib.request.urlopen(url, timeout=2)
