"""The held-out split of the preference stages (`rlhf.preferences.split_heldout`): reward and dpo hold out
the same prompts, every comparison of one prompt on one side, so their held-out numbers are comparable."""

from __future__ import annotations

import ast

from rlhf.preferences import is_heldout, split_heldout
from tests.conftest import ROOT


def groups(n: int) -> list[dict]:
    return [{"prompt": f"Question number {i}?", "responses": ["a", "b"], "pairs": [(0, 1)]} for i in range(n)]


def test_split_is_a_partition_in_order_by_prompt():
    data = groups(200)
    train, val = split_heldout(data, 0.3, seed=7)
    assert sorted(map(id, train + val)) == sorted(map(id, data))
    assert train == [g for g in data if g in train] and val == [g for g in data if g in val]  # order kept
    assert all(is_heldout(g["prompt"], 0.3, 7) for g in val)
    assert not any(is_heldout(g["prompt"], 0.3, 7) for g in train)
    assert 30 <= len(val) <= 90  # a hash split: about 60 of 200


def test_one_prompt_lands_on_one_side_however_it_is_written():
    """Rankings of the same prompt (case, spacing, Unicode form aside) never straddle train and held-out."""
    variants = ["Name a Blue Animal.", "name a blue animal.", "  Name  a Blue\tAnimal. ", "Ｎame a Blue Animal."]
    for seed in range(20):
        sides = {bool(split_heldout([{"prompt": p}], 0.5, seed)[1]) for p in variants}
        assert len(sides) == 1, seed


def test_seed_and_fraction_move_the_split():
    data = groups(200)
    assert split_heldout(data, 0.3, seed=0)[1] != split_heldout(data, 0.3, seed=1)[1]
    small, large = split_heldout(data, 0.1, seed=0)[1], split_heldout(data, 0.5, seed=0)[1]
    assert set(map(id, small)) < set(map(id, large))  # a larger fraction holds out a superset
    assert split_heldout(data, 0.0, seed=0) == (data, [])


def test_reward_and_dpo_split_with_it():
    """Both preference stages call the one split, so a change to it moves both the same way."""
    for stage in ("reward", "dpo"):
        tree = ast.parse((ROOT / "stages" / f"{stage}.py").read_text(encoding="utf-8"))
        called = {n.func.id for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
        assert "split_heldout" in called and "is_heldout" not in called, stage
