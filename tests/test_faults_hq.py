"""Fault suite, HQ pull, against a real Azurite: a pull merges into its destination and never loses local work
(files it does not name stay; a local file it names that was edited is reported, not overwritten, unless forced,
and then kept aside); Azurite stopped in the middle of a pull leaves nothing half-written, and a later pull
completes and verifies."""
from pathlib import Path

import numpy as np
import pytest
from services import Azurite, hq_env, sha, stopping_store

from echoes.cli import main
from echoes.cloud import HQError, HQStore, pull


@pytest.fixture(scope="module")
def azurite(tmp_path_factory):
    with Azurite(tmp_path_factory.mktemp("azurite")) as az: yield az


@pytest.fixture
def hq(azurite, monkeypatch, tmp_path, request): return hq_env(monkeypatch, azurite, tmp_path, request.node.name)


def make_object(root: Path, files: int = 3, mib: float = 0.25, seed: int = 0) -> Path:
    "A cache folder under runs/ of `files` random files, one in a subfolder."
    d = root / "cache" / "features" / "obj"
    (d / "sub").mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(files):
        (d / ("sub" if i == 0 else ".") / f"part{i}.bin").write_bytes(rng.bytes(int(mib * (1 << 20))))
    (d / "meta.json").write_text('{"encoder": "pixels"}')
    return d


def leftovers(dest: Path) -> list[str]:
    "What a pull in progress writes beside or in `dest`: none of it may remain after the pull returns or fails."
    found = [*dest.parent.glob(f".{dest.name}.hq-*"), *dest.rglob("*.part"), *dest.rglob(".*hq-*")]
    return sorted(p.name for p in found)


def test_pull_keeps_files_it_does_not_name(hq, tmp_path, capsys):
    d = make_object(tmp_path / "runs")
    HQStore().push(d)
    dest = tmp_path / "thesis"
    dest.mkdir(); (dest / "thesis.tex").write_text("draft\n")
    assert main(["hq", "pull", "obj", "--dest", str(dest), "--json"]) == 0
    assert (dest / "thesis.tex").read_text() == "draft\n", "a pull deleted a file it does not name"
    for f in ("meta.json", "sub/part0.bin", "part1.bin", "part2.bin"): assert sha(dest / f) == sha(d / f)
    assert pull("obj", dest=dest)["skipped"], "the object's files are all there: nothing to do"
    assert leftovers(dest) == []


def test_locally_modified_file_is_reported_not_overwritten(hq, tmp_path, capsys):
    d = make_object(tmp_path / "runs")
    HQStore().push(d)
    dest = tmp_path / "copy"
    pull("obj", dest=dest)
    (dest / "meta.json").write_text('{"encoder": "mine"}')               # someone edited the local copy
    (dest / "part1.bin").write_bytes(b"truncated")                       # or it was cut short
    (dest / "sub" / "part0.bin").unlink()                                # and one is simply missing
    with pytest.raises(HQError) as e: pull("obj", dest=dest)
    assert "meta.json" in str(e.value) and "part1.bin" in str(e.value) and "nothing was changed" in str(e.value)
    assert "part2.bin" not in str(e.value) and "sub/part0.bin" not in str(e.value)
    assert (dest / "meta.json").read_text() == '{"encoder": "mine"}' and not (dest / "sub" / "part0.bin").exists()
    # the CLI says it in one line, exit 2
    assert main(["hq", "pull", "obj", "--dest", str(dest)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("echoes hq: error: pull cache/obj: 2 local file(s)") and "\n" not in err
    # the default place, where the object came from: the same protection
    (d / "meta.json").write_text('{"encoder": "edited in place"}')
    with pytest.raises(HQError, match="meta.json"): pull("obj")
    assert (d / "meta.json").read_text() == '{"encoder": "edited in place"}'
    # forced: the object's bytes go in, and each modified file is kept beside its pulled one
    r = pull("obj", dest=dest, force=True)
    assert sorted(Path(k).name.split(".local-")[0] for k in r["kept_local"]) == ["meta.json", "part1.bin"]
    assert {Path(k).read_bytes() for k in r["kept_local"]} == {b'{"encoder": "mine"}', b"truncated"}
    for f in ("meta.json", "part1.bin", "sub/part0.bin"): assert sha(dest / f) == sha(Path(r["dest"]) / f)
    assert pull("obj", dest=dest)["skipped"] and leftovers(dest) == []


def test_half_written_files_never_trusted(hq, tmp_path):
    d = make_object(tmp_path / "runs")
    HQStore().push(d)
    dest = tmp_path / "copy"
    # what a pull killed with SIGKILL leaves: its hidden temporary folder beside dest, with half a file in it
    (stale := tmp_path / ".copy.hq-dead.part").mkdir()
    (stale / "part1.bin").write_bytes((d / "part1.bin").read_bytes()[:1000])
    # and a copier that wrote at the final name and was cut off: the file is there, but short
    dest.mkdir(); (dest / "part2.bin").write_bytes((d / "part2.bin").read_bytes()[:1000])
    with pytest.raises(HQError, match="part2.bin"): pull("obj", dest=dest)
    r = pull("obj", dest=dest, force=True)
    assert sha(dest / "part2.bin") == sha(d / "part2.bin") and sha(dest / "part1.bin") == sha(d / "part1.bin")
    assert len(r["kept_local"]) == 1


# ------------------------------------------------------------------------- fault: Azurite stopped mid-pull
@pytest.mark.slow
def test_azurite_stopped_mid_pull(tmp_path, monkeypatch):
    az = Azurite(tmp_path / "az")
    try:
        hq_env(monkeypatch, az, tmp_path, "faults")
        d = make_object(tmp_path / "runs", files=8, mib=1)            # 8 MiB in 9 files
        HQStore().push(d)
        dest = tmp_path / "copy"
        dest.mkdir(); (dest / "thesis.tex").write_text("draft\n")
        # 1. Blob goes away at the 4th of 9 downloads and stays away: the pull fails clearly, in bounded time
        store = stopping_store(az, "downloading", 4, max_concurrency=1, attempts=3, backoff=0.2)
        with pytest.raises(HQError, match="failed after 3 attempts") as e: store.pull("obj", dest=dest)
        assert az.key not in str(e.value)
        # 2. nothing of the failed pull is at dest or beside it; what was there stays
        assert sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*")) == ["thesis.tex"]
        assert leftovers(dest) == [] and (dest / "thesis.tex").read_text() == "draft\n"
        # 3. Blob is back: a later pull completes and verifies every file; the next one has nothing to do
        az.start()
        r = HQStore().pull("obj", dest=dest)
        assert not r["skipped"] and r["files"] == 9 and r["kept_local"] == []
        for f in d.rglob("*"):
            if f.is_file(): assert sha(dest / f.relative_to(d)) == sha(f), f
        assert (dest / "thesis.tex").read_text() == "draft\n"
        assert HQStore().pull("obj", dest=dest)["skipped"] and leftovers(dest) == []
    finally:
        az.stop()
