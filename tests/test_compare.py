"""echoes.compare on real training runs: the tidy table matches what training returned, and the summary's
means, t-intervals, Welch tests and Holm correction match an independent computation with scipy. The paired
statistics against values known by hand, from scipy or by simulation; and a search sweep's record (real MLflow)
read back into its protocol, search history, final table and fairness verdict."""
import math

import matplotlib
import numpy as np
import pandas as pd
import pytest
from hypothesis import given
from hypothesis import strategies as st
from scipy import stats

matplotlib.use("Agg")

from echoes import compare  # noqa: E402
from echoes.tracking import run_experiment  # noqa: E402


@pytest.fixture(scope="module")
def real_runs(tmp_path_factory):
    uri = f"sqlite:///{tmp_path_factory.mktemp('compare') / 'mlflow.db'}"
    out = []
    models = [("esn", {"hidden_size": 60}), ("mean", {"epochs": 2}), ("gru", {"epochs": 2, "hidden_size": 16})]
    for model, extra in models:
        for seed in range(3):
            out.append(run_experiment({"model": model, "seed": seed, "experiment": "test-compare", "tracking_uri": uri,
                                       "progress": False, "log_model": False, "tensorboard": False, **extra}))
    return uri, out


@pytest.mark.slow
def test_runs_table_matches_training(real_runs):
    uri, out = real_runs
    df = compare.runs("test-compare", uri)
    assert len(df) == len(out) and set(df["status"]) == {"FINISHED"}
    assert list(df["model"].unique()) == ["esn", "gru", "mean"]  # the canonical order
    for r in out:
        row = df[df["run_id"] == r["run_id"]].iloc[0]
        assert row["model"] == r["model"]
        for k in ("test_acc", "train_time_s", "latency_ms", "peak_mem_mb", "trainable_params"):
            assert row[k] == pytest.approx(r[k])
    assert set(df["config"]) == {"esn", "gru", "mean"}  # runs differing only by seed share a config


@pytest.mark.slow
def test_summary_statistics(real_runs):
    uri, _ = real_runs
    df = compare.runs("test-compare", uri)
    s = compare.summary(df)
    assert "Welch" in s.attrs["test"] and "Holm" in s.attrs["test"]
    assert list(s["test_acc_mean"]) == sorted(s["test_acc_mean"], reverse=True)
    best = s.loc[0, "model"]
    acc = {m: g["test_acc"].to_numpy() for m, g in df.groupby("model")}
    for r in s.itertuples():
        x = acc[r.model]
        assert r.n == 3
        assert r.test_acc_mean == pytest.approx(x.mean())
        lo, hi = stats.t.interval(0.95, len(x) - 1, loc=x.mean(), scale=stats.sem(x)) if x.std() else (x[0], x[0])
        assert r.test_acc_ci == pytest.approx((hi - lo) / 2, abs=1e-12)
        t = df[df["model"] == r.model]["train_time_s"].to_numpy()
        assert r.train_time_s_ci == pytest.approx(stats.t.ppf(0.975, 2) * t.std(ddof=1) / math.sqrt(3))
        assert r.trainable_params_ci == 0  # the same architecture has the same size whatever the seed
    raw = {r.model: compare.welch(acc[best], acc[r.model]) for r in s.itertuples() if r.model != best}
    for m, p in raw.items():
        if acc[best].std() or acc[m].std():
            assert p == pytest.approx(stats.ttest_ind(acc[best], acc[m], equal_var=False).pvalue)
    ps = sorted(raw.values())
    holm = [min(1, max((len(ps) - j) * ps[j] for j in range(i + 1))) for i in range(len(ps))]
    assert sorted(s["p_holm"].dropna()) == pytest.approx(holm)
    assert list(s.loc[s["model"] == best, "vs_best"]) == ["best"]
    assert all(s["significant"] == (s["p_holm"] < 0.05))
    assert "±" in compare.format_summary(s).iloc[0]["test accuracy"]


@pytest.mark.slow
def test_artifacts_and_plots(real_runs):
    uri, _ = real_runs
    df = compare.runs("test-compare", uri)
    hist = compare.history(df, tracking_uri=uri)
    assert set(hist["model"]) == {"gru", "mean"} and hist["step"].max() == 2
    pc = compare.per_class(df, uri)
    assert pc.shape[0] == 3 and pc.shape[1] >= 2 and ((pc >= 0) & (pc <= 1)).all().all()
    arch = compare.architectures(df, uri)
    assert set(arch) == {"esn", "gru", "mean"}
    assert arch["esn"]["frozen_params"] > 0 and arch["esn"]["trainable_params"] > 0
    for fig in (compare.plot_tradeoffs(df), compare.plot_learning_curves(hist), compare.plot_per_class(pc),
                compare.plot_architectures(arch)):
        assert fig is not None and fig.axes
    assert compare.plot_esn_grid(df) is None  # no ESN grid in these runs
    x, y = df["trainable_params"].tolist(), df["test_acc"].tolist()
    front = compare.pareto_front(x, y)
    assert all(not any(x[j] <= x[i] and y[j] > y[i] for j in range(len(x))) for i in front)
    assert np.isfinite(y).all()


# Statistics against values known independently: by hand, from scipy, or by simulation.

def test_bootstrap_interval_against_t():
    rng = np.random.default_rng(0)
    big = rng.normal(0.9, 0.02, 400)
    m, lo, hi, n = compare.bootstrap_interval(big)
    tlo, thi = stats.t.interval(0.95, n - 1, loc=big.mean(), scale=stats.sem(big))
    assert n == 400 and m == pytest.approx(big.mean())
    assert lo == pytest.approx(tlo, abs=0.1 * (thi - tlo)) and hi == pytest.approx(thi, abs=0.1 * (thi - tlo))
    for _ in range(20):  # at 5 seeds the percentile bootstrap is narrower than t: inside it, for normal data
        x = rng.normal(0.9, 0.02, 5)
        _, lo, hi, _ = compare.bootstrap_interval(x)
        tlo, thi = stats.t.interval(0.95, 4, loc=x.mean(), scale=stats.sem(x))
        assert tlo < lo < x.mean() < hi < thi


def test_bootstrap_interval_coverage():
    "Over many normal samples of 30, the 95% bootstrap interval holds the true mean about 95% of the time."
    rng = np.random.default_rng(1)
    hits = [lo <= 0.5 <= hi for lo, hi in (compare.bootstrap_interval(rng.normal(0.5, 0.1, 30), n=2000, seed=s)[1:3]
                                           for s in range(400))]
    assert 0.90 <= np.mean(hits) <= 0.98


def test_holm_known_values():
    p = [0.01, 0.04, 0.03, 0.005]  # sorted: 0.005*4, 0.01*3, 0.03*2, max(0.04*1, 0.06)
    assert compare.holm(p) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert compare.holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])
    out = compare.holm([np.nan, 0.02, 0.04])
    assert np.isnan(out[0]) and out[1:] == pytest.approx([0.04, 0.04])  # NaN is no comparison: m = 2


@given(st.lists(st.floats(0, 1), min_size=1, max_size=12))
def test_holm_properties(p):
    adj = compare.holm(p)
    x = np.asarray(p)
    assert (adj >= x - 1e-12).all() and (adj <= 1).all()
    order = np.argsort(x, kind="stable")
    assert (np.diff(adj[order]) >= -1e-12).all()  # the order of the raw p-values is kept
    assert (adj <= np.minimum(1, len(p) * x) + 1e-12).all()  # never more than Bonferroni


def test_paired_by_hand():
    a, b = [0.90, 0.88, 0.93, 0.91, 0.95], [0.88, 0.87, 0.90, 0.91, 0.91]  # differences .02 .01 .03 0 .04
    r = compare._paired(a, b)
    d = np.array([0.02, 0.01, 0.03, 0.0, 0.04])
    sd = math.sqrt(((d - 0.02) ** 2).sum() / 4)  # 0.0158
    assert r["n_pairs"] == 5 and r["mean_diff"] == pytest.approx(0.02) and r["sd_diff"] == pytest.approx(sd)
    assert r["d_z"] == pytest.approx(0.02 / sd)
    assert r["p_value"] == pytest.approx(stats.ttest_rel(a, b).pvalue)
    assert r["p_value"] == pytest.approx(2 * stats.t.sf(0.02 / (sd / math.sqrt(5)), 4))
    assert r["p_beats"] > 0.95  # only resamples of the one zero difference can tie


def test_paired_tests_clearly_better_and_missing_seeds():
    rng = np.random.default_rng(2)
    rows = [dict(model=m, seed=s, status="FINISHED", test_acc=v + rng.normal(0, 0.01))
            for m, v in {"gru": 0.95, "lstm": 0.80, "esn": 0.949}.items() for s in range(6)]
    rows = [r for r in rows if (r["model"], r["seed"]) != ("esn", 5)]  # one final run failed
    t = compare.paired_tests(pd.DataFrame(rows)).set_index("model")
    assert t.attrs["best"] in ("gru", "esn")
    assert t.loc["lstm", "p_beats_best"] == 0.0 and t.loc["lstm", "significant"] and t.loc["lstm", "d_z"] < -5
    assert t.loc["esn", "n"] == 5 and t.loc["gru", "n"] == 6
    other = "esn" if t.attrs["best"] == "gru" else "gru"
    assert t.loc[other, "n_pairs"] == 5 and not t.loc[other, "significant"]
    m = compare.beats_matrix(pd.DataFrame(rows))
    assert m.loc[t.attrs["best"], "lstm"] == 1.0
    assert (m + m.T).fillna(1).to_numpy() == pytest.approx(np.ones((3, 3)))


def test_minimum_detectable_difference_by_simulation():
    "A true difference of the MDD is detected with the promised power; MDD falls with more seeds."
    rng = np.random.default_rng(3)
    mdd = {S: compare.minimum_detectable_difference(0.02, S) for S in (3, 5, 10, 20)}
    assert mdd[3] > mdd[5] > mdd[10] > mdd[20]
    for S in (5, 10):
        d = rng.normal(mdd[S], 0.02, (40_000, S))
        t = d.mean(1) / (d.std(1, ddof=1) / math.sqrt(S))
        assert np.mean(np.abs(t) > stats.t.ppf(0.975, S - 1)) == pytest.approx(0.8, abs=0.01)
    assert compare.minimum_detectable_difference(0.02, 5, power=0.9) > mdd[5]
    with pytest.raises(ValueError, match="alpha < power"):
        compare.minimum_detectable_difference(0.02, 5, alpha=0.5, power=0.4)


# A search sweep's record, written into a real MLflow store the way the search writes it (the contract of
# nbs/08b_search.ipynb): a parent run tagged echoes.protocol=search with protocol.json, search and final child runs.

SPACES = {"esn": {"spectral_radius": {"kind": "loguniform", "low": 0.01, "high": 10},
                  "readout": {"kind": "choice", "choices": ["last", "mean"]}},
          "lstm": {"lr": {"kind": "loguniform", "low": 1e-4, "high": 0.1},
                   "hidden_size": {"kind": "logint", "low": 16, "high": 256}},
          "gru": {"lr": {"kind": "loguniform", "low": 1e-4, "high": 0.1},
                  "hidden_size": {"kind": "logint", "low": 16, "high": 256}},
          "mean": {"lr": {"kind": "loguniform", "low": 1e-4, "high": 0.1}}}
LEVEL = {"esn": 0.928, "lstm": 0.927, "gru": 0.93, "mean": 0.60}
# each final run's own deviation, by seed, fixed so that the verdict is known: gru best, esn and lstm within noise of it
NOISE = {"esn": [0.004, -0.004, 0.003, -0.003, 0.0], "lstm": [-0.003, 0.003, 0.004, -0.004, 0.0],
         "gru": [0.0] * 5, "mean": [0.002, -0.002, 0.0, 0.001, -0.001]}
FEATURES = {"dataset": "synthetic", "classes": 16, "encoder": "pixels", "frames": 16, "frame_size": 32}


def _draw(spec, rng, choice):
    if spec["kind"] == "choice": return choice
    v = float(np.exp(rng.uniform(np.log(spec["low"]), np.log(spec["high"]))))
    return round(v) if spec["kind"] == "logint" else v


def log_search_sweep(uri, trials=4, seeds=(0, 1, 2, 3, 4), skip=(), budgets=None, device="cpu", choice="last",
                     features=FEATURES, experiment="search"):
    "Write a search sweep's record; `skip`: (model, seed) final runs left out. Returns the parent run id."
    from mlflow.entities import Metric, Param
    from echoes.tracking import experiment_id
    c, rng = compare.client(uri), np.random.default_rng(0)
    exp = experiment_id(experiment, uri)  # its artifacts beside the store, as every echoes run's
    parent = c.create_run(exp, run_name="search-sweep", tags={"echoes.protocol": "search"}).info.run_id
    split = rng.normal(0, 0.02, max(seeds) + 1)  # a seed's split is as hard for every architecture

    def log(model, name, seed, hp, acc, tags):
        rid = c.create_run(exp, run_name=name, tags={"mlflow.parentRunId": parent, "echoes.model": model,
                                                     **tags}).info.run_id
        ms = {"val_acc": acc + rng.normal(0, 0.005), "test_acc": acc, "trainable_params": 1000,
              "train_time_s": 0.5 if model == "esn" else 5.0}
        params = {"model": model, "seed": seed, "fold": 1, "val_fraction": 0.2, **features, **hp}
        c.log_batch(rid, metrics=[Metric(k, float(v), 0, 0) for k, v in ms.items()],
                    params=[Param(k, str(v)) for k, v in params.items()])
        c.set_terminated(rid, "FINISHED")
        return rid, ms

    selected, spent = {}, {}
    for model, space in SPACES.items():
        found = []
        for k in range(trials):
            hp = {p: _draw(s, rng, choice) for p, s in space.items()}
            tags = {"echoes.phase": "search", "echoes.study": f"{experiment}-{model}", "echoes.search_trial": str(k)}
            rid, ms = log(model, f"{model}-t{k}", 100, hp, LEVEL[model] - 0.03 * rng.random(), tags)
            found.append((ms["val_acc"], rid, hp))
        val, rid, hp = max(found, key=lambda f: f[0])
        selected[model] = {"params": hp, "val_acc": val, "run_id": rid}
        spent[model] = {"trials": trials, "failed": 0, "train_s": trials * (0.5 if model == "esn" else 5.0),
                        "device": device}
        for s in seeds:
            if (model, s) not in skip:
                log(model, f"{model}-s{s}", s, hp, LEVEL[model] + split[s] + NOISE[model][s],
                    {"echoes.phase": "final", "echoes.selected_from": rid})
    c.log_dict(parent, {"select": "val_acc", "seeds": list(seeds), "search_seed": 100, "spaces": SPACES,
                        "budgets": budgets or {m: {"trials": trials, "seconds": None} for m in SPACES},
                        "spent": spent, "selected": selected, "features": FEATURES, "fixed": {"epochs": 5}},
               "protocol.json")
    c.set_terminated(parent, "FINISHED")
    return parent


@pytest.fixture(scope="module")
def search_store(tmp_path_factory):
    uri = f"sqlite:///{tmp_path_factory.mktemp('search') / 'mlflow.db'}"
    fair = log_search_sweep(uri)
    unfair = log_search_sweep(uri, skip={("lstm", 3)}, budgets={**{m: {"trials": 4, "seconds": None} for m in SPACES},
                                                                 "esn": {"trials": 8, "seconds": None}},
                              features={**FEATURES, "frames": 8}, experiment="unfair")
    return uri, fair, unfair


def test_search_record_reads_back(search_store):
    uri, parent, _ = search_store
    df = compare.runs(parent, uri)
    assert df["phase"].value_counts().to_dict() == {"search": 16, "final": 20}
    s = df[df["phase"] == "search"]
    assert s["study"].str.startswith("search-").all() and sorted(set(s["search_trial"])) == [0, 1, 2, 3]
    assert (df.loc[df["phase"] == "final", "selected_from"].isin(s["run_id"])).all()
    proto = compare.protocol(parent, uri)
    assert proto["budgets"]["gru"] == {"trials": 4, "seconds": None} and proto["seeds"] == [0, 1, 2, 3, 4]
    h = compare.search_history(df, protocol=proto)
    assert h.groupby("model").size().to_dict() == {"esn": 4, "lstm": 4, "gru": 4, "mean": 4}
    for m, g in h.groupby("model"):
        assert g["selected"].sum() == 1 and g.loc[g["selected"], "run_id"].item() == proto["selected"][m]["run_id"]
        assert (g["best_so_far"] == g["val_acc"].cummax()).all()
    b = compare.budget_table(proto)
    assert b["architecture"].tolist() == ["esn", "lstm", "gru", "mean"] and set(b["trials granted"]) == {4}


def test_final_table_uses_only_final_runs(search_store):
    uri, parent, _ = search_store
    df = compare.runs(parent, uri)
    t = compare.final_table(df, compare.protocol(parent, uri)).set_index("model")
    fin = df[df["phase"] == "final"]
    for m, g in fin.groupby("model"):
        x = g["test_acc"].to_numpy()
        assert t.loc[m, "n"] == 5 and t.loc[m, "mean"] == pytest.approx(x.mean())
        lo, hi = stats.t.interval(0.95, 4, loc=x.mean(), scale=stats.sem(x))
        assert (t.loc[m, "t_lo"], t.loc[m, "t_hi"]) == pytest.approx((lo, hi))
    best = t.attrs["best"]
    acc = fin.pivot_table(index="seed", columns="model", values="test_acc")
    raw = {m: stats.ttest_rel(acc[m], acc[best]).pvalue for m in acc if m != best}
    assert [t.loc[m, "p_value"] for m in raw] == pytest.approx(list(raw.values()))
    assert [t.loc[m, "p_holm"] for m in raw] == pytest.approx(list(compare.holm(list(raw.values()))))
    assert t.loc["mean", "significant"] and t.loc["mean", "p_beats_best"] == 0.0
    assert set(t["trials"]) == {4}


def test_fairness_fair_and_unfair(search_store):
    uri, fair, unfair = search_store
    f = compare.fairness(compare.protocol(fair, uri), compare.runs(fair, uri))
    assert f["fair"], f["checks"]
    assert f["verdict"] == "Fair: equal budgets, the same seeds, the same features, selection on validation."
    assert f["conclusion"].startswith("gru is best (0.9")
    assert "esn and lstm are not distinguishable from it at 5 seeds" in f["conclusion"]
    assert "mean is worse (Holm p = " in f["conclusion"] and "At 5 seeds a paired t-test detects" in f["conclusion"]
    checks = {c["check"]: c for c in f["checks"]}
    assert "fold=1" in checks["features"]["detail"] and "val_fraction=0.2" in checks["features"]["detail"]
    u = compare.fairness(compare.protocol(unfair, uri), compare.runs(unfair, uri))
    assert not u["fair"]
    assert u["verdict"] == "Not fair: the tuning budgets differ; the seeds differ; the features differ."
    checks = {c["check"]: c for c in u["checks"]}
    assert "unequal: esn 8 trials, lstm 4 trials" in checks["budgets"]["detail"]
    assert checks["seeds"]["detail"].endswith("lstm has 0, 1, 2, 4")
    assert checks["features"]["detail"] == "frames: 8 in the runs, 16 in the protocol"
    t = u["table"].set_index("model")
    assert t.loc["lstm", "n"] == 4 and t.loc["lstm", "n_pairs"] == 4  # paired on the seeds both have


def test_protocol_bad_and_missing(search_store, tmp_path):
    uri, parent, _ = search_store
    c = compare.client(uri)
    eid = c.get_run(parent).info.experiment_id
    assert compare.protocol(c.create_run(eid).info.run_id, uri) is None  # a grid sweep's parent: no protocol
    bad = c.create_run(eid, tags={"echoes.protocol": "search"}).info.run_id
    assert compare.protocol(bad, uri) is None  # a search still writing its protocol
    (tmp_path / "protocol.json").write_bytes(b'{"budgets": {"gru": {"trials": 4}')  # cut short
    c.log_artifact(bad, str(tmp_path / "protocol.json"))
    with pytest.raises(ValueError, match=f"protocol.json of sweep {bad} is not valid JSON"):
        compare.protocol(bad, uri)
    bad2 = c.create_run(eid, tags={"echoes.protocol": "search"}).info.run_id
    c.log_dict(bad2, {"budgets": {"gru": 4}}, "protocol.json")
    with pytest.raises(ValueError, match=r"`budgets.gru` should be an object"):
        compare.protocol(bad2, uri)
