"""Real services for tests: Azurite (Azure Blob emulator), an MLflow tracking server, a local Ray cluster.

Every helper starts its processes on 127.0.0.1, on free ports, in a new process group, and remembers their
PIDs; `.stop()` ends exactly those processes (SIGTERM to the group, then SIGKILL), never anything found by
name. Use them as context managers or from fixtures with teardown:

    from services import Azurite, MLflowServer, RayCluster

    with Azurite(tmp_path / "azurite") as az:           # az.connection_string, az.account, az.key
        env = {**os.environ, **az.env}                   # AZURE_STORAGE_CONNECTION_STRING
        az.create_container("hq")
        with MLflowServer(f"sqlite:///{tmp_path}/m.db", az.wasbs("hq", "mlartifacts"), env=env) as ml:
            ...                                          # ml.url, ml.port
        with RayCluster(tmp_path / "ray", env=env, worker_resources={"trial": 2}) as rc:
            ...                                          # rc.address, rc.kill_worker(), rc.add_worker()

`Azurite` takes a custom account with a random key by default (AZURITE_ACCOUNTS), so a test can grep stored
outputs for that key and know any hit is a leak. Startup costs measured on a 2-core machine: Azurite 1-3 s,
MLflow server (1 worker, job runner off) 10-25 s, Ray head + worker 10-20 s. Ray nodes get ~100 MB object
stores and no dashboard.
"""
from __future__ import annotations

import base64
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def free_port() -> int:
    "A TCP port on 127.0.0.1 that is free right now."
    return free_ports(1)[0]


def free_ports(n: int, exclude: tuple[int, ...] = ()) -> list[int]:
    "`n` distinct free ports (all held bound while choosing: the OS may hand a closed one out again)."
    socks = []
    try:
        while len(socks) < n:
            s = socket.socket(); s.bind(("127.0.0.1", 0)); socks.append(s)
            if s.getsockname()[1] in exclude: socks.pop().close()
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks: s.close()


def wait_for(check, timeout: float, what: str, proc: subprocess.Popen | None = None, log: Path | None = None):
    "Poll `check()` until it returns truthy; fail with the process's log tail if it dies or time runs out."
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}:\n{_tail(log)}")
        with contextlib.suppress(OSError, ValueError, subprocess.SubprocessError):
            if r := check(): return r
        time.sleep(0.3)
    raise TimeoutError(f"{what} not ready after {timeout:.0f} s:\n{_tail(log)}")


def _tail(log: Path | None, n: int = 3000) -> str:
    return log.read_text(errors="replace")[-n:] if log and log.exists() else ""


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def stop_process_group(proc: subprocess.Popen, timeout: float = 15) -> None:
    "End `proc`, its process group and any descendants it left (by PID), politely then by force."
    if proc is None or proc.pid is None: return
    kids = descendants(proc.pid)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)
        for k in kids:
            with contextlib.suppress(psutil.Error):
                k.send_signal(sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=timeout if sig == signal.SIGTERM else 5)
        _, alive = psutil.wait_procs([k for k in kids if _alive(k)], timeout=timeout if sig == signal.SIGTERM else 5)
        if proc.poll() is not None and not [k for k in alive if _alive(k)]: return


def descendants(pid: int) -> list:
    "All processes below `pid` (psutil objects), or [] when it is gone."
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []


def _alive(p) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def sigkill_when(cmd: list[str], env: dict, log: Path, ready, timeout: float = 300, grace: float = 5) -> dict:
    """Start `cmd` in a session of its own and SIGKILL it as soon as `ready()` holds. Returns the notebook kernels
    that ran below it at the kill and what of its descendants outlived it by `grace` s; the survivors are killed."""
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    seen: dict[int, psutil.Process] = {}
    try:
        t0 = time.time()
        while not ready():
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.time() - t0 < timeout, f"{cmd[:2]}: not ready to be killed in {timeout:g} s"
            seen.update({p.pid: p for p in descendants(proc.pid)})
            time.sleep(0.3)
        seen.update({p.pid: p for p in descendants(proc.pid)})
        kernels = [p.pid for p in seen.values() if _alive(p) and "ipykernel" in " ".join(p.cmdline())]
        os.kill(proc.pid, signal.SIGKILL); proc.wait()
        deadline = time.time() + grace
        while time.time() < deadline and any(_alive(p) for p in seen.values()): time.sleep(0.1)
        return {"kernels": kernels, "survivors": [p.pid for p in seen.values() if _alive(p)]}
    finally:
        for p in seen.values():  # only what this call started; nothing when none outlived the kill
            if _alive(p): p.kill()


class Service:
    "A process started in its own group, with a log file; a context manager that stops it on exit."
    name = "service"

    def __init__(self):
        self.proc: subprocess.Popen | None = None
        self.log: Path | None = None

    def _spawn(self, cmd: list[str], log: Path, env: dict | None = None, cwd: Path | None = None):
        log.parent.mkdir(parents=True, exist_ok=True)
        self.log = log
        with open(log, "ab") as f:
            self.proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                         start_new_session=True)
        return self.proc

    @property
    def pid(self) -> int | None: return self.proc.pid if self.proc else None

    def stop(self, timeout: float = 15) -> None:
        if self.proc is not None:
            stop_process_group(self.proc, timeout)
            self.proc = None

    def __enter__(self): return self
    def __exit__(self, *exc): self.stop()


# ---------------------------------------------------------------- Azurite
class Azurite(Service):
    """Azurite's Blob service on a free port, data under `location`.

    With `account=None` it uses the well-known `devstoreaccount1`; by default it makes a custom account with
    a random key, so a test can grep outputs for `.key`. `stop()` then `start()` again keeps the data (the
    same `location` and port), which is how the fault tests take Blob away in the middle of a push.
    """
    name = "azurite"

    def __init__(self, location: Path | str, port: int | None = None, account: str | None = "echoestest",
                 key: str | None = None, start: bool = True, timeout: float = 60):
        super().__init__()
        self.location, self.port = Path(location), port or free_port()
        if account is None:
            self.account = "devstoreaccount1"
            self.key = ("Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==")
        else:
            self.account = account
            self.key = key or base64.b64encode(secrets.token_bytes(32)).decode()
        self.timeout = timeout
        if start: self.start()

    @property
    def blob_endpoint(self) -> str: return f"http://127.0.0.1:{self.port}/{self.account}"

    @property
    def connection_string(self) -> str:
        return (f"DefaultEndpointsProtocol=http;AccountName={self.account};AccountKey={self.key};"
                f"BlobEndpoint={self.blob_endpoint};")

    @property
    def env(self) -> dict:
        "Environment variables that point azure-storage-blob (and MLflow's wasbs://) at this Azurite."
        return {"AZURE_STORAGE_CONNECTION_STRING": self.connection_string}

    def wasbs(self, container: str, path: str = "") -> str:
        "A `wasbs://` URI for MLflow; the connection string in the environment routes it to Azurite."
        return f"wasbs://{container}@{self.account}.blob.core.windows.net/{path}".rstrip("/")

    def start(self) -> Azurite:
        exe = ROOT / "node_modules" / ".bin" / "azurite-blob"
        if not exe.exists(): raise FileNotFoundError(f"{exe} missing: run `npm install` in {ROOT}")
        self.location.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        if self.account != "devstoreaccount1": env["AZURITE_ACCOUNTS"] = f"{self.account}:{self.key}"
        cmd = [str(exe), "--blobHost", "127.0.0.1", "--blobPort", str(self.port), "--location", str(self.location),
               "--skipApiVersionCheck", "--disableTelemetry", "--silent"]
        self._spawn(cmd, self.location / "azurite.log", env=env)
        wait_for(lambda: _port_open(self.port), self.timeout, "azurite", self.proc, self.log)
        return self

    def service_client(self):
        from azure.storage.blob import BlobServiceClient
        return BlobServiceClient.from_connection_string(self.connection_string)

    def create_container(self, name: str):
        from azure.core.exceptions import ResourceExistsError
        try:
            self.service_client().create_container(name)
        except ResourceExistsError:
            pass
        return name


# ---------------------------------------------------------------- MLflow server
class MLflowServer(Service):
    """`mlflow server` with one worker and no job runner (the cheap settings from TOOLCHAIN.md).

    Pass credentials through `env` (e.g. `{**os.environ, **azurite.env}`), never on the command line:
    command lines are visible to every user of the machine.
    """
    name = "mlflow"

    def __init__(self, backend_store_uri: str, artifacts_destination: str, env: dict | None = None,
                 port: int | None = None, log_dir: Path | str | None = None, timeout: float = 180,
                 start: bool = True):
        super().__init__()
        self.backend_store_uri, self.artifacts_destination = backend_store_uri, artifacts_destination
        self.port, self.env, self.timeout = port or free_port(), env, timeout
        self.log_dir = Path(log_dir) if log_dir else Path(os.environ.get("ECHOES_RUNS", "/tmp")) / "services"
        if start: self.start()

    @property
    def url(self) -> str: return f"http://127.0.0.1:{self.port}"

    def start(self) -> MLflowServer:
        env = dict(self.env if self.env is not None else os.environ)
        env.update(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false", MLFLOW_DISABLE_TELEMETRY="true")
        cmd = [str(BIN / "mlflow"), "server", "--backend-store-uri", self.backend_store_uri,
               "--artifacts-destination", self.artifacts_destination,
               "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"]
        self._spawn(cmd, self.log_dir / f"mlflow-{self.port}.log", env=env)

        def healthy():
            with urllib.request.urlopen(f"{self.url}/health", timeout=2) as r: return r.status == 200
        wait_for(healthy, self.timeout, "mlflow server", self.proc, self.log)
        return self


# ---------------------------------------------------------------- Ray
class RayCluster:
    """A local Ray cluster: a head node and worker nodes, each a `ray start --block` process group.

    Nodes run in their own process groups so that `kill_worker(i)` (SIGKILL) takes down exactly one node,
    the way a preempted VM disappears, and `stop()` ends only the processes this object started. `env` is
    the nodes' environment: Ray tasks inherit it, which is how credentials reach tasks without passing
    through Ray's runtime_env (that one is stored in the GCS and shown by the dashboard).
    """

    def __init__(self, temp_dir: Path | str | None = None, head_cpus: int = 1, head_resources: dict | None = None,
                 workers: int = 1, worker_cpus: int = 1, worker_resources: dict | None = None,
                 env: dict | None = None, object_store_mb: int = 100, timeout: float = 90, start: bool = True):
        # Ray's unix socket paths must stay under ~107 characters: keep the temp dir short.
        self.temp_dir = Path(temp_dir) if temp_dir else Path(f"/tmp/rayt{secrets.token_hex(3)}")
        self.head_cpus, self.head_resources = head_cpus, head_resources or {}
        self.n_workers, self.worker_cpus, self.worker_resources = workers, worker_cpus, worker_resources or {}
        self.env = dict(env if env is not None else os.environ)
        self.env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        self.object_store = object_store_mb * 2**20
        self.timeout = timeout
        self.port = free_port()
        self.head: Service | None = None
        self.workers: list[Service] = []
        if start: self.start()

    @property
    def address(self) -> str: return f"127.0.0.1:{self.port}"

    def _node_cmd(self, head: bool, cpus: int, resources: dict) -> list[str]:
        # every port a node uses, chosen together: Ray refuses to start when two components share one
        agent, metrics, runtime_env, client, node_manager, object_manager = free_ports(6, exclude=(self.port,))
        cmd = [str(BIN / "ray"), "start", "--block", "--node-ip-address", "127.0.0.1", "--num-cpus", str(cpus),
               "--num-gpus", "0", "--object-store-memory", str(self.object_store), "--disable-usage-stats",
               "--dashboard-agent-listen-port", str(agent), "--metrics-export-port", str(metrics),
               "--runtime-env-agent-port", str(runtime_env), "--node-manager-port", str(node_manager),
               "--object-manager-port", str(object_manager), "--log-style", "record"]
        if resources: cmd += ["--resources", json.dumps(resources)]
        if head:
            cmd += ["--head", "--port", str(self.port), "--include-dashboard=false",
                    "--ray-client-server-port", str(client), "--temp-dir", str(self.temp_dir)]
        else:
            cmd += ["--address", self.address]
        return cmd

    def _alive_nodes(self) -> int:
        out = subprocess.run([str(BIN / "python"), "-c", (
            "import ray,sys; ray.init(address=sys.argv[1], logging_level='ERROR', log_to_driver=False); "
            "print(sum(n['Alive'] for n in ray.nodes()))"), self.address],
            capture_output=True, text=True, env=self.env, timeout=60, check=False)
        return int(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 and out.stdout.strip() else -1

    def start(self) -> RayCluster:
        self.temp_dir.mkdir(parents=True, exist_ok=True)
        self.head = Service()
        self.head._spawn(self._node_cmd(True, self.head_cpus, self.head_resources), self.temp_dir / "head.log",
                         env=self.env)
        wait_for(lambda: _port_open(self.port), self.timeout, "ray head", self.head.proc, self.head.log)
        for _ in range(self.n_workers): self.add_worker(wait=False)
        self.wait_nodes(1 + self.n_workers)
        return self

    def add_worker(self, cpus: int | None = None, resources: dict | None = None, wait: bool = True) -> Service:
        "Start one more worker node (another `ray start --address`); returns its `Service`."
        w = Service()
        w._spawn(self._node_cmd(False, cpus or self.worker_cpus, resources or self.worker_resources),
                 self.temp_dir / f"worker{len(self.workers)}.log", env=self.env)
        self.workers.append(w)
        if wait: self.wait_nodes(self.alive_expected())
        return w

    def alive_expected(self) -> int:
        return 1 + sum(w.proc is not None and w.proc.poll() is None for w in self.workers)

    def wait_nodes(self, n: int) -> None:
        wait_for(lambda: self._alive_nodes() >= n, self.timeout, f"{n} ray nodes", self.head.proc, self.head.log)

    def kill_worker(self, i: int = 0) -> None:
        "SIGKILL worker node `i` and everything it started, as if its VM vanished."
        w = self.workers[i]
        if w.proc is None: return
        kids = descendants(w.proc.pid)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(w.proc.pid, signal.SIGKILL)
        for p in kids:
            with contextlib.suppress(psutil.Error):
                p.kill()
        w.proc.wait(timeout=10)
        psutil.wait_procs(kids, timeout=10)
        w.proc = None

    def stop(self) -> None:
        # a test cluster holds nothing worth a graceful shutdown: a short grace, then SIGKILL
        for w in self.workers: w.stop(timeout=3)
        if self.head: self.head.stop(timeout=5)
        self.head = None
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def __enter__(self): return self
    def __exit__(self, *exc): self.stop()



# ------------------------------------------------------------------------- helpers for HQ tests
def sha(p: Path) -> str:
    "The sha256 of a file's bytes."
    import hashlib
    return hashlib.sha256(Path(p).read_bytes()).hexdigest()


def hq_env(monkeypatch, az: Azurite, tmp_path: Path, test_name: str) -> str:
    "Point echoes' HQ at `az` (credentials from the environment only), a container of this test, runs under tmp_path."
    import hashlib
    for k in ("AZURE_STORAGE_SAS_TOKEN", "AZURE_STORAGE_ACCOUNT_URL", "AZURE_STORAGE_ACCOUNT", "ECHOES_HQ_ARTIFACTS"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING", az.connection_string)
    container = "t" + hashlib.sha1(test_name.encode()).hexdigest()[:12]
    monkeypatch.setenv("ECHOES_HQ_CONTAINER", container)
    monkeypatch.setenv("ECHOES_RUNS", str(tmp_path / "runs"))
    return container


def stopping_store(az: Azurite, what: str, n: int, restart_after: float | None = None, **kw):
    "An `echoes.cloud.HQStore` that stops `az` when its n-th transfer whose description starts with `what` begins."
    import threading

    from echoes.cloud import HQStore

    class StopAt(HQStore):
        def _retry(self, fn, description):
            if description.startswith(what):
                with lock:
                    count[0] += 1
                    fire = count[0] == n
                if fire:
                    az.stop()
                    if restart_after is not None: threading.Timer(restart_after, az.start).start()
            return super()._retry(fn, description)

    lock, count = threading.Lock(), [0]
    return StopAt(**kw)
