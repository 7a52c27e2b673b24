"""Fault suite, sweeps: bad sweep files refused before any trial runs, naming the file's key; a parallel sweep
killed with SIGKILL leaves no worker or kernel behind, and its re-run records every trial once, all FINISHED."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from services import sigkill_when

from echoes.cli import main
from echoes.core import ConfigError
from echoes.sweep import load_sweep
from echoes.tracking import client, search_all

BIN = Path(sys.executable).parent

BAD = {  # sweep file -> what the error says, after "<file>: "
    "seeds: 2.5\nmodels: [mean]": "seeds: must be an integer or a list of integers; got 2.5",
    "seeds: [1, 1.5]\nmodels: [mean]": "seeds: must be an integer or a list of integers; got 1.5",
    "seeds: -1\nmodels: [mean]": "seeds: a count of seeds must be >= 1",
    "models: esn": "models: must be a list of model names or a mapping",
    "models: [esn, 3]": "models: must be a list of model names or a mapping",
    "models: {esn: leak}": "models.esn: must be a mapping",
    "models: [esn]\nparams: {spectral_radius: .nan}": "params: spectral_radius must be a finite number",
    "models: {esn: {spectral_radius: .nan}}": "models.esn: spectral_radius must be a finite number",
    "models: {esn: {spectral_radius: [0.9, .nan]}}": "models.esn: spectral_radius must be a finite number",
    "models: {esn: {leak: .inf}}": "models.esn: leak must be a finite number",
    "models: {lstm: {epochs: 2.5}}": "models.lstm: epochs must be an integer",
    "models: [esn]\nparams: {bogus: 1}": "params: unknown parameter(s) ['bogus']",
    "models: [esn]\nparams: {leak: []}": "params: leak: an empty list is a grid of no values",
    "models: [esn]\nparams: [1, 2]": "params: must be a mapping",
    "name: ../../outside\nmodels: [mean]": "name: must be one plain file name",
    "name: a/b\nmodels: [mean]": "name: must be one plain file name",
    "name: ..\nmodels: [mean]": "name: must be one plain file name",
    "models: [mean]\nparallel: 0": "parallel: must be an integer >= 1",
    "models: [mean]\nseed: 3": "unknown sweep key(s) ['seed']",
    "models: [mean\n": "not valid YAML",
    "[mean, esn]": "a sweep must be a mapping",
}


@pytest.mark.parametrize("text", BAD, ids=range(len(BAD)))
def test_bad_sweep_file_refused_naming_its_key(text, tmp_path):
    f = tmp_path / "sweeps" / "x.yaml"
    f.parent.mkdir(); f.write_text(text + "\n")
    with pytest.raises(ConfigError) as e: load_sweep(f)
    assert str(e.value).startswith(f"{f}: ") and BAD[text] in str(e.value), str(e.value)


def test_bad_sweep_file_is_one_line_and_no_run(tmp_path, capsys):
    f = tmp_path / "x.yaml"; f.write_text("seeds: 2.5\nmodels: [mean]\n")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert main(["sweep", str(f), "--tracking-uri", uri]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"echoes sweep: error: {f}: seeds: must be an integer or a list of integers; got 2.5"
    assert not (tmp_path / "mlflow.db").exists(), "no store, no run"
    assert not list((Path(os.environ["ECHOES_RUNS"]) / "notebooks").glob("sweep-x-*")), "no trial ran"


def test_sweep_name_never_leaves_runs(tmp_path):
    assert load_sweep({"name": "ok.v1", "models": ["mean"], "seeds": 1}).name == "ok.v1"
    (f := tmp_path / "odd name.yaml").write_text("models: [mean]\nseeds: 1\n")
    assert load_sweep(f).name == "odd_name"  # a file's stem becomes a safe name; an explicit unsafe one is refused


# ------------------------------------------------------------------------------- fault: SIGKILL of the parent
def _trial_runs(uri: str):
    "The sweep's child runs (those with a trial key), or [] while the store is not there yet."
    try:
        c = client(uri)
        exps = [e.experiment_id for e in c.search_experiments()]
        return [r for r in search_all(c, exps, "") if "echoes.trial_key" in r.data.tags] if exps else []
    except Exception:  # the sweep is still creating the store
        return []


@pytest.mark.slow
def test_sigkill_of_parallel_sweep_then_rerun(tmp_path):
    sweep = tmp_path / "killme.yaml"
    sweep.write_text("name: killme\ndataset: synthetic\nseeds: [0, 1, 2]\nparams: {epochs: 1, hidden_size: 16}\n"
                     "models:\n  mean: {}\n  esn: {hidden_size: 50}\n")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**os.environ, "ECHOES_RUNS": str(tmp_path / "runs"), "PYTHONUNBUFFERED": "1"}
    cmd = [str(BIN / "echoes"), "sweep", str(sweep), "--parallel", "2", "--tracking-uri", uri, "--json"]
    # the store is made here first: a process creating a new SQLite store races a second one opening it
    client(uri).search_experiments()
    killed = sigkill_when(cmd, env, tmp_path / "first.log",
                          lambda: sum(r.info.status == "FINISHED" for r in _trial_runs(uri)) >= 2)
    assert killed["kernels"], "a trial's kernel was running when the parent was killed"
    assert not killed["survivors"], f"outlived the killed sweep: {killed['survivors']}"
    left = _trial_runs(uri)
    assert 2 <= sum(r.info.status == "FINISHED" for r in left) < 6

    finished_before = {r.data.tags["echoes.trial_key"]: r.info.run_id for r in left if r.info.status == "FINISHED"}
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert (summary["total"], summary["failed"], summary["not_run"]) == (6, 0, 0), summary
    assert summary["skipped"] == len(finished_before)
    c = client(uri)
    children = search_all(c, [summary["experiment_id"]], f"tags.`mlflow.parentRunId` = '{summary['parent_run_id']}'")
    keys = [r.data.tags["echoes.trial_key"] for r in children]
    assert len(keys) == len(set(keys)) == 6, "every trial recorded once"
    assert {r.info.status for r in children} == {"FINISHED"}
    assert all(rid == {r.data.tags["echoes.trial_key"]: r.info.run_id for r in children}[k]
               for k, rid in finished_before.items())
    assert c.get_run(summary["parent_run_id"]).info.status == "FINISHED"
    parents = [r for r in search_all(c, [summary["experiment_id"]], "tags.`echoes.sweep_name` = 'killme'")
               if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1
