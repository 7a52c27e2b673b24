"""Training reads the feature cache in place: a split is a row index into the cache file (`Rows`), batches read
their rows from the file, and the results are those of the old path that copied each split into memory.
The RSS test trains on a synthetic cache of N and of 4N clips in subprocesses: peak RSS must stay flat, where
the copying path grows by the split's size (run as a control, so the test can tell the two apart)."""
import json
import subprocess
import sys
import textwrap
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch

from echoes.core import Rows, SeqData, array_manifest
from echoes.data import _seq, load
from echoes.models import create
from echoes.train import evaluate, fit


def _cache(path: Path, n: int, T: int, D: int, seed: int = 0) -> np.memmap:
    "A float16 (n, T, D) `.npy` feature cache at `path`, opened read-only as training opens one."
    block = np.random.default_rng(seed).normal(size=(min(n, 512), T, D)).astype(np.float16)
    a = np.lib.format.open_memmap(path, "w+", np.float16, (n, T, D))
    for i in range(0, n, len(block)): a[i:i + len(block)] = block[:n - i]
    a.flush(); del a
    return np.load(path, mmap_mode="r")


def _copied(d: SeqData) -> SeqData:
    "`d` as the old path built it: the split's rows copied into memory."
    return SeqData(np.asarray(d.X), d.y, d.lengths, d.classes, d.info)


def test_split_is_a_row_index_not_a_copy(tmp_path):
    X = _cache(tmp_path / "features.npy", 4000, 8, 64)  # 4 MB
    idx = np.flatnonzero(np.arange(4000) % 5 != 0)  # train without every fifth clip: not contiguous
    tracemalloc.start()
    s = _seq(X, np.arange(4000) % 3, np.full(4000, 8), idx, ["a", "b", "c"], {})
    peak = tracemalloc.get_traced_memory()[1]; tracemalloc.stop()
    assert isinstance(s.X, Rows) and Path(s.X.path) == tmp_path / "features.npy"
    assert s.X.shape == (len(idx), 8, 64) and s.input_size == 64 and len(s) == len(idx)
    assert peak < 0.1 * len(idx) * 8 * 64 * 2, peak  # the index and labels, not the 3.2 MB of rows
    ref = np.asarray(X)[idx]
    np.testing.assert_array_equal(np.asarray(s.X), ref)
    g = torch.Generator().manual_seed(3)
    perm = torch.randperm(len(idx), generator=torch.Generator().manual_seed(3)).numpy()
    for k, (x, _, y) in enumerate(s.batches(700, shuffle=True, generator=g)):  # the seeded order, kept
        rows = perm[k * 700:(k + 1) * 700]
        np.testing.assert_array_equal(x.numpy(), ref[rows].astype(np.float32)); assert (y.numpy() == s.y[rows]).all()
    sub = s.subset(np.array([5, 0, 17]))
    assert isinstance(sub.X, Rows); np.testing.assert_array_equal(np.asarray(sub.X), ref[[5, 0, 17]])
    assert isinstance(SeqData(X, np.zeros(4000), np.full(4000, 8)).X, Rows)  # a whole cache too
    np.save(tmp_path / "v.npy", np.arange(10.0))  # rows that are scalars
    np.testing.assert_array_equal(Rows(np.load(tmp_path / "v.npy", mmap_mode="r"), [7, 2, 3]).read(), [7.0, 2.0, 3.0])


def test_in_memory_arrays_still_work():
    from echoes.data import from_arrays
    X = np.random.default_rng(0).normal(size=(40, 6, 3)).astype(np.float32)
    s = from_arrays((X, np.arange(40) % 2))
    assert isinstance(s.train.X, np.ndarray) and s.train.X.shape[1:] == (6, 3)
    assert sum(len(b[0]) for b in s.train.batches(7)) == len(s.train)


@pytest.fixture(scope="module")
def builtin():
    s = load("synthetic", device="cpu", classes=4, clips_per_class=12, frames=8, frame_size=16, progress=False)
    assert all(isinstance(d.X, Rows) for d in (s.train, s.val, s.test))
    assert (np.diff(s.train.X.idx) > 1).any()  # a split the old path had to copy
    return s


def test_esn_fit_matches_the_copying_path(builtin):
    s, out = builtin, []
    for tr, va, te in ((s.train, s.val, s.test), (_copied(s.train), _copied(s.val), _copied(s.test))):
        m = create("esn", tr.input_size, len(s.classes), hidden_size=60, seed=1)
        h = fit(m, tr, va, batch_size=5, device="cpu")
        out.append((m, h, evaluate(m, te, batch_size=7, device="cpu")))
    (m1, h1, e1), (m2, h2, e2) = out
    assert torch.equal(m1.readout.weight, m2.readout.weight) and torch.equal(m1.readout.bias, m2.readout.bias)
    assert (h1["ridge"], h1["val_acc"], h1["n_train"]) == (h2["ridge"], h2["val_acc"], h2["n_train"])
    assert (e1["predictions"] == e2["predictions"]).all() and e1["loss"] == e2["loss"]


def test_gru_epoch_matches_the_copying_path(builtin):
    s, out = builtin, []
    for tr, va, te in ((s.train, s.val, s.test), (_copied(s.train), _copied(s.val), _copied(s.test))):
        m = create("gru", tr.input_size, len(s.classes), hidden_size=12, seed=2)
        h = fit(m, tr, va, epochs=2, batch_size=4, seed=5, device="cpu", progress=False)
        out.append((m, h, evaluate(m, te, batch_size=7, device="cpu")))
    (m1, h1, e1), (m2, h2, e2) = out
    assert all(torch.equal(a, b) for a, b in zip(m1.state_dict().values(), m2.state_dict().values()))
    assert [e["train_loss"] for e in h1["epochs"]] == [e["train_loss"] for e in h2["epochs"]]
    assert (e1["predictions"] == e2["predictions"]).all()


CHILD = textwrap.dedent("""
    import json, sys
    import numpy as np, torch
    from echoes.core import SeqData, verify_cache
    from echoes.data import _seq
    from echoes.models import create
    from echoes.train import evaluate, fit
    torch.set_num_threads(1)
    folder, mode = sys.argv[1], sys.argv[2]
    assert verify_cache(folder, finite=("features.npy",)) is None  # reusing a cache checks all of it
    X = np.load(folder + "/features.npy", mmap_mode="r"); n = len(X)
    y, L = np.arange(n) % 5, np.full(n, X.shape[1])
    cut = int(0.8 * n); tr = np.arange(cut)
    split = lambda idx: _seq(X, y, L, idx, [str(k) for k in range(5)], {})
    train, val, test = split(tr[tr % 7 != 0]), split(tr[tr % 7 == 0]), split(np.arange(cut, n))
    if mode == "copy":  # the old path: each split's rows copied into memory
        train, val = (SeqData(np.asarray(d.X), d.y, d.lengths, d.classes) for d in (train, val))
    esn = create("esn", X.shape[2], 5, hidden_size=32)
    fit(esn, train, val, batch_size=512, device="cpu")
    gru = create("gru", X.shape[2], 5, hidden_size=8)
    fit(gru, train, val, epochs=1, batch_size=512, device="cpu", progress=False)
    for m in (esn, gru): evaluate(m, test, batch_size=512, device="cpu")
    # VmHWM, this process's own peak: ru_maxrss would carry the parent's across the spawn's exec
    hwm = next(l for l in open("/proc/self/status") if l.startswith("VmHWM:"))
    print(json.dumps({"rss_mb": int(hwm.split()[1]) / 1024}))
""")


def _peak_rss(folder: Path, mode: str) -> float:
    r = subprocess.run([sys.executable, "-c", CHILD, str(folder), mode], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])["rss_mb"]


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmHWM from /proc")
def test_peak_rss_flat_in_n(tmp_path):
    T, D, n = 16, 128, 24_000  # 4 KB a clip: 94 MB at N, 375 MB at 4N
    sizes = {}
    for k in (1, 4):
        folder = tmp_path / f"cache{k}"; folder.mkdir()
        _cache(folder / "features.npy", k * n, T, D)
        arrays = array_manifest(folder, ["features.npy"], finite=("features.npy",))
        (folder / "meta.json").write_text(json.dumps({"arrays": arrays}))
        sizes[k] = (folder / "features.npy").stat().st_size / 2**20
    grown = sizes[4] - sizes[1]
    small, big = _peak_rss(tmp_path / "cache1", "inplace"), _peak_rss(tmp_path / "cache4", "inplace")
    copy = _peak_rss(tmp_path / "cache4", "copy")
    margin = 0.2 * grown  # a copy of the train split alone is ~0.7 of the growth
    assert copy - small > margin, (small, copy, grown)  # the control: this test sees a copy
    assert big - small < margin, (small, big, grown)
