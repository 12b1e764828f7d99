from typing import Literal

import pytest
import torch

from difftilt.core import ConfigError, TimeMLP
from difftilt.core.config import ConfigMixin, load_yaml, validate_kwargs


def _target(alpha: float, steps: int = 10, mode: Literal["a", "b"] = "a", names: list[str] | None = None,
            flag: bool = False):
    return None


def test_validate_kwargs_accepts_and_converts():
    out = validate_kwargs(_target, {"alpha": 1, "steps": 3, "mode": "b", "names": ["x"]}, "sec")
    assert out == {"alpha": 1.0, "steps": 3, "mode": "b", "names": ["x"]} and isinstance(out["alpha"], float)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"alpha": "abc"}, "sec.alpha: expected a number, got str 'abc'"),
        ({"alpha": 1.0, "steps": 2.5}, "sec.steps: expected an integer"),
        ({"alpha": 1.0, "steps": True}, "sec.steps: expected an integer"),
        ({"alpha": 1.0, "mode": "c"}, "sec.mode: expected one of 'a', 'b'"),
        ({"alpha": 1.0, "names": ["x", 3]}, r"sec.names\[1\]: expected a string"),
        ({"alpha": 1.0, "flag": "yes"}, "sec.flag: expected true/false"),
        ({"alpha": 1.0, "alhpa": 2}, "unknown field 'alhpa'"),
        ({"alpha": 1.0, "stepz": 2}, "did you mean 'steps'"),
        ({}, "missing required field 'alpha'"),
    ],
)
def test_validate_kwargs_names_the_bad_field(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        validate_kwargs(_target, kwargs, "sec")


def test_load_yaml_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml: invalid YAML"):
        load_yaml(bad)
    with pytest.raises(ConfigError, match="not found"):
        load_yaml(tmp_path / "missing.yaml")
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_yaml(lst)


def test_config_mixin_round_trip(tmp_path):
    net = TimeMLP((3,), (2,), hidden=8, depth=2, zero_init=False)
    net.save_pretrained(tmp_path, "ctrl")
    assert (tmp_path / "ctrl.safetensors").is_file() and (tmp_path / "ctrl.json").is_file()
    back = ConfigMixin.from_pretrained(tmp_path, "ctrl")
    assert isinstance(back, TimeMLP) and back.config == net.config
    x = torch.randn(4, 3)
    assert torch.allclose(back(x, 0.3), net(x, 0.3))
    with pytest.raises(Exception, match="no saved module"):
        ConfigMixin.from_pretrained(tmp_path, "missing")


def test_yaml_reads_exponent_floats_without_a_dot(tmp_path):
    from difftilt.core.config import parse_yaml
    from difftilt.core.run import read_config

    assert parse_yaml("lr: 1e-3\nn: 3\nname: e5") == {"lr": 0.001, "n": 3, "name": "e5"}
    path = tmp_path / "c.yaml"
    path.write_text("finetune: {lr: 5e-4}\n")
    assert load_yaml(path)["finetune"]["lr"] == 0.0005
    assert read_config(str(path), ["finetune.lr=1e-3"])["finetune"]["lr"] == 0.001
