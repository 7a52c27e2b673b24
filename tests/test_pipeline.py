"""Decoding and encoding in one pass (`echoes.data.caches`): the same caches as decoding then encoding, memory flat
in N (peak RSS of a child process), a SIGKILLed build that resumes, bad videos skipped with the rest intact."""
import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from echoes.data import caches, clip_cache, index, synth
from echoes.features import encode, feature_cache, get_encoder


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    "3 classes x 10 clips of 12 frames at 32x32, UCF101 layout."
    return synth(tmp_path_factory.mktemp("pipe") / "ds", classes=3, clips_per_class=10, frames=12, size=32, seed=3)


def entries(root: Path) -> list[dict]:
    return index(root, 1, "train") + index(root, 1, "test")


@contextlib.contextmanager
def echoes_log():
    "The messages the echoes logger emits inside the block (it does not propagate to pytest's capture)."
    logs, handler = [], logging.Handler()
    handler.emit = lambda r: logs.append(r.getMessage())
    logging.getLogger("echoes").addHandler(handler)
    try:
        yield logs
    finally:
        logging.getLogger("echoes").removeHandler(handler)


def in_runs(path: Path, fn):
    "`fn()` with ECHOES_RUNS at `path`: a build that shares no cache with the others."
    old = os.environ["ECHOES_RUNS"]
    os.environ["ECHOES_RUNS"] = str(path)
    try:
        return fn()
    finally:
        os.environ["ECHOES_RUNS"] = old


# ---------------------------------------------------------------- (a) one pass == decode, then encode

@pytest.mark.parametrize("encoder, opts", [("randconv", {"width": 16}), ("resnet18", {"size": 32})])
def test_one_pass_equals_decode_then_encode(ds, runs, tmp_path, encoder, opts):
    ents = entries(ds)
    cc, fc = caches(ents, ds, 8, 24, encoder, device="cpu", batch_frames=24, num_workers=2, encoder_opts=opts)
    assert fc.meta["encode"]["streamed"] == len(ents) and fc.meta["decode"]["workers"] == 2  # overlapped, in a pool
    enc = get_encoder(encoder, **opts)

    def separately():
        c = clip_cache(ents, ds, 8, 24, num_workers=0)
        return c, feature_cache(c, enc, device="cpu", batch_frames=64)
    cc2, fc2 = in_runs(tmp_path / "separate", separately)
    assert (cc2.key, fc2.key) == (cc.key, fc.key) and fc2.meta["encode"]["streamed"] == 0
    np.testing.assert_array_equal(np.asarray(cc.clips), np.asarray(cc2.clips))
    np.testing.assert_array_equal(cc.lengths, cc2.lengths)
    np.testing.assert_array_equal(np.asarray(fc.features), np.asarray(fc2.features))
    # and the old path: the whole clip array through `encode` at once
    np.testing.assert_array_equal(np.asarray(fc.features), encode(np.asarray(cc2.clips), enc, "cpu", 2048))
    assert fc.meta["arrays"] == fc2.meta["arrays"] and cc.meta["arrays"] == cc2.meta["arrays"]


def test_clip_cache_built_first_is_streamed_through(ds, runs):
    ents = entries(ds)
    cc = clip_cache(ents, ds, 8, 24, num_workers=0)
    cc2, fc = caches(ents, ds, 8, 24, "pixels", device="cpu", batch_frames=40)
    assert cc2.path == cc.path and fc.meta["encode"]["streamed"] == 0 and fc.meta["encode"]["clips"] == len(ents)
    assert fc.meta["encode"]["batch_frames"] == 40
    np.testing.assert_array_equal(np.asarray(fc.features), encode(np.asarray(cc.clips), get_encoder("pixels"), "cpu"))


# ---------------------------------------------------------------- (b) peak RSS does not grow with N

CHILD = textwrap.dedent("""
    import json, resource, sys
    from pathlib import Path
    from echoes.data import caches, index
    from echoes.features import feature_cache
    root, size, mode = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    ents = index(root, 1, "train") + index(root, 1, "test")
    cc, fc = caches(ents, root, 16, size, "pixels", device="cpu", num_workers=2)
    if mode == "stream":  # the clip cache exists: a second encoder reads it all back
        fc = feature_cache(cc, "randconv", device="cpu", width=8)
    print(json.dumps({"n": len(ents), "ok": int(cc.ok.sum()), "encode": fc.meta["encode"],
                      "self_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
""")


def child_peak_mb(root: Path, size: int, mode: str, runs: Path) -> tuple[float, dict]:
    """Peak RSS (MiB) of a child building the caches, its pool workers included (wait4 reports the largest), and
    what it printed, with its own peak (`self_mb`): where resident rows would be, and what the workers' may hide."""
    runs.parent.mkdir(parents=True, exist_ok=True)
    out, err = runs.parent / f"{root.name}-{mode}.out", runs.parent / f"{root.name}-{mode}.err"
    with open(out, "w") as fo, open(err, "w") as fe:
        p = subprocess.Popen([sys.executable, "-c", CHILD, str(root), str(size), mode], stdout=fo, stderr=fe,
                             env={**os.environ, "ECHOES_RUNS": str(runs)})
        _, status, ru = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)
    assert p.returncode == 0, err.read_text()[-3000:]
    return ru.ru_maxrss / 1024, json.loads(out.read_text().splitlines()[-1])


@pytest.mark.slow
def test_peak_memory_is_flat_in_n(tmp_path):
    "60 and 240 clips cached at 16 x 128 x 128: resident rows would add 180 x 786 kB = 141 MB to the larger build."
    size, small, large = 128, 60, 240
    roots = {n: synth(tmp_path / f"n{n}", classes=4, clips_per_class=n // 4, frames=16, size=32, seed=n)
             for n in (small, large)}
    peaks, own = {}, {}
    for n, root in roots.items():
        for mode in ("both", "stream"):  # one pass; then encoding alone over the finished clip cache
            peaks[n, mode], info = child_peak_mb(root, size, mode, tmp_path / f"runs{n}" / "r")
            assert info["n"] == info["ok"] == n and info["encode"]["clips"] == n
            own[n, mode] = info["self_mb"]
    leak_mb = (large - small) * 16 * size * size * 3 / 2**20
    for mode in ("both", "stream"):
        print(f"{mode}: peak RSS of the child {own[small, mode]:.0f} MiB at N={small}, {own[large, mode]:.0f} MiB at "
              f"N={large}; with its workers {peaks[small, mode]:.0f} and {peaks[large, mode]:.0f} MiB")
        for p in (own, peaks):
            assert p[large, mode] - p[small, mode] < leak_mb / 3, (mode, own, peaks, leak_mb)


# ---------------------------------------------------------------- (c) SIGKILL mid-way, then resume

BUILDER = textwrap.dedent("""
    import sys
    from pathlib import Path
    from echoes.data import caches, index
    root = Path(sys.argv[1])
    ents = index(root, 1, "train") + index(root, 1, "test")
    caches(ents, root, 8, 48, "resnet18", device="cpu", batch_frames=32, num_workers=2, checkpoint_s=0.05,
           encoder_opts={"size": 48})
""")


def committed(base: Path, name: str) -> int:
    "How many rows the one partial build under `base` has committed (0 if none yet)."
    try:
        return int(np.load(next(base.glob("*.partial")) / name).astype(bool).sum())
    except (StopIteration, OSError, ValueError, EOFError):
        return 0


@pytest.mark.slow
def test_killed_build_resumes_to_the_same_caches(tmp_path, runs):
    root = synth(tmp_path / "kill", classes=4, clips_per_class=30, frames=8, size=32, seed=5)  # 120 clips
    ents = entries(root)
    log = tmp_path / "builder.err"  # a file, not a pipe: nothing waits on what the workers inherited
    with open(log, "w") as fe:
        p = subprocess.Popen([sys.executable, "-c", BUILDER, str(root)], stdout=subprocess.DEVNULL, stderr=fe,
                             env={**os.environ})
    clips, feats, deadline = runs / "cache" / "clips", runs / "cache" / "features", time.monotonic() + 120
    while committed(feats, "encoded.npy") < 8 and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.kill(p.pid, signal.SIGKILL)  # the main process: its workers see their parent die and exit
    assert p.wait() == -signal.SIGKILL, log.read_text()[-3000:]
    decoded, encoded = committed(clips, "status.npy"), committed(feats, "encoded.npy")
    assert 8 <= encoded <= decoded < len(ents), (encoded, decoded)  # killed half-way, features behind the clips
    assert not [p for p in (runs / "cache").glob("*/*") if p.is_dir() and not p.name.endswith(".partial")]

    with echoes_log() as logs:
        cc, fc = caches(ents, root, 8, 48, "resnet18", device="cpu", batch_frames=32, num_workers=2,
                        encoder_opts={"size": 48})
    for what in ("clip", "feature"):
        assert any(m.startswith(f"resuming {what} cache") for m in logs), logs
    assert fc.meta["encode"]["clips"] == len(ents) - encoded  # only what the killed build had not committed
    assert not list((runs / "cache").glob("*/*.partial"))

    def fresh():
        return caches(ents, root, 8, 48, "resnet18", device="cpu", batch_frames=32, num_workers=2,
                      encoder_opts={"size": 48})
    cc2, fc2 = in_runs(tmp_path / "fresh", fresh)
    np.testing.assert_array_equal(np.asarray(cc.clips), np.asarray(cc2.clips))
    np.testing.assert_array_equal(np.asarray(fc.features), np.asarray(fc2.features))
    assert fc.meta["arrays"] == fc2.meta["arrays"] and cc.meta["arrays"] == cc2.meta["arrays"]


# ---------------------------------------------------------------- (d) bad videos in the middle

def test_bad_videos_are_skipped_and_named(ds, runs, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(ds, bad)
    ents = entries(bad)
    cut, text = 7, 16  # in the middle, each between good clips
    f_cut, f_text = bad / ents[cut]["path"], bad / ents[text]["path"]
    f_cut.write_bytes(f_cut.read_bytes()[:300])  # the header and a little: no frame decodes
    f_text.write_text("not a video at all\n" * 50)
    gc, gf = in_runs(tmp_path / "good", lambda: caches(entries(ds), ds, 8, 24, "randconv", device="cpu", num_workers=2))
    with echoes_log() as logs:
        cc, fc = caches(ents, bad, 8, 24, "randconv", device="cpu", num_workers=2, batch_frames=24)
    assert [s["path"] for s in cc.skipped] == [ents[cut]["path"], ents[text]["path"]]
    for i in (cut, text):
        assert any(ents[i]["path"] in m and m.startswith("skipping") for m in logs), logs
    ok = np.ones(len(ents), bool)
    ok[[cut, text]] = False
    np.testing.assert_array_equal(cc.ok, ok)
    X, G = np.asarray(fc.features), np.asarray(gf.features)
    np.testing.assert_array_equal(X[ok], G[ok])  # every good row as in the clean build
    np.testing.assert_array_equal(np.asarray(cc.clips)[ok], np.asarray(gc.clips)[ok])
    assert not X[~ok].any() and fc.meta["encode"]["clips"] == len(ents) - 2
