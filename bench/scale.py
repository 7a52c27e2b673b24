"""Scale benchmark: every stage of the pipeline on N clips, each in its own process; rate, peak RSS, time at 13,320.

Each stage's rate, its peak RSS and its time extrapolated linearly to UCF101's 13,320 clips, on a generated
UCF101-shaped dataset of `--clips` clips (or the dataset in `--root`).

Stages, in order (each a fresh `python bench/scale.py --stage NAME` process, so its peak RSS is its own):
  decode     echoes.data.clip_cache: decode, sample T frames, resize to S (the clip cache)
  encode     echoes.features.feature_cache over that clip cache (the feature cache)
  cache      the `echoes data cache` command (decode + encode as the CLI does it), into a fresh runs folder
  esn_fit    echoes.train.fit of the default ESN on the train split (echoes.data.load from the caches, untimed)
  gru_epoch  one epoch of the default GRU (echoes.train.fit, epochs=1)
  eval_esn   echoes.train.evaluate of the fitted ESN on the test split
  eval_gru   the same for the GRU
Baselines, measured in the same run on `--baseline-clips` of the same videos (medians of `--repeats`):
  raw_pyav   PyAV decode + RGB conversion (threads=1) of every frame, no sampling or resizing (bench/data.py's
             `raw_decode`), in as many processes as the clip cache uses for a large job (min(cpus, 8))
  resnet18   a bare torchvision ResNet-18 forward (no weights, eval, no_grad, float32 channels_last) over as many
             frames as those clips give (clips x T) at S x S, in batches of the encoder's `batch_frames`
Ratios are a stage's rate over its baseline's: decode against raw_pyav (clips/s), encode against resnet18
(frames/s), cache against both run one after the other. frames/s counts source-video frames for decoding and
T frames per clip after it. Peak RSS is each process's VmHWM (ru_maxrss would carry the parent's peak across
the spawn). The extrapolation is the stage's wall time x 13,320 / N (train and test splits scale alike).

Usage: python bench/scale.py [--clips 1000] [--seconds 3 11] [--root DIR] [--encoder resnet18] [--frames 16]
       [--size 112] [--device auto] [--baseline-clips 256] [--repeats 3] [--keep DIR] [--json | --markdown]
"""
import argparse
import contextlib
import functools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

UCF101_CLIPS = 13_320
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
STAGES = ("raw_pyav", "resnet18", "decode", "encode", "cache", "esn_fit", "gru_epoch", "eval_esn", "eval_gru")
BASELINE = {"decode": ("raw_pyav",), "encode": ("resnet18",), "cache": ("raw_pyav", "resnet18")}


def _args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clips", type=int, default=1000, help="clips to generate (UCF101-shaped; default %(default)s)")
    p.add_argument("--classes", type=int, default=None,
                   help="classes of the generated set (default: min(101, clips // 4))")
    p.add_argument("--seconds", type=float, nargs="+", default=[3.0, 11.0],
                   help="clip length in seconds: one value, or a range LO HI (default: UCF101's 3 11)")
    p.add_argument("--root", type=Path, default=None,
                   help="take this dataset (any echoes layout) instead of generating one")
    p.add_argument("--encoder", default="resnet18"); p.add_argument("--frames", type=int, default=16)
    p.add_argument("--size", type=int, default=112, help="S of the clip cache (default %(default)s)")
    p.add_argument("--device", default="auto", help="for encoding, training and evaluation (default: auto)")
    p.add_argument("--baseline-clips", type=int, default=256,
                   help="clips the baselines run on (0: all; default %(default)s)")
    p.add_argument("--repeats", type=int, default=3, help="repeats of each baseline (medians; default %(default)s)")
    p.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES), help="run only these (default: all)")
    p.add_argument("--keep", type=Path, default=None, help="work in this folder and keep it (default: a temporary one)")
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    p.add_argument("--markdown", action="store_true", help="print the table as Markdown (for the README)")
    p.add_argument("--stage", choices=STAGES, default=None, help=argparse.SUPPRESS)  # a child: run this stage
    p.add_argument("--work", type=Path, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def peak_rss_mb() -> float:
    "This process's own peak RSS in MiB (VmHWM; ru_maxrss where /proc is missing)."
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"): return int(line.split()[1]) / 1024
    except OSError: pass
    import resource
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 2**20 if sys.platform == "darwin" else kb / 1024


@functools.cache
def _bench_data():
    "bench/data.py as a module: its raw PyAV decode is this benchmark's decode baseline too."
    import importlib.util
    spec = importlib.util.spec_from_file_location("bench_data", HERE / "data.py")
    mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
    return mod


def _raw_job(path: str) -> int:
    return _bench_data().raw_decode(path)


def _entries(root: Path):
    "The train + test clips of fold 1 and their videos folder, through the public index."
    from echoes.data import LAYOUTS, index, layout_of
    name = layout_of(root)
    return index(root, 1, "train", dataset=name) + index(root, 1, "test", dataset=name), LAYOUTS[name].videos(root)


def _sample(files: list, k: int) -> list:
    "`k` of `files`, evenly spaced (all of them when k is 0 or more than there are)."
    return files if not k or k >= len(files) else [files[round(i * (len(files) - 1) / (k - 1 or 1))] for i in range(k)]


def _source_frames(files) -> int:
    "Frames in the videos, from their stream headers."
    import av
    n = 0
    for f in files:
        with av.open(str(f)) as c:
            s = c.streams.video[0]
            n += s.frames or (round(float(s.duration * s.time_base * s.average_rate)) if s.duration else 0)
    return n


def _median(fn, repeats: int) -> float:
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter(); fn(); ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


# ---------------------------------------------------------------- stages (each runs in a child process)
def stage_raw_pyav(a, root: Path) -> dict:
    import multiprocessing as mp
    ents, vids = _entries(root)
    files = [str(vids / e["path"]) for e in _sample(ents, a.baseline_clips)]
    workers = min(os.cpu_count() or 1, 8)
    with mp.get_context("spawn").Pool(workers) as pool:
        pool.map(_raw_job, files[:workers])  # start and warm the workers: the clip cache's pool is not timed warm
        frames = []
        wall = _median(lambda: frames.append(sum(pool.map(_raw_job, files, chunksize=1))), a.repeats)
    return {"clips": len(files), "frames": frames[-1], "wall_s": wall, "workers": workers}


def stage_resnet18(a, root: Path) -> dict:
    import inspect

    import torch
    import torchvision

    from echoes.core import get_device
    from echoes.features import feature_cache
    ents, _ = _entries(root)
    clips = len(_sample(ents, a.baseline_clips)); frames = clips * a.frames
    p = inspect.signature(feature_cache).parameters.get("batch_frames")
    batch = p.default if p is not None and isinstance(p.default, int) else 2048
    batch = max(a.frames, batch // a.frames * a.frames)  # whole clips per batch, as the encoder takes them
    dev = get_device(a.device)
    net = torchvision.models.resnet18(weights=None).eval().to(dev).to(memory_format=torch.channels_last)
    x = torch.rand(batch, 3, a.size, a.size, device=dev).contiguous(memory_format=torch.channels_last)

    @torch.no_grad()
    def run():
        for i in range(0, frames, batch):
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dev.type == "cuda"):
                net(x[:min(batch, frames - i)])
        if dev.type == "cuda": torch.cuda.synchronize(dev)
    run() if dev.type == "cuda" else net(x[:2])  # warm-up (cuDNN autotuning on a GPU)
    return {"clips": clips, "frames": frames, "wall_s": _median(run, a.repeats), "batch_frames": batch,
            "device": str(dev)}


def stage_decode(a, root: Path) -> dict:
    from echoes.data import clip_cache
    ents, vids = _entries(root)
    t0 = time.perf_counter()
    cc = clip_cache(ents, vids, a.frames, a.size, progress=False)
    wall = time.perf_counter() - t0
    return {"clips": int(cc.ok.sum()), "frames": _source_frames(vids / e["path"] for e in ents), "wall_s": wall,
            "skipped": len(cc.skipped)}


def stage_encode(a, root: Path) -> dict:
    from echoes.data import clip_cache
    from echoes.features import feature_cache
    ents, vids = _entries(root)
    cc = clip_cache(ents, vids, a.frames, a.size, progress=False)  # built by the decode stage: opened, not rebuilt
    t0 = time.perf_counter()
    fc = feature_cache(cc, a.encoder, device=a.device)
    wall = time.perf_counter() - t0
    return {"clips": int(cc.ok.sum()), "frames": int(cc.ok.sum()) * a.frames, "wall_s": wall,
            "feature_shape": list(fc.features.shape)}


def stage_cache(a, root: Path) -> dict:
    import io

    from echoes.cli import main
    os.environ["ECHOES_RUNS"] = str(a.work / "runs-cli")  # its own caches: the command builds them from scratch
    out = io.StringIO()
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(out):
        rc = main(["data", "cache", "--root", str(root), "--frames", str(a.frames), "--size", str(a.size),
                   "--encoder", a.encoder, "--json"])
    wall = time.perf_counter() - t0
    if rc: raise RuntimeError(f"echoes data cache exited {rc}")
    r = json.loads(out.getvalue().strip().splitlines()[-1])
    return {"clips": r["clips"], "frames": r["clips"] * a.frames, "wall_s": wall}


def _splits(a, root: Path):
    "The splits through `load`, which finds the caches the decode and encode stages built (else builds them)."
    from echoes.data import layout_of, load
    feats = Path(os.environ["ECHOES_RUNS"]) / "cache" / "features"
    if not any(feats.glob("*/meta.json")):
        NOTES.append("built the caches itself (no decode/encode stage ran here): its peak RSS includes encoding")
    return load(layout_of(root), root, frames=a.frames, frame_size=a.size, encoder=a.encoder, device=a.device,
                progress=False)


def _fit(a, root: Path, model: str, **kw) -> dict:
    import torch

    from echoes.models import create
    from echoes.train import fit
    s = _splits(a, root)
    m = create(model, s.train.input_size, len(s.classes))
    t0 = time.perf_counter()
    h = fit(m, s.train, s.val, device=a.device, progress=False, **kw)
    wall = time.perf_counter() - t0
    torch.save(m, a.work / f"{model}.pt")
    steps = int(s.train.lengths.sum())
    return {"clips": len(s.train), "frames": steps, "wall_s": wall, "train_clips": len(s.train),
            "val_clips": 0 if s.val is None else len(s.val), "closed_form": bool(h.get("closed_form"))}


def _eval(a, root: Path, model: str) -> dict:
    import torch

    from echoes.train import evaluate
    if not (a.work / f"{model}.pt").exists():
        raise FileNotFoundError(f"{a.work / model}.pt: no fitted {model}; run its fit stage first (same --keep folder)")
    s = _splits(a, root)
    m = torch.load(a.work / f"{model}.pt", weights_only=False)
    t0 = time.perf_counter()
    r = evaluate(m, s.test, device=a.device)
    wall = time.perf_counter() - t0
    return {"clips": len(s.test), "frames": int(s.test.lengths.sum()), "wall_s": wall, "accuracy": r["accuracy"]}


STAGE_FNS = {"raw_pyav": stage_raw_pyav, "resnet18": stage_resnet18, "decode": stage_decode, "encode": stage_encode,
             "cache": stage_cache, "esn_fit": lambda a, r: _fit(a, r, "esn"),
             "gru_epoch": lambda a, r: _fit(a, r, "gru", epochs=1), "eval_esn": lambda a, r: _eval(a, r, "esn"),
             "eval_gru": lambda a, r: _eval(a, r, "gru")}


NOTES: list[str] = []  # what a reader of a stage's row must know


def child(a) -> None:
    "Run stage `a.stage` and print its measurements as the last line of stdout."
    os.environ.setdefault("ECHOES_RUNS", str(a.work / "runs"))
    root = Path((a.work / "root.txt").read_text())
    r = STAGE_FNS[a.stage](a, root)
    print(json.dumps({"stage": a.stage, **r, "rss_mb": peak_rss_mb(), **({"note": NOTES[0]} if NOTES else {})}))


# ---------------------------------------------------------------- the parent: data, children, table
def dataset(a, work: Path) -> Path:
    "The dataset to run on: `--root`, or a UCF101-shaped one of `--clips` clips generated under `work`."
    if a.root: return a.root.resolve()
    from echoes.data import synth_ucf101
    classes = a.classes or max(1, min(101, a.clips // 4))  # >= 4 clips a class: groups for train, test and val
    per = max(4, round(a.clips / classes))
    lo, hi = (a.seconds * 2)[:2]
    root, t0 = work / "ucf", time.perf_counter()
    with contextlib.suppress(OSError, ValueError, KeyError):  # a kept folder's dataset, when it is the one asked for
        m = json.loads((root / "synthetic.json").read_text())
        if (m["classes"], m["clips_per_class"], m["seconds"]) == (classes, per, [lo, hi]): return root
    synth_ucf101(root, classes=classes, clips_per_class=per, seconds=(lo, hi))
    print(f"generated {classes} x {per} clips of {lo:g}-{hi:g} s at 320x240 in {time.perf_counter() - t0:.0f} s",
          file=sys.stderr)
    return root


def run_stage(a, name: str, work: Path) -> dict:
    argv = [sys.executable, str(Path(__file__).resolve()), "--stage", name, "--work", str(work),
            "--encoder", a.encoder, "--frames", str(a.frames), "--size", str(a.size), "--device", a.device,
            "--baseline-clips", str(a.baseline_clips), "--repeats", str(a.repeats)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")])}
    env.pop("ECHOES_RUNS", None)
    t0 = time.perf_counter()
    p = subprocess.run(argv, capture_output=True, text=True, env=env)
    if p.returncode: raise RuntimeError(f"stage {name} failed (exit {p.returncode}):\n{p.stderr[-4000:]}")
    r = json.loads(p.stdout.strip().splitlines()[-1])
    r["process_s"] = time.perf_counter() - t0
    return r


def finish(rows: list[dict], n: int) -> list[dict]:
    "Rates, the extrapolation to 13,320 clips and the ratio against each stage's baseline."
    by = {r["stage"]: r for r in rows}
    for r in rows:
        r["clips_per_s"] = r["clips"] / r["wall_s"]; r["frames_per_s"] = r["frames"] / r["wall_s"]
        per_clip = r["wall_s"] / max(1, r["clips"]) if r["stage"] in ("raw_pyav", "resnet18") else r["wall_s"] / n
        r["ucf101_s"] = per_clip * UCF101_CLIPS
        base = [by[b] for b in BASELINE.get(r["stage"], ()) if b in by]
        if base and len(base) == len(BASELINE[r["stage"]]):
            r["baseline"] = " + ".join(b["stage"] for b in base)
            r["ratio"] = sum(b["wall_s"] / max(1, b["clips"]) for b in base) / (r["wall_s"] / max(1, r["clips"]))
    return rows


def _hms(s: float) -> str:
    s = round(s); return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


COLUMNS = ("stage", "clips", "wall s", "clips/s", "frames/s", "peak RSS MB", "@13,320", "vs baseline")


def table(rows: list[dict], n: int, a, markdown: bool = False) -> str:
    base = next((r["clips"] for r in rows if r["stage"] in ("raw_pyav", "resnet18")), None)
    dev = next((f" ({r['device']})" for r in rows if "device" in r), "")
    head = (f"{n} clips, T={a.frames} at {a.size}x{a.size}, encoder {a.encoder}, device {a.device}{dev}, "
            f"{os.cpu_count()} cpus; " + (f"baselines on {base} of the same clips, medians of {a.repeats}"
                                          if base else "no baselines"))
    cells = [[r["stage"], str(r["clips"]), f"{r['wall_s']:.1f}", f"{r['clips_per_s']:.1f}", f"{r['frames_per_s']:.0f}",
              f"{r['rss_mb']:.0f}", _hms(r["ucf101_s"]), f"{r['ratio']:.2f}x {r['baseline']}" if "ratio" in r else ""]
             for r in rows]
    notes = [f"{r['stage']}: {r['note']}" for r in rows if "note" in r]
    if markdown:
        return "\n".join([head, "", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS),
                          *("| " + " | ".join(c) + " |" for c in cells), *(["", *notes] if notes else [])])
    w = [max(len(x) for x in col) for col in zip(COLUMNS, *cells)]
    fmt = lambda c: "  ".join(x.ljust(k) if i in (0, 7) else x.rjust(k) for i, (x, k) in enumerate(zip(c, w))).rstrip()
    return "\n".join([head, fmt(COLUMNS), *map(fmt, cells), *notes])


def main(argv=None):
    a = _args(argv)
    if a.stage: return child(a)
    if len(a.seconds) > 2 or not 0 < min(a.seconds) or a.clips < 1:
        raise SystemExit("--seconds takes one length or a range LO HI of positive seconds; --clips must be >= 1")
    work = Path(a.keep or tempfile.mkdtemp(prefix="echoes-scale-")).resolve(); work.mkdir(parents=True, exist_ok=True)
    try:
        root = dataset(a, work)
        (work / "root.txt").write_text(str(root))
        for stage, runs in (("decode", "runs"), ("cache", "runs-cli")):  # a kept folder's caches: timed as new
            if stage in a.stages: shutil.rmtree(work / runs, ignore_errors=True)
        rows = []
        for name in (s for s in STAGES if s in a.stages):
            rows.append(run_stage(a, name, work))
            print(f"{name}: {rows[-1]['wall_s']:.1f} s, peak RSS {rows[-1]['rss_mb']:.0f} MB", file=sys.stderr)
        n = next((r["clips"] for r in rows if r["stage"] in ("decode", "cache")), None) or len(_entries(root)[0])
        rows = finish(rows, n)
        print(json.dumps(rows, indent=1) if a.json else table(rows, n, a, a.markdown))
    finally:
        if not a.keep: shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
