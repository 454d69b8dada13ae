"""The benchmarks in bench/ run end to end on tiny configs (crash tests; the numbers are not checked).

bench/gpu_check.py --smoke and bench/profile_ppo.py --smoke run as subprocesses (its __main__ included) on whatever device is here;
generation.py and ppo_vs_trl.py run in-process on tiny models. The TRL comparison is skipped when
the optional `bench` extra (trl==1.12.0) is not installed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"


@pytest.fixture(scope="module")
def bench_path():
    sys.path.insert(0, str(BENCH))
    yield
    sys.path.remove(str(BENCH))


def test_gpu_check_smoke(tmp_path):
    out = tmp_path / "gpu.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, str(BENCH / "gpu_check.py"), "--smoke", "--threads", "1", "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["smoke"] is True
    assert result["sft"]["tokens_per_s"] > 0
    assert result["ppo"]["eps_steady"] > 0 and result["ppo"]["steps"] == 2
    assert result["model"]["params"] > 0
    assert result["generation"]["batch"] == 4 and result["generation"]["ratio_ours_over_generate"] > 0


def test_gpu_check_runs_without_dvclive(tmp_path):
    """The GPU image has no DVC: gpu_check's PPO run logs its curves through the stand-in instead."""
    out = tmp_path / "gpu.json"
    script = (
        "import runpy, sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'dvclive':\n"
        "            raise ImportError('dvclive hidden by the test')\n"
        "sys.meta_path.insert(0, Block())\n"
        f"sys.argv = ['gpu_check.py', '--smoke', '--threads', '1', '--out', {str(out)!r}]\n"
        f"runpy.run_path({str(BENCH / 'gpu_check.py')!r}, run_name='__main__')\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["dvclive"] is False and result["ppo"]["steps"] == 2


def test_profile_ppo_smoke(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, str(BENCH / "profile_ppo.py"), "--smoke", "--out-dir", str(tmp_path)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "aten::" in (tmp_path / "profile.txt").read_text()


def test_generation_smoke(tmp_path, bench_path):
    import generation

    result = generation.main(["--smoke", "--threads", "1", "--out", str(tmp_path / "gen.json")])
    run = result["runs"][0]
    assert run["batch"] == 4 and run["new_tokens"] == 4
    assert run["ours"]["tokens_per_s"] > 0 and run["generate"]["tokens_per_s"] > 0
    assert json.loads((tmp_path / "gen.json").read_text())["matmul_gflops_1024_fp32"] > 0


def test_ppo_vs_trl_smoke(tmp_path, bench_path):
    pytest.importorskip("trl")
    import ppo_vs_trl

    result = ppo_vs_trl.main(["--smoke", "--threads", "1", "--rounds", "2", "--out", str(tmp_path / "ppo.json")])
    assert result["ours"]["steps"] == result["trl"]["steps"] == 2
    # The order alternates: ours first in round 1, second in round 2.
    assert [r["position"] for r in result["runs"]["ours"]] == [1, 2]
    assert [r["position"] for r in result["runs"]["trl"]] == [2, 1]
    assert len(result["ratio_eps_steady_by_round"]) == 2
    assert result["ratio_eps_steady"] > 0
    assert 0 < result["flops"]["ours"]["share_of_matmul"]


def test_ppo_step_flops_formula(bench_path):
    from ppo_vs_trl import ppo_step_flops

    # One policy param, one value param, B·T = 10 tokens, 4 epochs: forward-only 2·(3 + 2)·10 = 100,
    # updates 4·6·2·10 = 480.
    assert ppo_step_flops(1, 1, batch=2, width=5, epochs=4) == 580
    assert ppo_step_flops(1, 1, batch=2, width=5, epochs=4, trl=True) == 560  # 2·(2 + 2)·10 forward-only
    # One minibatch: no policy or value scoring pass, 2·(2 + 1)·10 forward-only.
    assert ppo_step_flops(1, 1, batch=2, width=5, epochs=4, reuse_first_forward=True) == 540


def test_rm_curve_scripts(tmp_path):
    """bench/rm_curve.sh parses; bench/rm_curve.py tabulates the reward and bestofn metrics of each variant."""
    import json
    import subprocess
    import sys

    from tests.conftest import ROOT

    assert subprocess.run(["bash", "-n", str(ROOT / "bench" / "rm_curve.sh")]).returncode == 0
    for name, acc, b8 in (("base", 0.72, 0.53), ("double", 0.74, 0.57)):
        d = tmp_path / name
        d.mkdir()
        (d / "reward.json").write_text(json.dumps({"train": {"comparisons": 10},
            "heldout": {"accuracy_gold": acc, "accuracy_labels": 0.6, "labels_gold_agreement": 0.7}}))
        gold = lambda m: {"gold": {"mean": m, "ci_low": m - 0.04, "ci_high": m + 0.04}}
        (d / "bestofn.json").write_text(json.dumps({"temperature": 1.0, "sft_greedy": gold(0.6),
            "best_of": {"1": gold(0.33), "8": gold(b8), "16": gold(b8 - 0.01)}}))
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "rm_curve.py"), str(tmp_path), "--write", str(tmp_path / "r.json")],
                         capture_output=True, text=True, check=True).stdout.splitlines()
    assert out[2].startswith("| base |") and "0.720" in out[2] and "0.530 [0.490, 0.570]" in out[2]
    assert out[3].startswith("| double |") and "0.740" in out[3]
    written = json.loads((tmp_path / "r.json").read_text())
    assert [r["variant"] for r in written["variants"]] == ["base", "double"] and "cpu" in written["machine"]


def test_kl_leash_scripts(tmp_path):
    """bench/kl_leash.sh parses; bench/kl_leash.py puts each seed's run beside the sweep's β = 0.2 numbers."""
    import json
    import subprocess
    import sys

    from tests.conftest import ROOT

    assert subprocess.run(["bash", "-n", str(ROOT / "bench" / "kl_leash.sh")]).returncode == 0
    for seed, gold in (("seed-1", 0.65), ("seed-2", 0.60)):
        run = tmp_path / seed / "kl-0.4"
        run.mkdir(parents=True)
        family = {"arith": 0.5, "fact": 0.3}
        (run / "evaluate.json").write_text(json.dumps({
            "models": {"policy_noptx": {"gold": {"total": gold, "by_family": family}, "kl": {"mean": 1.1}},
                       "sft": {"gold": {"total": 0.6, "by_family": family}, "kl": {"mean": 0.0}}},
            "win_rates": {"policy_noptx_vs_sft": {"win_rate": 0.55, "ci_low": 0.51, "ci_high": 0.6,
                                                  "gold_win_rate": 0.57}}}))
        (run / "ppo.json").write_text(json.dumps({"final_rollout": {"kl": 1.0}, "timing": {"wall_s": 100.0}}))
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "kl_leash.py"), str(tmp_path), "--write", str(tmp_path / "k.json")],
                         capture_output=True, text=True, check=True).stdout.splitlines()
    row = next(line for line in out if line.startswith("| ppo_noptx, kl 0.4 |"))
    assert "| 1, 2 | +0.050 / +0.000 | +0.025 |" in row and "0.550 [0.51, 0.60]" in row
    written = json.loads((tmp_path / "k.json").read_text())
    assert set(written["rows"]["ppo_noptx, kl 0.4"]) == {"seed-1", "seed-2"} and "cpu" in written["machine"]
    assert set(written["rows"]["ppo_noptx, kl 0.2 (sweep)"]) == {"seed-0", "seed-1", "seed-2"}


def test_world_habit_params_rows_and_spread(tmp_path, bench_path):
    """bench/world_habit.py: one draw's params.yaml (the world's seed, every training seed, world overrides, an
    unknown key refused), and the table's row and mean ± sd from a run's metrics."""
    import yaml
    from world_habit import TRAINING, row, spread, write_params

    d = tmp_path / "w1s2"
    (d / "metrics").mkdir(parents=True)
    write_params(d / "params.yaml", world_seed=1, seed=2, sets=["world.demo_followup_rate=0.5", "ppo.ptx_coef=0.3",
                                                               "world.demo_followup_families=[arith]"], d=d)
    p = yaml.safe_load((d / "params.yaml").read_text())
    assert p["world"]["seed"] == 1 and {p[s]["seed"] for s in TRAINING} == {2}
    assert p["world"]["demo_followup_rate"] == 0.5 and p["world"]["demo_followup_families"] == ["arith"]
    assert p["ppo"]["ptx_coef"] == 0.3
    assert p["evaluate"]["models"]["policy_noptx"] == str(d / "models" / "policy_noptx")
    with pytest.raises(SystemExit, match="unknown params key world.nope"):
        write_params(tmp_path / "bad.yaml", world_seed=0, seed=0, sets=["world.nope=1"], d=d)

    def fake(noptx: float) -> dict:
        win = lambda w: {"win_rate": w, "ci_low": round(w - 0.05, 2), "ci_high": round(w + 0.05, 2)}  # noqa: E731
        (d / "metrics" / "evaluate.json").write_text(json.dumps({
            "models": {"sft": {"gold": {"total": 0.5}}, "policy": {"gold": {"total": 0.6}},
                       "policy_noptx": {"gold": {"total": noptx}, "kl": {"mean": 0.8}}},
            "win_rates": {"policy_noptx_vs_sft": win(0.58), "policy_vs_sft": win(0.6), "sft_vs_base": win(0.7)}}))
        (d / "metrics" / "bestofn.json").write_text(json.dumps({"temperature": 0.5, "best_of": {"8": {
            "vs_greedy": {"mean": 0.03, "ci_low": 0.0, "ci_high": 0.06}}}}))
        return {**row(d), "sft_greedy_offer_rate": {"all": 0.7}}

    one = fake(0.62)
    assert (one["world_seed"], one["seed"]) == (1, 2) and one["habit"]["demo_followup_rate"] == 0.5
    assert one["gold"]["policy_noptx"] == 0.62 and one["win_rates"]["policy_noptx_vs_sft"] == [0.58, 0.53, 0.63]
    assert one["kl"] == {"policy_noptx": 0.8} and one["best_of_8_minus_greedy"]["mean"] == 0.03
    line = spread({"a": one, "b": fake(0.66)})
    assert line.startswith("mean ± sd over 2 runs:") and "noptx − SFT 0.140 ± 0.028" in line


def test_world_habit_family_table(tmp_path, bench_path):
    """bench/world_habit.py table: each pair's win rate per family, read from evaluate's by_family, as mean ± sd."""
    from world_habit import family_table, family_verdicts

    def run(name: str, sort: float) -> dict:
        d = tmp_path / name
        (d / "metrics").mkdir(parents=True)
        by = lambda x: {"by_family": {"sort": {"win_rate": x, "prompts": 4, "ties": 2},  # noqa: E731
                                      "unknown": {"win_rate": 0.9, "prompts": 2, "ties": 0}}}
        (d / "metrics" / "evaluate.json").write_text(json.dumps({"win_rates": {
            "policy_vs_sft": by(sort), "policy_noptx_vs_sft": by(0.5), "sft_vs_base": by(0.75)}}))
        return {"win_rates_by_family": family_verdicts(d)}

    rows = {"a": run("a", 0.4), "b": run("b", 0.6)}
    assert rows["a"]["win_rates_by_family"]["policy_vs_sft"] == {"sort": 0.4, "unknown": 0.9}
    lines = family_table(rows).splitlines()
    assert lines[0] == "| pair | sort | unknown |"
    assert lines[2] == "| policy vs sft | 0.50 ± 0.14 | 0.90 ± 0.00 |" and lines[4].startswith("| sft vs base | 0.75 ± 0.00")
    assert family_table({"a": rows["a"]}).splitlines()[2] == "| policy vs sft | 0.40 | 0.90 |"


def test_world_habit_from_reuses_only_what_ptx_leaves_alone(tmp_path, bench_path):
    """bench/world_habit.py run --from: a finished draw's upstream outputs are copied only when its params differ
    from the new run's in ppo: alone, and never from a draw whose PPO-ptx had no ptx."""
    from world_habit import REUSED, reuse, write_params

    src, d = tmp_path / "w0s1", tmp_path / "ptx03"
    src.mkdir()
    write_params(src / "params.yaml", world_seed=0, seed=1, sets=[], d=src)
    for name in REUSED:
        path = src / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if "." in path.name:
            path.write_text(name)
        else:
            path.mkdir()
            (path / "f").write_text(name)
    d.mkdir()
    write_params(d / "params.yaml", world_seed=0, seed=2, sets=["ppo.ptx_coef=0.3"], d=d)
    with pytest.raises(SystemExit, match=r"differ from this run.s outside ppo: \(bestofn, pretrain, rank, reward, sample, sft\)"):
        reuse(src, d, d / "params.yaml")  # another training seed: nothing may be reused
    assert not (d / "models").exists()
    write_params(d / "params.yaml", world_seed=0, seed=1, sets=["ppo.ptx_coef=0.3"], d=d)
    reuse(src, d, d / "params.yaml")
    assert (d / "models/sft/f").read_text() == "models/sft" and (d / "metrics/reward.json").read_text() == "metrics/reward.json"
    assert not (d / "models/policy").exists() and not (d / "metrics/ppo.json").exists()  # ppo and sft_ptx run again
    write_params(src / "params.yaml", world_seed=0, seed=1, sets=["ppo.ptx_coef=0"], d=src)
    with pytest.raises(SystemExit, match="ptx_coef is 0"):
        reuse(src, tmp_path / "other", d / "params.yaml")
