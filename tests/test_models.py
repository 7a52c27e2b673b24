"""The models layer: one interface for seven models, masking, closed-form readouts, errors, determinism."""
import json
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from echoes.core import count_params, toy_sequences
from echoes.esn import (
    DeepESN,
    Reservoir,
    RidgeStats,
    SimpleESN,
    batches_of,
    init_reservoir,
    spectral_radius,
)
from echoes.models import HPARAMS, MODELS, create, size_table
from echoes.rnn import RecurrentClassifier

ROOT = Path(__file__).resolve().parents[1]
D, C = 8, 5


@pytest.fixture(autouse=True)
def _one_thread():
    # tiny tensors on a shared 2-core machine: thread sync costs more than it saves
    n = torch.get_num_threads(); torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _batch(B=4, T=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, T, D, generator=g), torch.tensor([9, 3, 6, 1][:B])


@pytest.mark.parametrize("name", MODELS)
def test_interface(name):
    m = create(name, D, C, hidden_size=16, num_layers=2).eval()
    x, lens = _batch()
    out = m(x, lens)
    assert out.shape == (4, C) and out.dtype == torch.float32
    assert m(x).shape == (4, C)  # lengths default to the full T
    assert m.closed_form is (name in ("esn", "deep_esn"))
    d = m.describe()
    assert (d["trainable_params"], d["total_params"]) == count_params(m)
    assert all({"name", "type", "in", "out", "trainable", "frozen"} <= set(layer) for layer in d["layers"])
    json.dumps(d)  # an artifact: must serialise
    if m.closed_form: assert callable(m.fit_readout)


@pytest.mark.parametrize("name", MODELS)
def test_padded_steps_do_not_change_outputs(name):
    m = create(name, D, C, hidden_size=16, num_layers=2, readout="both" if name != "mean" else None).eval()
    x, lens = _batch()
    junk = torch.cat([x, 50 * torch.randn(4, 7, D)], 1)
    x2 = x.clone()
    for i, n in enumerate(lens): x2[i, n:] = 123.0  # junk inside the padded region too
    with torch.no_grad():
        ref = m(x, lens)
        torch.testing.assert_close(m(junk, lens), ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(m(x2, lens), ref, atol=1e-5, rtol=1e-5)
        # a sequence's output does not depend on its batch-mates
        torch.testing.assert_close(m(x[1:2, :3], lens[1:2]), ref[1:2], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
@pytest.mark.parametrize("readout", ["last", "mean", "both"])
def test_padded_equals_packed(cell, readout):
    x, lens = _batch()
    a = RecurrentClassifier(D, C, 16, 2, cell=cell, readout=readout, seed=4).eval()
    b = RecurrentClassifier(D, C, 16, 2, cell=cell, readout=readout, seed=4, packed=True).eval()
    with torch.no_grad(): torch.testing.assert_close(a(x, lens), b(x, lens), atol=1e-5, rtol=1e-5)
    # and the gradients agree too (a training step sees the same thing)
    a.train(); b.train()
    ga = torch.autograd.grad(a(x, lens).square().sum(), list(a.parameters()))
    gb = torch.autograd.grad(b(x, lens).square().sum(), list(b.parameters()))
    for u, v in zip(ga, gb, strict=True): torch.testing.assert_close(u, v, atol=1e-4, rtol=1e-4)


def test_rnn_is_elman_and_deep_rnn_is_stacked():
    m = create("rnn", D, C)
    assert isinstance(m.rnn, nn.RNN) and m.rnn.nonlinearity == "tanh" and m.rnn.num_layers == 1
    d = create("deep_rnn", D, C, dropout=0.3)
    assert isinstance(d.rnn, nn.RNN) and d.rnn.num_layers >= 2 and d.rnn.dropout == 0.3
    assert isinstance(create("lstm", D, C).rnn, nn.LSTM) and isinstance(create("gru", D, C).rnn, nn.GRU)


def _toy(n, seed, **kw):
    return toy_sequences(n, seed=seed, min_len=8, **kw)


def test_esn_learns_temporal_task_where_mean_fails():
    tr, va = _toy(400, 0), _toy(300, 1)
    esn = create("esn", 6, 4, hidden_size=100, seed=0)
    info = esn.fit_readout(lambda: batches_of(*tr), lambda: batches_of(*va))
    assert info["val_acc"] > 0.9 and info["ridge"] in info["ridge_grid"] and info["n_train"] == 400
    mean = create("mean", 6, 4)
    opt = torch.optim.Adam(mean.parameters(), lr=0.01)
    for _ in range(30):
        for x, lens, y in batches_of(*tr, 50):
            loss = nn.functional.cross_entropy(mean(x, lens), y); opt.zero_grad(); loss.backward(); opt.step()
    with torch.no_grad():
        acc_mean = (mean(torch.as_tensor(va[0]), torch.as_tensor(va[2])).argmax(1).numpy() == va[1]).mean()
    assert acc_mean < 0.4, acc_mean  # chance is 0.25: the time-mean carries nothing
    deep = create("deep_esn", 6, 4, hidden_size=60, num_layers=2, seed=0)
    assert deep.fit_readout(lambda: batches_of(*tr), lambda: batches_of(*va))["val_acc"] > 0.85


def _numpy_ridge(Fm, y, lam, C):
    Y = np.eye(C)[y]; n = len(Fm)
    Fc, Yc = Fm - Fm.mean(0), Y - Y.mean(0)
    A = np.linalg.solve(Fc.T @ Fc + n * lam * np.eye(Fm.shape[1]), Fc.T @ Yc)
    return A, Y.mean(0) - Fm.mean(0) @ A


@pytest.mark.parametrize("readout", ["last", "mean", "both"])
def test_streaming_fit_equals_one_shot_numpy(readout):
    tr = _toy(300, 0, D=6)
    esn = SimpleESN(6, 4, hidden_size=40, readout=readout, seed=2)
    esn.fit_readout(batches_of(*tr, 37), ridge=1e-3)  # an iterable, odd batch size
    Fm = esn.features(torch.as_tensor(tr[0]), torch.as_tensor(tr[2])).double().numpy()
    A, b = _numpy_ridge(Fm, tr[1], 1e-3, 4)
    np.testing.assert_allclose(esn.readout.weight.detach().double().numpy(), A.T, atol=1e-5, rtol=1e-4)
    np.testing.assert_allclose(esn.readout.bias.detach().double().numpy(), b, atol=1e-5, rtol=1e-4)


def test_ridge_picked_on_val_matches_brute_force_and_reads_each_split_once():
    tr, va = _toy(200, 0, noise=1.0), _toy(150, 1, noise=1.0)
    grid = [1e-6, 1e-3, 1e-1, 10.0]
    esn = SimpleESN(6, 4, hidden_size=60, seed=1, ridge=grid)
    passes = {"train": 0, "val": 0}

    def counted(split, data):
        def make():
            passes[split] += 1
            return batches_of(*data, 64)
        return make
    info = esn.fit_readout(counted("train", tr), counted("val", va))
    assert passes == {"train": 1, "val": 1}
    Ftr = esn.features(torch.as_tensor(tr[0]), torch.as_tensor(tr[2])).double().numpy()
    Fva = esn.features(torch.as_tensor(va[0]), torch.as_tensor(va[2])).double().numpy()
    accs = []
    for lam in grid:
        A, b = _numpy_ridge(Ftr, tr[1], lam, 4)
        accs.append(((Fva @ A + b).argmax(1) == va[1]).mean())
    np.testing.assert_allclose(info["val_acc_grid"], accs, atol=1e-9)
    best = max(range(len(grid)), key=lambda i: (accs[i], grid[i]))
    assert info["ridge"] == grid[best] and info["val_acc"] == pytest.approx(accs[best])
    assert info["selection"] == "val" and info["n_val"] == 150
    # without validation data, GCV picks from the same statistics, and says so
    info2 = SimpleESN(6, 4, hidden_size=60, seed=1, ridge=grid).fit_readout(batches_of(*tr))
    assert info2["selection"] == "gcv" and info2["val_acc"] is None and info2["ridge"] in grid


def test_ridge_stats_gcv_matches_direct_formula():
    g = np.random.default_rng(3)
    Fm, y = g.normal(size=(120, 7)), g.integers(0, 3, 120)
    st = RidgeStats(7, 3); st.update(torch.tensor(Fm), torch.tensor(y))
    _, _, gcv = st.solve([0.5])
    A, b = _numpy_ridge(Fm, y, 0.5, 3)
    Y = np.eye(3)[y]; Fc = Fm - Fm.mean(0)
    rss = ((Y - Fm @ A - b) ** 2).sum() / 120
    df = np.trace(Fc @ np.linalg.solve(Fc.T @ Fc + 120 * 0.5 * np.eye(7), Fc.T)) + 1
    assert gcv[0].item() == pytest.approx(rss / (1 - df / 120) ** 2, rel=1e-9)


def test_zero_ridge_on_rank_deficient_features_is_finite():
    st = RidgeStats(4, 2)
    f = torch.randn(50, 2, dtype=torch.float64)
    st.update(torch.cat([f, f], 1), torch.randint(0, 2, (50,)))  # duplicated columns: singular
    A, b, _ = st.solve([0.0])
    assert torch.isfinite(A).all() and torch.isfinite(b).all()


@pytest.mark.parametrize("kw,msg", [
    ({"hidden_size": 0}, "positive integer"), ({"hidden_size": -3}, "positive integer"),
    ({"spectral_radius": 0}, "> 0"), ({"spectral_radius": -0.5}, "> 0"),
    ({"leak": 0}, "(0, 1]"), ({"leak": 1.01}, "(0, 1]"), ({"density": 0}, "(0, 1]"), ({"density": 1.5}, "(0, 1]"),
    ({"dropout": 1.0}, "[0, 1)"), ({"readout": "max"}, "one of"), ({"ridge": -1.0}, ">= 0"), ({"ridge": []}, ">= 0"),
    ({"readout_training": "adam"}, "'ridge' or 'sgd'"), ({"spectral_raduis": 0.9}, "unknown hyperparameter"),
])
def test_bad_hparams(kw, msg):
    with pytest.raises(ValueError, match=None) as e: create("esn", D, C, **kw)
    assert msg in str(e.value)


def test_bad_names_and_sizes():
    with pytest.raises(ValueError) as e: create("transformer", D, C)
    assert all(n in str(e.value) for n in MODELS)
    for kw in ({"input_size": 0}, {"num_classes": 0}):
        args = {"input_size": D, "num_classes": C, **kw}
        with pytest.raises(ValueError, match="positive integer"): create("lstm", **args)
    with pytest.raises(ValueError, match=">= 2"): create("deep_esn", D, C, num_layers=1)
    with pytest.raises(ValueError, match=">= 2"): create("deep_rnn", D, C, num_layers=1)
    with pytest.raises(ValueError, match="3 values for 2 layers"):
        create("deep_esn", D, C, num_layers=2, leak=[.1, .2, .3])
    with pytest.raises(ValueError, match="single value"): create("lstm", D, C, hidden_size=[4, 4])


def test_irrelevant_shared_names_are_ignored_and_none_means_default():
    cfg = dict.fromkeys(HPARAMS)
    cfg.update(hidden_size=16, leak=0.5, spectral_radius=0.8, dropout=0.1, ridge=[0.1, 1.0])
    for name in MODELS: create(name, D, C, **cfg)
    assert create("lstm", D, C, leak=0.5).hidden_size == create("lstm", D, C).hidden_size
    assert create("esn", D, C, hidden_size=None).reservoir.hidden_size == SimpleESN(D, C).reservoir.hidden_size


@pytest.mark.parametrize("name", MODELS)
def test_deterministic_by_seed(name):
    x, lens = _batch()
    with torch.no_grad():
        a = create(name, D, C, hidden_size=16, seed=5).eval()(x, lens)
        torch.manual_seed(999)  # the global RNG does not matter
        b = create(name, D, C, hidden_size=16, seed=5).eval()(x, lens)
        c = create(name, D, C, hidden_size=16, seed=6).eval()(x, lens)
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert not torch.equal(a, c)


def test_reservoir_weights_are_buffers():
    for m in (create("esn", D, C, hidden_size=30), create("deep_esn", D, C, hidden_size=20, num_layers=3)):
        names = {n for n, _ in m.named_parameters()}
        assert names == {"readout.weight", "readout.bias"}
        bufs = dict(m.named_buffers())
        assert bufs and all(k.rsplit(".", 1)[-1] in ("W", "W_in", "b") for k in bufs)
        assert all(k in m.state_dict() for k in bufs)
        trainable, total = count_params(m)
        assert total == trainable + sum(b.numel() for b in bufs.values())
        m2 = m.to(torch.float64)
        assert all(b.dtype == torch.float64 for b in m2.buffers())


def test_reservoir_spectral_radius_and_density():
    r = init_reservoir(5, 400, spectral_radius=0.7, density=0.05, seed=0)
    assert spectral_radius(r["W"], "exact") == pytest.approx(0.7, rel=1e-5)
    assert (r["W"] != 0).float().mean().item() == pytest.approx(0.05, rel=0.1)
    assert not r["W_in"].eq(0).any()


@pytest.mark.parametrize("n", [1024, 2048])
def test_circular_law_estimate_against_exact(n):
    g = np.random.default_rng(n)
    W = g.uniform(-1, 1, (n, n)) * (g.random((n, n)) < 0.1)
    exact, est = spectral_radius(W, "exact"), spectral_radius(W, "circular")
    assert abs(est / exact - 1) < 0.06, (exact, est)


def test_large_reservoir_uses_estimate_and_lands_near_target():
    r = init_reservoir(4, 2500, spectral_radius=0.9, seed=0)  # above exact_max: circular-law rescaling
    assert spectral_radius(r["W"], "circular") == pytest.approx(0.9, rel=1e-6)


def test_deep_esn_per_layer_params():
    m = create("deep_esn", D, C, hidden_size=[30, 20, 10], num_layers=3, spectral_radius=[0.5, 0.9, 1.1],
               leak=[1.0, 0.5, 0.1], input_scaling=0.7, density=[0.2, 0.1, 0.3], seed=0)
    assert [r.hidden_size for r in m.layers] == [30, 20, 10]
    assert [r.input_size for r in m.layers] == [D, 30, 20]
    assert [r.leak for r in m.layers] == [1.0, 0.5, 0.1]
    for r, rho in zip(m.layers, [0.5, 0.9, 1.1], strict=True):
        assert spectral_radius(r.W) == pytest.approx(rho, rel=1e-5)
    assert all(r.input_scaling == 0.7 for r in m.layers)
    assert m.readout.in_features == 2 * 60
    # each layer is a reservoir driven by the states of the one below
    x, lens = _batch()
    s1 = m.layers[0].run(x, lens); s2 = m.layers[1].run(s1, lens); s3 = m.layers[2].run(s2, lens)
    f = m.features(x, lens)
    idx = lens - 1
    last = torch.cat([s[torch.arange(4), idx] for s in (s1, s2, s3)], 1)
    torch.testing.assert_close(f[:, :60], last, atol=1e-5, rtol=1e-5)


def test_chunking_bounds_memory_without_changing_results():
    x, lens = _batch()
    for m in (SimpleESN(D, C, hidden_size=30), DeepESN(D, C, hidden_size=20, num_layers=2)):
        ref = m.features(x, lens)
        m.chunk_mb = 1e-9  # one sequence per chunk
        torch.testing.assert_close(m.features(x, lens), ref, atol=1e-6, rtol=1e-6)


def test_sgd_readout_ablation():
    tr, va = _toy(300, 0), _toy(200, 1)
    m = create("esn", 6, 4, hidden_size=80, readout_training="sgd", seed=0)
    assert m.closed_form is False and count_params(m)[0] == 80 * 2 * 4 + 4
    opt = torch.optim.Adam(m.parameters(), lr=0.02)
    for _ in range(40):
        for x, lens, y in batches_of(*tr, 100):
            loss = nn.functional.cross_entropy(m(x, lens), y); opt.zero_grad(); loss.backward(); opt.step()
    assert len(m._cache) == 3  # the reservoir ran once per distinct batch
    with torch.no_grad():
        acc = (m(torch.as_tensor(va[0]), torch.as_tensor(va[2])).argmax(1).numpy() == va[1]).mean()
    assert acc > 0.75
    m2 = pickle.loads(pickle.dumps(m))  # mlflow logs models by pickle: the cache is left behind
    assert len(m2._cache) == 0
    torch.testing.assert_close(m2(torch.as_tensor(va[0][:5]), torch.as_tensor(va[2][:5])),
                               m(torch.as_tensor(va[0][:5]), torch.as_tensor(va[2][:5])))


def test_fitted_esn_survives_pickle_and_state_dict():
    tr = _toy(100, 0)
    m = create("esn", 6, 4, hidden_size=30); m.fit_readout(batches_of(*tr), ridge=1e-2)
    x, lens = torch.as_tensor(tr[0][:7]), torch.as_tensor(tr[2][:7])
    m2 = pickle.loads(pickle.dumps(m))
    torch.testing.assert_close(m2(x, lens), m(x, lens))
    m3 = create("esn", 6, 4, hidden_size=30, seed=99); m3.load_state_dict(m.state_dict())
    torch.testing.assert_close(m3(x, lens), m(x, lens))


def test_default_sizes_in_origin_ranges():
    rows = size_table(512, 101)
    assert {r["model"] for r in rows} == set(MODELS)
    assert all(r["in_range"] for r in rows), rows


def test_memory_capacity_and_echo_state_diagnostics():
    from echoes.esn import echo_state_distance, memory_capacity
    mc, per = memory_capacity(Reservoir(1, 30, spectral_radius=0.9, leak=1.0, input_scaling=0.3), 40, T=1200)
    assert 3 < mc <= 30 and per[0] > 0.9
    x = torch.rand(150, 1) * 2 - 1
    d = echo_state_distance(Reservoir(1, 50, spectral_radius=0.8, leak=0.5, input_scaling=0.5), x)
    assert d[-1] < 1e-5 * d[0]


def test_models_import_without_mlflow_or_av():
    # the GPU machine has torch but neither mlflow nor av: the models layer must not need them
    code = ("import sys\n"
            "for m in ('mlflow', 'av', 'papermill', 'pandas', 'matplotlib'): sys.modules[m] = None\n"
            "import echoes.esn, echoes.rnn, echoes.models\n"
            "print(echoes.models.create('esn', 4, 3, hidden_size=8)(__import__('torch').zeros(2, 3, 4)).shape)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr
    assert "torch.Size([2, 3])" in out.stdout


def test_gpu_check_runs_tiny_on_cpu():
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--device", "cpu"],
                         capture_output=True, text=True, timeout=300, cwd=ROOT, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["device"] == "cpu" and summary["tiny"] is True
    assert summary["esn"]["eager_ms"] > 0 and summary["lstm"]["ours_padded_ms"] > 0


def _sparse_and_dense(res, fn):
    "fn() under the sparse and the dense recurrent product of `res`."
    assert res.csr() is not None
    a = fn(); res.sparse = False
    try:
        assert res.csr() is None; b = fn()
    finally:
        res.sparse = "auto"
    return a, b


@pytest.mark.parametrize("readout", ["last", "mean", "both"])
def test_sparse_path_equals_dense_path(readout):
    esn = SimpleESN(D, C, hidden_size=150, density=0.1, leak=0.4, readout=readout, seed=3)
    g = torch.Generator().manual_seed(1)
    x, lens = torch.randn(9, 17, D, generator=g), torch.tensor([17, 1, 5, 17, 9, 2, 16, 11, 3])
    fs, fd = _sparse_and_dense(esn.reservoir, lambda: esn.features(x, lens))
    torch.testing.assert_close(fs, fd, atol=1e-5, rtol=0)
    ss, sd = _sparse_and_dense(esn.reservoir, lambda: esn.reservoir.run(x, lens))
    torch.testing.assert_close(ss, sd, atol=1e-5, rtol=0)
    h0 = torch.rand(9, 150, generator=g) - 0.5
    ss0, sd0 = _sparse_and_dense(esn.reservoir, lambda: esn.reservoir.run(x, lens, h0=h0))
    torch.testing.assert_close(ss0, sd0, atol=1e-5, rtol=0)
    # masking stays exact on the sparse path: padded steps repeat the last valid state bit for bit,
    # and junk in the padding changes nothing
    for i, n in enumerate(lens.tolist()):
        assert torch.equal(ss[i, n:], ss[i, n - 1].expand(17 - n, -1))
    x_junk = x.clone()
    for i, n in enumerate(lens.tolist()): x_junk[i, n:] = 1e3
    assert torch.equal(esn.features(x_junk, lens), fs)
    deep = DeepESN(D, C, hidden_size=[100, 80], num_layers=2, density=0.05, seed=0)
    a, b = _sparse_and_dense(deep.layers[0], lambda: deep.features(x, lens))
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_sparse_path_choice_and_cache():
    from echoes.esn import SPARSE_MAX_DENSITY, SPARSE_MIN_UNITS, Reservoir
    assert Reservoir(D, 200, density=0.1).csr() is not None
    assert Reservoir(D, 200, density=0.3).csr() is None                      # dense enough for the GEMM to win
    assert Reservoir(D, SPARSE_MIN_UNITS - 1, density=0.1).csr() is None     # too small to matter
    assert Reservoir(D, 200, density=0.3, sparse=True).csr() is not None     # forced either way
    assert Reservoir(D, 200, density=0.1, sparse=False).csr() is None
    assert 0 < SPARSE_MAX_DENSITY < 0.2
    res = Reservoir(D, 200, density=0.1)
    A = res.csr()
    assert res.csr() is A  # cached
    res.W.mul_(0.5)        # an in-place change (or a load_state_dict) invalidates it
    np.testing.assert_allclose(res.csr().toarray(), res.W.numpy())
    res2 = pickle.loads(pickle.dumps(res))
    assert res2._csr is None and res2.csr() is not None
    np.testing.assert_allclose(res2.csr().toarray(), res.W.numpy())
    resd = Reservoir(D, 200, density=0.1).double()  # float64 model: float64 CSR, float64 states
    assert resd.csr().dtype == np.float64 and resd.run(torch.randn(2, 5, D, dtype=torch.float64)).dtype == torch.float64
