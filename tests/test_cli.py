"""The `echoes` command as users call it: a subprocess, with --json output parsed back."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent


def echoes(*args, check=True, timeout=600):
    r = subprocess.run([str(BIN / "echoes"), *map(str, args)], capture_output=True, text=True, timeout=timeout,
                       env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if check:
        assert r.returncode == 0, r.stderr[-3000:]
    return r


@pytest.mark.parametrize("cmd", [[], ["train"], ["ui"], ["data"], ["data", "synth"], ["data", "index"],
                                 ["data", "cache"], ["sweep"], ["dashboard"], ["hq"]])
def test_help(cmd):
    r = echoes(*cmd, "--help")
    assert "usage: echoes" in r.stdout and len(r.stdout.splitlines()) > 3


def test_train_help_lists_every_notebook_parameter():
    from echoes.train import TrainConfig
    out = echoes("train", "--help").stdout
    for name in TrainConfig.__dataclass_fields__:
        assert f"--{name.replace('_', '-')}" in out, name


def test_data_commands_json(tmp_path):
    root = tmp_path / "syn"
    assert json.loads(echoes("data", "synth", "--out", root, "--classes", 4, "--clips-per-class", 10,
                             "--json").stdout) == {"root": str(root)}
    train = json.loads(echoes("data", "index", "--root", root, "--split", "train", "--json").stdout)
    official = (root / "ucfTrainTestlist" / "trainlist01.txt").read_text().split()[::2]
    assert [r["path"] for r in train] == official  # no validation option: exactly the official train list
    assert set(train[0]) == {"path", "label", "class", "group"}
    val = json.loads(echoes("data", "index", "--root", root, "--split", "val", "--val-fraction", 0.25,
                            "--json").stdout)
    rest = json.loads(echoes("data", "index", "--root", root, "--split", "train", "--val-fraction", 0.25,
                             "--json").stdout)
    assert val and {r["group"] for r in val}.isdisjoint({r["group"] for r in rest})  # whole groups only
    assert sorted(r["path"] for r in val + rest) == sorted(official)
    summary = json.loads(echoes("data", "cache", "--root", root, "--frames", 8, "--size", 16, "--json").stdout)
    assert summary["clips"] == 40 and summary["skipped"] == []
    assert Path(summary["clip_cache"]).is_dir() and Path(summary["feature_cache"]).is_dir()
    again = json.loads(echoes("data", "cache", "--root", root, "--frames", 8, "--size", 16, "--json").stdout)
    assert again["clip_cache"] == summary["clip_cache"]  # reused, not rebuilt


def test_train_json_and_resume_of_finished_run(tmp_path):
    uri = f"sqlite:///{tmp_path}/m.db"
    r = echoes("train", "--model", "esn", "--tracking-uri", uri, "--run-name", "cli-esn", "--json")
    lines = [ln for ln in r.stdout.splitlines() if ln.strip()]
    assert len(lines) == 1
    res = json.loads(lines[0])
    assert res["test_acc"] >= 0.85 and res["status"] == "FINISHED" and res["run_id"]
    again = json.loads(echoes("train", "--model", "esn", "--tracking-uri", uri, "--run-name", "cli-esn",
                              "--json").stdout)
    assert again["run_id"] == res["run_id"]  # the same run, not a second one


def test_bad_input_is_a_clear_error(tmp_path):
    r = echoes("train", "--model", "transformer", check=False)
    assert r.returncode == 2 and "valid models: esn" in r.stderr and "Traceback" not in r.stderr
    r = echoes("data", "index", "--root", tmp_path / "nowhere", "--split", "train", check=False)
    assert r.returncode == 2 and "nowhere" in r.stderr and "Traceback" not in r.stderr


def test_hq_push_ls_pull_through_the_cli(tmp_path):
    "`echoes hq` against a real Azurite: push a cache, list it, pull it into a fresh place, skip a matching pull."
    from services import Azurite
    root = tmp_path / "syn"
    echoes("data", "synth", "--out", root, "--classes", 2, "--clips-per-class", 4)
    cache = json.loads(echoes("data", "cache", "--root", root, "--frames", 4, "--size", 16, "--json").stdout)
    key = cache["feature_cache_key"]
    with Azurite(tmp_path / "azurite") as az:
        os.environ.update(az.env)
        try:
            az.create_container("echoes")
            pushed = json.loads(echoes("hq", "push", key, "--json").stdout)
            assert pushed["name"] == key
            listed = json.loads(echoes("hq", "ls", "--json").stdout)
            assert key in {o["name"] for o in listed}
            dest = tmp_path / "pulled"
            first = json.loads(echoes("hq", "pull", key, "--dest", dest, "--json").stdout)
            again = json.loads(echoes("hq", "pull", key, "--dest", dest, "--json").stdout)
            assert not first.get("skipped") and again.get("skipped")
            names = lambda d: sorted(p.name for p in Path(d).iterdir())  # noqa: E731
            assert names(dest) == names(cache["feature_cache"])
            assert az.key not in json.dumps([pushed, listed, first])
        finally:
            for k in az.env:
                os.environ.pop(k, None)
