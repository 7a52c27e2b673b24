"""The training notebook run as users run it: the papermill CLI as a subprocess, then read back from MLflow."""
import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import mlflow.pytorch
import papermill
import pytest

from echoes.train import TrainConfig

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
NB = "nbs/train.ipynb"


def papermill_cli(*args, cwd=ROOT, timeout=600):
    return subprocess.run([str(BIN / "papermill"), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def search(uri: str, experiment: str = "synthetic"):
    "The runs of `experiment` in the store at `uri`, through the public fluent API users call."
    mlflow.set_tracking_uri(uri)
    return mlflow.search_runs(experiment_names=[experiment], output_format="list")


def test_parameters_cell_matches_train_config():
    "Every TrainConfig field is a notebook parameter with the same default, and the tag survived nbdev-clean."
    params = papermill.inspect_notebook(str(ROOT / NB))
    defaults = TrainConfig.__dataclass_fields__
    assert set(defaults) == set(params), set(defaults) ^ set(params)
    for name, p in params.items():
        assert eval(p["default"]) == defaults[name].default, name
    for name in ["model", "dataset", "epochs", "seed", "batch_size", "lr", "hidden_size", "frames", "frame_size",
                 "tracking_uri", "experiment", "run_name", "device"]:
        assert name in params


def test_papermill_esn_run_is_logged(tmp_path):
    "`papermill nbs/train.ipynb OUT -p model esn` trains for real and leaves a full MLflow run."
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    out = tmp_path / "esn.ipynb"
    r = papermill_cli(NB, str(out), "-p", "model", "esn", "-p", "tracking_uri", uri, "-p", "run_name", "pm-esn")
    assert r.returncode == 0, r.stderr[-3000:]
    client = mlflow.MlflowClient(uri)
    runs = search(uri)
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    m = run.data.metrics
    assert m["test_acc"] >= 0.85, m
    for k in ["test_top5", "train_time_s", "latency_ms", "throughput_cps", "trainable_params", "total_params",
              "peak_mem_mb"]:
        assert k in m, k
    assert m["trainable_params"] < m["total_params"]  # the reservoir is frozen
    assert run.data.params["model"] == "esn"
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.json", "describe.json", "per_class.json", "confusion.png", "logs"} <= artifacts, artifacts
    # MLflow 3 keeps models as LoggedModels linked to their source run
    models = mlflow.search_logged_models(experiment_ids=[run.info.experiment_id], output_format="list",
                                         filter_string=f"source_run_id='{run.info.run_id}'")
    assert [lm.name for lm in models] == ["model"]
    net = mlflow.pytorch.load_model(models[0].model_uri)
    assert type(net).__name__ == "SimpleESN"
    nbs = [a.path for a in client.list_artifacts(run.info.run_id, "notebook")]
    assert nbs == ["notebook/esn.ipynb"], nbs
    executed = json.loads(Path(client.download_artifacts(run.info.run_id, nbs[0], str(tmp_path / "dl"))).read_text())
    assert any(c.get("outputs") for c in executed["cells"] if c["cell_type"] == "code")


def test_papermill_to_stdout(tmp_path):
    "The bare form with no output path writes the executed notebook to stdout."
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    r = papermill_cli(NB, "-p", "model", "esn", "-p", "tracking_uri", uri)
    assert r.returncode == 0, r.stderr[-3000:]
    nb = json.loads(r.stdout)
    assert nb["cells"]
    runs = search(uri)
    assert [x.info.status for x in runs] == ["FINISHED"]


@pytest.mark.parametrize("param,value,names", [
    ("model", "transformer", "esn"), ("dataset", "youtube8m", "synthetic"),
    ("bogus", "1", "valid parameters: batch_size"),  # papermill itself defines any name it is given
    ("spectral_radius", "nan", "spectral_radius must be a finite number"), ("input_scaling", "nan", "input_scaling"),
    ("ridge", "nan", "ridge"), ("epochs", "2.5", "epochs must be an integer"),
    ("hidden_size", "100000", "needs about")])
def test_bad_parameter_fails_early(tmp_path, param, value, names):
    "A bad parameter name or value fails in the configuration cell, naming it and what it accepts; nothing is tracked."
    out = tmp_path / "bad.ipynb"
    r = papermill_cli(NB, str(out), "-p", param, value, "-p", "tracking_uri", f"sqlite:///{tmp_path}/m.db")
    assert r.returncode != 0
    assert names in r.stderr and "ConfigError" in r.stderr, r.stderr[-2000:]
    nb = json.loads(out.read_text())
    executed = [c for c in nb["cells"] if c["cell_type"] == "code" and c.get("execution_count")]
    failed = "".join(executed[-1]["source"])
    assert "TrainConfig.from_dict" in failed, "the error must come before any data is loaded"
    assert not (tmp_path / "m.db").exists(), "nothing is tracked for a config that cannot run"
