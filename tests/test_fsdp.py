"""Fully sharded data parallel (`fsdp: true`, rlhf/dist.py) for sft, reward and ppo under 2 CPU processes (gloo).

Each rank holds half of every parameter, gradient and Adam moment; the batches and the global step are
those of plain data parallel, so a 2-process FSDP run must land where one process does, within the same
tolerance as the data-parallel tests (tests/test_multiprocess.py: each rank's loss is a mean over its own
tokens, and the reductions sum in another order). The trained model is gathered whole on rank 0 and saved
as an ordinary Hugging Face folder. Checkpoints are sharded (one folder of per-rank shards, named by
checkpoint.pt): a run killed after its first checkpoint resumes to exactly the weights of a run that was
never killed. ppo shards its policy and value model (and their Adam state) and samples its rollouts through
the sharded policy, every rank stopping at the same token; it is compared with one process at T = 0.001, as in
tests/test_multiprocess.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
import yaml

from tests.conftest import ENV, ROOT, TINY, assert_runs_agree, without_timing
from tests.test_multiprocess import launch_ppo, launcher, run_cli


@pytest.fixture(scope="module")
def fsdp_params(tmp_path_factory) -> Path:
    params = yaml.safe_load(TINY.read_text())
    for section in ("pretrain", "sft", "reward"):
        params[section]["fsdp"] = True
    path = tmp_path_factory.mktemp("fsdp") / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def sft_args(tiny_run, root: Path, params: Path) -> list[str]:
    return ["sft", "--base", str(tiny_run.base), "--data", str(tiny_run.prepared), "--world", str(root / "no-world.json"),
            "--out", str(root / "sft"), "--metrics", str(root / "sft.json"), "--plots", str(root / "plots"),
            "--checkpoints", str(root / "ckpt"), "--params", str(params)]


@pytest.fixture(scope="module")
def fsdp_sft(tiny_run, fsdp_params, tmp_path_factory) -> Path:
    """One uninterrupted 2-process FSDP run of sft on the tiny profile."""
    root = tmp_path_factory.mktemp("fsdp_sft")
    run_cli([*launcher(2), *sft_args(tiny_run, root, fsdp_params)])
    return root


def test_fsdp_sft_matches_one_process_and_saves_a_plain_model(tiny_run, fsdp_sft):
    from transformers import AutoModelForCausalLM

    one, two = json.loads((tiny_run.metrics / "sft.json").read_text()), json.loads((fsdp_sft / "sft.json").read_text())
    assert two["processes"] == 2 and one["steps"] == two["steps"]
    assert abs(one["train_loss"] - two["train_loss"]) < 0.02 * one["train_loss"]
    assert abs(one["val_loss"] - two["val_loss"]) < 0.02 * one["val_loss"]
    assert_runs_agree(tiny_run.sft, fsdp_sft / "sft", tiny_run.base)
    model = AutoModelForCausalLM.from_pretrained(str(fsdp_sft / "sft"), use_safetensors=True)  # plain tensors, no shards
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # tied weights stay tied
    assert not (fsdp_sft / "ckpt").exists()


def reward_args(tiny_rm, out: Path, params: Path) -> list[str]:
    return ["reward", "--sft", str(tiny_rm.sft), "--data", str(tiny_rm.rankings), "--demos", str(tiny_rm.prepared / "sft.jsonl"),
            "--world", str(tiny_rm.world), "--out", str(out / "reward"), "--metrics", str(out / "reward.json"),
            "--plots", str(out / "plots"), "--checkpoints", str(out / "ckpt"), "--params", str(params)]


@pytest.fixture(scope="module")
def fsdp_reward(tiny_rm, fsdp_params, tmp_path_factory) -> Path:
    """One uninterrupted 2-process FSDP run of reward on the tiny profile."""
    out = tmp_path_factory.mktemp("fsdp_reward")
    run_cli([*launcher(2), *reward_args(tiny_rm, out, fsdp_params)])
    return out


def test_fsdp_reward_matches_one_process(tiny_rm, fsdp_reward):
    from transformers import AutoModelForSequenceClassification

    out = fsdp_reward
    one = json.loads((tiny_rm.metrics / "reward.json").read_text())
    two = json.loads((out / "reward.json").read_text())
    assert one["train"]["steps"] == two["train"]["steps"]
    assert abs(one["train"]["train_loss"] - two["train"]["train_loss"]) < 0.05
    assert abs(one["heldout"]["accuracy_labels"] - two["heldout"]["accuracy_labels"]) < 0.1
    assert abs(one["bias"]["value"] - two["bias"]["value"]) < 0.05  # scored by the gathered model on rank 0
    rm = AutoModelForSequenceClassification.from_pretrained(str(out / "reward"), use_safetensors=True)
    assert rm.config.num_labels == 1 and not (out / "ckpt").exists()


def kill_processes_naming(marker: str) -> None:
    """SIGKILL every process whose command line contains `marker` (here: the launcher and both ranks), and
    wait until none is left."""
    def matching() -> list[int]:
        pids = []
        for entry in Path("/proc").iterdir():
            try:
                if entry.name.isdigit() and marker in (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode():
                    pids.append(int(entry.name))
            except OSError:  # the process ended meanwhile
                pass
        return pids

    t0 = time.time()
    while pids := matching():
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        assert time.time() - t0 < 30, f"processes {pids} survive SIGKILL"
        time.sleep(0.05)


def kill_after_first_checkpoint(cmd: list[str], ckpt: Path, log_path: Path) -> dict:
    """Start `cmd`, SIGKILL the launcher and every rank as soon as `ckpt` exists, and return the checkpoint."""
    with log_path.open("w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=log, stderr=subprocess.STDOUT)
        t0 = time.time()
        try:
            while not ckpt.is_file():
                assert proc.poll() is None, log_path.read_text()
                assert time.time() - t0 < 300, "no checkpoint after 300 s"
                time.sleep(0.01)
        finally:
            # The launcher starts its ranks in sessions of their own: kill every process of this run.
            kill_processes_naming(str(ckpt.parent))
            proc.wait()
    return torch.load(ckpt, map_location="cpu", weights_only=True)


def test_fsdp_sft_resumes_from_sharded_checkpoints(tiny_run, fsdp_params, fsdp_sft, tmp_path):
    from safetensors.torch import load_file

    cmd = [*launcher(2), *sft_args(tiny_run, tmp_path, fsdp_params)]
    ckpt = tmp_path / "ckpt" / "checkpoint.pt"
    state = kill_after_first_checkpoint(cmd, ckpt, tmp_path / "killed.log")
    step = state["step"]
    assert 0 < step < json.loads((fsdp_sft / "sft.json").read_text())["steps"] and not (tmp_path / "sft.json").exists()
    assert "model" not in state and state["shards"] == f"sharded-{step}"  # the weights live in the shards only
    assert list((tmp_path / "ckpt" / state["shards"]).glob("*.distcp"))

    res, _ = run_cli(cmd)
    assert f"resuming from {ckpt} at step {step}" in " ".join((res.stdout + res.stderr).split())
    ours, ref = load_file(tmp_path / "sft/model.safetensors"), load_file(fsdp_sft / "sft/model.safetensors")
    assert ours.keys() == ref.keys() and all(torch.equal(ours[k], ref[k]) for k in ref)
    assert without_timing(tmp_path / "sft.json") == without_timing(fsdp_sft / "sft.json")
    assert not (tmp_path / "ckpt").exists()


def test_fsdp_reward_resumes_from_sharded_checkpoints(tiny_rm, fsdp_params, fsdp_reward, tmp_path):
    from safetensors.torch import load_file

    cmd = [*launcher(2), *reward_args(tiny_rm, tmp_path, fsdp_params)]
    ckpt = tmp_path / "ckpt" / "checkpoint.pt"
    state = kill_after_first_checkpoint(cmd, ckpt, tmp_path / "killed.log")
    step = state["step"]
    assert 0 < step < json.loads((fsdp_reward / "reward.json").read_text())["train"]["steps"]
    assert "model" not in state and state["shards"] == f"sharded-{step}"
    run_cli(cmd)
    ours, ref = load_file(tmp_path / "reward/model.safetensors"), load_file(fsdp_reward / "reward/model.safetensors")
    assert ours.keys() == ref.keys() and all(torch.equal(ours[k], ref[k]) for k in ref)
    assert without_timing(tmp_path / "reward.json") == without_timing(fsdp_reward / "reward.json")


@pytest.fixture(scope="module")
def fsdp_ppo_params(tmp_path_factory) -> Path:
    params = yaml.safe_load(TINY.read_text())
    # Greedy-in-effect sampling and one minibatch per epoch: both runs see the same episodes (test_multiprocess).
    params["ppo"].update(temperature=0.001, minibatch_size=params["ppo"]["batch_size"], eval_prompts=2, steps=4,
                         fsdp=True)
    path = tmp_path_factory.mktemp("fsdp_ppo") / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def fsdp_ppo(tiny_rm, fsdp_ppo_params, tmp_path_factory) -> tuple[Path, dict, str]:
    """One uninterrupted 2-process FSDP run of ppo on the tiny profile: (its folder, metrics, log)."""
    root = tmp_path_factory.mktemp("fsdp_ppo_run")
    metrics, log, _ = launch_ppo(tiny_rm, fsdp_ppo_params, root, 2)
    return root, metrics, log


def test_fsdp_ppo_matches_one_process_and_saves_plain_models(tiny_rm, fsdp_ppo_params, fsdp_ppo, tmp_path):
    import math

    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    one, _, _ = launch_ppo(tiny_rm, fsdp_ppo_params, tmp_path / "one", 1)  # fsdp is ignored with one process
    root, two, log = fsdp_ppo
    assert "processes" not in one and two["processes"] == 2 and two["fsdp"] is True
    assert one["steps"] == two["steps"] and one["episodes"] == two["episodes"]
    for key, v in one["final_rollout"].items():  # global means over both ranks' episodes
        assert math.isfinite(two["final_rollout"][key]) and abs(v - two["final_rollout"][key]) <= 2e-3, key
    for name, init in (("policy", tiny_rm.sft), ("value", tiny_rm.reward)):
        w1, w2 = load_file(tmp_path / f"one/{name}/model.safetensors"), load_file(root / f"{name}/model.safetensors")
        w0 = load_file(init / "model.safetensors")
        assert w1.keys() == w2.keys()
        for k in w1:  # reduce-scatter sums in another order: rounding, far below how far the weights moved
            assert (w1[k] - w2[k]).norm() <= 1e-2 * (w1[k] - w0[k]).norm() + 1e-6, (name, k)
    assert "rank 1 done, its shards gathered on rank 0" in log
    policy = AutoModelForCausalLM.from_pretrained(str(root / "policy"), use_safetensors=True)  # whole, plain tensors
    assert policy.lm_head.weight.data_ptr() == policy.model.embed_tokens.weight.data_ptr()
    value = AutoModelForSequenceClassification.from_pretrained(str(root / "value"), use_safetensors=True)
    assert value.config.num_labels == 1
    assert sorted(p.name for p in root.iterdir()) == ["plots", "policy", "ppo.json", "value"]  # no checkpoint left


def test_fsdp_ppo_resumes_from_sharded_checkpoints(tiny_rm, fsdp_ppo_params, fsdp_ppo, tmp_path):
    from safetensors.torch import load_file

    root, two, _ = fsdp_ppo
    cmd = [*launcher(2), "ppo", "--sft", str(tiny_rm.sft), "--reward", str(tiny_rm.reward), "--data",
           str(tiny_rm.prepared), "--world", str(tiny_rm.world), "--out", str(tmp_path / "policy"), "--value-out",
           str(tmp_path / "value"), "--metrics", str(tmp_path / "ppo.json"), "--plots", str(tmp_path / "plots"),
           "--checkpoints", str(tmp_path / "ckpt"), "--params", str(fsdp_ppo_params)]
    ckpt = tmp_path / "ckpt" / "checkpoint.pt"
    state = kill_after_first_checkpoint(cmd, ckpt, tmp_path / "killed.log")
    step = state["step"]
    assert 0 < step < two["steps"] and not (tmp_path / "ppo.json").exists()
    # Policy, value model and both optimizers live in the shards; the KL controller and generators in the file.
    assert not {"policy", "value", "policy_opt", "value_opt"} & set(state) and "kl_ctl" in state
    assert state["shards"] == f"sharded-{step}" and list((tmp_path / "ckpt" / state["shards"]).glob("*.distcp"))

    run_cli(cmd)
    assert json.loads((tmp_path / "ppo.json").read_text())["timing"]["resumed_from"] == step
    for name in ("policy", "value"):
        ours, ref = load_file(tmp_path / f"{name}/model.safetensors"), load_file(root / f"{name}/model.safetensors")
        assert ours.keys() == ref.keys() and all(torch.equal(ours[k], ref[k]) for k in ref), name
    assert without_timing(tmp_path / "ppo.json") == without_timing(root / "ppo.json")


def test_fsdp_with_lora_is_refused_by_name():
    from rlhf.errors import StageError
    from tests.conftest import tiny_params

    for stage in ("sft", "reward", "ppo"):
        tiny_params(stage, fsdp=True).validate()  # alone, or LoRA alone, is fine
        tiny_params(stage, lora_r=4).validate()
        with pytest.raises(StageError, match=f"params key '{stage}.fsdp': FSDP with LoRA is not supported yet"):
            tiny_params(stage, fsdp=True, lora_r=4).validate()
