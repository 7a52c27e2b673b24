"""Sweeps on a real local Ray cluster (a head and a worker node on 127.0.0.1), logging to a real MLflow server
whose artifacts go to Azurite through wasbs://, with dataset caches pulled from the HQ container.

Slow: the services take ~40 s to start on 2 cores, and each trial is a papermill run of nbs/train.ipynb.
"""
import os
import threading
import time

import pytest
from services import Azurite, MLflowServer, RayCluster

from echoes.cloud import cache_paths, push_caches
from echoes.cluster import run_sweep_ray

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    "Azurite, an MLflow server with wasbs:// artifacts on it, a two-node Ray cluster whose nodes have their own runs."
    tmp = tmp_path_factory.mktemp("raystack")
    with Azurite(tmp / "azurite") as az:
        az.create_container("raytest")
        base = {**os.environ, **az.env, "ECHOES_HQ_CONTAINER": "raytest", "MLFLOW_DISABLE_TELEMETRY": "true",
                "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        with MLflowServer(f"sqlite:///{tmp / 'hq.db'}", az.wasbs("raytest", "mlartifacts"), env=base,
                          log_dir=tmp) as ml:
            # the nodes start with empty runs folders: whatever a trial needs comes from HQ or is built there
            node_env = {**base, "ECHOES_RUNS": str(tmp / "node-runs")}
            with RayCluster(env=node_env, head_cpus=1, workers=1, worker_cpus=1) as rc:
                yield {"az": az, "ml": ml, "rc": rc, "tmp": tmp, "env": base}


@pytest.fixture
def driver_env(stack, monkeypatch):
    for k in ("AZURE_STORAGE_CONNECTION_STRING", "ECHOES_HQ_CONTAINER"):
        monkeypatch.setenv(k, stack["env"][k])


def sweep(name, seeds):
    return {"name": name, "experiment": "raytest", "dataset": "synthetic", "seeds": seeds,
            "params": {"device": "cpu"}, "models": {"esn": {"hidden_size": 60}}}


def children(client, summary):
    exp = client.get_experiment_by_name(summary["experiment"])
    return client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{summary['parent_run_id']}'")


def test_sweep_on_two_nodes_matches_local(stack, driver_env, tmp_path):
    from mlflow.tracking import MlflowClient

    from echoes.data import load
    from echoes.sweep import run_sweep
    ml, az = stack["ml"], stack["az"]
    # caches built once on the driver and pushed to HQ; the nodes pull them
    info = load("synthetic", device="cpu", progress=False).info
    pushed = push_caches(info)
    names = sorted(cache_paths(info))
    assert {p["name"] for p in pushed} == set(names)
    s = run_sweep_ray(sweep("ray2", [0, 1]), address=stack["rc"].address, tracking_uri=ml.url, caches=names,
                      progress=False)
    assert (s["total"], s["finished"], s["failed"]) == (2, 2, 0), s
    assert s["executor"] == "ray"
    trials = s["trials"]
    assert all(t["node_id"] for t in trials)
    pulls = [p for t in trials for p in t["pulled"]]
    assert {p["name"] for p in pulls} == set(names) and any(not p["skipped"] for p in pulls)
    # runs, metrics and executed notebooks are in the server; the notebooks are blobs on Azurite
    client = MlflowClient(ml.url)
    runs = children(client, s)
    assert len(runs) == 2 and all(r.info.status == "FINISHED" and "test_acc" in r.data.metrics for r in runs)
    # the trial used the pulled caches: same keys as the driver's
    assert {r.data.tags.get("echoes.feature_cache") for r in runs} == {info["feature_cache"]}
    cc = az.service_client().get_container_client("raytest")
    blobs = [b.name for b in cc.list_blobs(name_starts_with="mlartifacts/")]
    for r in runs:
        nb = [a.path for a in client.list_artifacts(r.info.run_id, "notebook")]
        assert nb and nb[0].endswith(".ipynb"), nb
        assert any(r.info.run_id in b and b.endswith(nb[0]) for b in blobs)
    # the same sweep on the local executor gives the same results
    local = run_sweep(sweep("ray2", [0, 1]), tracking_uri=f"sqlite:///{tmp_path / 'local.db'}", progress=False)
    assert local["finished"] == 2
    def acc(summ): return {t["key"]: round(t["test_acc"], 6) for t in summ["trials"]}
    print(f"ray sweep {s['wall_s']} s on 2 nodes, local sweep {local['wall_s']} s (parallel 1)")
    assert acc(local) == acc(s)
    # re-running the Ray sweep skips what is FINISHED
    again = run_sweep_ray(sweep("ray2", [0, 1]), address=stack["rc"].address, tracking_uri=ml.url, progress=False)
    assert again["skipped"] == 2 and again["finished"] == 0


def test_search_on_two_nodes_agrees_with_its_studies(stack, driver_env):
    "A search sweep on the two-node cluster: one proposal per free slot, each told to its study as it finishes."
    from test_search import agree
    sw = {"name": "raysearch", "experiment": "raytest", "dataset": "synthetic", "seeds": [0, 1],
          "params": {"device": "cpu", "epochs": 2, "hidden_size": 16},
          "models": {"esn": {"hidden_size": 50}, "mean": {}},
          "search": {"budget": {"trials": 2}, "startup_trials": 1}}
    s = run_sweep_ray(sw, address=stack["rc"].address, tracking_uri=stack["ml"].url, parallel=2, progress=False)
    assert (s["total"], s["failed"], s["executor"]) == (2 + 2 + 4, 0, "ray"), s
    assert len({t["node_id"] for t in s["trials"] if t.get("node_id")}) == 2, "both nodes ran trials"
    agree(s, stack["ml"].url, {"esn": 2, "mean": 2})


def test_failing_trial_is_retried_then_reported(stack, driver_env, tmp_path):
    "A trial whose notebook fails is submitted once more, then reported FAILED with its error; the others finish."
    import nbformat
    from mlflow.tracking import MlflowClient
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("model, seed, run_id = 'mean', 0, None", metadata={"tags": ["parameters"]}),
                nbformat.v4.new_code_cell("if seed == 1: raise RuntimeError('diverged')")]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, tmp_path / "standin.ipynb")
    sw = {"name": "rayfail", "experiment": "raytest", "notebook": str(tmp_path / "standin.ipynb"), "seeds": [0, 1],
          "models": ["mean"]}
    s = run_sweep_ray(sw, address=stack["rc"].address, tracking_uri=stack["ml"].url, retry_failed=1, progress=False)
    assert (s["total"], s["finished"], s["failed"]) == (2, 1, 1), s
    bad = next(t for t in s["trials"] if t["status"] == "FAILED")
    good = next(t for t in s["trials"] if t["status"] == "FINISHED")
    assert bad["seed"] == 1 and bad["attempts"] == 2 and "diverged" in bad["error"]
    assert good["attempts"] == 1
    runs = children(MlflowClient(stack["ml"].url), s)
    assert sorted(r.info.status for r in runs) == ["FAILED", "FINISHED"]     # the retry re-entered its run


def test_worker_node_killed_mid_sweep(stack, driver_env):
    "Kill the worker node while both trials run (one per node): its trial reruns on the head, each run FINISHED once."
    from mlflow.tracking import MlflowClient
    ml, rc = stack["ml"], stack["rc"]
    client = MlflowClient(ml.url)
    sw = sweep("raykill", [5, 6])
    out, killed = {}, threading.Event()

    def run():
        try: out["summary"] = run_sweep_ray(sw, address=rc.address, tracking_uri=ml.url, max_retries=2, progress=False)
        except BaseException as e:  # noqa: BLE001 reported below
            out["error"] = e
    th = threading.Thread(target=run)
    th.start()
    t0 = time.time()
    while time.time() - t0 < 240 and th.is_alive():
        exp = client.get_experiment_by_name("raytest")
        if exp:
            kids = client.search_runs([exp.experiment_id], "tags.`echoes.sweep_name` = 'raykill'")
            parent = [r for r in kids if "mlflow.parentRunId" not in r.data.tags]
            if parent:
                running = client.search_runs([exp.experiment_id],
                                             f"tags.`mlflow.parentRunId` = '{parent[0].info.run_id}'")
                if len(running) >= 2:
                    rc.kill_worker(0); killed.set(); break
        time.sleep(0.3)
    th.join(600)
    assert killed.is_set(), "both trials never started"
    assert "error" not in out, out.get("error")
    s = out["summary"]
    assert (s["total"], s["finished"], s["failed"]) == (2, 2, 0), s
    assert len({t["node_id"] for t in s["trials"]}) == 1              # both completed on the surviving head node
    runs = children(client, s)
    keys = [r.data.tags["echoes.trial_key"] for r in runs]
    assert sorted(keys) == sorted({t["key"] for t in s["trials"]})    # one child run per trial: none twice
    assert all(r.info.status == "FINISHED" for r in runs)
