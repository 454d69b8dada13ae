"""Multi-process training: sft, reward and ppo under `accelerate launch --multi_gpu --num_processes 2`
(data parallel, gloo on CPU), and rlhf.dist's collectives in two real processes.

The one-process run is a plain `python -m cli sft`; the two-process run adds the launcher (its own
start-up, ~3-5 s here, is in its wall time). Same params, so the global batch is the same: with two
processes each rank computes the loss on its half of every batch (`Dist.shard`) and the ranks average their
gradients. The result is not bit-identical to one process (each rank's loss is a mean over its own
response tokens, so the average of the two halves weights tokens slightly differently than one mean
over the whole batch, and the all-reduce sums in another order) but it must be close. Wall times of
both runs are printed (`pytest -s` shows them). The gold comparison is skipped (no world file) so
the timing is training plus start-up.

ppo samples its rollouts, and each rank samples with its own seed (docs/ppo.md item 21), so at the
profile's temperature two processes roll out other responses than one process and the weights differ
by sampling noise alone (measured: about 0.8x the policy's own motion), which says nothing about the
data-parallel arithmetic. The ppo comparison therefore samples at T = 0.001 (greedy in effect: the
same responses in both runs) with one minibatch per PPO epoch: the two runs then see the same data
and must agree to float rounding. The arithmetic of the policy-gradient term, which vanishes at that
temperature, is checked in two gloo processes by `test_collectives_reproduce_one_process_math`.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

from tests.conftest import ROOT, TINY, assert_runs_agree


def free_port() -> int:
    with socket.socket() as s:  # other jobs on this machine may hold accelerate's default 29500
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launcher(processes: int) -> list[str]:
    """`python -m cli` for one process (how it is normally run), else `accelerate launch` on CPU."""
    if processes == 1:
        return [sys.executable, "-m", "cli"]
    return [str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu", "--num_processes", str(processes),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(free_port()), "-m", "cli"]


def run_cli(cmd: list[str]) -> tuple[subprocess.CompletedProcess, float]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    t0 = time.time()
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    wall = time.time() - t0
    assert res.returncode == 0, res.stdout + res.stderr
    return res, wall


def launch_sft(tiny_run, out_root: Path, processes: int) -> tuple[dict, float]:
    cmd = [*launcher(processes), "sft", "--base", str(tiny_run.base), "--data", str(tiny_run.prepared),
           "--world", str(out_root / "no-world.json"), "--out", str(out_root / "sft"),
           "--metrics", str(out_root / "sft.json"), "--plots", str(out_root / "plots"),
           "--checkpoints", str(out_root / "ckpt"), "--params", str(TINY)]
    _, wall = run_cli(cmd)
    return json.loads((out_root / "sft.json").read_text()), wall


def test_two_process_sft_matches_one_process(tiny_run, tmp_path):
    one, wall_1 = launch_sft(tiny_run, tmp_path / "one", 1)
    two, wall_2 = launch_sft(tiny_run, tmp_path / "two", 2)
    print(f"\nsft on the tiny profile: 1 process {wall_1:.1f} s, 2 processes {wall_2:.1f} s "
          f"(train loss {one['train_loss']} vs {two['train_loss']}; val loss {one['val_loss']} vs {two['val_loss']})")

    assert one["processes"] == 1 and two["processes"] == 2
    assert one["steps"] == two["steps"]  # same global batch, same number of optimizer steps
    assert abs(one["train_loss"] - two["train_loss"]) < 0.02 * one["train_loss"]
    assert abs(one["val_loss"] - two["val_loss"]) < 0.02 * one["val_loss"]
    assert_runs_agree(tmp_path / "one/sft", tmp_path / "two/sft", tiny_run.base)
    assert not (tmp_path / "two/ckpt").exists() and (tmp_path / "two/sft/config.json").is_file()


def test_two_process_reward_matches_one_process(tiny_rm, tmp_path):
    """The reward model under 2 processes: whole K-way groups per rank, gradients averaged."""
    out = tmp_path / "two"
    cmd = [*launcher(2), "reward", "--sft", str(tiny_rm.sft),
           "--data", str(tiny_rm.rankings), "--demos", str(tiny_rm.prepared / "sft.jsonl"),
           "--world", str(tiny_rm.world), "--out", str(out / "reward"), "--metrics", str(out / "reward.json"),
           "--plots", str(out / "plots"), "--checkpoints", str(out / "ckpt"), "--params", str(TINY)]
    _, wall = run_cli(cmd)
    print(f"\nreward on the tiny profile, 2 processes: {wall:.1f} s")
    one = json.loads((tiny_rm.metrics / "reward.json").read_text())
    two = json.loads((out / "reward.json").read_text())
    assert one["train"]["steps"] == two["train"]["steps"]
    assert abs(one["train"]["train_loss"] - two["train"]["train_loss"]) < 0.05
    assert abs(one["heldout"]["accuracy_labels"] - two["heldout"]["accuracy_labels"]) < 0.1
    assert (out / "reward/config.json").is_file() and not (out / "ckpt").exists()


def launch_ppo(tiny_rm, params: Path, out_root: Path, processes: int) -> tuple[dict, str, float]:
    cmd = [*launcher(processes), "ppo", "--sft", str(tiny_rm.sft), "--reward", str(tiny_rm.reward), "--data", str(tiny_rm.prepared),
           "--world", str(tiny_rm.world), "--out", str(out_root / "policy"), "--value-out", str(out_root / "value"),
           "--metrics", str(out_root / "ppo.json"), "--plots", str(out_root / "plots"),
           "--checkpoints", str(out_root / "ckpt"), "--params", str(params)]
    res, wall = run_cli(cmd)
    return json.loads((out_root / "ppo.json").read_text()), " ".join(res.stdout.split()), wall


def test_two_process_ppo_matches_one_process(tiny_rm, tmp_path):
    """ppo under 2 processes: each rank rolls out half of every batch; whitening, KL and metrics are global."""
    import math

    from safetensors.torch import load_file

    params = yaml.safe_load(TINY.read_text())
    # Greedy-in-effect sampling and one minibatch per epoch: both runs see the same episodes (module doc).
    params["ppo"].update(temperature=0.001, minibatch_size=params["ppo"]["batch_size"], eval_prompts=2)
    assert params["ppo"]["checkpoint_every"] == 1  # the 2-process run gathers both ranks' generators each step
    params_path = tmp_path / "params.yaml"
    params_path.write_text(yaml.safe_dump(params))
    one, _, wall_1 = launch_ppo(tiny_rm, params_path, tmp_path / "one", 1)
    two, log_2, wall_2 = launch_ppo(tiny_rm, params_path, tmp_path / "two", 2)
    r1, r2 = one["final_rollout"], two["final_rollout"]
    print(f"\nppo on the tiny profile: 1 process {wall_1:.1f} s, 2 processes {wall_2:.1f} s (last rollout rm "
          f"{r1['rm_score']} vs {r2['rm_score']}, gold {r1['gold']} vs {r2['gold']}; held-out corpus log-prob "
          f"{one['corpus_logprob']['policy']} vs {two['corpus_logprob']['policy']})")

    assert "processes" not in one and two["processes"] == 2
    assert one["steps"] == two["steps"] and one["episodes"] == two["episodes"]  # same global batch and steps
    for key, v in r1.items():  # global means over both ranks' episodes: those of the one-process run
        assert math.isfinite(r2[key]) and abs(v - r2[key]) <= 2e-4, (key, v, r2[key])
    for name, init in (("policy", tiny_rm.sft), ("value", tiny_rm.reward)):
        w1, w2 = load_file(tmp_path / f"one/{name}/model.safetensors"), load_file(tmp_path / f"two/{name}/model.safetensors")
        w0 = load_file(init / "model.safetensors")
        for k in w1:
            moved = (w1[k] - w0[k]).norm()
            # Float rounding only (all-reduce order): far tighter than the sft test's (tests/conftest.py, assert_runs_agree).
            assert (w1[k] - w2[k]).norm() <= 1e-3 * moved + 1e-6, (name, k)
    # The stage compares both ranks' weights through checksums at the end and fails if they differ.
    assert "rank 1 done, weights identical to rank 0's" in log_2
    # Only rank 0 wrote: one set of outputs, each curve logged once per step, no checkpoint left behind.
    two_root = tmp_path / "two"
    assert sorted(p.name for p in two_root.iterdir()) == ["plots", "policy", "ppo.json", "value"]
    assert (two_root / "policy/config.json").is_file() and (two_root / "plots/overoptimization.png").is_file()
    rows = (two_root / "plots/plots/metrics/objective/kl.tsv").read_text().strip().splitlines()
    assert [r.split("\t")[0] for r in rows[1:]] == [str(i) for i in range(one["steps"])]


def _collectives_worker(rank: int, world_size: int, port: int) -> None:
    """One rank of test_collectives_reproduce_one_process_math (a module-level function, so spawn can import it)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    import torch.distributed as tdist

    from rlhf import ppo
    from rlhf.dist import Dist, init_dist
    from rlhf.training import IGNORE_INDEX, masked_lm_loss

    dist, _ = init_dist(torch.device("cpu"))
    assert dist.world_size == world_size and dist.rank == rank
    # One global batch, the same on every rank (fixed seed); each rank keeps its shard, as the stage does.
    gen = torch.Generator().manual_seed(0)
    B, R, V, F = 8, 6, 11, 4
    mask = (torch.arange(R) < torch.randint(1, R + 1, (B,), generator=gen)[:, None]).long()  # (B, R) ragged
    x = 3 * torch.randn(B, R, generator=gen) + 1
    feats, tokens = torch.randn(B, R, F, generator=gen), torch.randint(0, V, (B, R), generator=gen)
    old_lp, old_values, returns = -torch.rand(B, R, generator=gen), torch.randn(B, R, generator=gen), torch.randn(B, R, generator=gen)
    ptx_feats = torch.randn(B, 7, F, generator=gen)
    ptx_labels = torch.randint(0, V, (B, 7), generator=gen)
    ptx_labels[torch.rand(B, 7, generator=gen) < 0.4] = IGNORE_INDEX  # documents of different lengths
    rows = dist.shard(range(B))

    # Item 15: the shards whitened with all ranks' statistics are the rows of the whole batch whitened.
    for shift in (True, False):
        torch.testing.assert_close(ppo.whiten(x[rows], mask[rows], shift_mean=shift, all_sum=dist.all_sum),
                                   ppo.whiten(x, mask, shift_mean=shift)[rows])

    def step(d: Dist, sel: list[int]) -> list[torch.nn.Module]:
        """The stage's update on rows `sel`: clipped policy and value losses over the ranks' mean token
        count, the ptx mean weighted by this rank's share of the tokens, averaged gradients."""
        torch.manual_seed(1)
        policy, value = torch.nn.Linear(F, V), torch.nn.Linear(F, 1)
        adv = ppo.whiten(x[sel], mask[sel], all_sum=d.all_sum if d.enabled else None)
        denom = d.all_mean(mask[sel].sum()).clamp(min=1)
        lp = ppo.logprobs_from_logits(policy(feats[sel]), tokens[sel])
        pg_loss, _ = ppo.clipped_policy_loss(lp, old_lp[sel], adv, mask[sel], clip_range=0.2, denom=denom)
        vf_loss, _ = ppo.clipped_value_loss(value(feats[sel]).squeeze(-1), old_values[sel], returns[sel], mask[sel],
                                            clip_range=0.2, denom=denom)
        n_tokens = (ptx_labels[sel][:, 1:] != IGNORE_INDEX).sum()
        ptx_loss = masked_lm_loss(policy(ptx_feats[sel]), ptx_labels[sel]) * (n_tokens / d.all_mean(n_tokens))
        (pg_loss + vf_loss + ptx_loss).backward()
        d.average_gradients(policy)
        d.average_gradients(value)
        return [policy, value]

    shard_models, whole_models = step(dist, rows), step(Dist(), list(range(B)))
    for a, b in zip(shard_models, whole_models, strict=True):
        for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
            torch.testing.assert_close(pa.grad, pb.grad, rtol=1e-5, atol=1e-7)

    # The same averaged gradients and the same optimizer: identical weights on every rank, and the
    # checksum comparison notices a rank that drifted.
    policy = shard_models[0]
    torch.optim.Adam(policy.parameters(), lr=0.1).step()
    assert dist.same_weights(policy)
    with torch.no_grad():
        policy.bias[0] += 1e-6 * (rank == 1)
    assert not dist.same_weights(policy)

    assert dist.means({"rank": float(rank), "same": 2.5}) == {"rank": (world_size - 1) / 2, "same": 2.5}
    assert dist.gather({"rank": rank}) == [{"rank": r} for r in range(world_size)]
    tdist.destroy_process_group()


def test_collectives_reproduce_one_process_math():
    """rlhf.dist in two gloo processes: global whitening, loss denominators, gradient averaging, checksums."""
    import torch.multiprocessing as mp

    t0 = time.time()
    mp.spawn(_collectives_worker, args=(2, free_port()), nprocs=2, join=True)
    print(f"\ncollectives in 2 gloo processes: {time.time() - t0:.1f} s")


def test_one_process_dist_is_a_no_op():
    """Without a launcher every collective returns its input unchanged: one-process runs are untouched."""
    from rlhf import ppo
    from rlhf.dist import Dist

    one = Dist()
    x, mask = torch.randn(3, 4), torch.ones(3, 4)
    count = mask.long().sum()
    assert one.all_sum(x) is x and one.all_mean(count) is count
    assert one.means({"a": 1.0}) == {"a": 1.0} and one.gather(7) == [7] and one.same_weights(torch.nn.Linear(2, 2))
    assert torch.equal(ppo.whiten(x, mask, all_sum=one.all_sum), ppo.whiten(x, mask))
