"""Best-of-n: the unbiased estimator against brute force over all subsets, the KL formula, and the stage
end to end on the tiny profile (metrics, curve CSV, determinism, proxy-only without a world)."""

from __future__ import annotations

import itertools
import json
import math
import random
import subprocess
import sys

import pytest

from rlhf.errors import StageError
from stages.bestofn import (
    best_of_n_expectation, best_of_n_kl, best_of_n_weights, curve_rows, n_values,
)
from tests.conftest import ROOT, tiny_params, without_timing


def brute_force(proxy, values, n):
    """Mean over every n-subset of the value of its highest-proxy member (a tie: mean of the tied members)."""
    total = []
    for subset in itertools.combinations(range(len(proxy)), n):
        top = max(proxy[i] for i in subset)
        tied = [values[i] for i in subset if proxy[i] == top]
        total.append(sum(tied) / len(tied))
    return sum(total) / len(total)


@pytest.mark.parametrize("N", [1, 2, 3, 5, 8])
def test_estimator_matches_brute_force_over_all_subsets(N):
    rng = random.Random(N)
    for trial in range(20):
        # Integer proxy scores on a small range give ties often; a second draw has none.
        proxy = [float(rng.randint(0, 3)) for _ in range(N)] if trial % 2 else [rng.gauss(0, 1) for _ in range(N)]
        values = [rng.random() for _ in range(N)]
        for n in range(1, N + 1):
            assert best_of_n_expectation(proxy, values, n) == pytest.approx(brute_force(proxy, values, n), abs=1e-12)


def test_estimator_ends_mean_and_argmax():
    proxy, gold = [0.3, -1.0, 2.0, 0.5], [0.1, 0.9, 0.4, 0.7]
    assert best_of_n_expectation(proxy, gold, 1) == pytest.approx(sum(gold) / 4)  # n=1: the plain mean
    assert best_of_n_expectation(proxy, gold, 4) == pytest.approx(0.4)  # n=N: the RM's argmax
    assert best_of_n_expectation(proxy, proxy, 2) >= best_of_n_expectation(proxy, proxy, 1)  # proxy never falls


def test_weights_sum_to_one_and_match_the_formula():
    for N in (1, 4, 16):
        for n in range(1, N + 1):
            w = best_of_n_weights(N, n)
            assert sum(w) == pytest.approx(1.0)
            assert all(x == 0 for x in w[: n - 1])  # the n-1 lowest can never be the best of n
    # N=4, n=2: C(i-1, 1) / C(4, 2) = 0, 1/6, 2/6, 3/6
    assert best_of_n_weights(4, 2) == pytest.approx([0, 1 / 6, 2 / 6, 3 / 6])
    with pytest.raises(ValueError):
        best_of_n_weights(4, 5)


def test_kl_formula_and_n_values():
    assert best_of_n_kl(1) == 0.0
    assert best_of_n_kl(2) == pytest.approx(math.log(2) - 0.5)
    assert best_of_n_kl(16) == pytest.approx(math.log(16) - 15 / 16)
    assert n_values(16) == [1, 2, 4, 8, 16]
    assert n_values(12) == [1, 2, 4, 8, 12]
    assert n_values(1) == [1]


def test_curve_kl_adds_the_picks_tempering_log_ratio():
    """kl = log n − (n−1)/n to the sampler, plus the expected log π_T − log π of the RM's pick."""
    from stages.bestofn import best_of_curve

    proxy = [0.1, 0.9, 0.5, 0.3, 0.2, 0.8, 0.4, 0.7]  # two prompts, four samples each
    tempering = [1.0, 3.0, 2.0, 0.5, 0.0, 4.0, 1.0, 2.0]
    ci = {"resamples": 50, "seed": 0}
    curve = best_of_curve(proxy, None, None, [], samples=4, ci=ci, tempering=tempering)
    plain = best_of_curve(proxy, None, None, [], samples=4, ci=ci)
    for n, entry in curve.items():
        shift = (best_of_n_expectation(proxy[:4], tempering[:4], n) + best_of_n_expectation(proxy[4:], tempering[4:], n)) / 2
        assert entry["kl_sampling"] == plain[n]["kl"] == pytest.approx(best_of_n_kl(n), abs=1e-6)
        assert entry["kl"] == pytest.approx(best_of_n_kl(n) + shift, abs=1e-6)
        assert entry["sqrt_kl"] == pytest.approx(math.sqrt(entry["kl"]), abs=1e-6)
    assert curve[1]["kl"] == pytest.approx(sum(tempering) / 8, abs=1e-6)  # n = 1: KL(π_T ‖ π), estimated
    assert curve[4]["kl"] == pytest.approx(best_of_n_kl(4) + (3.0 + 4.0) / 2, abs=1e-6)  # the argmax's log-ratio


def test_curve_rows_drop_gold_without_a_judge():
    with_gold = {1: {"kl": 0.0, "sqrt_kl": 0.0, "proxy": {"mean": 0.1}, "gold": {"mean": 0.2}}}
    assert curve_rows(with_gold) == ["n,kl,sqrt_kl,proxy,gold", "1,0.000000,0.000000,0.1000,0.2000"]
    without = {1: {"kl": 0.0, "sqrt_kl": 0.0, "proxy": {"mean": 0.1}}}
    assert curve_rows(without)[0] == "n,kl,sqrt_kl,proxy"


# ----------------------------------------------------------------------------------------------
# The stage on the tiny profile


@pytest.fixture(scope="module")
def bon_run(tiny_rm):
    from stages import bestofn

    out = tiny_rm.root / "bestofn"
    result = bestofn.run(tiny_params("bestofn"), sft=tiny_rm.sft, reward=tiny_rm.reward,
                         test=tiny_rm.prepared / "test.jsonl", world=tiny_rm.world, metrics=out / "metrics.json",
                         plots=out / "plots")
    return tiny_rm, out, result


def test_bestofn_writes_metrics_and_curve(bon_run):
    tiny_rm, out, result = bon_run
    params = tiny_params("bestofn")
    m = json.loads((out / "metrics.json").read_text())
    assert m["timing"] == result["timing"] and m["timing"]["samples_per_s"] > 0
    assert m["timing"]["wall_s"] >= m["timing"]["train_s"] >= 0
    assert m["prompts"] == params.prompts and m["samples"] == params.samples
    assert list(m["best_of"]) == [str(n) for n in n_values(params.samples)]
    for n, entry in m["best_of"].items():
        assert entry["kl_sampling"] == pytest.approx(best_of_n_kl(int(n)), abs=1e-6)
        assert entry["kl"] >= 0 and entry["sqrt_kl"] == pytest.approx(math.sqrt(entry["kl"]), abs=1e-6)
        for key in ("proxy", "gold", "vs_greedy"):
            assert entry[key]["ci_low"] <= entry[key]["mean"] <= entry[key]["ci_high"], (n, key)
        assert 0 <= entry["gold"]["mean"] <= 1
    assert params.temperature < 1  # the tiny profile samples below 1: the KL from SFT adds the sampler's distance
    assert m["tempering_kl"] > 0 and m["best_of"]["1"]["kl"] == pytest.approx(m["tempering_kl"], abs=1e-5)
    proxies = [e["proxy"]["mean"] for e in m["best_of"].values()]
    assert proxies == sorted(proxies)  # the RM's own score of its pick cannot fall as n grows
    assert 0 <= m["sft_greedy"]["gold"]["mean"] <= 1 and m["sft_greedy"]["gold"]["by_family"]
    for n, entry in m["best_of"].items():
        assert entry["vs_greedy"]["mean"] == pytest.approx(entry["gold"]["mean"] - m["sft_greedy"]["gold"]["mean"],
                                                           abs=2e-4)
    lines = (out / "plots/bestofn.csv").read_text().splitlines()
    assert lines[0] == "n,kl,sqrt_kl,proxy,gold" and len(lines) == 1 + len(m["best_of"])
    row = dict(zip(lines[0].split(","), lines[-1].split(","), strict=True))
    assert float(row["gold"]) == pytest.approx(m["best_of"][str(params.samples)]["gold"]["mean"], abs=1e-4)
    assert not list(out.rglob("*.tmp"))  # atomic writes leave no temporaries


def test_bestofn_is_deterministic_and_runs_without_a_world(bon_run, tmp_path):
    from stages import bestofn

    tiny_rm, out, _ = bon_run
    params = tiny_params("bestofn")
    bestofn.run(params, sft=tiny_rm.sft, reward=tiny_rm.reward, test=tiny_rm.prepared / "test.jsonl",
                world=tiny_rm.world, metrics=tmp_path / "m.json", plots=tmp_path / "plots")
    assert without_timing(tmp_path / "m.json") == without_timing(out / "metrics.json")
    assert (tmp_path / "plots/bestofn.csv").read_bytes() == (out / "plots/bestofn.csv").read_bytes()

    bestofn.run(params, sft=tiny_rm.sft, reward=tiny_rm.reward, test=tiny_rm.prepared / "test.jsonl",
                world=tmp_path / "no-world.json", metrics=tmp_path / "proxy.json", plots=tmp_path / "proxy")
    m = json.loads((tmp_path / "proxy.json").read_text())
    reference = json.loads((out / "metrics.json").read_text())
    assert "gold" not in m["sft_greedy"] and all("gold" not in e for e in m["best_of"].values())
    # Same samples and scores: the proxy curve does not depend on whether a gold judge is present.
    assert [e["proxy"] for e in m["best_of"].values()] == [e["proxy"] for e in reference["best_of"].values()]
    assert (tmp_path / "proxy/bestofn.csv").read_text().splitlines()[0] == "n,kl,sqrt_kl,proxy"


def test_bestofn_missing_reward_model_is_a_stage_error(tiny_run, tmp_path):
    from stages import bestofn

    with pytest.raises(StageError, match="reward model"):
        bestofn.run(tiny_params("bestofn"), sft=tiny_run.sft, reward=tmp_path / "none",
                    test=tiny_run.prepared / "test.jsonl", world=tiny_run.world, metrics=tmp_path / "m.json",
                    plots=tmp_path / "p")


def test_bestofn_cli_help():
    res = subprocess.run([sys.executable, "-m", "cli", "bestofn", "--help"], capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0 and "Example" in res.stdout and "best-of-n" in res.stdout.lower()
