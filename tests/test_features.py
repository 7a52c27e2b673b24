"""echoes.features: encoders, weights, the feature cache."""
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

from echoes.features import ENCODERS, encode, feature_cache, get_encoder


class Clips:
    "A minimal clip cache: key, clips, ok."
    def __init__(self, clips, key="k", ok=None):
        self.clips, self.key = clips, key
        self.ok = np.ones(len(clips), bool) if ok is None else ok


@pytest.fixture(scope="module")
def clips():
    return np.random.default_rng(0).integers(0, 256, (4, 3, 32, 32, 3), dtype=np.uint8)


@pytest.mark.parametrize("name,dim", [("pixels", 64), ("randconv", 256), ("resnet18", 512)])
def test_encoders_shapes_and_determinism(name, dim, clips, runs):
    opts = {"weights": None} if name == "resnet18" else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        enc = get_encoder(name, **opts)
        f = encode(clips, enc, "cpu")
        assert f.shape == (4, 3, dim) and f.dtype == np.float16 and np.isfinite(f).all()
        assert enc.out_dim(32) == dim
        if name != "resnet18":
            np.testing.assert_array_equal(encode(clips, get_encoder(name, **opts), "cpu"), f)


def test_resnet18_weights_file_and_fallback(tmp_path, clips, runs):
    with pytest.warns(UserWarning, match="weights=None"):
        r0 = get_encoder("resnet18", weights=None)
    import torchvision
    net = torchvision.models.resnet18(weights=None)
    torch.save(net.state_dict(), tmp_path / "w.pth")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a weights file: no warning
        r1 = get_encoder("resnet18", weights=tmp_path / "w.pth")
    assert r1.weights_hash() != r0.weights_hash()
    a = feature_cache(Clips(clips), r0, device="cpu")
    b = feature_cache(Clips(clips), r1, device="cpu")
    assert a.key != b.key  # the weights are part of the key
    with pytest.raises(FileNotFoundError, match="weights file not found"):
        get_encoder("resnet18", weights=tmp_path / "nope.pth")


def test_random_resnet18_is_the_same_in_every_process(tmp_path):
    "Without a weights file, two processes build the same encoder: one feature-cache key, the same features."
    np.save(tmp_path / "clips.npy", np.random.default_rng(1).integers(0, 256, (2, 2, 32, 32, 3), dtype=np.uint8))
    code = ("import sys, numpy as np, torch; from echoes.features import encode, get_encoder\n"
            "torch.manual_seed(int(sys.argv[2]))  # whatever the process's own RNG state\n"
            "e = get_encoder('resnet18', weights=None, size=32); print(e.weights_hash(), e.spec)\n"
            "np.save(sys.argv[3], encode(np.load(sys.argv[1]), e, 'cpu'))")
    outs = [subprocess.run([sys.executable, "-W", "ignore", "-c", code, str(tmp_path / "clips.npy"), str(seed),
                            str(tmp_path / f"f{seed}.npy")], capture_output=True, text=True, check=True).stdout
            for seed in (1, 2)]
    assert outs[0] == outs[1], outs
    np.testing.assert_array_equal(np.load(tmp_path / "f1.npy"), np.load(tmp_path / "f2.npy"))


def test_feature_cache_reuse_and_skipped_rows(clips, runs):
    ok = np.array([True, False, True, True])
    a = feature_cache(Clips(clips, ok=ok), "pixels", device="cpu")
    assert isinstance(a.features, np.memmap) and a.features.shape == (4, 3, 64)
    assert not np.asarray(a.features[1]).any()
    np.testing.assert_allclose(np.asarray(a.features[2], np.float32),
                               encode(clips[2:3], get_encoder("pixels"), "cpu")[0].astype(np.float32))
    mtime = (a.path / "features.npy").stat().st_mtime_ns
    b = feature_cache(Clips(clips, ok=ok), "pixels", device="cpu")
    assert b.key == a.key and (b.path / "features.npy").stat().st_mtime_ns == mtime  # read, not rebuilt
    assert feature_cache(Clips(clips, key="other"), "pixels", device="cpu").key != a.key
    assert feature_cache(Clips(clips), "pixels", device="cpu", size=16).key != a.key
    assert not list(runs.glob("cache/features/*.partial"))  # no build folders left behind


def test_unfinished_feature_cache_is_rebuilt(clips, runs):
    a = feature_cache(Clips(clips), "pixels", device="cpu")
    good = np.asarray(a.features).copy()
    (a.path / "meta.json").unlink()  # as if the build had been killed before its last file
    np.lib.format.open_memmap(a.path / "features.npy", "w+", np.float16, good.shape).flush()  # zeros
    b = feature_cache(Clips(clips), "pixels", device="cpu")
    assert b.path == a.path and (b.path / "meta.json").exists()
    np.testing.assert_array_equal(np.asarray(b.features), good)


def test_unknown_encoder():
    with pytest.raises(ValueError, match="valid names: " + ", ".join(ENCODERS)):
        get_encoder("vit")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu(clips, runs):
    for name in ("pixels", "randconv"):
        enc = get_encoder(name)
        c, g = encode(clips, enc, "cpu"), encode(clips, enc, "cuda")
        np.testing.assert_allclose(c.astype(np.float32), g.astype(np.float32), atol=0.05, rtol=0.05)
