"""Data-layer benchmark: each rate is printed beside its baseline, measured in the same run (medians of repeats).

1. Loader decode (echoes.data.decode_clip: decode, sample T frames, RGB, resize) against raw PyAV decode + RGB
   conversion (threads=1) of every frame of the same files, on clips as long as UCF101's (7 s at 25 fps).
   Target: ratio >= 0.9.
2. Reading a clip from the clip cache (memmap) against decoding it. Target: >= 20x.
3. Feature-cache read rate (clips/s) against an ESN-like state update (leaky tanh reservoir, 500 units) on
   the same features, on the CPU: the cache must not be the bottleneck.

Usage: python bench/data.py [--videos 24] [--frames-per-video 175] [--repeats 5] [--json]
"""
import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import av
import numpy as np
import torch


def make_videos(root: Path, n: int, frames: int) -> Path:
    "UCF101-layout XVID AVIs at 320x240 with moving content (so the codec has real work)."
    from echoes.data import write_avi, write_splits
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:240, 0:320]
    items = []
    for i in range(n):
        cls = f"Class{i % 4}"
        (root / cls).mkdir(parents=True, exist_ok=True)
        base = rng.integers(0, 255, (3,))
        vid = np.empty((frames, 240, 320, 3), np.uint8)
        for t in range(frames):
            wave = 127 + 100 * np.sin((xx + 4 * t) / 17.0 + i) * np.cos((yy - 3 * t) / 23.0)
            vid[t] = np.clip(wave[..., None] * 0.7 + base * 0.3, 0, 255)
        rel = f"{cls}/v_{cls}_g{i % 25 + 1:02d}_c01.avi"
        write_avi(root / rel, vid)
        items.append((rel, cls, i % 25 + 1))
    write_splits(root, items, [f"Class{k}" for k in range(4)])
    return root


def raw_decode(path) -> int:
    with av.open(str(path)) as c:
        return sum(f.to_ndarray(format="rgb24", threads=1).shape[0] > 0 for f in c.decode(video=0))


def med(fn, repeats):
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter(); fn(); ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def measure(a, tmp: Path) -> dict:
    "Build the videos and caches under `tmp` and time every path."
    os.environ["ECHOES_RUNS"] = str(tmp / "runs")
    from echoes.data import clip_cache, decode_clip, index
    from echoes.features import feature_cache

    root = make_videos(tmp / "ucf", a.videos, a.frames_per_video)
    ents = index(root, 1, "train") + index(root, 1, "test")
    files = [root / e["path"] for e in ents]
    n = len(files)
    raw_decode(files[0]); decode_clip(files[0], a.frames, a.size)  # warm up

    t_raw = med(lambda: [raw_decode(f) for f in files], a.repeats)
    t_loader = med(lambda: [decode_clip(f, a.frames, a.size) for f in files], a.repeats)
    t0 = time.perf_counter()
    cc = clip_cache(ents, root, a.frames, a.size, num_workers=a.workers, progress=False)
    t_build = time.perf_counter() - t0
    t_read = med(lambda: [np.array(cc.clips[i]) for i in range(n)], a.repeats)

    # features for the ESN comparison: the default pixels encoder (8x8 grey, D=64) on this cache
    fc = feature_cache(cc, "pixels", device="cpu")
    X = fc.features
    reps = max(1, 4096 // n)  # read the cache several times over, so the timings are not noise

    def read_feats():
        for _ in range(reps):
            for i in range(0, n, 64):
                torch.from_numpy(np.asarray(X[i:i + 64], np.float32))
    t_feat = med(read_feats, a.repeats)
    U = torch.from_numpy(np.asarray(X, np.float32)).repeat(reps, 1, 1)
    g = torch.Generator().manual_seed(0)
    N = 500
    Win = torch.rand(N, U.shape[2], generator=g) - 0.5
    W = torch.randn(N, N, generator=g) * 0.9 / N ** 0.5

    def esn():
        for i in range(0, len(U), 64):
            u = U[i:i + 64]; h = torch.zeros(len(u), N)
            for t in range(u.shape[1]):
                h = 0.7 * h + 0.3 * torch.tanh(u[:, t] @ Win.T + h @ W.T)
    t_esn = med(esn, a.repeats)

    src_frames = n * a.frames_per_video
    return {
        "videos": n, "video_frames": a.frames_per_video, "resolution": "320x240", "T": a.frames, "S": a.size,
        "raw_pyav_videos_per_s": n / t_raw, "raw_pyav_frames_per_s": src_frames / t_raw,
        "loader_videos_per_s": n / t_loader, "loader_vs_raw": t_raw / t_loader,
        "clip_cache_build_videos_per_s": n / t_build, "clip_cache_build_vs_raw": t_raw / t_build,
        "cache_read_clips_per_s": n / t_read, "cache_read_vs_decode": t_loader / t_read,
        "feature_read_clips_per_s": reps * n / t_feat, "esn_state_clips_per_s": reps * n / t_esn,
        "feature_read_vs_esn": t_esn / t_feat, "cpu_threads": torch.get_num_threads(), "cpus": os.cpu_count(),
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--videos", type=int, default=24)
    ap.add_argument("--frames-per-video", type=int, default=175, help="UCF101's clips average 7 s at 25 fps")
    ap.add_argument("--frames", type=int, default=16, help="T sampled per clip")
    ap.add_argument("--size", type=int, default=112, help="S of the clip cache")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--workers", type=int, default=None,
                    help="clip-cache build processes (default: auto, in-process for small jobs; a spawned pool "
                         "costs several seconds to start, since each worker imports torch)")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp(prefix="echoes-bench-"))
    try: out = measure(a, tmp)
    finally: shutil.rmtree(tmp, ignore_errors=True)  # videos and caches: tens of MB a run
    if a.json:
        print(json.dumps(out, indent=1))
        return
    o = out
    print(f"{o['videos']} videos x {a.frames_per_video} frames at 320x240 (XVID AVI), "
          f"clips of T={a.frames} at {a.size}x{a.size}; medians of {a.repeats}")
    print(f"{'measure':<44}{'rate':>14}   {'baseline':<40}{'ratio':>8}")
    raw = f"raw PyAV decode+RGB {o['raw_pyav_videos_per_s']:.1f} vid/s"
    rows = [
        ("loader decode_clip (1 process)", f"{o['loader_videos_per_s']:.1f} vid/s", raw, o["loader_vs_raw"],
         "target >= 0.9"),
        (f"clip cache build (workers={a.workers}, once)", f"{o['clip_cache_build_videos_per_s']:.1f} vid/s", raw,
         o["clip_cache_build_vs_raw"], ""),
        ("cached clip read (memmap)", f"{o['cache_read_clips_per_s']:.0f} clip/s",
         f"loader decode {o['loader_videos_per_s']:.1f} clip/s", o["cache_read_vs_decode"], "target >= 20x"),
        ("feature cache read (float16 -> f32)", f"{o['feature_read_clips_per_s']:.0f} clip/s",
         f"ESN states (500 units, CPU) {o['esn_state_clips_per_s']:.0f} clip/s", o["feature_read_vs_esn"],
         "cache/ESN, want > 1"),
    ]
    for name, rate, base, ratio, note in rows:
        print(f"{name:<44}{rate:>14}   {base:<40}{ratio:>7.1f}x  {note}")

if __name__ == "__main__":
    main()
