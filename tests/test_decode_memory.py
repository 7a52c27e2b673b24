"""Decoding a clip takes memory bounded by the clip, not by the video: long videos (and a long one cut short) are
decoded in a child process whose peak RSS growth is measured, and the frames it kept are checked by content."""
import json
import os
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest

from echoes.data import sample_indices, write_avi

CHILD = """
import json, sys
import numpy as np
from echoes.data import decode_clip
def status(key):
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(key + ":"))
warm, path, T, S = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
decode_clip(warm, T, S)  # imports, codec and resize kernels: paid before the measurement
base = status("VmRSS")
with open("/proc/self/clear_refs", "w") as f: f.write("5")  # restart the peak (VmHWM) from here
clip, n = decode_clip(path, T, S)
print(json.dumps({"growth_mb": (status("VmHWM") - base) / 1024, "n": n, "shape": list(clip.shape),
                  "top": clip[:, : S * 4 // 9].mean((1, 2, 3)).tolist(),
                  "bottom": clip[:, S * 5 // 9:].mean((1, 2, 3)).tolist()}))
"""


def levels(k: int) -> tuple[int, int]:
    "Luma of the top and the bottom half of frame k: together they tell k modulo 400."
    return 16 + 10 * (k % 20), 16 + 10 * (k // 20 % 20)


def write_long(path: Path, frames: int, width: int, height: int) -> Path:
    "An XVID AVI of flat grey frames, frame k's two halves at `levels(k)`: simple content that encodes fast."
    with av.open(str(path), "w", format="avi") as c:
        s = c.add_stream("mpeg4", rate=25)
        s.codec_tag, s.pix_fmt, s.width, s.height, s.bit_rate = "XVID", "yuv420p", width, height, 400_000
        yuv = np.full((height * 3 // 2, width), 128, np.uint8)
        for k in range(frames):
            yuv[: height // 2], yuv[height // 2: height] = levels(k)
            for p in s.encode(av.VideoFrame.from_ndarray(yuv, format="yuv420p")): c.mux(p)
        for p in s.encode(): c.mux(p)
    return path


def decode_in_child(path: Path, warm: Path, T: int = 16, S: int = 112) -> dict:
    r = subprocess.run([sys.executable, "-c", CHILD, str(warm), str(path), str(T), str(S)], capture_output=True,
                       text=True, env={**os.environ}, check=False, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return {**json.loads(r.stdout.splitlines()[-1]), "stderr": r.stderr}


def assert_sampled(out: dict, n: int, T: int = 16):
    "The clip holds frames sample_indices(n, T), in order (read back from the grey levels, after YUV -> RGB)."
    step = lambda v: np.rint(np.asarray(v) / 1.164 / 10).astype(int)  # noqa: E731
    assert (step(out["top"]) + 20 * step(out["bottom"])).tolist() == (sample_indices(n, T) % 400).tolist()


@pytest.fixture(scope="module")
def warm(tmp_path_factory):
    return write_avi(tmp_path_factory.mktemp("warm") / "warm.avi", np.zeros((20, 480, 640, 3), np.uint8))


@pytest.fixture(scope="module")
def long_video(tmp_path_factory):
    "3,000 frames of 640x480 (2 min at 25 fps): holding every decoded frame takes 3000 x 461 kB = 1.4 GB."
    return write_long(tmp_path_factory.mktemp("long") / "long.avi", 3000, 640, 480)


def test_long_video_memory_is_bounded(long_video, warm):
    out = decode_in_child(long_video, warm)
    assert out["shape"] == [16, 112, 112, 3] and out["n"] == 16
    assert_sampled(out, 3000)
    assert out["growth_mb"] < 150, out["growth_mb"]


def test_long_video_cut_short(long_video, warm, tmp_path):
    "A cut file whose header still says 3,000 frames: sampled from the frames that decode, memory still bounded."
    cut = tmp_path / "cut.avi"
    cut.write_bytes(long_video.read_bytes()[: long_video.stat().st_size * 3 // 5])
    with av.open(str(cut)) as c:
        header = c.streams.video[0].frames
        decodable = sum(1 for _ in c.decode(video=0))
    assert header == 3000 and 1000 < decodable < 3000
    out = decode_in_child(cut, warm)
    assert_sampled(out, decodable)
    assert out["growth_mb"] < 150, out["growth_mb"]
    assert f"the container says 3000 frames but {decodable} decode" in out["stderr"] and str(cut) in out["stderr"]


@pytest.mark.slow
def test_hundred_thousand_frames(tmp_path, warm):
    "100,000 frames (over an hour at 25 fps) of 160x120: all of them held would take 2.9 GB."
    f = write_long(tmp_path / "huge.avi", 100_000, 160, 120)
    out = decode_in_child(f, warm)
    assert_sampled(out, 100_000)
    assert out["growth_mb"] < 150, out["growth_mb"]
