"""The ppo stage end to end on the tiny profile, and resume after a real SIGKILL.

The reference run happens in-process; the resume test runs `python -m cli ppo` in a subprocess with
the same params (checkpoint_every=1), SIGKILLs it after its first checkpoint, reruns it, and checks
that the final weights and metrics equal the uninterrupted run's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml

from tests.conftest import ROOT, TINY, kill_after_first_checkpoint, tiny_params, without_timing


@dataclass(frozen=True)
class PPORun:
    sft: Path
    reward: Path
    prepared: Path
    world: Path
    out: Path
    value_out: Path
    metrics: Path
    plots: Path
    result: dict


def build_reward_model(sft: Path, out: Path) -> Path:
    """A stand-in RM (the SFT backbone with a seeded random score head) for when no tiny_rm fixture exists."""
    from transformers import AutoModelForSequenceClassification

    from rlhf.models import load_tokenizer, save_model

    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = AutoModelForSequenceClassification.from_pretrained(str(sft), num_labels=1, use_safetensors=True)
    model.config.pad_token_id = load_tokenizer(sft).pad_token_id
    save_model(model, load_tokenizer(sft), out)
    return out


@pytest.fixture(scope="module")
def reward_dir(request, tiny_run, tmp_path_factory) -> Path:
    try:
        return Path(request.getfixturevalue("tiny_rm").reward)
    except pytest.FixtureLookupError:
        return build_reward_model(tiny_run.sft, tmp_path_factory.mktemp("rm") / "reward")


def stage_paths(root: Path) -> dict[str, Path]:
    return {"out": root / "models/policy", "value_out": root / "models/value", "metrics": root / "metrics/ppo.json",
            "plots": root / "plots/ppo", "checkpoints": root / "checkpoints/ppo"}


@pytest.fixture(scope="module")
def ppo_run(tiny_run, reward_dir, tmp_path_factory) -> PPORun:
    from stages import ppo

    root = tmp_path_factory.mktemp("ppo")
    paths = stage_paths(root)
    result = ppo.run(tiny_params("ppo"), sft=tiny_run.sft, reward=reward_dir, data=tiny_run.prepared,
                     world=tiny_run.world, **paths)
    return PPORun(sft=tiny_run.sft, reward=reward_dir, prepared=tiny_run.prepared, world=tiny_run.world,
                  out=paths["out"], value_out=paths["value_out"], metrics=paths["metrics"], plots=paths["plots"],
                  result=result)


def test_ppo_writes_models_metrics_and_plots(ppo_run):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    AutoModelForCausalLM.from_pretrained(str(ppo_run.out), use_safetensors=True)
    value = AutoModelForSequenceClassification.from_pretrained(str(ppo_run.value_out), use_safetensors=True)
    assert value.config.num_labels == 1
    assert (ppo_run.out / "tokenizer.json").is_file()

    m = json.loads(ppo_run.metrics.read_text())
    assert m["timing"]["episodes_per_s"] > 0 and m["timing"]["wall_s"] > m["timing"]["train_s"] > 0
    for key in ("rm_score", "kl", "gold", "ended_with_eos", "response_length", "kl_coef"):
        assert key in m["final_rollout"], key
    for name in ("policy", "sft"):
        assert 0.0 <= m["test"][name]["gold"]["total"] <= 1.0
    assert m["corpus_logprob"]["policy"] < 0 and m["corpus_logprob"]["sft"] < 0

    # Item 18 on every step of the run: ratio ≡ 1, approx KL = 0, clipfrac = 0 on the first minibatch.
    s = m["sanity"]
    assert s["first_minibatch_max_abs_ratio_minus_1"] < 1e-5
    assert s["first_minibatch_max_approxkl"] < 1e-9
    assert s["first_minibatch_max_clipfrac"] == 0.0

    # Item 22's metric set as dvclive curves, item 23's plot.
    curves = ppo_run.plots / "plots" / "metrics"
    for name in ("objective/kl", "objective/entropy", "objective/non_score_reward", "objective/scores",
                 "objective/rlhf_reward", "policy/approxkl", "policy/clipfrac", "loss/policy", "loss/value",
                 "loss/ptx", "val/ratio", "val/ratio_var", "val/response_length", "val/eos_share", "kl_coef",
                 "gold/score", "objective/rm_score"):
        rows = (curves / f"{name}.tsv").read_text().strip().splitlines()
        assert len(rows) == 1 + tiny_params("ppo").steps, name
    assert (ppo_run.plots / "overoptimization.png").stat().st_size > 1000
    csv = (ppo_run.plots / "overoptimization.csv").read_text().splitlines()
    assert csv[0] == "step,sqrt_kl,proxy_score,gold_score" and len(csv) == 1 + tiny_params("ppo").steps
    # The first rollout comes from the SFT policy itself: KL exactly 0.
    assert float(csv[1].split(",")[1]) == 0.0


def test_ppo_resumes_after_sigkill_with_identical_weights(ppo_run, tmp_path):
    from safetensors.torch import load_file

    params = yaml.safe_load(TINY.read_text())
    assert params["ppo"]["checkpoint_every"] == 1  # the reference run used the same params
    params_path = tmp_path / "params.yaml"
    params_path.write_text(yaml.safe_dump(params))
    paths = stage_paths(tmp_path)
    cmd = [sys.executable, "-m", "cli", "ppo", "--params", str(params_path), "--sft", str(ppo_run.sft),
           "--reward", str(ppo_run.reward), "--data", str(ppo_run.prepared), "--world", str(ppo_run.world)]
    cmd += [x for k, v in paths.items() for x in (f"--{k.replace('_', '-')}", str(v))]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    ckpt = paths["checkpoints"] / "checkpoint.pt"

    # cwd outside the repository: the subprocess must not depend on where it starts (nor on git state).
    step = kill_after_first_checkpoint(cmd[3:], ckpt, tmp_path / "killed.log", timeout=120, cwd=tmp_path)
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert 0 < step < tiny_params("ppo").steps
    assert not paths["metrics"].exists()

    # A checkpoint of a 2-process run holds each rank's sampling stream (item 21); one process cannot
    # continue it and says so instead of resuming with other samples.
    from rlhf.errors import StageError
    from stages import ppo

    saved = ckpt.read_bytes()
    torch.save({**state, "sample_gens": [state["sample_gen"]] * 2}, ckpt)
    with pytest.raises(StageError, match="written by a 2-process run, resumed with 1; relaunch with 2 processes"):
        ppo.run(tiny_params("ppo"), sft=ppo_run.sft, reward=ppo_run.reward, data=ppo_run.prepared,
                world=ppo_run.world, **paths)
    ckpt.write_bytes(saved)

    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "resumed from step" in " ".join(done.stdout.split())  # rich may wrap the summary line
    assert not ckpt.exists()  # removed on success
    for folder in ("out", "value_out"):
        ours = load_file(str(paths[folder] / "model.safetensors"))
        ref = load_file(str(getattr(ppo_run, folder) / "model.safetensors"))
        assert ours.keys() == ref.keys()
        for k in ref:
            assert torch.equal(ours[k], ref[k]), (folder, k)
    assert without_timing(paths["metrics"]) == without_timing(ppo_run.metrics)
    # The rebuilt dvclive curves hold each step once.
    rows = (paths["plots"] / "plots/metrics/objective/kl.tsv").read_text().strip().splitlines()
    assert [r.split("\t")[0] for r in rows[1:]] == [str(i) for i in range(tiny_params("ppo").steps)]


def test_reuses_first_forward_only_for_one_minibatch_in_one_micro_batch():
    from stages.ppo import reuses_first_forward

    assert reuses_first_forward(8, 8, 8)
    assert reuses_first_forward(4, 4, 8)  # a rank's share (8 over 2 processes) within one micro-batch of 8
    assert not reuses_first_forward(8, 4, 4)  # the second minibatch comes after an optimizer step
    assert not reuses_first_forward(8, 8, 4)  # two micro-batches: GAE needs both forwards' values first


def test_ppo_first_forward_shortcut_matches_general_path(ppo_run, tmp_path):
    """One minibatch per epoch in one micro-batch: epoch 0's update forward doubles as the policy's and the
    value model's scoring pass. The run equals the general path's (a separate no_grad scoring pass) up
    to float rounding, and item 18's sanity values are exact: ratio 1, approx KL 0, clipfrac 0."""
    from safetensors.torch import load_file

    from stages import ppo

    params = tiny_params("ppo", steps=2, minibatch_size=8, micro_batch_size=8, checkpoint_every=0, heldout_corpus=0,
                         eval_prompts=1)
    assert params.batch_size == 8 and ppo.reuses_first_forward(8, 8, 8)
    runs, seen = {}, {}
    for reuse in (True, False):
        paths = stage_paths(tmp_path / f"reuse_{reuse}")
        seen[reuse] = []
        ppo.run(params, sft=ppo_run.sft, reward=ppo_run.reward, data=ppo_run.prepared, world=ppo_run.world,
                reuse_first_forward=reuse, on_step=lambda step, m, r=reuse: seen[r].append((step, m["step"])), **paths)
        runs[reuse] = paths
    # The timing hook the benchmarks use: called once at the end of every step, with that step's metrics.
    assert seen[True] == seen[False] == [(0, 0.0), (1, 1.0)]
    fast, general = (json.loads(runs[r]["metrics"].read_text()) for r in (True, False))
    assert fast["sanity"]["first_minibatch_max_abs_ratio_minus_1"] == 0.0
    assert fast["sanity"]["first_minibatch_max_approxkl"] == 0.0
    assert fast["sanity"]["first_minibatch_max_clipfrac"] == 0.0
    assert general["sanity"]["first_minibatch_max_abs_ratio_minus_1"] < 1e-5
    for key, value in general["final_rollout"].items():
        assert fast["final_rollout"][key] == pytest.approx(value, abs=1e-4), key
    # Every logged curve (losses, KL, entropy, clip fractions, ...) step by step.
    curves = {r: runs[r]["plots"] / "plots" / "metrics" for r in runs}
    for tsv in sorted(curves[False].rglob("*.tsv")):
        rows = {r: (curves[r] / tsv.relative_to(curves[False])).read_text().strip().splitlines()[1:] for r in runs}
        assert len(rows[True]) == len(rows[False]) == params.steps, tsv
        for a, b in zip(rows[True], rows[False], strict=True):
            assert float(a.split("\t")[-1]) == pytest.approx(float(b.split("\t")[-1]), abs=1e-5), tsv.name
    for folder in ("out", "value_out"):
        a, b = (load_file(str(runs[r][folder] / "model.safetensors")) for r in (True, False))
        for k in b:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-5, msg=f"{folder} {k}")


@pytest.mark.parametrize("key, value", [("adam_eps", 0.0), ("adam_beta1", -0.1), ("adam_beta2", 1.0)])
def test_ppo_rejects_bad_adam_settings(key, value):
    from rlhf.errors import StageError

    with pytest.raises(StageError, match=f"ppo.{key}"):
        tiny_params("ppo", **{key: value}).validate()


def test_ppo_missing_reward_model_says_what_to_run(ppo_run, tmp_path):
    from rlhf.errors import StageError
    from stages import ppo

    with pytest.raises(StageError, match="reward model folder not found"):
        ppo.run(tiny_params("ppo"), sft=ppo_run.sft, reward=tmp_path / "missing", data=ppo_run.prepared,
                world=None, **stage_paths(tmp_path))


def test_ppo_cli_help():
    out = subprocess.run([sys.executable, "-m", "cli", "ppo", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0 and "Example:" in out.stdout and "--value-out" in out.stdout


def test_overoptimization_files(tmp_path):
    from rlhf.rollout import moving_average, write_overoptimization

    assert moving_average([1.0, 3.0, 5.0, 7.0], window=2) == [1.0, 2.0, 4.0, 6.0]
    history = [{"step": float(i), "objective/sqrt_kl": 0.1 * i, "objective/rm_score": 0.2 * i, "gold/score": 0.5}
               for i in range(6)]
    assert write_overoptimization(history, tmp_path) == tmp_path / "overoptimization.png"
    assert (tmp_path / "overoptimization.csv").read_text().splitlines()[2] == "1,0.100000,0.200000,0.500000"
    # Without a world file there is no gold score: the CSV keeps its header, no picture is drawn.
    none = tmp_path / "none"
    assert write_overoptimization([{k: v for k, v in h.items() if k != "gold/score"} for h in history], none) is None
    assert (none / "overoptimization.csv").read_text() == "step,sqrt_kl,proxy_score,gold_score\n"


def test_ppo_steps_compose_on_an_explicit_state(ppo_run):
    """The module-level steps on one rollout: rollout -> score -> rewards and advantages -> update -> metrics.

    The shortcut's forward gives the same old log-probs, entropy and values as the no_grad scoring pass;
    step 4 penalizes responses without EOS and leaves nothing after EOS; one step updates
    both networks and β and reports item 22's metrics with ratio exactly 1 on the first minibatch.
    """
    from stages import ppo

    params = tiny_params("ppo", steps=2, minibatch_size=8, micro_batch_size=8, checkpoint_every=0)
    state = ppo.setup(params, sft=ppo_run.sft, reward=ppo_run.reward, data=ppo_run.prepared, world=ppo_run.world,
                      checkpoints=None)
    assert state.reuse and state.step == 0 and state.local_batch == 8 and state.updates_per_step == 2
    for opt in (state.policy_opt, state.value_opt):  # item 24: Adam's ε and β from the params
        assert opt.param_groups[0]["eps"] == params.adam_eps == 1e-5
        assert opt.param_groups[0]["betas"] == (params.adam_beta1, params.adam_beta2) == (0.9, 0.95)
    ro = ppo.rollout(state, 0)
    b, r = params.batch_size, params.max_new_tokens
    assert ro.responses.shape == ro.r_mask.shape == (b, r) and ro.ids.shape == (b, ro.context_len + r)
    assert torch.equal(ro.mask[:, ro.context_len:], ro.r_mask)
    full = ppo.score(state, ro, with_policy=True)
    short = ppo.score(state, ro, with_policy=False)
    assert set(short) == {"ref_logprobs", "scores"} and full["scores"].shape == (b,)
    perm = torch.randperm(b, generator=torch.Generator().manual_seed(0))
    held = ppo.score_with_first_update_forward(state, ro, short, perm)
    assert held[1].requires_grad  # the update reuses it, graph and all
    for key in ("logprobs", "entropy", "values"):
        torch.testing.assert_close(short[key] * ro.r_mask, full[key] * ro.r_mask, rtol=0, atol=1e-5, msg=key)

    adv = ppo.rewards_and_advantages(state, ro, full)
    expected = torch.where(ro.ended, full["scores"], torch.full_like(full["scores"], params.missing_eos_penalty))
    assert torch.equal(adv.scores, expected)
    assert torch.equal(adv.kl, (full["logprobs"] - full["ref_logprobs"]) * ro.r_mask)
    assert float((adv.advantages * (1 - ro.r_mask)).abs().sum()) == 0.0  # nothing after EOS (item 14)

    before = [p.detach().clone() for p in (state.policy.lm_head.weight, state.value.model.score.weight)]
    beta = state.kl_ctl.value
    m = ppo.ppo_step(state, 0)
    assert m["sanity/first_ratio"] == 1.0 and m["sanity/first_approxkl"] == 0.0 and m["kl_coef"] == beta
    assert state.kl_ctl.value != beta  # adaptive β (target_kl > 0 in the tiny profile)
    after = (state.policy.lm_head.weight, state.value.model.score.weight)
    assert all(not torch.equal(a, b) for a, b in zip(before, after, strict=True))
    assert {"objective/kl", "policy/clipfrac", "loss/ptx", "val/ratio", "gold/score"} <= set(m)


def test_sft_ptx_control_takes_ppos_optimizer_steps_on_the_same_corpus_batches(ppo_run, monkeypatch):
    """rl_coef = 0 (dvc.yaml's `sft_ptx`): no rollouts, and the policy takes exactly PPO-ptx's optimizer
    steps, each on the corpus batch PPO-ptx uses at that update."""
    from stages import ppo

    seen: dict[float, list[int]] = {}
    real = ppo.ptx_backward

    def recording(state, update_index):
        seen.setdefault(state.params.rl_coef, []).append(update_index)
        return real(state, update_index)

    monkeypatch.setattr(ppo, "ptx_backward", recording)
    steps = {}
    for rl_coef in (1.0, 0.0):
        params = tiny_params("ppo", steps=2, checkpoint_every=0, rl_coef=rl_coef)
        state = ppo.setup(params, sft=ppo_run.sft, reward=ppo_run.reward, data=ppo_run.prepared, world=ppo_run.world,
                          checkpoints=None)
        before = state.policy.lm_head.weight.detach().clone()
        metrics = [ppo.ppo_step(state, step) for step in range(params.steps)]
        assert not torch.equal(before, state.policy.lm_head.weight)
        steps[rl_coef] = [int(s["step"]) for s in state.policy_opt.state.values()]
        if rl_coef == 0:
            assert set(metrics[-1]) == {"step", "loss/ptx"}  # no rollout was sampled
            assert not state.value_opt.state  # the value model never trained
    assert seen[0.0] == seen[1.0] == list(range(2 * state.updates_per_step))
    assert steps[0.0] == steps[1.0] and set(steps[0.0]) == {2 * state.updates_per_step}


def test_ppo_cli_set_overrides_params_for_the_control_stages(ppo_run, tmp_path):
    """`rlhf ppo --set KEY=VALUE` (dvc.yaml's variant stages): typed, validated, one-line errors."""
    from rlhf.errors import StageError
    from rlhf.params import override

    base = tiny_params("ppo")
    assert override(base, ["ptx_coef=0", "steps=5"], "ppo") == tiny_params("ppo", ptx_coef=0.0, steps=5)
    for bad, match in (("ptx=0", "expected KEY=VALUE with KEY one of"), ("rl_coef", "expected KEY=VALUE"),
                       ("steps=many", "ppo.steps': expected an integer"), ("rl_coef=-1", "ppo.rl_coef")):
        with pytest.raises(StageError, match=match):
            override(base, [bad], "ppo")

    paths = stage_paths(tmp_path)
    cmd = [sys.executable, "-m", "cli", "ppo", "--params", str(TINY), "--set", "rl_coef=0", "--set", "steps=2",
           "--set", "eval_prompts=2", "--sft", str(ppo_run.sft), "--reward", str(ppo_run.reward),
           "--data", str(ppo_run.prepared), "--world", str(ppo_run.world)]
    cmd += [x for k, v in paths.items() for x in (f"--{k.replace('_', '-')}", str(v))]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SFT + ptx control" in " ".join(done.stdout.split())
    m = json.loads(paths["metrics"].read_text())
    assert m["steps"] == 2 and "control" in m and "final_rollout" not in m
    assert m["test"]["prompts"] == 2 and "gold" in m["test"]["policy"] and "tax" in m["corpus_logprob"]
    assert (paths["out"] / "model.safetensors").is_file() and not paths["value_out"].exists()
    bad = subprocess.run(cmd[:4] + ["--set", "nope=1"] + cmd[4:], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode == 1 and "nope=1" in bad.stderr and "Traceback" not in bad.stderr
