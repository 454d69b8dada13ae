"""Strict params loading: unknown, missing and mistyped keys are errors that name the key."""

from dataclasses import dataclass

import pytest
import yaml

from rlhf.errors import StageError
from rlhf.params import from_dict, load_section, require


@dataclass(frozen=True)
class Toy:
    lr: float
    steps: int
    name: str
    on: bool
    sizes: list[int]

    def validate(self):
        require(self.lr > 0, "toy.lr", "must be > 0")


GOOD = {"lr": 0.1, "steps": 3, "name": "a", "on": True, "sizes": [1, 2]}


def test_good_section_loads_and_converts_int_to_float():
    p = from_dict(Toy, {**GOOD, "lr": 1}, "toy")
    assert p.lr == 1.0 and isinstance(p.lr, float) and p.sizes == (1, 2)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"extra": 1}, "'toy.extra' is unknown"),
        ({"steps": "3"}, "'toy.steps': expected an integer"),
        ({"steps": 3.5}, "'toy.steps': expected an integer"),
        ({"steps": True}, "'toy.steps': expected an integer"),
        ({"on": 1}, "'toy.on': expected true or false"),
        ({"lr": "fast"}, "'toy.lr': expected a number"),
        ({"lr": float("nan")}, "'toy.lr': expected a finite number"),
        ({"lr": -1.0}, "'toy.lr': must be > 0"),
        ({"sizes": [1, "x"]}, "'toy.sizes[1]': expected an integer"),
    ],
)
def test_bad_values_name_the_key(change, message):
    with pytest.raises(StageError, match=message.replace("[", r"\[").replace("]", r"\]")):
        from_dict(Toy, {**GOOD, **change}, "toy")


def test_missing_key_is_named():
    data = dict(GOOD)
    del data["steps"]
    with pytest.raises(StageError, match="'toy.steps' is missing"):
        from_dict(Toy, data, "toy")


def test_missing_section_and_file(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({"other": {}}))
    with pytest.raises(StageError, match="no 'toy:' section"):
        load_section(path, "toy", Toy)
    with pytest.raises(StageError, match="params file not found"):
        load_section(tmp_path / "nope.yaml", "toy", Toy)
    path.write_text("toy: [unclosed")
    with pytest.raises(StageError, match="not valid YAML"):
        load_section(path, "toy", Toy)


def test_repository_params_and_tiny_profile_load_for_every_stage():
    """Both profiles define every stage's section with exactly the dataclass's keys."""
    import importlib

    from tests.conftest import ROOT, TINY

    for path in (ROOT / "params.yaml", TINY):
        sections = yaml.safe_load(path.read_text())
        for name in sections:
            module = importlib.import_module(f"stages.{name}")
            load_section(path, name, module.Params)
