"""Sweeps on the real training notebook: expansion of the shipped sweep files, a parallel sweep where some trials
fail and the others finish, and a re-run that resumes (skips the FINISHED trials, retries the failed ones)."""
from pathlib import Path

import pytest
import zmq

from echoes.sweep import load_sweep, run_sweep
from echoes.tracking import client, search_all

ROOT = Path(__file__).resolve().parent.parent


def test_default_sweep_is_the_search_protocol_with_equal_budgets():
    from echoes.search import SearchSweep, load
    ss = load(ROOT / "sweeps" / "default.yaml")
    assert isinstance(ss, SearchSweep)
    assert set(ss.sweep.models) == {"esn", "deep_esn", "rnn", "deep_rnn", "lstm", "gru", "mean"}
    assert len(set(ss.budgets.values())) == 1, "every architecture gets the same budget"
    assert len(ss.sweep.seeds) >= 5 and ss.seed not in ss.sweep.seeds
    assert all(ss.spaces[m] for m in ss.sweep.models), "every architecture is tuned"
    assert ss.sweep.dataset == "synthetic" and ss.select.startswith("val")


def test_smoke_sweep_file():
    ts = load_sweep(ROOT / "sweeps" / "smoke.yaml").trials
    assert len(ts) <= 12 and len({t.model for t in ts}) >= 3


def test_bad_sweeps_fail_early():
    with pytest.raises(ValueError, match="valid models"):
        load_sweep({"models": ["transformer"]})
    with pytest.raises(ValueError, match="unknown parameter"):
        load_sweep({"models": {"esn": {"spectral_radus": [0.9]}}})
    with pytest.raises(ValueError, match="unknown sweep key"):
        load_sweep({"models": ["esn"], "seed": 3})
    with pytest.raises(FileNotFoundError):
        load_sweep("no/such/sweep.yaml")


@pytest.mark.slow
def test_failing_trials_do_not_stop_others_and_rerun_resumes(tmp_path, capfd):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    # `encoder: bogus` passes the config checks but fails inside the notebook, when the data layer loads
    sweep = {"name": "resume-test", "seeds": [0, 1], "params": {"epochs": 1, "hidden_size": 16},
             "models": {"esn": {"hidden_size": 50}, "mean": {"encoder": "bogus"}}}
    s1 = run_sweep(sweep, parallel=2, tracking_uri=uri, progress=False)
    assert (s1["total"], s1["finished"], s1["failed"], s1["skipped"]) == (4, 2, 2, 0), s1
    if zmq.has("curve"):  # the trials' kernels ran on encrypted sockets, so ipykernel had nothing to warn about
        assert "without encryption" not in capfd.readouterr().err
    c = client(uri)
    by_name = {t["name"]: t for t in s1["trials"]}
    for name in ("esn-seed0", "esn-seed1"):
        run = c.get_run(by_name[name]["run_id"])
        assert run.info.status == "FINISHED"
        assert run.data.tags["mlflow.parentRunId"] == s1["parent_run_id"]
        assert run.data.tags["echoes.trial_key"] == by_name[name]["key"]
        assert run.data.tags["echoes.sweep"] == s1["key"]
        assert run.data.params["model"] == "esn" and "test_acc" in run.data.metrics
        assert [a.path for a in c.list_artifacts(run.info.run_id, "notebook")] == [f"notebook/{name}.ipynb"]
    for name in ("mean-seed0", "mean-seed1"):
        t = by_name[name]
        assert t["status"] == "FAILED" and "bogus" in t["error"]
        assert c.get_run(t["run_id"]).info.status == "FAILED"
        assert c.list_artifacts(t["run_id"], "notebook"), "the failed notebook is kept for diagnosis"
    assert c.get_run(s1["parent_run_id"]).info.status == "FAILED"

    s2 = run_sweep(sweep, parallel=2, tracking_uri=uri, progress=False)
    assert s2["parent_run_id"] == s1["parent_run_id"]
    assert (s2["skipped"], s2["failed"], s2["finished"]) == (2, 2, 0), s2
    skipped = {t["name"]: t["run_id"] for t in s2["trials"] if t["status"] == "SKIPPED"}
    assert skipped == {"esn-seed0": by_name["esn-seed0"]["run_id"], "esn-seed1": by_name["esn-seed1"]["run_id"]}
    children = search_all(c, [s1["experiment_id"]], f"tags.`mlflow.parentRunId` = '{s1['parent_run_id']}'")
    assert len(children) == 4, "a re-run reuses the trials' runs, it does not add new ones"
    assert sum(r.info.status == "FINISHED" for r in children) == 2
