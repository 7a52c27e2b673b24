"""echoes.compare on real training runs: the tidy table matches what training returned, and the summary's
means, t-intervals, Welch tests and Holm correction match an independent computation with scipy."""
import math

import matplotlib
import numpy as np
import pytest
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
