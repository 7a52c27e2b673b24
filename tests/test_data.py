"""echoes.data with real files: UCF101 layouts, bad input of every kind, a killed cache build, other sources."""
import json
import os
import pickle
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import av
import numpy as np
import pytest

from echoes import data
from echoes.data import build_cache, clip_cache, index, load, synth


@pytest.fixture(scope="module")
def ucf(tmp_path_factory):
    "A small synthetic dataset in UCF101 layout (3 classes x 8 clips, 8 frames of 16x16)."
    return synth(tmp_path_factory.mktemp("ucf") / "ds", classes=3, clips_per_class=8, frames=8, size=16, seed=1)


def copy_ds(src: Path, dst: Path) -> Path:
    import shutil
    shutil.copytree(src, dst)
    return dst


def append(path: Path, line: str, crlf=False):
    with open(path, "a", newline="") as f:
        f.write(line + ("\r\n" if crlf else "\n"))


def write_empty_avi(path: Path):
    "A real AVI container with a video stream and no frames."
    path.unlink(missing_ok=True)
    with av.open(str(path), "w", format="avi") as c:
        s = c.add_stream("mpeg4", rate=25)
        s.width = s.height = 16
        s.pix_fmt = "yuv420p"
        c.start_encoding()  # writes the header; without it PyAV writes no file at all
    assert path.stat().st_size > 0


# ---------------------------------------------------------------- layouts and splits

def test_index_matches_official_lists_and_folds(ucf):
    classes = data.read_classind(ucf)
    assert classes == ["MoveRight", "MoveLeft", "MoveDown"]
    for fold in (1, 2, 3):
        tr, te = index(ucf, fold, "train"), index(ucf, fold, "test")
        listed = (ucf / f"ucfTrainTestlist/trainlist0{fold}.txt").read_text().split("\n")
        assert [e["path"] for e in tr] == [ln.split()[0] for ln in listed if ln]
        assert len(tr) + len(te) == 24
        assert {data.ucf_group_fold(e["group"], 8) for e in te} == {fold}
        assert all(e["label"] == classes.index(e["class"]) for e in tr + te)


def test_val_split_is_by_group(ucf):
    tr = index(ucf, 1, "train", val_fraction=0.3, seed=3)
    va = index(ucf, 1, "val", val_fraction=0.3, seed=3)
    assert va and tr
    assert not {e["group"] for e in tr} & {e["group"] for e in va}
    assert sorted(e["path"] for e in tr + va) == sorted(e["path"] for e in index(ucf, 1, "train"))
    assert index(ucf, 1, "val", val_fraction=0.3, seed=3) == va  # seeded


def test_both_layouts_and_crlf(ucf, tmp_path, runs):
    official = tmp_path / "official"
    official.mkdir()
    os.symlink(ucf, official / "UCF-101")  # the videos folder may live elsewhere (another disk): it is resolved first
    (official / "ucfTrainTestlist").mkdir()
    for f in (ucf / "ucfTrainTestlist").iterdir():  # CRLF everywhere
        (official / "ucfTrainTestlist" / f.name).write_bytes(f.read_bytes().replace(b"\n", b"\r\n"))
    assert index(official, 2, "test") == index(ucf, 2, "test")
    s = load("ucf101", official, frames=4, frame_size=16, val_fraction=None)
    assert (len(s.train), len(s.test)) == (len(index(ucf, 1, "train")), len(index(ucf, 1, "test")))
    assert s.val is None and s.info["skipped"] == []


# ---------------------------------------------------------------- bad input, with real bad files

@pytest.fixture
def bad(ucf, tmp_path):
    "A copy of the dataset with one of each kind of bad input."
    ds = copy_ds(ucf, tmp_path / "bad")
    lists = ds / "ucfTrainTestlist"
    good = ds / "MoveRight/v_MoveRight_g08_c01.avi"
    b = good.read_bytes()
    # truncated: a listed video cut in half
    (ds / "MoveRight/v_MoveRight_g08_c01.avi").write_bytes(b[: len(b) // 2])
    # corrupt: a valid header followed by noise
    (ds / "MoveLeft/v_MoveLeft_g08_c01.avi").write_bytes(b[:300] + np.random.default_rng(0).bytes(3000))
    # zero frames
    write_empty_avi(ds / "MoveDown/v_MoveDown_g08_c01.avi")
    # shorter than T (T = 12 below, the videos have 8 frames: all are short; one has only 2)
    data.write_avi(ds / "MoveDown/v_MoveDown_g09_c99.avi", np.zeros((2, 16, 16, 3), np.uint8))
    append(lists / "trainlist01.txt", "MoveDown/v_MoveDown_g09_c99.avi 3")
    # non-video files
    (ds / "MoveLeft/v_MoveLeft_g09_c99.avi").write_text("this is not a video\n")
    append(lists / "trainlist01.txt", "MoveLeft/v_MoveLeft_g09_c99.avi 2")
    (ds / "MoveLeft/notes.txt").write_text("hello")
    append(lists / "trainlist01.txt", "MoveLeft/notes.txt 2")
    # missing video, unknown class, label that disagrees, path escaping the root
    append(lists / "trainlist01.txt", "MoveLeft/v_MoveLeft_g10_c42.avi 2", crlf=True)
    append(lists / "trainlist01.txt", "Juggling/v_Juggling_g10_c01.avi 1")
    append(lists / "trainlist01.txt", "MoveLeft/v_MoveLeft_g10_c01.avi 1")
    (tmp_path / "outside.avi").write_bytes(b)
    append(lists / "trainlist01.txt", "../outside.avi 1")
    append(lists / "testlist01.txt", "MoveRight/../../outside.avi")
    append(lists / "testlist01.txt", str(tmp_path / "outside.avi"))  # absolute
    # a symlink inside the root pointing outside it, as a file and as a whole class folder
    os.symlink(tmp_path / "outside.avi", ds / "MoveRight/v_MoveRight_g11_c01.avi")
    append(lists / "trainlist01.txt", "MoveRight/v_MoveRight_g11_c01.avi 1")
    (tmp_path / "elsewhere").mkdir()
    data.write_avi(tmp_path / "elsewhere/v_Linked_g11_c01.avi", np.zeros((8, 16, 16, 3), np.uint8))
    os.symlink(tmp_path / "elsewhere", ds / "Linked")
    # a class listed in classInd.txt whose folder holds no videos
    (ds / "Empty").mkdir()
    append(lists / "classInd.txt", "4 Empty")
    append(lists / "classInd.txt", "5 Linked")
    append(lists / "trainlist01.txt", "Linked/v_Linked_g11_c01.avi 5")
    # good videos with spaces and non-ASCII characters in their names: kept and decoded
    for name in ("MoveLeft/v_Move Left_g12_c01.avi", "MoveDown/v_Déplacé_ünï_g13_c01.avi"):
        data.write_avi(ds / name, np.full((8, 16, 16, 3), 99, np.uint8))
        append(lists / "trainlist01.txt", f"{name} {2 if 'Left' in name else 3}")
    # a duplicate line, a 0-byte video
    append(lists / "trainlist01.txt", "MoveLeft/v_Move Left_g12_c01.avi 2")
    (ds / "MoveRight/v_MoveRight_g12_c01.avi").write_bytes(b"")
    append(lists / "trainlist01.txt", "MoveRight/v_MoveRight_g12_c01.avi 1")
    return ds


def test_bad_input_is_skipped_and_good_clips_kept(bad, runs):
    n_listed_good = 24  # the original 24 clips are all still listed; 3 of them are now bad
    s = load("ucf101", bad, frames=12, frame_size=16, val_fraction=None)
    reasons = {d["path"]: d["reason"] for d in s.info["skipped"]}
    where = {d["path"]: d.get("where") for d in s.info["skipped"]}
    assert "corrupt" in reasons["MoveRight/v_MoveRight_g08_c01.avi"]  # truncated
    assert "corrupt" in reasons["MoveLeft/v_MoveLeft_g08_c01.avi"]
    assert reasons["MoveDown/v_MoveDown_g08_c01.avi"] == "no video frames"
    assert "not a video" in reasons["MoveLeft/v_MoveLeft_g09_c99.avi"]
    assert "not a video" in reasons["MoveLeft/notes.txt"]
    assert reasons["MoveLeft/v_MoveLeft_g10_c42.avi"] == "video file not found"
    assert "unknown class 'Juggling'" in reasons["Juggling/v_Juggling_g10_c01.avi"]
    assert "disagrees" in reasons["MoveLeft/v_MoveLeft_g10_c01.avi"]
    assert "escapes" in reasons["../outside.avi"] and "escapes" in reasons["MoveRight/../../outside.avi"]
    assert where["../outside.avi"].startswith("trainlist01.txt:")
    assert where["MoveRight/../../outside.avi"] == "testlist01.txt:7"
    assert "escapes" in reasons[str(bad.parent / "outside.avi")]
    assert reasons["MoveRight/v_MoveRight_g11_c01.avi"].startswith("resolves outside the dataset root (to ")
    assert str(bad.parent / "elsewhere") in reasons["Linked/v_Linked_g11_c01.avi"]
    assert reasons["MoveRight/v_MoveRight_g12_c01.avi"] == "empty file (0 bytes)"
    assert reasons["MoveLeft/v_Move Left_g12_c01.avi"] == "listed twice"
    assert [d["path"] for d in s.info["skipped"]].count("MoveLeft/v_Move Left_g12_c01.avi") == 1
    assert s.info["empty_classes"] == ["Empty", "Linked"]
    # every good clip is there: 24 originals - 3 broken + the 2-frame one + the two oddly named ones
    assert len(s.train) + len(s.test) == n_listed_good - 3 + 1 + 2
    ents = json.loads((Path(s.info["paths"]["clip_cache"]) / "meta.json").read_text())["entries"]
    odd = [i for i, e in enumerate(ents) if e["path"] in ("MoveLeft/v_Move Left_g12_c01.avi",
                                                           "MoveDown/v_Déplacé_ünï_g13_c01.avi")]
    assert len(odd) == 2 and [ents[i]["group"] for i in odd] == [12, 13]
    clips = data.ClipCache.open(s.info["paths"]["clip_cache"]).clips
    assert all(abs(float(clips[i].mean()) - 99) < 3 for i in odd)  # decoded, not skipped
    short = {d["path"]: d["frames"] for d in s.info["short"]}
    assert short["MoveDown/v_MoveDown_g09_c99.avi"] == 2 and len(short) == len(s.train) + len(s.test)
    i = [e["path"] for e in json.loads((Path(s.info["paths"]["clip_cache"]) / "meta.json").read_text())["entries"]]
    cc = data.ClipCache.open(s.info["paths"]["clip_cache"])
    k = i.index("MoveDown/v_MoveDown_g09_c99.avi")
    assert cc.lengths[k] == 2 and (cc.clips[k, 2:] == cc.clips[k, 1]).all()  # policy: repeat the last frame
    assert min(s.train.lengths.tolist()) == 2
    summary = build_cache(bad, 1, frames=12, size=16)
    json.dumps(summary)
    assert summary["clips"] == 24 and len(summary["skipped"]) == len(s.info["skipped"])


def test_refusals_name_the_file(ucf, tmp_path, runs):
    ds = copy_ds(ucf, tmp_path / "r")
    (ds / "ucfTrainTestlist/testlist02.txt").write_text("\r\n")
    with pytest.raises(ValueError, match=r"testlist02\.txt: empty split"):
        index(ds, 2, "test")
    (ds / "ucfTrainTestlist/testlist03.txt").write_text("Nope/v_Nope_g01_c01.avi\n")
    with pytest.raises(ValueError, match=r"testlist03\.txt: empty split \(no usable entries; 1 lines skipped\)"):
        load("ucf101", ds, fold=3, frames=4, frame_size=16)
    (ds / "ucfTrainTestlist/classInd.txt").write_text("1 MoveRight\nMoveLeft\n")
    with pytest.raises(ValueError, match=r"classInd\.txt:2: expected '<index> <ClassName>'"):
        index(ds, 1, "train")
    with pytest.raises(FileNotFoundError, match="dataset folder not found"):
        load("ucf101", tmp_path / "nothing")


# ---------------------------------------------------------------- the clip cache: reuse, keys, kill half-way

def test_cache_key_follows_files(ucf, tmp_path, runs):
    ds = copy_ds(ucf, tmp_path / "k")
    ents = index(ds, 1, "train") + index(ds, 1, "test")
    a = clip_cache(ents, ds, 4, 16)
    assert clip_cache(ents, ds, 4, 16).key == a.key
    assert clip_cache(ents, ds, 5, 16).key != a.key and clip_cache(ents, ds, 4, 8).key != a.key
    f = ds / ents[0]["path"]
    data.write_avi(f, np.full((8, 16, 16, 3), 200, np.uint8))  # new content, new size and mtime
    b = clip_cache(ents, ds, 4, 16)
    assert b.key != a.key and b.clips[0].mean() > 150


KILLER = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    from echoes import data
    job_name, root, kill_at, build = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    n = {"done": 0}
    orig = getattr(data, job_name)
    def job(args):
        n["done"] += 1
        if n["done"] == kill_at: os.kill(os.getpid(), signal.SIGKILL)
        return orig(args)
    setattr(data, job_name, job)
    exec(build)
""")


def kill_during_build(runs: Path, job_name: str, root: Path, kill_at: int, build: str) -> Path:
    "Run the statement `build` in a child that SIGKILLs itself at its `kill_at`-th decode job; the partial folder."
    r = subprocess.run([sys.executable, "-c", KILLER, job_name, str(root), str(kill_at), build], env={**os.environ},
                       capture_output=True, check=False)
    assert r.returncode == -signal.SIGKILL, r.stderr.decode()[-2000:]
    base = runs / "cache" / "clips"
    partial = list(base.glob("*.partial"))
    assert len(partial) == 1 and not [p for p in base.iterdir() if p.is_dir() and not p.name.endswith(".partial")]
    return partial[0]


def fresh_build(tmp_path: Path, runs: Path, build):
    "`build()` with an empty runs folder, for comparison with a resumed build."
    os.environ["ECHOES_RUNS"] = str(tmp_path / "fresh")
    try:
        return build()
    finally:
        os.environ["ECHOES_RUNS"] = str(runs)


def test_killed_build_is_never_trusted_and_resumes(ucf, tmp_path, runs):
    partial = kill_during_build(runs, "_decode_job", ucf, 15, "ents = data.index(root, 1, 'train') + "
                                "data.index(root, 1, 'test'); data.clip_cache(ents, root, 6, 16, num_workers=0, "
                                "checkpoint_s=0.0)")
    done = (np.load(partial / "status.npy") > 0).sum()
    assert 0 < done < 24  # some work was checkpointed, not all
    ents = index(ucf, 1, "train") + index(ucf, 1, "test")
    resumed = clip_cache(ents, ucf, 6, 16, num_workers=0)
    assert not partial.exists() and resumed.ok.all()
    fresh = fresh_build(tmp_path, runs, lambda: clip_cache(ents, ucf, 6, 16, num_workers=0))
    assert fresh.key == resumed.key
    np.testing.assert_array_equal(np.asarray(resumed.clips), np.asarray(fresh.clips))
    np.testing.assert_array_equal(resumed.lengths, fresh.lengths)


def test_process_pool_matches_in_process(ucf, runs):
    ents = index(ucf, 1, "train") + index(ucf, 1, "test")
    a = np.asarray(clip_cache(ents, ucf, 4, 16, num_workers=0).clips).copy()
    os.environ["ECHOES_RUNS"] = str(runs / "b")
    try:
        b = clip_cache(ents, ucf, 4, 16, num_workers=2)
    finally:
        os.environ["ECHOES_RUNS"] = str(runs)
    np.testing.assert_array_equal(a, np.asarray(b.clips))


def test_augmented_copies(ucf, runs):
    s = load("ucf101", ucf, frames=4, frame_size=16, val_fraction=None)
    a = load("ucf101", ucf, frames=4, frame_size=16, val_fraction=None, augment=2, jitter=True, crop=0.7, flip=True)
    assert len(a.train) == 3 * len(s.train) and len(a.test) == len(s.test)
    assert len(a.info["augment_caches"]) == 2
    n = len(s.train)
    assert not np.array_equal(np.asarray(a.train.X[:n]), np.asarray(a.train.X[n:2 * n]))


def test_decode_resizes_320x240(tmp_path):
    rng = np.random.default_rng(0)
    f = data.write_avi(tmp_path / "big.avi", rng.integers(0, 255, (30, 240, 320, 3), dtype=np.uint8))
    clip, n = data.decode_clip(f, 8, 112)
    assert clip.shape == (8, 112, 112, 3) and n == 8


# ---------------------------------------------------------------- other sources

def write_cifar(root: Path, n=20):
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"batch_label": name.encode(), b"labels": rng.integers(0, 10, n).tolist(),
                 b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"filenames": [b"x.png"] * n}
        with open(d / name, "wb") as f:
            pickle.dump(batch, f, protocol=2)
    with open(d / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [f"c{i}".encode() for i in range(10)], b"num_cases_per_batch": n}, f, protocol=2)
    return root


def test_cifar10_rows_and_patches(tmp_path, runs):
    root = write_cifar(tmp_path / "cifar")
    s = load("cifar10", root, val_fraction=0.1, download=False)
    assert s.train.X.shape[1:] == (32, 96) and len(s.train) + len(s.val) == 100 and len(s.test) == 20
    _, ytr, *_ = data.read_cifar10(root, download=False)
    assert np.allclose(np.asarray(s.test.X[0], np.float32).reshape(32, 32, 3),
                       data.read_cifar10(root, False)[2][0] / 255, atol=2e-3)
    assert s.classes[:2] == ["c0", "c1"] and ytr.shape == (100,)
    p = load("cifar10", root, mode="patches", patch=4, download=False)
    assert p.train.X.shape[1:] == (64, 48)
    with pytest.raises(FileNotFoundError, match="CIFAR-10 not found"):
        load("cifar10", tmp_path / "none", download=False)


def write_frame_folders(root: Path) -> Path:
    "Six folders of 10 JPEGs (video0-3 train, video4-5 test), a missing folder listed, video5 with a broken frame."
    from PIL import Image
    lines = {"train": [], "test": []}
    rng = np.random.default_rng(0)
    for v in range(6):
        d = root / f"video{v}"
        d.mkdir(parents=True)
        for k in range(1, 11):
            Image.fromarray(rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)).save(d / f"img_{k:05d}.jpg")
        lines["test" if v >= 4 else "train"].append(f"video{v} 1 10 {v % 2}")
    lines["train"].append("missing 1 10 0")
    (root / "video5" / "img_00004.jpg").write_text("broken")
    lines["train"].append("video5 1 10 1")
    for k, v in lines.items():
        (root / f"{k}.txt").write_text("\n".join(v) + "\n")
    return root


def test_frame_folders(tmp_path, runs):
    root = write_frame_folders(tmp_path / "frames")
    s = load("frames", root, frames=5, frame_size=16, val_fraction=None)
    assert len(s.train) == 4 and len(s.test) == 1  # video5 (broken) is skipped in both lists
    assert s.train.X.shape == (4, 5, 64)
    reasons = [d["reason"] for d in s.info["skipped"]]
    assert any("not found" in r for r in reasons) and any("img_00004.jpg" in r for r in reasons)


FRAMES_BUILD = ("data._frames_cache(data.read_annotations(root / 'train.txt', root)[0], root, 5, 16, "
                "'img_{:05d}.jpg', checkpoint_s=0.0)")


def test_killed_frame_folder_build_resumes(tmp_path, runs):
    "Frame folders build through the same resumable clip cache builder as videos."
    root = write_frame_folders(tmp_path / "frames")
    partial = kill_during_build(runs, "_frame_job", root, 3, FRAMES_BUILD)
    assert (np.load(partial / "status.npy") > 0).sum() == 2
    ents = data.read_annotations(root / "train.txt", root)[0]
    resumed = data._frames_cache(ents, root, 5, 16, "img_{:05d}.jpg")
    assert not partial.exists() and resumed.ok.tolist() == [True] * 4 + [False]
    assert "img_00004.jpg" in resumed.skipped[0]["reason"]
    fresh = fresh_build(tmp_path, runs, lambda: data._frames_cache(ents, root, 5, 16, "img_{:05d}.jpg"))
    assert fresh.key == resumed.key
    np.testing.assert_array_equal(np.asarray(resumed.clips), np.asarray(fresh.clips))


def test_unfinished_synthetic_dataset_is_regenerated(runs):
    root = data.synthetic_root(classes=2, clips_per_class=4, frames=4, size=8)
    clip = root / "MoveLeft/v_MoveLeft_g02_c01.avi"
    before = clip.read_bytes()
    (root / "synthetic.json").unlink()  # as if the generation had been killed before its last file
    clip.write_bytes(before[:100])
    assert data.synthetic_root(classes=2, clips_per_class=4, frames=4, size=8) == root
    assert (root / "synthetic.json").exists() and clip.read_bytes() == before
    assert not list(root.parent.glob("*.partial"))


def test_arrays(runs):
    X = [np.random.rand(t, 3) for t in range(2, 12)]
    s = load((X, np.arange(10) % 2), val_fraction=0.2)
    assert len(s.train) + len(s.val) + len(s.test) == 10
    assert s.train.X.shape[2] == 3


def test_unknown_names(runs):
    with pytest.raises(ValueError, match="valid names: synthetic, ucf101, frames, cifar10"):
        load("youtube8m")
    with pytest.raises(ValueError, match="valid names: pixels, randconv, resnet18"):
        load("synthetic", encoder="clip")


# ---------------------------------------------------------------- the built-in dataset does its job

def _esn_states(X, n=500, leak=0.3, rho=0.9, seed=0):
    import torch
    g = torch.Generator().manual_seed(seed)
    U = torch.from_numpy(np.asarray(X, np.float32))
    D = U.shape[2]
    Win = (torch.rand(n, D, generator=g) * 2 - 1) * 3 / D ** 0.5
    W = torch.randn(n, n, generator=g) * (torch.rand(n, n, generator=g) < 0.1)
    W *= rho / torch.linalg.eigvals(W).abs().max()
    b = (torch.rand(n, generator=g) * 2 - 1) * 0.2
    h = torch.zeros(len(U), n)
    for t in range(U.shape[1]):
        h = (1 - leak) * h + leak * torch.tanh(U[:, t] @ Win.T + h @ W.T + b)
    return h.double()


def _ridge_acc(Htr, ytr, Hva, yva, Hte, yte):
    import torch
    def fit(H, y, lam):
        H = torch.cat([H, torch.ones(len(H), 1, dtype=H.dtype)], 1)
        Y = torch.nn.functional.one_hot(torch.from_numpy(y), 8).double()
        return torch.linalg.solve(H.T @ H + lam * torch.eye(H.shape[1], dtype=H.dtype), H.T @ Y)
    def acc(W, H, y):
        return float(((torch.cat([H, torch.ones(len(H), 1, dtype=H.dtype)], 1) @ W).argmax(1).numpy() == y).mean())
    lam = max((1e-3, 1e-2, 0.1, 1, 10), key=lambda lam: acc(fit(Htr, ytr, lam), Hva, yva))
    return acc(fit(Htr, ytr, lam), Hte, yte)


@pytest.mark.slow
def test_default_dataset_needs_memory(runs):
    "The contract of the built-in dataset: an ESN reads it, a memoryless frame average cannot."
    s = load("synthetic")
    assert (s.info["counts"], len(s.classes)) == ({"train": 448, "val": 128, "test": 224}, 8)
    esn = _ridge_acc(_esn_states(s.train.X), s.train.y, _esn_states(s.val.X), s.val.y, _esn_states(s.test.X), s.test.y)
    import torch
    m = [torch.from_numpy(np.asarray(x, np.float64).mean(1)) for x in (s.train.X, s.val.X, s.test.X)]
    mean = _ridge_acc(m[0], s.train.y, m[1], s.val.y, m[2], s.test.y)
    assert esn >= 0.85, esn
    assert mean <= 0.25, mean
