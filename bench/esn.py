"""ESN benchmarks, each against its baseline in the same run (medians of repeats, ratios).

(a) echoes vs ReservoirPy, fed the same W, W_in, bias and leak: states agree (max |delta| <= 1e-5, float32)
    and so do predictions; time to compute readout features (last + mean state) of 2,000 sequences x 100
    steps x 64 features with 1,000 units, float32, same thread count. Target: echoes >= 4x faster.
    The CPU state pass takes the sparse (scipy CSR) recurrent product at density <= 0.12 (echoes.esn.sparse_W);
    the dense path (Reservoir.sparse = False) is timed too, in the same rounds.
(b) GEMM bound: the echoes state pass against the same matrix products alone (the input GEMM plus T
    recurrent products per chunk, no tanh, no leak, no masking), of the kind the pass uses: CSR products for
    the sparse path, dense addmm for the dense one; both baselines are printed. Target: <= 1.5x.
All contenders run round-robin, one repeat of each per round, so the load of a shared machine hits them
alike; the numbers are medians over rounds.
(c) Memory: a closed-form fit (features + streaming ridge statistics + lambda on validation) on 10,000 vs
    1,000 synthetic sequences, each in a fresh subprocess; peak RSS. Target: within 10%.

Usage: python bench/esn.py [--threads 1] [--repeats 3] [--quick]
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path


def _args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1,
                   help="threads for torch and numpy's BLAS alike (default 1: stable on a shared machine)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="smaller sizes, for a smoke test")
    p.add_argument("--mem-child", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--json", action="store_true", help="print only the JSON summary")
    return p.parse_args(argv)


ARGS = _args()
for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ[k] = str(ARGS.threads)  # before numpy/torch load their BLAS

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from echoes.esn import SimpleESN, _csr_matvecs  # noqa: E402

torch.set_num_threads(ARGS.threads)


def interleaved(fns: dict, repeats: int) -> dict:
    "Time each of `fns` once per round for `repeats` rounds: name -> (median seconds, all runs)."
    ts = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter(); fn(); ts[k].append(time.perf_counter() - t0)
    return {k: (statistics.median(v), v) for k, v in ts.items()}


def rss_mb():
    "This process's peak RSS in MiB: VmHWM (ru_maxrss would carry the parent's peak across fork+exec on Linux)."
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"): return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---------------------------------------------------------------- (a) ReservoirPy, (b) GEMM bound
def bench_states(n, T, D, N, repeats):
    import scipy.sparse as sp
    from reservoirpy.nodes import Reservoir as RpyReservoir

    g = np.random.default_rng(0)
    u = g.normal(size=(n, T, D)).astype(np.float32)
    y = (u[:, :T // 2].mean((1, 2)) > u[:, T // 2:].mean((1, 2))).astype(np.int64) + 2 * (u[:, -1, 0] > 0)
    esn = SimpleESN(D, 4, hidden_size=N, leak=0.3, spectral_radius=0.9, density=0.1, readout="both", seed=0)
    res = esn.reservoir
    x = torch.from_numpy(u)
    W, Win, b = res.W.numpy().astype(np.float64), res.W_in.numpy().astype(np.float64), res.b.numpy().astype(np.float64)

    def rpy_node(fmt):
        Wm = sp.csr_matrix(W) if fmt == "csr" else W
        return RpyReservoir(units=N, lr=res.leak, W=Wm, Win=Win, bias=b, input_dim=D)

    def rpy_features(node, batch=100):
        # run in slices so all states (n x T x N float64) never sit in memory at once; each sequence starts at 0
        out = []
        for i in range(0, n, batch):
            if getattr(node, "initialized", False): node.reset()
            s = np.asarray(node.run(u[i:i + batch]))
            out.append(np.concatenate([s[:, -1], s.mean(1)], 1))
        return np.concatenate(out)

    # correctness: all states of a few sequences (both of our paths), and predictions of one readout on both
    node = rpy_node("csr")
    node.run(u[:1]); node.reset()
    s_rpy = np.asarray(node.run(u[:16]))
    assert res.csr() is not None, "the benchmark's reservoir should take the sparse path"
    s_sparse = res.run(x[:16]).numpy()
    res.sparse = False; s_dense = res.run(x[:16]).numpy(); res.sparse = "auto"
    deltas = {"sparse_vs_reservoirpy": float(np.abs(s_rpy - s_sparse).max()),
              "dense_vs_reservoirpy": float(np.abs(s_rpy - s_dense).max()),
              "sparse_vs_dense": float(np.abs(s_sparse - s_dense).max())}

    def ours(mode):
        def fn():
            res.sparse = mode
            try: return esn.features(x)
            finally: res.sparse = "auto"
        return fn

    # choose ReservoirPy's faster storage for W (its own initialisers make CSR) on a slice, then time it whole
    probe = {}
    for fmt in ("csr", "dense"):
        nd = rpy_node(fmt); nd.run(u[:1]); nd.reset()
        t0 = time.perf_counter(); nd.run(u[:20]); probe[fmt] = time.perf_counter() - t0
    fmt = min(probe, key=probe.get)
    f_rpy = {}

    def rpy():
        f_rpy["f"] = rpy_features(rpy_node(fmt))

    # (b) the same products alone, in the same chunks as features(): input GEMM + T recurrent products
    step = esn._chunks(n, T, N)
    W_T, A = res.W.t(), res.csr()

    def products(kind):
        def fn():
            for i in range(0, n, step):
                U = res.drive(x[i:i + step])
                B = U.shape[1]
                if kind == "dense":
                    h = torch.zeros(B, N); out = torch.empty_like(h)
                    for t in range(T):
                        torch.addmm(U[t], h, W_T, out=out)
                        h, out = out, h
                else:  # the (N, B) layout of the sparse pass: y += W x into a preallocated buffer
                    h = np.zeros(N * B, np.float32); out = np.empty_like(h)
                    for _ in range(T):
                        out.fill(0)  # stands in for the pass's "+ U_t" (its own copy counts as pass overhead)
                        _csr_matvecs(N, N, B, A.indptr, A.indices, A.data, h, out)
                        h, out = out, h
        return fn

    fns = {"echoes_sparse": ours("auto"), "echoes_dense": ours(False), "gemm_sparse": products("sparse"),
           "gemm_dense": products("dense"), "reservoirpy": rpy}
    tm = interleaved(fns, repeats)
    med = {k: v[0] for k, v in tm.items()}

    f_ours = esn.features(x)
    info = esn.fit_readout([(x, torch.full((n,), T), torch.from_numpy(y))], ridge=1e-4)
    with torch.no_grad():
        p_ours = esn.readout(f_ours).argmax(1).numpy()
        p_rpy = esn.readout(torch.from_numpy(f_rpy["f"]).float()).argmax(1).numpy()
    feat_delta = float(np.abs(f_rpy["f"] - f_ours.double().numpy()).max())
    return {
        "shape": {"sequences": n, "steps": T, "features": D, "units": N, "density": res.density, "dtype": "float32",
                  "threads": ARGS.threads, "chunk": step, "rounds": repeats},
        "max_abs_state_delta": max(deltas["sparse_vs_reservoirpy"], deltas["dense_vs_reservoirpy"]),
        "state_deltas": deltas, "max_abs_feature_delta": feat_delta,
        "prediction_agreement": float((p_ours == p_rpy).mean()), "readout_train_ridge": info["ridge"],
        "reservoirpy_W_format": fmt, "reservoirpy_probe_s": probe,
        "echoes_s": med["echoes_sparse"], "echoes_dense_s": med["echoes_dense"], "reservoirpy_s": med["reservoirpy"],
        "speedup_vs_reservoirpy": med["reservoirpy"] / med["echoes_sparse"],
        "speedup_dense_vs_reservoirpy": med["reservoirpy"] / med["echoes_dense"],
        "sparse_over_dense_pass": med["echoes_dense"] / med["echoes_sparse"],
        "gemm_only_s": med["gemm_sparse"], "gemm_dense_only_s": med["gemm_dense"],
        "ratio_to_gemm_bound": med["echoes_sparse"] / med["gemm_sparse"],
        "ratio_dense_to_dense_gemm_bound": med["echoes_dense"] / med["gemm_dense"],
        "ratio_sparse_pass_to_dense_gemm_bound": med["echoes_sparse"] / med["gemm_dense"],
        "runs": {k: v[1] for k, v in tm.items()},
    }


# ---------------------------------------------------------------- (c) memory, one fit per fresh process
def mem_child(n_train):
    T, D, N, C, bs, n_val = 50, 64, 500, 10, 250, 500
    base = rss_mb()
    esn = SimpleESN(D, C, hidden_size=N, readout="both", seed=0)

    def batches(count, seed):
        def gen():  # synthetic batches made on the fly: the data never sits in memory whole
            for i in range(0, count, bs):
                g = torch.Generator().manual_seed(seed * 1_000_003 + i)
                b = min(bs, count - i)
                x = torch.randn(b, T, D, generator=g)
                lengths = torch.randint(T // 2, T + 1, (b,), generator=g)
                y = torch.randint(0, C, (b,), generator=g)
                yield x, lengths, y
        return gen
    t0 = time.perf_counter()
    info = esn.fit_readout(batches(n_train, 1), batches(n_val, 2))
    print(json.dumps({"n_train": n_train, "peak_rss_mb": rss_mb(), "rss_after_setup_mb": base,
                      "fit_s": time.perf_counter() - t0, "n_seen": info["n_train"]}))


def bench_memory(sizes):
    out = {}
    for n in sizes:
        r = subprocess.run([sys.executable, __file__, "--mem-child", str(n), "--threads", str(ARGS.threads)],
                           capture_output=True, text=True, check=True)
        out[n] = json.loads(r.stdout.strip().splitlines()[-1])
    small, big = out[sizes[0]]["peak_rss_mb"], out[sizes[1]]["peak_rss_mb"]
    grow = {n: out[n]["peak_rss_mb"] - out[n]["rss_after_setup_mb"] for n in sizes}
    return {"runs": out, "peak_ratio_big_over_small": big / small, "fit_growth_mb": grow}


def main():
    if ARGS.mem_child is not None:
        return mem_child(ARGS.mem_child)
    n, T, D, N = (200, 50, 64, 300) if ARGS.quick else (2000, 100, 64, 1000)
    t0 = time.perf_counter()
    memory = bench_memory((100, 1000) if ARGS.quick else (1000, 10000))
    states = bench_states(n, T, D, N, ARGS.repeats)
    summary = {"states": states, "memory": memory, "wall_s": time.perf_counter() - t0, "torch": torch.__version__}
    if not ARGS.json:
        s, m = states, memory
        print(f"ESN benchmarks, {s['shape']}")
        d = s["state_deltas"]
        print(f"(a) states vs ReservoirPy ({s['reservoirpy_W_format']} W): "
              f"max |Δstate| sparse {d['sparse_vs_reservoirpy']:.2e}, "
              f"dense {d['dense_vs_reservoirpy']:.2e}, sparse vs dense {d['sparse_vs_dense']:.2e} (target <= 1e-5), "
              f"prediction agreement {100 * s['prediction_agreement']:.2f}%")
        print(f"    medians of {s['shape']['rounds']} interleaved rounds: echoes (sparse W) {s['echoes_s']:.2f} s   "
              f"echoes (dense W) {s['echoes_dense_s']:.2f} s   ReservoirPy {s['reservoirpy_s']:.2f} s")
        print(f"    speedup {s['speedup_vs_reservoirpy']:.2f}x sparse, {s['speedup_dense_vs_reservoirpy']:.2f}x dense "
              f"(target >= 4x); sparse pass {s['sparse_over_dense_pass']:.2f}x faster than dense")
        print(f"(b) products alone: sparse {s['gemm_only_s']:.2f} s   dense {s['gemm_dense_only_s']:.2f} s")
        print(f"    sparse pass / sparse products {s['ratio_to_gemm_bound']:.2f}x (target <= 1.5x)   "
              f"dense pass / dense products {s['ratio_dense_to_dense_gemm_bound']:.2f}x   "
              f"sparse pass / dense products {s['ratio_sparse_pass_to_dense_gemm_bound']:.2f}x")
        ks = sorted(m["runs"], key=int)
        print(f"(c) closed-form fit peak RSS: {ks[0]} seqs {m['runs'][ks[0]]['peak_rss_mb']:.0f} MiB   "
              f"{ks[1]} seqs {m['runs'][ks[1]]['peak_rss_mb']:.0f} MiB   "
              f"ratio {m['peak_ratio_big_over_small']:.3f} (target <= 1.10); growth during the fit "
              f"{m['fit_growth_mb'][int(ks[0])]:.0f} vs {m['fit_growth_mb'][int(ks[1])]:.0f} MiB")
    print(json.dumps(summary, default=str))


if __name__ == "__main__":
    main()
