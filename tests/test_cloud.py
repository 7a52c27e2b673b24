"""HQ store, tracking server and Ray cluster config, against real local services (Azurite, mlflow server).

Fast tests share one Azurite per module; the fault and leak tests start their own services and are `slow`.
"""
import hashlib
import json
import os
import subprocess
import sys
import urllib.parse
from datetime import UTC, datetime, timedelta
from pathlib import Path

import jsonschema
import numpy as np
import pytest
import yaml
from services import ROOT, Azurite, free_port, hq_env, sha, stopping_store

from echoes.cloud import (
    HQError,
    HQStore,
    blob_name,
    cache_paths,
    credential_source,
    manifest_name,
    pull,
    push,
    push_caches,
    push_run,
    redact,
)
from echoes.cluster import hq_server
from echoes.tracking import tensorboard_dir


@pytest.fixture(scope="module")
def azurite(tmp_path_factory):
    with Azurite(tmp_path_factory.mktemp("azurite")) as az: yield az


@pytest.fixture
def hq(azurite, monkeypatch, tmp_path, request): return hq_env(monkeypatch, azurite, tmp_path, request.node.name)


def make_cache(root: Path, key: str = "k1", big_mib: int = 3) -> Path:
    d = root / "cache" / "features" / key
    (d / "sub").mkdir(parents=True)
    (d / "features.npy").write_bytes(np.random.default_rng(1).bytes(big_mib << 20))
    (d / "meta.json").write_text('{"encoder": "pixels"}')
    (d / "sub" / "same.json").write_text('{"encoder": "pixels"}')  # same content, another path
    (d / ".lock").write_text("")                                    # never part of an object
    return d


def test_push_pull_roundtrip(hq, tmp_path):
    d = make_cache(tmp_path / "runs")
    store = HQStore(chunk_size=1 << 20)
    r = store.push(d)
    assert (r["name"], r["files"], r["root"]) == ("k1", 3, "cache/features/k1")
    assert r["uploaded_files"] == 2 and r["blocks"] >= 3 + 1        # deduplicated; the big file in blocks
    props = store.blob_props(blob_name(sha(d / "features.npy")))
    assert props.metadata["sha256"] == sha(d / "features.npy")      # checksum in blob metadata
    assert store.push(d)["uploaded_bytes"] == 0                       # content already there
    # pull elsewhere, then again: skipped because the local copy matches
    p = store.pull("k1", dest=tmp_path / "copy")
    assert not p["skipped"] and p["files"] == 3
    for f in ("features.npy", "meta.json", "sub/same.json"): assert sha(tmp_path / "copy" / f) == sha(d / f)
    assert not (tmp_path / "copy" / ".lock").exists()
    assert (tmp_path / "copy" / "features.npy").stat().st_mtime_ns == (d / "features.npy").stat().st_mtime_ns
    assert store.pull("k1", dest=tmp_path / "copy")["skipped"]
    assert store.pull("k1")["skipped"]                                # default dest is its own root
    # a local file changed behind our back: the pull notices, and says so rather than overwrite it
    (tmp_path / "copy" / "meta.json").write_text("{}")
    with pytest.raises(HQError, match="meta.json"): store.pull("k1", dest=tmp_path / "copy")
    assert not store.pull("k1", dest=tmp_path / "copy", force=True)["skipped"]
    assert sha(tmp_path / "copy" / "meta.json") == sha(d / "meta.json")
    # an extra local file is not the object's business: it stays, and the object is complete without it
    (tmp_path / "copy" / "extra.bin").write_bytes(b"x")
    assert store.pull("k1", dest=tmp_path / "copy")["skipped"] and (tmp_path / "copy" / "extra.bin").exists()
    assert [o["name"] for o in store.ls(verify=True) if o["complete"]] == ["k1"]
    # module-level functions, by cache key, on another machine's runs folder
    os.environ["ECHOES_RUNS"] = str(tmp_path / "node")
    assert pull("k1")["dest"] == str(tmp_path / "node" / "cache" / "features" / "k1")


def test_push_by_key_and_single_file(hq, tmp_path):
    make_cache(tmp_path / "runs", "abc999", big_mib=0)
    assert push("abc999")["files"] == 3
    f = tmp_path / "model.pt"; f.write_bytes(b"weights" * 1000)
    assert push(f, "model-1")["files"] == 1
    r = pull("model-1", dest=tmp_path / "back" / "m.pt")
    assert sha(tmp_path / "back" / "m.pt") == sha(f) and not r["skipped"]


def test_partial_object_never_trusted(hq, tmp_path):
    store = HQStore(chunk_size=1 << 20)
    d = make_cache(tmp_path / "runs", "half")
    big = d / "features.npy"
    bc = store.cc.get_blob_client(blob_name(sha(big)))
    from echoes.cloud import block_id
    bc.stage_block(block_id(0, sha(big)), big.read_bytes()[: 1 << 20])   # staged, never committed
    assert store.ls() == [] and store.manifest("half") is None
    with pytest.raises(HQError, match="no committed object"): store.pull("half", dest=tmp_path / "x")
    assert not store.has_file(sha(big), big.stat().st_size)
    # the next push reuses the staged block and completes
    r = store.push(d)
    assert r["reused_blocks"] == 1 and store.has_file(sha(big), big.stat().st_size)
    # a blob whose bytes do not match its name: the download is refused and nothing lands at dest
    bad = store.cc.get_blob_client(blob_name(sha(d / "meta.json")))
    bad.upload_blob(b'{"encoder": "pixelz"}', overwrite=True, metadata={"sha256": sha(d / "meta.json"), "size": "21"})
    with pytest.raises(HQError, match="checksum mismatch"): store.pull("half", dest=tmp_path / "y")
    assert not (tmp_path / "y").exists() and not list(tmp_path.glob(".y.hq-*"))


def test_manifest_cannot_escape(hq, tmp_path):
    store = HQStore()
    body = json.dumps({"format": "echoes-hq/1", "kind": "cache", "name": "evil", "root": None, "is_dir": True,
                       "files": [{"path": "../../outside", "sha256": "0" * 64, "size": 1}], "bytes": 1}).encode()
    store.cc.get_blob_client(manifest_name("cache", "evil")).upload_blob(
        body, metadata={"sha256": hashlib.sha256(body).hexdigest()})
    with pytest.raises(HQError, match="unsafe path"): store.pull("evil", dest=tmp_path / "e")
    assert not (tmp_path / "outside").exists()


def test_sas_and_identity_credentials(azurite, monkeypatch, tmp_path):
    from azure.storage.blob import AccountSasPermissions, ResourceTypes, generate_account_sas
    perms = AccountSasPermissions(read=True, write=True, list=True, create=True, add=True, delete=True)
    sas = generate_account_sas(azurite.account, azurite.key, ResourceTypes(service=True, container=True, object=True),
                               perms, expiry=datetime.now(UTC) + timedelta(hours=1))
    monkeypatch.delenv("AZURE_STORAGE_CONNECTION_STRING", raising=False)
    monkeypatch.setenv("AZURE_STORAGE_ACCOUNT_URL", azurite.blob_endpoint)
    monkeypatch.setenv("AZURE_STORAGE_SAS_TOKEN", sas)
    monkeypatch.setenv("ECHOES_RUNS", str(tmp_path / "runs"))
    monkeypatch.setenv("ECHOES_HQ_CONTAINER", "sastest")
    assert credential_source() == "sas"
    d = make_cache(tmp_path / "runs", "viasas", big_mib=1)
    assert push(d)["files"] == 3
    assert not pull("viasas", dest=tmp_path / "c")["skipped"]
    assert "sig=" in sas and sas.split("sig=")[1].split("&")[0] not in redact(f"url?{sas}")
    # DefaultAzureCredential: the client is built from the account URL alone (it needs Azure AD to go further)
    monkeypatch.delenv("AZURE_STORAGE_SAS_TOKEN")
    monkeypatch.setenv("AZURE_STORAGE_ACCOUNT_URL", "https://echoeshq.blob.core.windows.net")  # tokens need https
    assert credential_source() == "azure-identity"
    from echoes.cloud import blob_service
    svc = blob_service()
    assert type(svc.credential).__name__ == "DefaultAzureCredential"


def test_cache_paths_from_dataset(hq, tmp_path):
    "The real data layer's info names the clip cache, the feature cache and the generated source."
    from echoes.data import load
    s = load("synthetic", device="cpu", classes=2, clips_per_class=4, frames=4, frame_size=16, progress=False)
    names = cache_paths(s.info)
    assert s.info["clip_cache"] in names and s.info["feature_cache"] in names
    rs = push_caches(s.info)
    assert {r["name"] for r in rs} == set(names)
    # another node: pull all three, and the data layer finds its caches by the same keys (mtimes kept)
    os.environ["ECHOES_RUNS"] = str(tmp_path / "node")
    for n in names: pull(n)
    s2 = load("synthetic", device="cpu", classes=2, clips_per_class=4, frames=4, frame_size=16, progress=False)
    assert (s2.info["clip_cache"], s2.info["feature_cache"]) == (s.info["clip_cache"], s.info["feature_cache"])
    assert str(tmp_path / "node") in s2.info["paths"]["feature_cache"]


def test_push_run_takes_tensorboard_logs_by_their_safe_path(hq, tmp_path, monkeypatch):
    "A run named with a space, slashes and `..`: its TensorBoard events reach Blob; nothing outside runs/ does."
    from mlflow.tracking import MlflowClient
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    uri = (tmp_path / "mlruns").as_uri()
    c = MlflowClient(uri)
    name = "../../../lr 0.1/a"
    run = c.create_run(c.create_experiment("my exp"), run_name=name)
    c.log_metric(run.info.run_id, "test_acc", 0.5)
    tb = tensorboard_dir("my exp", name, create=True)
    assert tb.resolve().is_relative_to((tmp_path / "runs" / "tb").resolve())
    (tb / "events.out.tfevents.1.host").write_bytes(b"real events")
    # where the name, joined as it is, would lead: outside runs/
    outside = tmp_path / "runs" / "tb" / "my exp" / name
    assert not outside.resolve().is_relative_to((tmp_path / "runs").resolve())
    outside.mkdir(parents=True)
    (outside / "private.txt").write_bytes(b"not a run's")
    r = push_run(run.info.run_id, uri)
    assert r["name"] == run.info.run_id
    m = HQStore().manifest(run.info.run_id, "run")
    assert sorted(f["path"] for f in m["files"]) == ["run.json", "tb/events.out.tfevents.1.host"]
    back = pull(run.info.run_id, "run", dest=tmp_path / "back")
    assert (Path(back["dest"]) / "tb" / "events.out.tfevents.1.host").read_bytes() == b"real events"
    assert json.loads((Path(back["dest"]) / "run.json").read_text())["run_name"] == name


# ------------------------------------------------------------------------- fault: Azurite stopped mid-push
@pytest.mark.slow
def test_azurite_stopped_mid_push(tmp_path, monkeypatch):
    az = Azurite(tmp_path / "az")
    try:
        hq_env(monkeypatch, az, tmp_path, "faults")
        d = make_cache(tmp_path / "runs", "bigcache", big_mib=24)
        big = d / "features.npy"
        # 1. Blob goes away after 8 of 96 blocks and stays away: the push fails clearly, in bounded time
        store = stopping_store(az, "uploading block", 8, chunk_size=256 << 10, max_concurrency=2, attempts=3,
                               backoff=0.2)
        with pytest.raises(HQError, match=r"failed after 3 attempts") as e:
            store.push(d)
        assert az.key not in str(e.value)
        # 2. Blob is back: nothing of the failed push is visible or trusted
        az.start()
        fresh = HQStore(chunk_size=256 << 10)
        assert fresh.ls() == [] and fresh.manifest("bigcache") is None
        assert not fresh.has_file(sha(big), big.stat().st_size)
        with pytest.raises(HQError, match="no committed object"): fresh.pull("bigcache", dest=tmp_path / "x")
        # 3. a later push completes, and a pull elsewhere gets the exact bytes
        r = fresh.push(d)
        assert r["files"] == 3 and r["blocks"] + r["reused_blocks"] >= 96
        fresh.pull("bigcache", dest=tmp_path / "copy")
        assert sha(tmp_path / "copy" / "features.npy") == sha(big)
        # 4. a short outage during a push is ridden out by the retries
        d2 = make_cache(tmp_path / "runs", "bigcache2", big_mib=24)
        (d2 / "features.npy").write_bytes(np.random.default_rng(2).bytes(24 << 20))
        store = stopping_store(az, "uploading block", 8, restart_after=1.0, chunk_size=256 << 10, max_concurrency=2,
                               attempts=7, backoff=0.5)
        r = store.push(d2)
        assert r["files"] == 3
        HQStore().pull("bigcache2", dest=tmp_path / "copy2")
        assert sha(tmp_path / "copy2" / "features.npy") == sha(d2 / "features.npy")
    finally:
        az.stop()


# ------------------------------------------------------------------------- tracking server + credential leaks
@pytest.mark.slow
def test_hq_server_and_no_credential_leaks(tmp_path, monkeypatch, capfd):
    """A training run through the HQ server with secrets in every environment: artifacts land on Blob, and the
    account key and SAS signature appear in no stored output (MLflow db, params, tags, artifacts, notebooks,
    logs, pushed objects, the dashboard)."""
    from azure.storage.blob import AccountSasPermissions, ResourceTypes, generate_account_sas
    from mlflow.tracking import MlflowClient
    runs = tmp_path / "runs"
    az = Azurite(tmp_path / "az")
    srv = None
    try:
        sas = generate_account_sas(az.account, az.key, ResourceTypes(service=True, container=True, object=True),
                                   AccountSasPermissions(read=True, list=True),
                                   expiry=datetime.now(UTC) + timedelta(hours=1))
        sig = urllib.parse.unquote(sas.split("sig=")[1].split("&")[0])
        secrets = [az.key, urllib.parse.quote(az.key, safe=""), sig, urllib.parse.quote(sig, safe="")]
        env = {"AZURE_STORAGE_CONNECTION_STRING": az.connection_string, "AZURE_STORAGE_SAS_TOKEN": sas,
               "ECHOES_RUNS": str(runs), "ECHOES_HQ_CONTAINER": "leaktest", "MLFLOW_DISABLE_TELEMETRY": "true"}
        for k, v in env.items(): monkeypatch.setenv(k, v)
        port = free_port()
        srv = hq_server(f"sqlite:///{runs / 'hq' / 'mlflow.db'}", host="127.0.0.1", port=port, block=False)
        assert srv.artifacts_destination == f"wasbs://leaktest@{az.account}.blob.core.windows.net/mlartifacts"
        # a real training run, via the papermill CLI, with the secrets in its environment
        out = runs / "notebooks" / "leak.ipynb"; out.parent.mkdir(parents=True, exist_ok=True)
        cmd = [str(Path(sys.executable).with_name("papermill")), str(ROOT / "nbs" / "train.ipynb"), str(out),
               "-p", "model", "esn", "-p", "tracking_uri", srv.url, "-p", "experiment", "leak",
               "-p", "run_name", "leaky", "-p", "progress", "False", "--cwd", str(ROOT / "nbs")]
        p = subprocess.run(cmd, env={**os.environ, **env}, capture_output=True, text=True, timeout=600, check=False)
        assert p.returncode == 0, p.stderr[-3000:]
        client = MlflowClient(srv.url)
        exp = client.get_experiment_by_name("leak")
        run = client.search_runs([exp.experiment_id])[0]
        assert run.info.status == "FINISHED"
        # artifacts went through the server to Blob (the client never needed Blob credentials for that)
        blobs = [b.name for b in az.service_client().get_container_client("leaktest").list_blobs()]
        assert any(b.startswith("mlartifacts/") and b.endswith("config.json") for b in blobs), blobs[:20]
        # a client without any Azure credentials logs an artifact through the server
        noaz = {k: v for k, v in os.environ.items() if not k.startswith("AZURE_")}
        code = ("import mlflow,sys,pathlib; c=mlflow.tracking.MlflowClient(sys.argv[1]); "
                "r=c.create_run(sys.argv[2]); p=pathlib.Path(sys.argv[3]); p.write_text('hi'); "
                "c.log_artifact(r.info.run_id, str(p)); print(r.info.run_id)")
        q = subprocess.run([sys.executable, "-c", code, srv.url, exp.experiment_id, str(tmp_path / "hello.txt")],
                           env=noaz, capture_output=True, text=True, timeout=120, check=False)
        assert q.returncode == 0, q.stderr[-2000:]
        rid = q.stdout.strip().splitlines()[-1]
        assert any(b.endswith(f"{rid}/artifacts/hello.txt") for b in
                   (b.name for b in az.service_client().get_container_client("leaktest").list_blobs()))
        # the run's outputs and the dataset caches go to HQ as objects
        push_run(run.info.run_id, srv.url)
        push_caches({"paths": {"runs": [str(x) for x in (runs / "cache").glob("*/*") if x.is_dir()]}})
        # the dashboard, when the project has one
        dash = None
        if (ROOT / "nbs" / "dashboard.ipynb").exists():
            from echoes.compare import dashboard
            dash = dashboard(srv.url, experiment="leak")
        # now grep everything that was stored
        stored: dict[str, bytes] = {}
        for f in runs.rglob("*"):
            if f.is_file(): stored[str(f)] = f.read_bytes()
        stored["server.log"] = srv.log.read_bytes()
        cc = az.service_client().get_container_client("leaktest")
        for b in cc.list_blobs(include=["metadata"]):
            stored[f"blob:{b.name}"] = cc.download_blob(b.name).readall() + json.dumps(b.metadata or {}).encode()
        run = client.get_run(run.info.run_id)
        stored["mlflow:params+tags"] = json.dumps([run.data.params, run.data.tags]).encode()
        cap = capfd.readouterr()
        stored["captured"] = (cap.out + cap.err + p.stdout + p.stderr).encode()
        assert len(stored) > 20 and any("leak.ipynb" in k for k in stored)
        if dash: assert str(dash) in stored
        for name, data in stored.items():
            for s in secrets:
                assert s.encode() not in data, f"a credential leaked into {name}"
    finally:
        if srv: srv.stop()
        az.stop()


# ------------------------------------------------------------------------- Ray cluster config for Azure
def test_azure_ray_config_validates():
    import ray.autoscaler
    from ray.autoscaler._private.util import prepare_config, validate_config
    cfg = yaml.safe_load((ROOT / "cloud" / "azure-ray.yaml").read_text())
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(cfg, schema)
    validate_config(prepare_config(cfg))                   # Ray's own checks, with the Azure defaults filled in
    assert cfg["provider"]["type"] == "azure"
    head, types = cfg["head_node_type"], cfg["available_node_types"]
    gpu = [t for n, t in types.items() if n != head and t.get("resources", {}).get("GPU")]
    assert gpu and all(t["min_workers"] == 0 for t in gpu) and cfg["idle_timeout_minutes"] > 0
    assert types[head]["min_workers"] == 0 and types[head]["max_workers"] == 0
    setup = " ".join(cfg["setup_commands"])
    assert "pip install" in setup and "echoes" in setup
    head_setup = " ".join(cfg["head_setup_commands"])
    assert "disk" in head_setup and "/mnt/echoes_data" in head_setup  # the HQ's persistent data disk
    start = " ".join(cfg["head_start_ray_commands"])
    assert "ray start --head" in start
    assert "AccountKey" not in json.dumps(cfg) and "sig=" not in json.dumps(cfg)   # no secrets in the config


def test_azure_notebook_is_not_executed():
    from fastcore.nbio import nb_frontmatter, read_nb
    nb = read_nb(ROOT / "nbs" / "azure.ipynb")
    assert str(nb_frontmatter(nb).get("skip_exec")).lower() == "true"
    text = json.dumps(nb)
    for step in ("ray up", "echoes hq server", "echoes hq push", "--executor ray", "ray down"):
        assert step in text, step
