"""Faults in the data layer, each with the real fault: finished caches damaged afterwards, and a disk that fills up
while the synthetic dataset, the clip cache or the feature cache is being written."""
import logging
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from echoes import data
from echoes.core import verify_cache
from echoes.data import load, synth

OPTS = dict(frames=4, frame_size=16, val_fraction=None, num_workers=0)


@pytest.fixture(scope="module")
def ucf(tmp_path_factory):
    "A small synthetic dataset in UCF101 layout (3 classes x 8 clips, 8 frames of 16x16)."
    return synth(tmp_path_factory.mktemp("ucf") / "ds", classes=3, clips_per_class=8, frames=8, size=16, seed=1)


@pytest.fixture
def said():
    "The messages the echoes loggers emit during the test."
    out = []
    class Grab(logging.Handler):
        def emit(self, record): out.append(record.getMessage())
    h = Grab(logging.WARNING)
    logging.getLogger("echoes").addHandler(h)
    yield out
    logging.getLogger("echoes").removeHandler(h)


def snapshot(s) -> dict:
    "Copies of everything `load` returned, and of the caches behind it."
    cc = data.ClipCache.open(s.info["paths"]["clip_cache"])
    return {"X": [np.array(d.X) for d in (s.train, s.test)], "y": [d.y.copy() for d in (s.train, s.test)],
            "L": [d.lengths.copy() for d in (s.train, s.test)], "clips": np.array(cc.clips),
            "lengths": cc.lengths.copy()}


def assert_same(a: dict, b: dict):
    for k in a:
        for u, v in zip(a[k] if isinstance(a[k], list) else [a[k]], b[k] if isinstance(b[k], list) else [b[k]]):
            np.testing.assert_array_equal(u, v, err_msg=k)


# ---------------------------------------------------------------- a finished cache damaged afterwards

def truncate(f: Path):
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def flip_middle(f: Path):
    b = bytearray(f.read_bytes())
    for i in range(len(b) // 2, len(b) // 2 + 8):
        b[i] ^= 0x01  # in float16 data a low mantissa bit: the values stay finite, only the checksum sees it
    f.write_bytes(bytes(b))


def write_nan(f: Path):
    x = np.load(f, mmap_mode="r+")
    x[len(x) // 2, 0, :3] = np.nan
    x.flush()


DAMAGE = {  # (cache, file, damage, what the warning says)
    "clips truncated": ("clip_cache", "clips.npy", truncate, "truncated"),
    "clips bytes flipped": ("clip_cache", "clips.npy", flip_middle, "checksum mismatch"),
    "lengths.npy deleted": ("clip_cache", "lengths.npy", Path.unlink, "missing"),
    "status.npy deleted": ("clip_cache", "status.npy", Path.unlink, "missing"),
    "clip meta.json garbage": ("clip_cache", "meta.json", lambda f: f.write_text("{not json"), "unreadable"),
    "clip meta.json of an older cache": ("clip_cache", "meta.json",
                                         lambda f: f.write_text('{"key": "x", "entries": [], "skipped": []}'),
                                         "records no array sizes"),
    "features truncated": ("feature_cache", "features.npy", truncate, "truncated"),
    "features bytes flipped": ("feature_cache", "features.npy", flip_middle, "checksum mismatch"),
    "features NaN": ("feature_cache", "features.npy", write_nan, "non-finite values"),
    "features header rewritten": ("feature_cache", "features.npy",
                                  lambda f: np.save(f, np.load(f).reshape(-1, 8).astype(np.float16)), "where"),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_damaged_cache_is_detected_and_rebuilt(case, ucf, runs, said):
    cache, name, damage, words = DAMAGE[case]
    s = load("ucf101", ucf, **OPTS)
    good = snapshot(s)
    folder = Path(s.info["paths"][cache])
    damage(folder / name)
    said.clear()
    again = load("ucf101", ucf, **OPTS)
    assert_same(good, snapshot(again))  # the same good data, never the damaged bytes
    warned = [m for m in said if "moved it aside" in m]
    assert len(warned) == 1 and f"{name}: " in warned[0] and words in warned[0], said
    assert Path(again.info["paths"][cache]) == folder and verify_cache(folder) is None
    aside = list(folder.parent.glob(f"corrupt-*-{folder.name}"))
    assert len(aside) == 1 and aside[0].name in warned[0]
    assert load("ucf101", ucf, **OPTS).info[cache] == s.info[cache]  # and now it is simply reused
    assert len(list(folder.parent.glob(f"corrupt-*-{folder.name}"))) == 1


def test_cache_without_meta_json_is_rebuilt(ucf, runs):
    "A finished folder whose meta.json went missing is an unfinished build: rebuilt in place, not renamed over."
    s = load("ucf101", ucf, **OPTS)
    good = snapshot(s)
    for cache in ("clip_cache", "feature_cache"):
        (Path(s.info["paths"][cache]) / "meta.json").unlink()
    assert_same(good, snapshot(load("ucf101", ucf, **OPTS)))
    assert not list(runs.glob("cache/*/*.partial"))


def test_refused_when_opened_directly(ucf, runs):
    s = load("ucf101", ucf, **OPTS)
    path = Path(s.info["paths"]["clip_cache"])
    (path / "lengths.npy").unlink()
    with pytest.raises(ValueError, match=r"lengths\.npy: missing"):
        data.ClipCache.open(path)


# ---------------------------------------------------------------- a full disk

@pytest.fixture
def small_disk(tmp_path):
    "`mount(size)` mounts a tmpfs of that size and returns its folder; unmounted at the end whatever happens."
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "disk"
    mnt.mkdir()
    mounted = []
    def mount(size: str) -> Path:
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)], capture_output=True,
                           text=True, check=False)
        if r.returncode:
            pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
        mounted.append(mnt)
        return mnt
    try:
        yield mount
    finally:
        for m in mounted:
            subprocess.run(["umount", "-l", str(m)], check=False)


CHILD = textwrap.dedent("""
    import json, os, sys
    from pathlib import Path
    from echoes import core, data, features
    disk, fill_in, kw = Path(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3])
    def fill_disk():
        "Another writer takes every byte left."
        with open(disk / "ballast", "wb", buffering=0) as f:
            try:
                while True: f.write(b"\\0" * 65536)
            except OSError: pass
    def filling(mod, name, at):
        orig, n = getattr(mod, name), [0]
        def wrapped(*a, **k):
            n[0] += 1
            if n[0] == at: fill_disk()
            return orig(*a, **k)
        setattr(mod, name, wrapped)
    if fill_in == "decode": filling(data, "_decode_job", 5)  # after clips.npy got its space
    if fill_in == "encode": filling(features, "encode", 1)  # after features.npy got its space
    try:
        data.load(**kw)
    except core.DiskFull as e:
        print(f"DISKFULL {e.errno} {e}"); sys.exit(3)
""")


def fill_up(disk: Path, fill_in: str, **kw) -> str:
    "Run `load(**kw)` with ECHOES_RUNS on `disk` in a child (a SIGBUS shows as a crash there); its DiskFull message."
    import json
    r = subprocess.run([sys.executable, "-c", CHILD, str(disk), fill_in, json.dumps(kw, default=str)],
                       env={**os.environ, "ECHOES_RUNS": str(disk)}, capture_output=True, text=True, check=False)
    assert r.returncode == 3, f"rc={r.returncode} (-7 is SIGBUS)\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
    line = [ln for ln in r.stdout.splitlines() if ln.startswith("DISKFULL")][-1]
    assert line.startswith("DISKFULL 28 [Errno 28] No space left on device while "), line
    return line


def copy_to_roomy(disk: Path, roomy: Path, monkeypatch):
    "Copy what the full disk holds (the half-written files) to a roomy folder, and point ECHOES_RUNS at it."
    shutil.copytree(disk, roomy, symlinks=True, ignore=shutil.ignore_patterns("ballast"))
    monkeypatch.setenv("ECHOES_RUNS", str(roomy))


def reference(tmp_path, monkeypatch, **kw):
    "What a build on an empty roomy disk returns."
    with monkeypatch.context() as m:
        m.setenv("ECHOES_RUNS", str(tmp_path / "reference"))
        return snapshot(load(**kw))


def test_disk_full_while_generating_the_synthetic_dataset(small_disk, tmp_path, monkeypatch):
    kw = dict(dataset="synthetic", classes=2, clips_per_class=8, frames=4, frame_size=16, video_size=32,
              val_fraction=None, num_workers=0)
    disk = small_disk("64k")
    line = fill_up(disk, "none", **kw)
    assert "generating the synthetic dataset" in line and f"'{disk}/data/synthetic-" in line, line
    assert list(disk.glob("data/*.partial")) and not [p for p in disk.glob("data/synthetic-*") if p.suffix != ".partial"
                                                      and p.suffix != ".lock"]
    copy_to_roomy(disk, tmp_path / "roomy", monkeypatch)
    assert_same(reference(tmp_path, monkeypatch, **kw), snapshot(load(**kw)))
    assert not list((tmp_path / "roomy").glob("data/*.partial"))


@pytest.mark.parametrize("fill_in,size,where", [
    ("none", "256k", "building the clip cache"),     # clips.npy (590 kB) cannot get its space
    ("decode", "2m", "building the clip cache"),     # the disk fills during decoding (clips.npy and, decoded and
                                                      # encoded in one pass, features.npy got their 1.8 MB): the
                                                      # checkpoint cannot be written
    ("none", "1m", "encoding the feature cache"),    # the clips fit, features.npy (1.2 MB) cannot get its space
    ("encode", "4m", "encoding the feature cache"),  # the disk fills during encoding: meta.json cannot be written
])
def test_disk_full_while_caching(fill_in, size, where, ucf, small_disk, tmp_path, monkeypatch):
    kw = dict(dataset="ucf101", root=str(ucf), frames=8, frame_size=32 if where.endswith("clip cache") else 16,
              encoder_opts={"size": 32, "grey": False}, val_fraction=None, num_workers=0)
    disk = small_disk(size)
    line = fill_up(disk, fill_in, **kw)
    sub = "clips" if "clip" in where else "features"
    assert where in line and f"'{disk}/cache/{sub}/" in line and line.endswith(".partial'"), line
    copy_to_roomy(disk, tmp_path / "roomy", monkeypatch)
    assert_same(reference(tmp_path, monkeypatch, **kw), snapshot(load(**kw)))
    assert not list((tmp_path / "roomy").glob("cache/*/*.partial"))
