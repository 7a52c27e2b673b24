"""Sweep benchmark: what a sweep adds to its trials' own work, against that work measured in the same run.

(a) in-process (the baseline): each trial's training through `echoes.tracking.run_experiment` in this process
    (data from the caches, fit, evaluate, MLflow logging with the model and figures), timed one by one, with the
    threads a pool slot's kernel gets (cores // parallel): the trials' own compute.
(b) warm: the same trials as a sweep on the local pool (`--parallel`), each slot running its trials through
    `nbs/train.ipynb` in its warm kernel, the executed notebook logged to each run.
(c) `--cold`: the same sweep with a new kernel per trial (the path before warm kernels), for reference.
Per-trial overhead = (wall x parallel - sum of in-process compute) / trials; "in a trial" is the median of each
trial's wall in its slot minus its in-process compute (the rest of the overhead is the kernels' start).
The three run round-robin, one repeat of each per round; the numbers are medians over rounds.
Target on the 2-core machine: per-trial overhead <= 1.5 s (warm).

Usage: python bench/sweep.py [--models esn gru mean] [--seeds 4] [--epochs 2] [--parallel 2] [--repeat 3] [--cold]
"""
import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path


def _args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["esn", "gru", "mean"])
    p.add_argument("--seeds", type=int, default=4, help="seeds per model (trials = models x seeds)")
    p.add_argument("--epochs", type=int, default=2, help="epochs of the gradient models")
    p.add_argument("--parallel", type=int, default=2, help="pool slots of the sweeps")
    p.add_argument("--repeat", type=int, default=3, help="rounds (medians over them)")
    p.add_argument("--cold", action="store_true", help="also time a new kernel per trial")
    p.add_argument("--notebook", default=None, help="the training notebook of the sweeps (default: nbs/train.ipynb)")
    p.add_argument("--json", action="store_true", help="print only the JSON summary")
    return p.parse_args(argv)


def sweep_spec(a, name: str) -> dict:
    return {"name": name, "dataset": "synthetic", "seeds": a.seeds, "models": {m: {} for m in a.models},
            "params": {"epochs": a.epochs, "hidden_size": 32, "batch_size": 64},
            **({"notebook": str(Path(a.notebook).resolve())} if a.notebook else {})}


def cell_times(rows) -> dict:
    "Where a trial's time goes, from papermill's timing of each cell in the executed notebooks (medians over trials)."
    import nbformat
    per_cell, in_cells, outside = {}, [], []
    for r in rows:
        cells = [c for c in nbformat.read(r["notebook"], 4).cells if c.cell_type == "code"]
        times = [c.metadata.papermill.duration or 0 for c in cells]
        for c, t in zip(cells, times): per_cell.setdefault((c.source.splitlines() or [""])[0][:60], []).append(t)
        in_cells.append(sum(times)); outside.append(r["wall_s"] - sum(times))
    top = sorted(((statistics.median(v), k) for k, v in per_cell.items()), reverse=True)[:4]
    return {"in_cells_s": statistics.median(in_cells), "outside_cells_s": statistics.median(outside),
            "slowest_cells": [{"cell": k, "s": t} for t, k in top]}


def in_process(trials, uri: str, tag: str) -> dict:
    "Each trial's compute, by trial key: `run_experiment` with the trial's parameters, one after another."
    from echoes.tracking import run_experiment
    out = {}
    for t in trials:
        t0 = time.perf_counter()
        run_experiment({**t.params, "tracking_uri": uri, "experiment": "bench-in-process",
                        "run_name": f"{t.name}-{tag}", "progress": False})
        out[t.key] = time.perf_counter() - t0
    return out


def swept(a, uri: str, name: str, warm: bool, compute: dict) -> dict:
    "Run the trials as a sweep on the local pool; its wall, overhead per trial and the median in-trial overhead."
    from echoes.sweep import LocalExecutor, run_sweep, shutdown_kernels
    t0 = time.perf_counter()
    s = run_sweep(sweep_spec(a, name), parallel=a.parallel, tracking_uri=uri, executor=LocalExecutor(warm=warm),
                  progress=False)
    wall = time.perf_counter() - t0
    shutdown_kernels()  # every round starts its kernels, as a new sweep does
    if s["finished"] != s["total"]:
        raise RuntimeError(f"sweep {name}: {s['failed']} trials failed: " +
                           "; ".join(f"{r['name']}: {r['error']}" for r in s["trials"] if r.get("error")))
    n, busy = s["total"], sum(compute.values())
    return {"wall_s": wall, "overhead_per_trial_s": (wall * a.parallel - busy) / n,
            "in_trial_overhead_s": statistics.median(r["wall_s"] - compute[r["key"]] for r in s["trials"]),
            "first_trial_s": max(r["wall_s"] for r in s["trials"]), "cells": cell_times(s["trials"])}


def measure(a, tmp: Path) -> dict:
    os.environ["ECHOES_RUNS"] = str(tmp / "runs")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    import torch

    from echoes.sweep import cpu_count, load_sweep, warm_caches
    from echoes.tracking import client, run_experiment
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    client(uri).search_experiments()          # a new store takes seconds: made before any timing
    trials = load_sweep(sweep_spec(a, "bench")).trials
    warm_caches(trials)                       # the caches, built once: every path reads them
    torch.set_num_threads(max(1, cpu_count() // a.parallel))  # what each pool slot's kernel gets
    run_experiment({**trials[0].params, "tracking_uri": uri, "experiment": "bench-warmup", "progress": False})
    modes = ["warm"] + (["cold"] if a.cold else [])
    rounds = []
    for r in range(a.repeat):
        compute = in_process(trials, uri, f"r{r}")
        row = {"compute_s": sum(compute.values())}
        for m in modes:
            row[m] = swept(a, uri, f"bench-{m}-r{r}", m == "warm", compute)
        rounds.append(row)
    med = lambda xs: statistics.median(xs)  # noqa: E731
    out = {"trials": len(trials), "models": a.models, "seeds": a.seeds, "epochs": a.epochs, "parallel": a.parallel,
           "cores": cpu_count(), "repeat": a.repeat, "compute_s": med([x["compute_s"] for x in rounds]),
           "compute_per_trial_s": med([x["compute_s"] for x in rounds]) / len(trials), "rounds": rounds}
    for m in modes:
        out[m] = {k: med([x[m][k] for x in rounds]) for k in rounds[0][m] if k != "cells"}
        out[m]["cells"] = rounds[len(rounds) // 2][m]["cells"]  # one round's, for the breakdown
    return out


def main(argv=None):
    a = _args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="echoes-bench-sweep-"))
    try: out = measure(a, tmp)
    finally: shutil.rmtree(tmp, ignore_errors=True)  # caches, stores, executed notebooks
    if not a.json:
        n, w = out["trials"], a.parallel
        print(f"{n} trials ({' '.join(a.models)} x {a.seeds} seeds, {a.epochs} epochs) on the built-in dataset, "
              f"{w} slots on {out['cores']} cores; medians of {a.repeat} rounds")
        print(f"{'':<26}{'wall':>9}{'sum compute':>13}{'overhead/trial':>16}{'in a trial':>12}{'wall / compute':>16}")
        print(f"{'in-process (baseline)':<26}{out['compute_s']:>8.1f}s{out['compute_s']:>12.1f}s{0:>15.2f}s{0:>11.2f}s"
              f"{1:>15.2f}x")
        for m in [k for k in ("warm", "cold") if k in out]:
            r = out[m]
            print(f"{'sweep, ' + m + ' kernels':<26}{r['wall_s']:>8.1f}s{out['compute_s']:>12.1f}s"
                  f"{r['overhead_per_trial_s']:>15.2f}s{r['in_trial_overhead_s']:>11.2f}s"
                  f"{r['wall_s'] * w / out['compute_s']:>15.2f}x")
        for m in [k for k in ("warm", "cold") if k in out]:
            c = out[m]["cells"]
            print(f"{m}: a trial (median) spends {c['in_cells_s']:.2f} s in the notebook's cells and "
                  f"{c['outside_cells_s']:.2f} s outside them (papermill, kernel start or reset, the runner's MLflow "
                  f"calls); in-process it computes in {out['compute_per_trial_s']:.2f} s; the slowest trial took "
                  f"{out[m]['first_trial_s']:.1f} s")
            print("   slowest cells: " + "; ".join(f"{x['s']:.2f} s {x['cell']!r}" for x in c["slowest_cells"]))
        print(f"per-trial overhead = (wall x {w} slots - sum compute) / {n}; target <= 1.5 s with warm kernels"
              + (f"; warm vs cold {out['cold']['overhead_per_trial_s'] / out['warm']['overhead_per_trial_s']:.1f}x less"
                 if "cold" in out else ""))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
