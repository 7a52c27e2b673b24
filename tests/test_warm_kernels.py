"""Warm kernels: a trial run in a kernel that served another sees what a new kernel sees (nothing the first one
left: names, seeds, threads, MLflow run, environment, working directory, loggers, options); a trial that fails or
kills its kernel is followed by one in a new kernel; a kernel serves several trials, in this process and in
each pool slot across calls of its executor, and goes when the executor closes.
Real papermill, real kernels, real MLflow (SQLite)."""
import json
import os
import random

import nbformat
import numpy as np
import papermill as pm
import psutil
import pytest
import torch

from echoes.core import kernel_config
from echoes.sweep import (LocalExecutor, _fits, _kernels, cpu_count, current_kernel, discard_kernel, plan,
                          settle_kernel, warm_kernel)
from echoes.tracking import client

KERNELSPEC = {"name": "python3", "display_name": "Python 3", "language": "python"}

POLLUTE = """
import json, logging, os, random, sys, warnings
import matplotlib.pyplot as plt, mlflow, numpy as np, pandas as pd, torch
leftover = 42
random.random(); np.random.rand(); torch.rand(3)                 # draws without a seed
random.seed(123); np.random.seed(123); torch.manual_seed(123)    # and a seed the next trial must not inherit
torch.set_num_threads(torch.get_num_threads() + 1); torch.set_default_dtype(torch.float64)
torch.set_grad_enabled(False)
mlflow.set_tracking_uri(uri); mlflow.set_experiment("pollution"); run = mlflow.start_run()
os.environ["ECHOES_POLLUTED"] = "1"; os.chdir("/"); sys.path.append("/polluted"); sys.argv.append("--polluted")
logging.getLogger().addHandler(logging.FileHandler(log)); logging.getLogger("echoes").addHandler(logging.NullHandler())
logging.getLogger("echoes.polluter").setLevel(logging.DEBUG)
warnings.simplefilter("error"); np.seterr(all="raise"); pd.set_option("display.max_rows", 3)
plt.rcParams["lines.linewidth"] = 9; plt.figure()
get_ipython().events.register("post_run_cell", lambda result: None)
json.dump({"run_id": run.info.run_id}, open(out, "w"))
"""

PROBE = """
names = sorted(globals())
from echoes.sweep import WARM_IMPORTS
for m in WARM_IMPORTS: __import__(m)  # a warm kernel is a new one that has made these imports
import json, logging, os, sys, warnings
import matplotlib as mpl, matplotlib.pyplot as plt, mlflow, numpy as np, pandas as pd, torch
from mlflow.tracking import fluent
connection_file = get_ipython().kernel.config["IPKernelApp"].get("connection_file")
def handlers(name): return [type(h).__name__ for h in logging.getLogger(name).handlers]
plt.plot([1, 2]); plt.show()  # the inline backend's hooks are in place from a kernel's first figure on
seen = {
    "names": names, "execution_count": get_ipython().execution_count,
    "threads": torch.get_num_threads(), "interop": torch.get_num_interop_threads(),
    "dtype": str(torch.get_default_dtype()), "grad": torch.is_grad_enabled(),
    "active_run": mlflow.active_run() is None, "tracking_uri": mlflow.get_tracking_uri(),
    "experiment": fluent._active_experiment_id, "environ": dict(os.environ), "cwd": os.getcwd(),
    "sys.path": sys.path, "argv": [a if a != connection_file else "-" for a in sys.argv],  # each kernel its own
    "root": handlers(""), "echoes": handlers("echoes"),
    "echoes.polluter": logging.getLogger("echoes.polluter").level, "warnings": [str(f) for f in warnings.filters],
    "numpy": np.geterr(), "pandas": pd.get_option("display.max_rows"), "rc": mpl.rcParams["lines.linewidth"],
    "figures": plt.get_fignums(), "callbacks": {k: len(v) for k, v in get_ipython().events.callbacks.items()}}
draws = {"random": __import__("random").random(), "numpy": float(np.random.rand()), "torch": torch.rand(1).item()}
json.dump({"seen": seen, "draws": draws, "pid": os.getpid()}, open(out, "w"))
"""


def notebook(path, *cells, params="out = None"):
    nb = nbformat.v4.new_notebook(metadata={"kernelspec": KERNELSPEC})
    nb.cells = [nbformat.v4.new_code_cell(params, metadata={"tags": ["parameters"]}),
                *(nbformat.v4.new_code_cell(c) for c in cells)]
    nbformat.write(nb, path)
    return path


def run_in(kernel, nb, out, **params):
    "Execute `nb` with papermill, in `kernel` (a WarmKernel) or, when None, in a new kernel; what it wrote to `out`."
    kw = {"km": kernel.km} if kernel else {"config": kernel_config()}
    pm.execute_notebook(str(nb), str(out.with_suffix(".ipynb")), parameters={"out": str(out), **params},
                        progress_bar=False, cwd=str(nb.parent), **kw)
    return json.loads(out.read_text())


def images(path) -> int:
    return sum("image/png" in o.get("data", {}) for c in nbformat.read(path, 4).cells for o in c.get("outputs", []))


@pytest.fixture
def fresh_kernels():
    "No warm kernel in this thread before or after the test."
    discard_kernel(now=True)
    yield
    discard_kernel(now=True)


def test_reset_leaks_nothing(tmp_path, fresh_kernels, monkeypatch):
    nbs = tmp_path / "nbs"; nbs.mkdir()
    polluter = notebook(nbs / "polluter.ipynb", POLLUTE, params="out = None\nuri = None\nlog = None")
    probe = notebook(nbs / "probe.ipynb", PROBE)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client(uri).search_experiments()  # the store exists before the kernels open it

    fresh = run_in(None, probe, tmp_path / "fresh.json")
    k = warm_kernel("python3", nbs)
    polluted = run_in(k, polluter, tmp_path / "polluted.json", uri=uri, log=str(tmp_path / "polluter.log"))
    settle_kernel(failed=False)
    warm = run_in(warm_kernel("python3", nbs), probe, tmp_path / "warm.json")
    settle_kernel(failed=False)
    again = run_in(warm_kernel("python3", nbs), probe, tmp_path / "again.json")
    settle_kernel(failed=False)

    assert warm["pid"] == again["pid"] == k.pid != fresh["pid"], "the kernel was reused"
    for key, value in fresh["seen"].items():
        assert warm["seen"][key] == value, (key, warm["seen"][key], value)
    assert again["seen"] == warm["seen"]
    assert images(tmp_path / "warm.ipynb") == images(tmp_path / "fresh.ipynb") == 1, "figures still show"
    # unseeded draws: fresh entropy each time, as in new kernels, never the polluter's seeded stream
    seeded = {"random": random.Random(123).random(), "numpy": float(np.random.RandomState(123).rand()),
              "torch": torch.rand(1, generator=torch.Generator().manual_seed(123)).item()}
    for name in seeded:
        assert len({seeded[name], warm["draws"][name], again["draws"][name], fresh["draws"][name]}) == 4, name
    # the run the polluter left active ended as a kernel's exit ends it
    assert client(uri).get_run(polluted["run_id"]).info.status == "FINISHED"

    assert not _fits(k, "python3", max_trials=3), "used up after 3 trials"
    monkeypatch.setenv("ECHOES_WARM_TEST", "1")
    assert not _fits(k, "python3", max_trials=50), "started with another environment"
    k2 = warm_kernel("python3", nbs)
    assert k2 is not k and k2.pid != k.pid and not psutil.pid_exists(k.pid)
    assert run_in(k2, probe, tmp_path / "k2.json")["seen"]["environ"]["ECHOES_WARM_TEST"] == "1"


STANDIN = """
import os
from mlflow import MlflowClient
MlflowClient(tracking_uri).set_tag(run_id, "pid", os.getpid())
if seed == 2: raise RuntimeError("diverged")
if seed == 4: os._exit(1)
"""
PARAMS = "\n".join(f"{k} = None" for k in ("model", "dataset", "seed", "run_id", "run_name", "tracking_uri",
                                           "experiment", "progress"))


def standin_trials(tmp_path, name, seeds):
    nb = notebook(tmp_path / "standin.ipynb", STANDIN, params=PARAMS)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    _, trials = plan({"name": name, "notebook": str(nb), "seeds": seeds, "models": ["mean"]}, uri)
    return uri, trials


def test_failed_and_dead_kernels_are_replaced(tmp_path, fresh_kernels):
    uri, trials = standin_trials(tmp_path, "faults", list(range(6)))
    results = list(LocalExecutor()(trials, parallel=1))
    c = client(uri)
    status = [r.status for r in results]
    assert status == ["FINISHED", "FINISHED", "FAILED", "FINISHED", "FAILED", "FINISHED"], results
    assert "diverged" in results[2].error and "DeadKernelError" in results[4].error
    pid = [int(c.get_run(r.run_id).data.tags["pid"]) for r in results]
    assert pid[0] == pid[1], "a kernel serves several trials"
    assert pid[3] not in (pid[0], pid[2]) and pid[2] == pid[1], "a failed trial's kernel is not used again"
    assert pid[5] not in (pid[3], pid[4]) and pid[4] == pid[3], "nor a dead one"
    assert current_kernel().pid == pid[5]
    assert not any(psutil.pid_exists(p) for p in pid[:5])


@pytest.mark.slow  # a pool of two slots, each starting a kernel
def test_pool_slots_keep_their_kernels_until_closed(tmp_path):
    uri, trials = standin_trials(tmp_path, "pool", [0, 1, 3, 5])
    ex = LocalExecutor()
    ex.prestart(trials[0].notebook, 2)  # as run_sweep does while it plans
    for th in list(ex._starting.values()): th.join()
    started = {_kernels[0].pid, _kernels[1].pid}
    results = list(ex(trials[:2], parallel=2)) + list(ex(trials[2:], parallel=2))  # a search, then its final runs
    assert {r.status for r in results} == {"FINISHED"}, results
    c = client(uri)
    pids = [int(c.get_run(r.run_id).data.tags["pid"]) for r in results]
    assert len(set(pids)) == 2 and set(pids[:2]) == set(pids[2:]), f"each slot runs its trials in one kernel: {pids}"
    assert set(pids) == started, "the trials ran in the kernels started ahead"
    assert current_kernel() is None or current_kernel().pid not in pids, "the slots' kernels, not this thread's"
    assert all(psutil.Process(p).ppid() == os.getpid() for p in set(pids)), "a slot's kernel is a child of this process"
    share = str(max(1, cpu_count() // 2))
    assert {psutil.Process(p).environ()["OMP_NUM_THREADS"] for p in pids} == {share}, "each slot its share of the cores"
    ex.close()
    assert not psutil.wait_procs([psutil.Process(p) for p in set(pids) if psutil.pid_exists(p)], timeout=10)[1], \
        "a slot's kernel outlived close()"
