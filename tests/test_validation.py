"""One validation for every entry point: random values of every type for every TrainConfig field, through the config
and through the `echoes train` parser, never crash with anything but ConfigError and never produce a run; the rows
of the bad-input table each give one line naming the parameter, exit 2 and no run."""
import dataclasses
import math
import typing

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from echoes.cli import main, parse_value
from echoes.core import ConfigError
from echoes.train import TrainConfig, check_value, fit

FIELDS = [f.name for f in dataclasses.fields(TrainConfig)]
HINTS = typing.get_type_hints(TrainConfig)
ANY = st.one_of(st.none(), st.booleans(), st.integers(-10**12, 10**12), st.floats(allow_nan=True, allow_infinity=True),
                st.text(max_size=12), st.lists(st.one_of(st.integers(-5, 10**6), st.floats()), max_size=3),
                st.sampled_from(["nan", "inf", "-inf", "1e400", "2.5", "abc", "[1, 'x']", "None", "True", "0", "-1"]))


def _typed(name, v) -> bool:
    "`v` is of a type field `name` is annotated with."
    kinds = typing.get_args(HINTS[name]) or (HINTS[name],)
    if v is None: return type(None) in kinds
    if isinstance(v, bool): return bool in kinds
    return any(isinstance(v, k) for k in kinds if k not in (bool, type(None)))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(name=st.sampled_from(FIELDS), value=ANY)
def test_config_accepts_or_refuses_with_config_error(name, value):
    try: cfg = TrainConfig(**{name: value})
    except ConfigError as e:
        assert str(e) and (name in str(e) or "unknown" in str(e)), e  # the message names the parameter
        return
    v = getattr(cfg, name)
    assert _typed(name, v), (name, value, v)
    if isinstance(v, float): assert math.isfinite(v)
    assert dataclasses.replace(cfg).to_dict() == cfg.to_dict()  # a valid config stays valid


@pytest.fixture
def runs(tmp_path, monkeypatch):
    monkeypatch.setenv("ECHOES_RUNS", str(tmp_path))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=st.sampled_from(FIELDS), text=st.one_of(st.text(max_size=12), ANY.map(str)))
def test_cli_refuses_what_the_config_refuses_and_records_nothing(runs, capsys, name, text):
    try: TrainConfig(**{name: parse_value(text)})
    except ConfigError: pass
    else: return  # a valid value would train: the config tests cover it
    assert main(["train", f"--{name.replace('_', '-')}={text}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("echoes train: error:"), err
    assert not any(runs.iterdir()), list(runs.iterdir())  # no store, no run, no cache


ROWS = [("--lr", "abc"), ("--lr", "inf"), ("--weight-decay", "abc"), ("--spectral-radius", "inf"),
        ("--input-scaling", "inf"), ("--ridge", "inf"), ("--epochs", "2.5"), ("--hidden-size", "100000"),
        ("--spectral-radius", "nan"), ("--ridge", "nan"), ("--input-scaling", "nan")]


@pytest.mark.parametrize("option,value", ROWS)
def test_each_row_of_the_table(runs, capsys, option, value):
    assert main(["train", option, value]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and option[2:].replace("-", "_") in err[0], err  # one line, naming the parameter
    assert not any(runs.iterdir())


def test_fit_checks_its_arguments_the_same_way():
    with pytest.raises(ConfigError, match="lr must be a finite number"): fit(None, None, lr=float("inf"))
    with pytest.raises(ConfigError, match="epochs must be an integer"): fit(None, None, epochs=2.5)
    assert check_value("epochs", "3") == 3
