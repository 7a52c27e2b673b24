"""Kill-and-resume: a training process SIGKILLed mid-epoch (or between a checkpoint and its metrics) and
restarted under the same run name continues into the same MLflow run, with every epoch metric logged exactly
once; a damaged checkpoint is never trusted."""
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from echoes.core import as_seqdata, toy_sequences
from echoes.train import CKPT_NAME, EPOCH_METRICS, fit, save_checkpoint

EPOCHS, N_TRAIN, BATCH = 4, 192, 32  # 6 batches per epoch
EPOCH_KEYS = tuple(k for k in EPOCH_METRICS if k != "epoch_time_s")  # timings differ between attempts

WORKER = textwrap.dedent(f"""
    import json, sys
    import torch
    torch.set_num_threads(1)
    from echoes.core import toy_sequences
    from echoes.tracking import run_experiment

    def toy(n, seed=0): return toy_sequences(n, num_classes=3, T=10, D=4, seed=seed, task="position")

    run_name = sys.argv[1]
    res = run_experiment(dict(model="gru", dataset="synthetic", epochs={EPOCHS}, batch_size={BATCH}, lr=1e-2,
                              hidden_size=16, device="cpu", run_name=run_name, log_model=False, patience=0),
                         splits=(toy({N_TRAIN}), toy(48, seed=1), toy(60, seed=2)))
    print("RESULT " + json.dumps(res))
""")


def run_worker(tmp_path: Path, run_name: str, fault: str | None = None) -> subprocess.CompletedProcess:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "ECHOES_RUNS": str(tmp_path / "runs"), "MLFLOW_DISABLE_TELEMETRY": "true"}
    env.pop("ECHOES_FAULT", None)
    env.pop("MLFLOW_TRACKING_URI", None)
    if fault: env["ECHOES_FAULT"] = fault
    return subprocess.run([sys.executable, str(script), run_name], env=env, capture_output=True, text=True,
                          timeout=300, check=False)


def result_of(p: subprocess.CompletedProcess) -> dict:
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(next(ln for ln in p.stdout.splitlines() if ln.startswith("RESULT "))[7:])


def mlflow_client(tmp_path: Path):
    from mlflow import MlflowClient
    return MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")


def the_run(tmp_path: Path, run_name: str):
    c = mlflow_client(tmp_path)
    exp = c.get_experiment_by_name("synthetic")
    runs = c.search_runs([exp.experiment_id], f"tags.`mlflow.runName` = '{run_name}'")
    assert len(runs) == 1, f"expected one run named {run_name}, found {len(runs)}"
    return c, runs[0]


def assert_epochs_exactly_once(c, run_id: str) -> None:
    for k in EPOCH_KEYS:
        steps = sorted(m.step for m in c.get_metric_history(run_id, k))
        assert steps == list(range(1, EPOCHS + 1)), f"{k}: steps {steps}"


def tb_steps(tmp_path: Path, run_name: str, key: str) -> list[int]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    ea = EventAccumulator(str(tmp_path / "runs" / "tb" / "synthetic" / run_name)).Reload()
    return [e.step for e in ea.Scalars(key)]


@pytest.mark.slow
def test_sigkill_mid_epoch_resumes_into_same_run(tmp_path):
    # killed in the middle of epoch 3 (batch 15 of 24): checkpoints of epochs 1-2 exist, epoch 3 is lost
    p = run_worker(tmp_path, "killed", fault="batch:15")
    assert p.returncode == -signal.SIGKILL, (p.returncode, p.stderr[-2000:])
    c, r = the_run(tmp_path, "killed")
    assert r.info.status == "RUNNING"  # SIGKILL leaves no chance to end it
    assert sorted(m.step for m in c.get_metric_history(r.info.run_id, "val_acc")) == [1, 2]
    ck_dir = tmp_path / "runs" / "checkpoints" / "synthetic" / r.info.run_id
    assert (ck_dir / CKPT_NAME).exists()

    res = result_of(run_worker(tmp_path, "killed"))
    c, r2 = the_run(tmp_path, "killed")
    assert res["run_id"] == r.info.run_id == r2.info.run_id
    assert r2.info.status == "FINISHED"
    assert_epochs_exactly_once(c, r.info.run_id)
    assert "test_acc" in r2.data.metrics and "train_time_s" in r2.data.metrics
    assert tb_steps(tmp_path, "killed", "train_loss") == list(range(1, EPOCHS + 1))
    assert not ck_dir.exists()  # a finished run's checkpoints are removed

    # the resumed run ends where an uninterrupted one does (CPU kernels are deterministic)
    ref = result_of(run_worker(tmp_path, "uninterrupted"))
    assert ref["run_id"] != res["run_id"]
    assert ref["test_acc"] == res["test_acc"]
    cr, rr = the_run(tmp_path, "uninterrupted")
    for k in EPOCH_KEYS:
        a = [m.value for m in sorted(c.get_metric_history(r.info.run_id, k), key=lambda m: m.step)]
        b = [m.value for m in sorted(cr.get_metric_history(rr.info.run_id, k), key=lambda m: m.step)]
        assert np.allclose(a, b, rtol=1e-5, atol=1e-6), (k, a, b)

    # asking again for a finished run returns its metrics and trains nothing
    again = result_of(run_worker(tmp_path, "killed"))
    assert again["run_id"] == res["run_id"] and again["test_acc"] == res["test_acc"]
    assert_epochs_exactly_once(c, r.info.run_id)


@pytest.mark.slow
def test_sigkill_between_checkpoint_and_metrics(tmp_path):
    # killed right after epoch 2's checkpoint, before epoch 2's metrics reached MLflow
    p = run_worker(tmp_path, "gap", fault="checkpoint:2")
    assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]
    c, r = the_run(tmp_path, "gap")
    assert sorted(m.step for m in c.get_metric_history(r.info.run_id, "val_acc")) == [1]
    result_of(run_worker(tmp_path, "gap"))
    c, r = the_run(tmp_path, "gap")
    assert r.info.status == "FINISHED"
    assert_epochs_exactly_once(c, r.info.run_id)


@pytest.mark.slow
def test_corrupt_checkpoint_of_a_killed_run_is_ignored(tmp_path):
    assert run_worker(tmp_path, "bad", fault="batch:15").returncode == -signal.SIGKILL
    c, r = the_run(tmp_path, "bad")
    ck = tmp_path / "runs" / "checkpoints" / "synthetic" / r.info.run_id / CKPT_NAME
    ck.write_bytes(ck.read_bytes()[: ck.stat().st_size // 2])  # truncated
    p = run_worker(tmp_path, "bad")
    result_of(p)
    assert "ignoring unreadable checkpoint" in p.stderr
    c, r = the_run(tmp_path, "bad")
    assert r.info.status == "FINISHED"
    assert_epochs_exactly_once(c, r.info.run_id)  # the re-run epochs 1-2 were not logged twice


def toy(n, seed=0):
    return as_seqdata(toy_sequences(n, num_classes=2, T=8, D=3, seed=seed, task="position"))


class TinyGRU(torch.nn.Module):
    closed_form = False

    def __init__(self):
        super().__init__()
        self.rnn, self.head = torch.nn.GRU(3, 8, batch_first=True), torch.nn.Linear(8, 2)

    def forward(self, x, lengths):
        return self.head(self.rnn(x)[0][torch.arange(len(x)), lengths - 1])


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty", "wrong_model"])
def test_fit_ignores_damaged_checkpoint(tmp_path, damage):
    torch.set_num_threads(1)
    train, val = toy(96), toy(32, seed=1)
    kw = dict(epochs=2, batch_size=32, device="cpu", progress=False)
    torch.manual_seed(0)
    ref = TinyGRU()
    fit(ref, train, val, **kw)

    ck = tmp_path / CKPT_NAME
    if damage == "garbage": ck.write_bytes(os.urandom(4096))
    elif damage == "empty": ck.write_bytes(b"")
    else:
        torch.manual_seed(0)
        other = TinyGRU() if damage == "truncated" else torch.nn.Linear(3, 2)
        save_checkpoint(ck, {"epoch": 1, "model": other.state_dict(), "optimizer": {}, "scheduler": {},
                             "rng": {}, "history": []})
        if damage == "truncated": ck.write_bytes(ck.read_bytes()[:-200])
    torch.manual_seed(0)
    m = TinyGRU()
    h = fit(m, train, val, checkpoint_dir=tmp_path, **kw)
    assert h["resumed_from"] == 0 and len(h["epochs"]) == 2
    for p, q in zip(ref.parameters(), m.parameters(), strict=True):
        assert torch.allclose(p, q)
    assert (tmp_path / CKPT_NAME).exists()  # a fresh, valid checkpoint replaced it
    assert list(tmp_path.glob(f"{CKPT_NAME}.corrupt-*")) or list(tmp_path.glob(f"{CKPT_NAME}.mismatch-*"))
