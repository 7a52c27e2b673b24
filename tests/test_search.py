"""The search protocol: bad search spaces refused before any trial, naming the sweep file's key; a search sweep
SIGKILLed mid-search and started again records every trial once, in MLflow and in its Optuna studies, which agree."""
import json
import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import yaml

from echoes.cli import main
from echoes.search import load, study_storage
from echoes.tracking import client, search_all

BIN = Path(sys.executable).parent

BASE = {"name": "tiny", "dataset": "synthetic", "seeds": [0, 1], "params": {"epochs": 2, "hidden_size": 16},
        "models": {"esn": {"hidden_size": 50}, "mean": {}}}

T2 = "budget: {trials: 2}\n"
BAD = {  # search section -> what the error says
    T2 + "spaces: {esn: {leak: {uniform: [0.9, 0.1]}}}": "search.spaces.esn.leak: low 0.9 must be below high 0.1",
    T2 + "spaces: {esn: {spectral_radius: {loguniform: [0, 10]}}}":
        "search.spaces.esn.spectral_radius: a log scale needs low > 0",
    T2 + "spaces: {esn: {ridge: {loguniform: [-1, 1]}}}": "search.spaces.esn.ridge: a log scale needs low > 0",
    T2 + "spaces: {mean: {spectral_radius: {uniform: [0.1, 1]}}}":
        "search.spaces.mean.spectral_radius: 'spectral_radius' is not a parameter mean can search",
    T2 + "spaces: {esn: {lr: {loguniform: [0.001, 0.1]}}}":
        "search.spaces.esn.lr: 'lr' is not a parameter esn can search",
    T2 + "spaces: {esn: {leak: {uniform: [0.1, 2]}}}": "search.spaces.esn.leak: esn: leak=2 must lie in (0, 1]",
    "budget: {trials: 0}": "search.budget.trials: must be an integer >= 1",
    "budget: {seconds: 0}": "search.budget.seconds: must be a number > 0",
    T2 + "budgets: {mean: {trials: 0}}": "search.budgets.mean.trials: must be an integer >= 1",
    T2 + "select: test_acc": "search.select: must be a validation metric",
    T2 + "bogus: 1": "search: unknown key(s) ['bogus']",
}


@pytest.mark.parametrize("search", BAD, ids=range(len(BAD)))
def test_bad_search_refused_naming_its_key_before_any_trial(search, tmp_path, capsys):
    f = tmp_path / "s.yaml"
    f.write_text(yaml.safe_dump(BASE) + "search:\n" + "".join(f"  {line}\n" for line in search.splitlines()))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert main(["sweep", str(f), "--tracking-uri", uri]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"echoes sweep: error: {f}: ") and BAD[search] in err and "\n" not in err, err
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "optuna.db").exists(), "no store, no trial"


def test_a_grid_in_a_search_sweep_is_refused():
    with pytest.raises(ValueError, match=r"models.esn.leak: a search sweep fixes or searches each parameter"):
        load({**BASE, "models": {"esn": {"leak": [0.3, 1.0]}}, "search": {"budget": {"trials": 2}}})


def agree(summary: dict, uri: str, trials: dict) -> None:
    "MLflow and the Optuna studies record the same search trials, once each, none RUNNING; the finals follow the best."
    c = client(uri)
    children = search_all(c, [summary["experiment_id"]], f"tags.`mlflow.parentRunId` = '{summary['parent_run_id']}'")
    keys = [r.data.tags["echoes.trial_key"] for r in children]
    assert len(keys) == len(set(keys)), "every trial recorded once in MLflow"
    assert {r.info.status for r in children} == {"FINISHED"}, [(r.info.run_name, r.info.status) for r in children]
    by_key = {r.data.tags["echoes.trial_key"]: r for r in children}
    p = summary["protocol"]
    storage = study_storage(uri) if uri.startswith("sqlite") else p["storage"]
    for m, n in trials.items():
        st = optuna.load_study(study_name=p["studies"][m], storage=storage)
        assert [t.state.name for t in st.trials] == ["COMPLETE"] * n, (m, [t.state.name for t in st.trials])
        mine = [r for r in children if r.data.tags["echoes.study"] == st.study_name]
        search = [r for r in mine if r.data.tags["echoes.phase"] == "search"]
        finals = [r for r in mine if r.data.tags["echoes.phase"] == "final"]
        assert sorted(int(r.data.tags["echoes.search_trial"]) for r in search) == list(range(n))
        for t in st.trials:  # the study's value of each trial is its MLflow run's validation accuracy
            run = by_key[t.user_attrs["trial_key"]]
            assert run.data.tags["echoes.search_trial"] == str(t.number)
            assert run.data.metrics["val_acc"] == pytest.approx(t.value)
        best = by_key[st.best_trial.user_attrs["trial_key"]]
        assert sorted(int(r.data.params["seed"]) for r in finals) == p["seeds"]
        assert {r.data.tags["echoes.selected_from"] for r in finals} == {best.info.run_id}
        assert p["spent"][m]["trials"] == n and p["budgets"][m]["trials"] == n
        assert p["selected"][m]["run_id"] == best.info.run_id
    assert c.get_run(summary["parent_run_id"]).info.status == "FINISHED"
    assert c.get_run(summary["parent_run_id"]).data.tags["echoes.protocol"] == "search"


@pytest.mark.slow
def test_search_killed_and_resumed_on_the_local_pool(tmp_path):
    from services import sigkill_when
    from test_faults_sweep import _trial_runs
    f = tmp_path / "tiny.yaml"
    f.write_text(yaml.safe_dump({**BASE, "search": {"budget": {"trials": 3}, "startup_trials": 2}}))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**os.environ, "ECHOES_RUNS": str(tmp_path / "runs"), "PYTHONUNBUFFERED": "1"}
    cmd = [str(BIN / "echoes"), "sweep", str(f), "--parallel", "2", "--tracking-uri", uri, "--json"]
    client(uri).search_experiments()  # the store is made here first (see test_faults_sweep)
    killed = sigkill_when(cmd, env, tmp_path / "first.log",
                          lambda: sum(r.info.status == "FINISHED" for r in _trial_runs(uri)) >= 2)
    assert not killed["survivors"], "a kernel outlived the killed sweep"
    left = _trial_runs(uri)
    assert sum(r.info.status == "FINISHED" for r in left) < 10, "the kill came before the end"
    finished_before = {r.data.tags["echoes.trial_key"]: r.info.run_id for r in left if r.info.status == "FINISHED"}

    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert (summary["total"], summary["failed"], summary["not_run"]) == (3 + 3 + 4, 0, 0), summary
    agree(summary, uri, {"esn": 3, "mean": 3})
    runs = {r.data.tags["echoes.trial_key"]: r.info.run_id for r in _trial_runs(uri)}
    assert all(runs[k] == rid for k, rid in finished_before.items()), "finished trials kept, not run again"
    assert len(optuna.get_all_study_names(study_storage(uri))) == 2


@pytest.mark.slow
def test_a_trial_whose_kernel_dies_once_runs_again_into_the_same_run(tmp_path):
    "A transient fault, real: the first try of a search trial and of a final run SIGKILLs its own kernel."
    import nbformat
    from echoes.search import run_search
    from echoes.sweep import default_notebook
    marks, victims = tmp_path / "marks", ["esn-search001", "mean-final-seed1"]
    marks.mkdir()
    nb = nbformat.read(default_notebook(), 4)
    at = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])) + 1
    nb.cells.insert(at, nbformat.v4.new_code_cell(
        "import os as _os, signal as _signal  # private names: the notebook takes every public one for a parameter\n"
        f"if run_name in {victims!r} and not _os.path.exists(f'{marks}/{{run_name}}'):\n"
        f"    open(f'{marks}/{{run_name}}', 'w').close(); _os.kill(_os.getpid(), _signal.SIGKILL)"))
    nbformat.write(nb, tmp_path / "train.ipynb")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    s = run_search({**BASE, "notebook": str(tmp_path / "train.ipynb"), "search": {"budget": {"trials": 2}}},
                   tracking_uri=uri, progress=False)
    assert sorted(p.name for p in marks.iterdir()) == victims, "each victim's kernel was killed once"
    assert (s["finished"], s["failed"]) == (s["total"], 0), s
    agree(s, uri, {"esn": 2, "mean": 2})
    assert {m: x["failed"] for m, x in s["protocol"]["spent"].items()} == {"esn": 0, "mean": 0}, "a retry is no failure"
