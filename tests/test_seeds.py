"""Results over seeds: the statistics against hand-computed values, which seeds a sweep sets, reading
experiments from `dvc exp show --json` and from folders, the summary files and the CLI.

The end-to-end sweep (`rlhf seeds run --seeds 2` in a scratch git repository on the tiny profile) takes
several minutes on two cores, so it runs in CI's .ci/seeds-tiny script, not here.
"""

from __future__ import annotations

import json
import math

import pytest
import yaml
from typer.testing import CliRunner

from cli.main import app
from rlhf.errors import StageError
from rlhf.seeds import (
    describe, experiments_from_show, flatten, headline, markdown, queue_commands, seed_of, summarize,
    sort_by_seed, t_quantile, t_two_sided_mass, training_seed_keys,
)
from tests.conftest import ROOT


def test_t_quantile_matches_the_printed_tables():
    # Two-sided 95% critical values of Student's t (any statistics table).
    for df, t in ((1, 12.706), (2, 4.303), (3, 3.182), (4, 2.776), (9, 2.262), (29, 2.045)):
        assert t_quantile(0.95, df) == pytest.approx(t, abs=5e-4), df
    assert t_quantile(0.99, 4) == pytest.approx(4.604, abs=5e-4)
    assert t_two_sided_mass(1.0, 1) == pytest.approx(0.5)  # Cauchy: P(|T| <= 1) = 1/2
    assert t_two_sided_mass(2.0, 2) == pytest.approx(2 / math.sqrt(6))  # df 2: t / sqrt(2 + t^2)
    assert t_two_sided_mass(0.0, 7) == 0.0 and t_two_sided_mass(1e6, 8) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        t_quantile(0.95, 0)


def test_describe_by_hand():
    s = describe([1.0, 2.0, 3.0, 4.0])
    # mean 2.5; sd = sqrt((2.25 + 0.25 + 0.25 + 2.25) / 3) = sqrt(5/3) = 1.29099;
    # half-width = 3.18245 * 1.29099 / 2 = 2.05424
    assert s["n"] == 4 and s["mean"] == 2.5 and s["min"] == 1.0 and s["max"] == 4.0
    assert s["sd"] == pytest.approx(1.290994, abs=1e-6)
    assert s["ci_low"] == pytest.approx(0.44576, abs=1e-4) and s["ci_high"] == pytest.approx(4.55424, abs=1e-4)
    two = describe([0.5, 0.7])  # sd = 0.141421; half = 12.7062 * 0.141421 / sqrt(2) = 1.27062
    assert two["ci_low"] == pytest.approx(0.6 - 1.27062, abs=1e-4)
    one = describe([0.3])
    assert one["mean"] == 0.3 and one["sd"] is None and one["ci_low"] is None


def test_sweep_sets_training_seeds_only():
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    keys = training_seed_keys(params)
    assert {"pretrain.seed", "sft.seed", "sample.seed", "rank.seed", "reward.seed", "ppo.seed", "bestofn.seed"} <= set(keys)
    assert not {"world.seed", "prepare.seed", "evaluate.seed"} & set(keys)
    cmds = queue_commands([0, 1], ["sft.seed", "ppo.seed"], prefix="seed", jobs=1)
    assert cmds[0] == ["dvc", "exp", "run", "--queue", "--name", "seed-0", "-S", "sft.seed=0", "-S", "ppo.seed=0"]
    assert cmds[1][5] == "seed-1" and cmds[1][-1] == "ppo.seed=1"
    assert cmds[-1] == ["dvc", "exp", "run", "--run-all", "--jobs", "1"]


METRICS_A = {
    "evaluate": {"models": {"sft": {"gold": {"total": 0.5, "by_family": {"arith": 0.1}},
                                    "toxicity": {"expected_max_toxicity": 0.4, "k": 25},
                                    "truthfulqa": {"mc1": 0.3, "mc2": 0.35, "questions": 120}},
                            "policy": {"gold": {"total": 0.7}}},
                 "win_rates": {"policy_vs_sft": {"win_rate": 0.6, "ci_low": 0.5, "wins": 3}}, "judge": "heldout"},
    "reward": {"heldout": {"accuracy_gold": 0.7, "pairs": 100}},
    "bestofn": {"best_of": {"8": {"gold": {"mean": 0.55, "ci_low": 0.5}}}, "sft_greedy": {"gold": {"mean": 0.5}}},
}
METRICS_B = {
    "evaluate": {"models": {"sft": {"gold": {"total": 0.6}}, "policy": {"gold": {"total": 0.8}}},
                 "win_rates": {"policy_vs_sft": {"win_rate": 0.5}}},
    "reward": {"heldout": {"accuracy_gold": 0.8}},
}


def test_flatten_and_headline_pick_the_headline_numbers():
    flat = flatten({"a": {"b": 1, "c": True, "d": "x", "e": [1], "f": float("nan")}, "g": 2.5})
    assert flat == {"a.b": 1.0, "g": 2.5}
    h = headline(METRICS_A)
    assert h["evaluate.models.sft.gold.total"] == 0.5 and h["evaluate.models.policy.gold.total"] == 0.7
    assert h["evaluate.win_rates.policy_vs_sft.win_rate"] == 0.6
    assert h["evaluate.win_rates.policy_vs_sft.ci_low"] == 0.5  # a seed's own interval, to check it per seed
    assert h["evaluate.models.sft.toxicity.expected_max_toxicity"] == 0.4
    assert h["evaluate.models.sft.truthfulqa.mc2"] == 0.35 and h["reward.heldout.accuracy_gold"] == 0.7
    assert h["bestofn.best_of.8.gold.mean"] == 0.55 and h["bestofn.sft_greedy.gold.mean"] == 0.5
    sizes = headline({"bestofn": {"best_of": {str(n): {"gold": {"mean": 0.1}} for n in (16, 2, 1)}}})
    assert list(sizes) == [f"bestofn.best_of.{n}.gold.mean" for n in (1, 2, 16)]  # numeric order, not text
    # Counts, other intervals and per-family details are not headline numbers.
    assert "bestofn.best_of.8.gold.ci_low" not in h
    assert not [k for k in h if k.endswith((".k", ".wins", ".questions", ".pairs", ".arith"))]


def test_summarize_over_experiments_with_missing_metrics():
    exps = [{"name": "seed-0", "params": {"world": {"seed": 0}, "sft": {"seed": 0}}, "metrics": METRICS_A},
            {"name": "seed-1", "params": {"world": {"seed": 0}, "sft": {"seed": 1}}, "metrics": METRICS_B}]
    s = summarize(exps)
    assert [e["seed"] for e in s["experiments"]] == [0, 1]
    gold = s["numbers"]["evaluate.models.sft.gold.total"]
    assert gold["values"] == {"seed-0": 0.5, "seed-1": 0.6} and gold["mean"] == pytest.approx(0.55)
    assert gold["sd"] == pytest.approx(math.sqrt(0.005))
    assert gold["ci_high"] - gold["mean"] == pytest.approx(12.7062 * math.sqrt(0.005) / math.sqrt(2), abs=1e-3)
    bon = s["numbers"]["bestofn.best_of.8.gold.mean"]  # only seed-0 ran best-of-n
    assert bon["n"] == 1 and bon["sd"] is None and bon["values"] == {"seed-0": 0.55}
    assert {"cpu", "torch", "python"} <= set(s["machine"]) and s["machine"]["torch"]
    table = markdown(s)
    assert "| evaluate.models.sft.gold.total | 2 | 0.550 | 0.071 | [-0.085, 1.185] | 0.500 | 0.600 | 0.500 | 0.600 |" in table
    assert "| bestofn.best_of.8.gold.mean | 1 | 0.550 |  |  | 0.550 | 0.550 | 0.550 |  |" in table
    assert "torch" in table.splitlines()[1]
    with pytest.raises(StageError):
        summarize([])
    assert seed_of({"params": {}}) is None


def test_experiments_from_dvc_exp_show_json():
    # The shape of `dvc exp show --json` (DVC 3): baselines with their experiments' revisions.
    def rev(name, sft_seed, gold):
        return {"rev": "abc", "name": name, "data": {
            "params": {"params.yaml": {"data": {"world": {"seed": 0}, "sft": {"seed": sft_seed}}}},
            "metrics": {"metrics/evaluate.json": {"data": {"models": {"sft": {"gold": {"total": gold}}}}},
                        "metrics/broken.json": {"error": {"type": "JSONDecodeError"}}}}}

    show = [{"rev": "workspace", "name": None, "data": {"metrics": {}}},
            {"rev": "main", "name": "main", "experiments": [
                {"revs": [rev("seed-0", 0, 0.5)], "name": "seed-0"},
                {"revs": [rev("seed-1", 1, 0.6)], "name": "seed-1"},
                {"revs": [rev("other", 0, 0.9)], "name": "other"}]}]
    exps = experiments_from_show(show, ["seed-0", "seed-1"])
    assert [e["name"] for e in exps] == ["seed-0", "seed-1"]
    assert exps[1]["metrics"] == {"evaluate": {"models": {"sft": {"gold": {"total": 0.6}}}}}
    assert seed_of(exps[1]) == 1
    assert len(experiments_from_show(show)) == 3
    newest_first = experiments_from_show(show, ["seed-0", "seed-1"])[::-1]  # `dvc exp show` lists the newest first
    assert [e["name"] for e in sort_by_seed(newest_first)] == ["seed-0", "seed-1"]


def test_cli_summarize_from_run_folders(tmp_path):
    for name, metrics, seed in (("run-a", METRICS_A, 0), ("run-b", METRICS_B, 1)):
        (tmp_path / name / "metrics").mkdir(parents=True)
        for stem, data in metrics.items():
            (tmp_path / name / "metrics" / f"{stem}.json").write_text(json.dumps(data))
        (tmp_path / name / "params.yaml").write_text(yaml.safe_dump({"world": {"seed": 0}, "sft": {"seed": seed}}))
    out_json, out_md = tmp_path / "out/seeds.json", tmp_path / "out/seeds.md"
    res = CliRunner().invoke(app, ["seeds", "summarize", "--runs", str(tmp_path / "run-a"), "--runs", str(tmp_path / "run-b"),
                                   "--json", str(out_json), "--markdown", str(out_md)])
    assert res.exit_code == 0, res.output
    data = json.loads(out_json.read_text())
    assert data["numbers"]["reward.heldout.accuracy_gold"]["mean"] == pytest.approx(0.75)
    assert [e["seed"] for e in data["experiments"]] == [0, 1]
    assert "| reward.heldout.accuracy_gold | 2 | 0.750 |" in out_md.read_text()

    res = CliRunner().invoke(app, ["seeds", "summarize", "--runs", str(tmp_path / "nothing")])
    assert res.exit_code == 1 and "no metrics/ folder" in res.output


def test_cli_run_outside_a_dvc_repository_fails_in_one_line(tmp_path, monkeypatch):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"world": {"seed": 0}, "sft": {"seed": 0}}))
    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(app, ["seeds", "run", "--seeds", "1", "--no-summarize"])
    assert res.exit_code == 1 and "exited with" in res.output


def test_seeds_help_has_examples():
    for args in (["seeds", "--help"], ["seeds", "run", "--help"], ["seeds", "summarize", "--help"]):
        res = CliRunner().invoke(app, args)
        assert res.exit_code == 0 and "Example" in res.output, args


def test_cli_run_without_dvc_says_how_to_get_it(tmp_path, monkeypatch):
    import shutil

    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"world": {"seed": 0}, "sft": {"seed": 0}}))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(shutil, "which", lambda *a, **k: None)
    res = CliRunner().invoke(app, ["seeds", "run", "--seeds", "1", "--no-summarize"])
    assert res.exit_code == 1 and "dvc not found on PATH or beside this Python" in res.output
    assert "Traceback" not in res.output
