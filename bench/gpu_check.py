"""GPU checks for the models layer; prints one JSON summary line last.

1. ESN states with length masking, B=256, T=64, D=512, N=2000, bf16: eager, and `torch.compile(mode=
   "reduce-overhead", fullgraph=True)` compiled once for the shape. Baseline, from the same run and built the
   same way: the bare products, one drive GEMM and T steps of tanh(U[t] + h @ W^T), with no leak, mask or
   readout features. Targets: compiled within 1.5x of that baseline, and of 0.8 ms (H200).
2. A cuDNN LSTM training step, H=1024, B=64, T=64, D=512, bf16: our `LSTMClassifier` (padded run + gather,
   and packed) against a plain `nn.LSTM` + linear head on h_n. Target: ours <= 1.2x plain.

Imports only torch and echoes.esn / echoes.rnn (the GPU machine has no mlflow, av, papermill). Run from the
repository root: `python bench/gpu_check.py` (CUDA if present), `--device cpu` for a tiny smoke run (a few
seconds), `--skip-compile` to leave out the ~25 s compile. Must finish in < 3 minutes.
"""
import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, no install needed
from echoes.esn import SimpleESN, compiled_features
from echoes.rnn import LSTMClassifier


def timeit(fn, device, reps=20, warmup=3):
    "Median milliseconds of `fn()` over `reps` runs (CUDA-synchronised)."
    for _ in range(warmup): fn()
    ts = []
    for _ in range(reps):
        if device.type == "cuda": torch.cuda.synchronize()
        t0 = time.perf_counter(); fn()
        if device.type == "cuda": torch.cuda.synchronize()
        ts.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(ts)


def plain_products(x, W_in, b, W):
    "The baseline: the products an ESN state pass cannot avoid, and nothing else."
    T = x.shape[1]
    U = torch.addmm(b, x.transpose(0, 1).reshape(-1, x.shape[-1]), W_in.t()).view(T, x.shape[0], -1)
    h, W_T = U.new_zeros(U.shape[1:]), W.t()
    for t in range(T): h = torch.tanh(U[t] + h @ W_T)
    return h


def esn_check(device, dtype, tiny, compile_, reps):
    B, T, D, N = (8, 8, 16, 64) if tiny else (256, 64, 512, 2000)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, T, D, generator=g).to(device, dtype)
    lengths = torch.randint(T // 2, T + 1, (B,), generator=g).to(device)
    m = SimpleESN(D, 101, hidden_size=N, readout="both").to(device, dtype)
    res = m.reservoir
    out = {"shape": {"B": B, "T": T, "D": D, "N": N}, "dtype": str(dtype).removeprefix("torch."),
           "target_ms": 1.5 * 0.8}
    mats = (res.W_in, res.b, res.W)
    out["eager_ms"] = timeit(lambda: m.features(x, lengths), device, reps)
    out["eager_plain_ms"] = timeit(lambda: plain_products(x, *mats), device, reps)
    out["eager_over_plain"] = round(out["eager_ms"] / out["eager_plain_ms"], 3)
    ref = m.features(x, lengths).float()
    if compile_:
        t0 = time.perf_counter()
        last, mean = compiled_features(res, x, lengths, B)  # first call compiles (once for this shape)
        if device.type == "cuda": torch.cuda.synchronize()
        out["compile_s"] = round(time.perf_counter() - t0, 1)
        out["compiled_ms"] = timeit(lambda: compiled_features(res, x, lengths, B), device, reps)
        last, mean = compiled_features(res, x, lengths, B)
        out["max_abs_diff_compiled_vs_eager"] = float((torch.cat([last, mean], -1).float() - ref).abs().max())
        plain = torch.compile(plain_products, mode="reduce-overhead", fullgraph=True, dynamic=False)
        plain(x, *mats)
        out["compiled_plain_ms"] = timeit(lambda: plain(x, *mats), device, reps)
        out["compiled_over_plain"] = round(out["compiled_ms"] / out["compiled_plain_ms"], 3)
        out["compiled_within_target"] = out["compiled_ms"] <= out["target_ms"] and out["compiled_over_plain"] <= 1.5
    else:
        out["compiled_ms"] = None
    return out


def lstm_check(device, dtype, tiny, reps):
    B, T, D, H, C = (8, 8, 16, 32, 5) if tiny else (64, 64, 512, 1024, 101)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, T, D, generator=g).to(device, dtype)
    y = torch.randint(0, C, (B,), generator=g).to(device)
    lengths = torch.randint(T // 2, T + 1, (B,), generator=g).to(device)
    full = torch.full((B,), T, device=device)

    class Plain(nn.Module):  # the baseline: nn.LSTM, head on h_n, every sequence full length
        def __init__(self):
            super().__init__()
            self.rnn, self.head = nn.LSTM(D, H, batch_first=True), nn.Linear(H, C)
        def forward(self, x, lengths=None):
            return self.head(self.rnn(x)[1][0][-1])

    def step_fn(model, lens):
        model.to(device, dtype).train()
        opt = torch.optim.SGD(model.parameters(), lr=1e-3)
        def step():
            loss = nn.functional.cross_entropy(model(x, lens).float(), y)
            opt.zero_grad(set_to_none=True); loss.backward(); opt.step()
        return step

    out = {"shape": {"B": B, "T": T, "D": D, "H": H}, "dtype": str(dtype).removeprefix("torch.")}
    out["plain_ms"] = timeit(step_fn(Plain(), None), device, reps)
    out["ours_padded_ms"] = timeit(step_fn(LSTMClassifier(D, C, H), lengths), device, reps)
    out["ours_padded_full_length_ms"] = timeit(step_fn(LSTMClassifier(D, C, H), full), device, reps)
    out["ours_packed_ms"] = timeit(step_fn(LSTMClassifier(D, C, H, packed=True), lengths), device, reps)
    out["ours_over_plain"] = round(out["ours_padded_ms"] / out["plain_ms"], 3)
    out["packed_over_padded"] = round(out["ours_packed_ms"] / out["ours_padded_ms"], 3)
    out["within_target"] = out["ours_over_plain"] <= 1.2
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--skip-compile", action="store_true")
    p.add_argument("--reps", type=int, default=None)
    a = p.parse_args(argv)
    device = torch.device(a.device)
    tiny = device.type != "cuda"
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    reps = a.reps or (3 if tiny else 30)
    if device.type == "cuda": torch.backends.cudnn.benchmark = True
    else: torch.set_num_threads(1)  # the tiny smoke run: threads only add sync on a shared machine
    t0 = time.perf_counter()
    summary = {"device": device.type, "name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               "torch": torch.__version__, "tiny": tiny}
    summary["lstm"] = lstm_check(device, dtype, tiny, reps)
    print("lstm:", json.dumps(summary["lstm"]), file=sys.stderr, flush=True)
    # compiling on the CPU needs a C++ toolchain and proves nothing about CUDA graphs: CUDA only
    summary["esn"] = esn_check(device, dtype, tiny, compile_=device.type == "cuda" and not a.skip_compile, reps=reps)
    summary["wall_s"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
