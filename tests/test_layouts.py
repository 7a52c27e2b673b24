"""HMDB51, Kinetics (CSV) and Something-Something v2 (JSON) layouts through `load` and `echoes data index`/`cache`,
each from a tiny fixture of real videos (XVID AVI, MPEG-4 in MP4, VP8 in WebM) with real bad input among them."""
import json
import logging
import os
import subprocess
import sys
from logging.handlers import BufferingHandler
from pathlib import Path

import av
import numpy as np
import pytest

from echoes import data
from echoes.data import index, load

OPTS = dict(frames=4, frame_size=16, val_fraction=None, num_workers=0)
BIN = Path(sys.executable).parent


def video(path: Path, value: int, frames: int = 12, fmt: str = "avi") -> Path:
    "A real video of flat frames at `value` (so a clip can be told by its content): XVID AVI, MP4 or WebM."
    path.parent.mkdir(parents=True, exist_ok=True)
    codec = {"avi": "mpeg4", "mp4": "mpeg4", "webm": "libvpx"}[fmt]
    with av.open(str(path), "w", format=fmt) as c:
        s = c.add_stream(codec, rate=25)
        s.width, s.height, s.pix_fmt = 32, 24, "yuv420p"
        for _ in range(frames):
            img = np.full((24, 32, 3), value, np.uint8)
            for p in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")): c.mux(p)
        for p in s.encode(): c.mux(p)
    return path


def echoes(*args):
    r = subprocess.run([str(BIN / "echoes"), *map(str, args)], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONUNBUFFERED": "1"}, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout)


def clip_means(s) -> dict:
    "Mean pixel of each decoded clip of `load`'s clip cache, by path."
    cc = data.ClipCache.open(s.info["paths"]["clip_cache"])
    return {e["path"]: float(np.asarray(cc.clips[i]).mean()) for i, e in enumerate(cc.entries) if cc.ok[i]}


# ---------------------------------------------------------------- HMDB51

@pytest.fixture
def hmdb(tmp_path):
    "3 classes x 4 AVIs, 3 folds of split files in testTrainMulti_7030_splits/, and bad input of every kind."
    root = tmp_path / "hmdb51"
    splits = root / "testTrainMulti_7030_splits"
    splits.mkdir(parents=True)
    for ci, cls in enumerate(["wave", "jump", "climb"]):
        for k in range(4):
            if cls != "climb":  # climb: a class folder with no videos, its split files still list them
                video(root / cls / f"{cls}_{k}.avi", 40 + 40 * ci + 5 * k)
        for fold in (1, 2, 3):
            tags = [(1, 1, 2, 0), (2, 1, 1, 0), (1, 2, 1, 0)][fold - 1]
            (splits / f"{cls}_test_split{fold}.txt").write_text("".join(f"{cls}_{k}.avi {t} \n"
                                                                        for k, t in enumerate(tags)))
    full = video(tmp_path / "full.avi", 40, frames=60).read_bytes()
    (root / "wave/cut.avi").write_bytes(full[: len(full) * 13 // 16])  # a video that ends early: still used
    (root / "jump/notes.avi").write_text("this is not a video\n")
    with open(splits / "wave_test_split1.txt", "a") as f:
        f.write("cut.avi 1\nmissing.avi 1\nbroken line\n")
    with open(splits / "jump_test_split1.txt", "a") as f:
        f.write("notes.avi 1\n")
    return root


def test_hmdb51(hmdb, runs):
    said = BufferingHandler(1000)  # what the echoes loggers say while loading
    logging.getLogger("echoes").addHandler(said)
    try:
        s = load("hmdb51", hmdb, **OPTS)
    finally:
        logging.getLogger("echoes").removeHandler(said)
    assert s.classes == ["climb", "jump", "wave"] and s.info["dataset"] == "hmdb51"
    reasons = {d["path"]: d["reason"] for d in s.info["skipped"]}
    assert reasons["wave/missing.avi"] == "video file not found"
    assert reasons["broken line"] == "expected '<video> <0|1|2>'"
    assert "not a video" in reasons["jump/notes.avi"]
    assert all(reasons[f"climb/climb_{k}.avi"] == "video file not found" for k in (0, 1, 2))
    assert s.info["empty_classes"] == ["climb"]
    means = clip_means(s)
    # every good video of fold 1 is there: train wave_0, wave_1, cut, jump_0, jump_1; test wave_2, jump_2
    assert sorted(means) == ["jump/jump_0.avi", "jump/jump_1.avi", "jump/jump_2.avi", "wave/cut.avi",
                             "wave/wave_0.avi", "wave/wave_1.avi", "wave/wave_2.avi"]
    assert (len(s.train), len(s.test)) == (5, 2)
    assert abs(means["jump/jump_1.avi"] - 85) < 3 and abs(means["wave/cut.avi"] - 40) < 3
    said = [r.getMessage() for r in said.buffer]
    assert any("wave/cut.avi" in m and "the container says 60 frames" in m for m in said), said
    folds = {fold: [e["path"] for e in index(hmdb, fold, "test", dataset="hmdb51")] for fold in (2, 3)}
    assert folds == {2: ["jump/jump_0.avi", "wave/wave_0.avi"], 3: ["jump/jump_1.avi", "wave/wave_1.avi"]}


def test_hmdb51_validation_is_a_seeded_draw_of_videos(hmdb, runs):
    va = index(hmdb, 1, "val", val_fraction=0.4, seed=2)
    tr = index(hmdb, 1, "train", val_fraction=0.4, seed=2)
    assert len(va) == 2 and not {e["path"] for e in va} & {e["path"] for e in tr}
    assert index(hmdb, 1, "val", val_fraction=0.4, seed=2) == va
    s = load("hmdb51", hmdb, **{**OPTS, "val_fraction": 0.4}, seed=2)
    n_val = len([e for e in va if e["path"] != "jump/notes.avi"])  # the one that is not a video is skipped
    assert s.info["counts"] == {"train": 5 - n_val, "val": n_val, "test": 2}


def test_hmdb51_refusals_name_the_file(hmdb, runs):
    (hmdb / "testTrainMulti_7030_splits/jump_test_split3.txt").unlink()
    with pytest.raises(FileNotFoundError, match=r"jump_test_split3\.txt: split file not found"):
        load("hmdb51", hmdb, fold=3, **OPTS)
    with pytest.raises(ValueError, match="fold must be one of 1, 2, 3 for hmdb51, got 4"):
        load("hmdb51", hmdb, fold=4, **OPTS)


# ---------------------------------------------------------------- Kinetics

HEAD = "label,youtube_id,time_start,time_end,split\n"


@pytest.fixture
def kinetics(tmp_path):
    "CSVs as in the download (train, validate, an unlabelled test), MP4s under <split>/<label>/ or <split>/."
    root = tmp_path / "kinetics"
    (root / "annotations").mkdir(parents=True)
    rows = [("air drumming", "yt-A_1", 0, 10, "train", "train/air drumming"),
            ("air drumming", "yt-A_1", 30, 40, "train", "train/air drumming"),  # a second clip of one video
            ("air drumming", "yt_B2", 5, 15, "train", "train/air_drumming"),
            ("abseiling", "-yt_C3", 1, 11, "train", "train"),  # flat under train/, a leading dash in the id
            ("abseiling", "yt_D4", 2, 12, "train", "train/abseiling"),
            ("abseiling", "yt_E5", 3, 13, "val", "val/abseiling"),
            ("air drumming", "yt_F6", 4, 14, "val", "val")]
    for k, (_, yid, a, b, _, folder) in enumerate(rows):
        video(root / folder / f"{yid}_{a:06d}_{b:06d}.mp4", 30 + 20 * k, fmt="mp4")
    (root / "train/abseiling/yt_G7_000001_000002.mp4").write_bytes(b"\0" * 1000)  # not a video
    train = HEAD + "".join(f"{label},{yid},{a},{b},{sp}\n" for label, yid, a, b, sp, _ in rows if sp == "train")
    train += "abseiling,yt_G7,1,2,train\nabseiling,yt_H8,1,2,train\n"  # not a video; not downloaded
    (root / "annotations/train.csv").write_text(train)
    (root / "annotations/validate.csv").write_text(HEAD + "".join(f"{label},{yid},{a}.0,{b}.0,{sp}\n"
                                                   for label, yid, a, b, sp, _ in rows if sp == "val"))
    (root / "annotations/test.csv").write_text("youtube_id,time_start,time_end,split\nyt_Z9,0,10,test\n")
    return root


def test_kinetics(kinetics, runs):
    s = load("kinetics", kinetics, **OPTS)
    assert s.classes == ["abseiling", "air drumming"] and (len(s.train), len(s.test)) == (5, 2)
    reasons = {d["path"]: (d["reason"], d.get("where")) for d in s.info["skipped"]}
    assert "not a video" in reasons["train/abseiling/yt_G7_000001_000002.mp4"][0]
    assert reasons["train/abseiling/yt_H8_000001_000002.mp4"] == ("video file not found", "train.csv:8")
    means = clip_means(s)
    assert abs(means["train/-yt_C3_000001_000011.mp4"] - 90) < 3
    assert abs(means["val/yt_F6_000004_000014.mp4"] - 150) < 3
    assert {e["group"] for e in index(kinetics, split="train")} == {"yt-A_1", "yt_B2", "-yt_C3", "yt_D4", "yt_G7"}
    va = index(kinetics, split="val", val_fraction=0.3, seed=0)
    tr = index(kinetics, split="train", val_fraction=0.3, seed=0)
    assert va and not {e["group"] for e in va} & {e["group"] for e in tr}  # the two clips of yt-A_1 stay together


def test_kinetics_refusals_name_the_file(kinetics, runs):
    (kinetics / "annotations/validate.csv").write_text("label,youtube_id,split\nabseiling,yt_E5,val\n")
    with pytest.raises(ValueError, match=r"validate\.csv: no column time_start, time_end"):
        load("kinetics", kinetics, **OPTS)
    (kinetics / "annotations/validate.csv").write_text(HEAD + "juggling,yt_X,1,2,val\n")
    with pytest.raises(ValueError, match="Kinetics test: empty split"):
        load("kinetics", kinetics, **OPTS)


# ---------------------------------------------------------------- Something-Something v2

@pytest.fixture
def ssv2(tmp_path):
    "The download's file names, WebM videos (one MP4) in 20bn-something-something-v2/."
    root = tmp_path / "ssv2"
    vids = root / "20bn-something-something-v2"
    root.mkdir()
    labels = {"Holding something": "0", "Pushing something from left to right": "1", "Dropping something": "2"}
    (root / "something-something-v2-labels.json").write_text(json.dumps(labels))
    train = [{"id": "11", "template": "Holding [something]", "label": "holding a pen", "placeholders": ["a pen"]},
             {"id": "12", "template": "Pushing [something] from left to right", "label": "pushing a cup"},
             {"id": "13", "template": "Holding [something]"}, {"id": "14", "label": "Dropping something"},
             {"id": "15", "template": "Spinning [something]"}, {"id": "16", "template": "Holding [something]"},
             {"id": "17", "template": "Dropping [something]"}]
    valid = [{"id": "21", "template": "Dropping [something]"}, {"id": "22", "template": "Holding [something]"}]
    (root / "something-something-v2-train.json").write_text(json.dumps(train))
    (root / "something-something-v2-validation.json").write_text(json.dumps(valid))
    for k, i in enumerate(["11", "12", "13", "15", "21", "22"]):
        video(vids / f"{i}.webm", 20 + 30 * k, fmt="webm")
    video(vids / "14.mp4", 200, fmt="mp4")
    (vids / "17.webm").write_text("<html>404</html>")  # a download error page saved as a video
    return root


def test_ssv2(ssv2, runs):
    s = load("ssv2", ssv2, **OPTS)
    assert s.classes[0] == "Holding something" and (len(s.train), len(s.test)) == (4, 2)
    reasons = {d["path"]: d["reason"] for d in s.info["skipped"]}
    assert reasons["15.webm"] == "unknown class 'Spinning something' (not in labels.json)"
    assert reasons["16.webm"] == "video file not found" and "not a video" in reasons["17.webm"]
    means = clip_means(s)
    assert abs(means["14.mp4"] - 200) < 3 and abs(means["22.webm"] - 170) < 4
    assert [e["label"] for e in index(ssv2, split="train")] == [0, 1, 0, 2, 2]


def test_ssv2_refusals_name_the_file(ssv2, runs):
    (ssv2 / "something-something-v2-labels.json").write_text('{"Holding something": "0", "Dropping": "x"}')
    with pytest.raises(ValueError, match=r"labels\.json: class 'Dropping' has id 'x', not a number"):
        load("ssv2", ssv2, **OPTS)
    (ssv2 / "something-something-v2-labels.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"labels\.json: not JSON"):
        load("ssv2", ssv2, **OPTS)
    (ssv2 / "something-something-v2-labels.json").unlink()
    with pytest.raises(FileNotFoundError, match="labels.json not found"):
        load("ssv2", ssv2, **OPTS)


# ---------------------------------------------------------------- the command line and the training config

def test_cli_index_and_cache_tell_the_layout(hmdb, kinetics, ssv2, runs):
    for root, name in ((hmdb, "hmdb51"), (kinetics, "kinetics"), (ssv2, "ssv2")):
        rows = echoes("data", "index", "--root", root, "--split", "train", "--json")
        assert rows == index(root, 1, "train", dataset=name), name
        summary = echoes("data", "cache", "--root", root, "--frames", 4, "--size", 16, "--json")
        s = load(name, root, **OPTS)
        assert summary["clips"] == len(s.train) + len(s.test), name
        assert summary["clip_cache_key"] == s.info["clip_cache"] and summary["classes"] == s.classes, name


def test_training_config_accepts_the_layouts():
    from echoes.train import TrainConfig
    for name in ("hmdb51", "kinetics", "ssv2"):
        assert TrainConfig(dataset=name, data_root="/data").validate().load_kwargs()["root"] == "/data"
