"""LoRA (rlhf/lora.py): sft, reward and ppo train adapters only and write plain Hugging Face folders.

On tiny random Llama and GPT-2 models (GPT-2's projections are Conv1D, Llama's Linear): the trainable
parameters are exactly the adapters (plus the score head of a reward or value model); the adapted model
starts equal to its base, runs as its base with the adapters off, and merges into the same function; the
stages' outputs load with plain `transformers`, differ from their inputs, and SFT's loss falls. A LoRA SFT
killed after a checkpoint resumes to the weights of an uninterrupted run, bit for bit.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from tests.conftest import ROOT, TINY, tiny_params, without_timing

pytest.importorskip("peft")

LORA = {"lora_r": 4, "lora_alpha": 8.0, "lora_dropout": 0.0, "lora_targets": ["all-linear"]}


def tiny_model(family: str, seq_cls: bool = False):
    from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification, GPT2Config,
                              LlamaConfig)

    common = {"vocab_size": 64, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, "num_labels": 1}
    if family == "gpt2":
        config = GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=32, resid_pdrop=0.0, embd_pdrop=0.0,
                            attn_pdrop=0.0, **common)
    else:
        config = LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                             intermediate_size=48, max_position_embeddings=32, **common)
    torch.manual_seed(0)
    auto = AutoModelForSequenceClassification if seq_cls else AutoModelForCausalLM
    return auto.from_config(config).eval()


def adapter_size(model, r: int) -> int:
    """What LoRA of rank r on every linear layer of the body adds: r·(in + out) per layer, counted here from the
    weights' shapes (Linear (out, in), Conv1D (in, out)), independently of peft."""
    from transformers.pytorch_utils import Conv1D

    body = getattr(model, model.base_model_prefix)
    return sum(r * sum(m.weight.shape) for n, m in body.named_modules()
               if isinstance(m, (torch.nn.Linear, Conv1D)) and "." in n)


def settings(section: str = "sft", **kw):
    from rlhf.lora import LoraSettings

    values = {"r": 4, "alpha": 8.0, "dropout": 0.0, "targets": ("all-linear",), **kw}
    return LoraSettings(section=section, **values)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_adapters_train_alone_start_as_the_base_and_merge_into_the_same_function(family):
    from rlhf.decode import supports
    from rlhf.lora import add_adapters, adapters_off, has_adapters, merged, parameter_counts

    model = tiny_model(family)
    expected = adapter_size(model, 4)
    total = sum(p.numel() for p in model.parameters())
    ids = torch.randint(3, 64, (2, 9))
    base_logits = model(input_ids=ids).logits
    adapted = add_adapters(model, settings(), seed=0)
    assert adapted is model and has_adapters(adapted)
    assert parameter_counts(adapted) == {"trainable": expected, "total": total + expected}
    assert all("lora_" in n for n, p in adapted.named_parameters() if p.requires_grad)
    assert torch.equal(adapted(input_ids=ids).logits, base_logits)  # B = 0: starts as the base
    assert not supports(adapted)  # the lean Llama decoder would skip the adapters
    with torch.no_grad():
        for n, p in adapted.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)  # as if trained
    tuned = adapted(input_ids=ids).logits
    assert not torch.allclose(tuned, base_logits, atol=1e-3)
    with adapters_off(adapted):
        assert torch.equal(adapted(input_ids=ids).logits, base_logits)
    out = merged(adapted)
    assert not has_adapters(out) and not any("lora" in k for k in out.state_dict())
    assert torch.allclose(out(input_ids=ids).logits, tuned, atol=1e-4)
    assert family != "llama" or supports(out)


def test_adapters_are_seeded_and_a_reward_head_trains_fully():
    from rlhf.errors import StageError
    from rlhf.lora import add_adapters, parameter_counts

    a = add_adapters(tiny_model("llama", seq_cls=True), settings("reward"), seed=3, train_head=True)
    b = add_adapters(tiny_model("llama", seq_cls=True), settings("reward"), seed=3, train_head=True)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    head = a.score.weight.numel()
    assert parameter_counts(a)["trainable"] == adapter_size(tiny_model("llama"), 4) + head
    assert a.score.weight.requires_grad
    with pytest.raises(StageError, match="'sft.lora_targets': 'c_attn' is not a module of this LlamaForCausalLM"):
        add_adapters(tiny_model("llama"), settings(targets=("c_attn",)), seed=0)
    q_only = add_adapters(tiny_model("llama"), settings(targets=("q_proj",)), seed=0)
    assert parameter_counts(q_only)["trainable"] == 2 * 4 * (32 + 32)  # two layers, r·(in + out)


def test_lora_params_are_checked():
    from rlhf.errors import StageError

    for stage in ("sft", "reward", "ppo"):
        assert tiny_params(stage).lora_r == 0  # off by default: full fine-tuning, outputs as before
        with pytest.raises(StageError, match=f"'{stage}.lora_r': must be >= 0"):
            tiny_params(stage, lora_r=-1).validate()
        with pytest.raises(StageError, match=f"'{stage}.lora_targets'"):
            tiny_params(stage, lora_targets=()).validate()


def loss_curve(plots: Path) -> list[float]:
    rows = (plots / "plots/metrics/train/loss.tsv").read_text().strip().splitlines()[1:]
    return [float(r.split("\t")[-1]) for r in rows]


def assert_plain_folder_that_differs(folder: Path, before: Path, auto) -> None:
    """`folder` loads with plain transformers, has `before`'s tensors by name (no adapter left) and new values."""
    from safetensors.torch import load_file

    auto.from_pretrained(str(folder))
    ours, theirs = load_file(str(folder / "model.safetensors")), load_file(str(before / "model.safetensors"))
    assert not any("lora" in k for k in ours)
    shared = [k for k in ours if k in theirs]
    assert shared and set(ours) - {"score.weight"} <= set(theirs)
    assert any(not torch.equal(ours[k], theirs[k]) for k in shared)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_sft_with_lora_trains_adapters_and_writes_a_merged_folder(family, tiny_run, tmp_path):
    from transformers import AutoModelForCausalLM

    from rlhf.models import load_tokenizer
    from stages import sft
    from tests.test_model_families import build_base

    base = tiny_run.base if family == "llama" else build_base(family, load_tokenizer(tiny_run.base), tmp_path / "gpt2")
    params = tiny_params("sft", **LORA, lr=0.02, epochs=3, eval_prompts=2, checkpoint_every=0)
    got = sft.run(params, base=base, data=tiny_run.prepared, world=tiny_run.world, out=tmp_path / "sft",
                  metrics=tmp_path / "sft.json", plots=tmp_path / "plots", checkpoints=None)
    counts = got["lora"]["parameters"]
    assert counts["trainable"] == adapter_size(AutoModelForCausalLM.from_pretrained(str(base)), 4)
    assert counts["trainable"] < counts["total"] / 5
    assert json.loads((tmp_path / "sft.json").read_text())["lora"] == got["lora"]
    assert_plain_folder_that_differs(tmp_path / "sft", base, AutoModelForCausalLM)
    # The loss falls: on the training demonstrations (the curve itself is noisy at batch size 8), per response token.
    from rlhf.io import DEMONSTRATION_SCHEMA, read_jsonl
    from rlhf.models import load_causal_lm, load_tokenizer

    tok = load_tokenizer(base)
    examples = sft.fitting_examples(tok, read_jsonl(tiny_run.prepared / "sft.jsonl", DEMONSTRATION_SCHEMA), 48)
    before, after = (sft.validation_loss(load_causal_lm(m).eval(), examples, tok.pad_token_id, torch.device("cpu"))
                     for m in (base, tmp_path / "sft"))
    assert after < before - 0.01, (before, after, loss_curve(tmp_path / "plots"))


def test_reward_with_lora_trains_adapters_and_the_head(tiny_rm, tmp_path):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from stages import reward

    got = reward.run(tiny_params("reward", **LORA, checkpoint_every=0), sft=tiny_rm.sft, data=tiny_rm.rankings,
                     demos=tiny_rm.prepared / "sft.jsonl", world=tiny_rm.world, out=tmp_path / "reward",
                     metrics=tmp_path / "reward.json", plots=tmp_path / "plots", checkpoints=None)
    counts = got["lora"]["parameters"]
    hidden = AutoModelForCausalLM.from_pretrained(str(tiny_rm.sft)).config.hidden_size
    assert counts["trainable"] == adapter_size(AutoModelForCausalLM.from_pretrained(str(tiny_rm.sft)), 4) + hidden
    assert_plain_folder_that_differs(tmp_path / "reward", tiny_rm.sft, AutoModelForSequenceClassification)
    model = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "reward"))
    assert model.config.reward_bias == got["bias"]["value"]
    # Five steps on the tiny world's labels measure plumbing, not learning (their held-out labels agree with gold
    # on about half the pairs); that LoRA training learns is test_reward_with_lora_learns_a_separable_preference.
    assert 0 <= got["heldout"]["accuracy_labels"] <= 1 and got["heldout"]["pairs"] > 0


def test_reward_with_lora_learns_a_separable_preference():
    """The reward stage's K-way loss through adapters and a trainable head (the frozen random body stays as it
    is) learns the toy preference of tests/test_learning.py: more GOOD tokens is better."""
    from rlhf.lora import LoraSettings, add_adapters, trainable_parameters
    from tests.test_learning import separable_preference_accuracy, toy_reward_model

    model = add_adapters(toy_reward_model(), LoraSettings(r=4, alpha=8.0, dropout=0.0, targets=("all-linear",),
                                                          section="reward"), seed=0, train_head=True)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen and len(trainable_parameters(model)) < len(list(model.parameters()))
    before, after = separable_preference_accuracy(model, lr=1e-2)
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    assert before < 0.75, before  # an untrained head is near chance
    assert after >= 0.9, (before, after)


def test_ppo_with_lora_uses_the_policy_without_adapters_as_reference(tiny_rm, tmp_path):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from stages import ppo

    params = tiny_params("ppo", **LORA, steps=3, lr=0.003, eval_prompts=2, heldout_corpus=4, checkpoint_every=0)
    got = ppo.run(params, sft=tiny_rm.sft, reward=tiny_rm.reward, data=tiny_rm.prepared, world=tiny_rm.world,
                  out=tmp_path / "policy", value_out=tmp_path / "value", metrics=tmp_path / "ppo.json",
                  plots=tmp_path / "plots", checkpoints=None)
    lm = AutoModelForCausalLM.from_pretrained(str(tiny_rm.sft))
    assert got["lora"]["policy"]["trainable"] == adapter_size(lm, 4)
    assert got["lora"]["value"]["trainable"] == adapter_size(lm, 4) + lm.config.hidden_size
    assert got["lora"]["reference"] == "policy with adapters off"
    # The reference is the SFT model: the first rollout's KL to it is 0 up to rounding, later ones are not.
    kl = [float(r.split("\t")[-1]) for r in
          (tmp_path / "plots/plots/metrics/objective/kl.tsv").read_text().strip().splitlines()[1:]]
    assert abs(kl[0]) < 1e-5 and max(abs(k) for k in kl[1:]) > 1e-4, kl
    assert got["corpus_logprob"]["sft"] != got["corpus_logprob"]["policy"]
    assert_plain_folder_that_differs(tmp_path / "policy", tiny_rm.sft, AutoModelForCausalLM)
    assert_plain_folder_that_differs(tmp_path / "value", tiny_rm.reward, AutoModelForSequenceClassification)


def test_sft_with_lora_resumes_after_sigkill_to_the_same_weights(tiny_run, tmp_path):
    from safetensors.torch import load_file

    from stages import sft

    params = yaml.safe_load(TINY.read_text())
    params["sft"].update(LORA, checkpoint_every=2, eval_prompts=2)
    params_path = tmp_path / "params.yaml"
    params_path.write_text(yaml.safe_dump(params))
    sft_params = tiny_params("sft", **LORA, checkpoint_every=2, eval_prompts=2)
    ref = tmp_path / "ref"
    sft.run(sft_params, base=tiny_run.base, data=tiny_run.prepared, world=tiny_run.world, out=ref / "sft",
            metrics=ref / "sft.json", plots=ref / "plots", checkpoints=ref / "ckpt")

    paths = {"base": tiny_run.base, "data": tiny_run.prepared, "world": tiny_run.world, "out": tmp_path / "sft",
             "metrics": tmp_path / "sft.json", "plots": tmp_path / "plots", "checkpoints": tmp_path / "ckpt"}
    cmd = [sys.executable, "-m", "cli", "sft", "--params", str(params_path)]
    cmd += [x for k, v in paths.items() for x in (f"--{k}", str(v))]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    ckpt = paths["checkpoints"] / "checkpoint.pt"
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 300
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    assert proc.poll() is None, "the run ended before it could be killed:\n" + proc.stdout.read().decode()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert torch.load(ckpt, map_location="cpu", weights_only=True)["step"] > 0

    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "resuming from" in " ".join((done.stdout + done.stderr).split())
    ours, theirs = load_file(str(paths["out"] / "model.safetensors")), load_file(str(ref / "sft/model.safetensors"))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert without_timing(paths["metrics"]) == without_timing(ref / "sft.json")


def test_ppo_with_lora_resumes_after_sigkill_to_the_same_weights(tiny_rm, tmp_path):
    """PPO with adapters on policy and value model: killed after its first checkpoint, the rerun resumes
    (adapters, optimizers, sampling stream) and ends with the merged weights of a run never killed."""
    from safetensors.torch import load_file

    from stages import ppo
    from tests.conftest import kill_after_first_checkpoint

    changes = {**LORA, "steps": 4, "checkpoint_every": 1, "eval_prompts": 2, "heldout_corpus": 4}
    ref = tmp_path / "ref"
    ppo.run(tiny_params("ppo", **changes), sft=tiny_rm.sft, reward=tiny_rm.reward, data=tiny_rm.prepared,
            world=tiny_rm.world, out=ref / "policy", value_out=ref / "value", metrics=ref / "ppo.json",
            plots=ref / "plots", checkpoints=ref / "ckpt")
    params = yaml.safe_load(TINY.read_text())
    params["ppo"].update(changes)
    params_path = tmp_path / "params.yaml"
    params_path.write_text(yaml.safe_dump(params))
    run = tmp_path / "run"
    args = ["ppo", "--params", str(params_path), "--sft", str(tiny_rm.sft), "--reward", str(tiny_rm.reward),
            "--data", str(tiny_rm.prepared), "--world", str(tiny_rm.world), "--out", str(run / "policy"),
            "--value-out", str(run / "value"), "--metrics", str(run / "ppo.json"), "--plots", str(run / "plots"),
            "--checkpoints", str(run / "ckpt")]
    step = kill_after_first_checkpoint(args, run / "ckpt" / "checkpoint.pt", tmp_path / "killed.log")
    assert 0 < step < changes["steps"] and not (run / "ppo.json").exists()

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run([sys.executable, "-m", "cli", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"resumed from step {step}" in " ".join(done.stdout.split())
    for folder in ("policy", "value"):
        ours, theirs = load_file(str(run / folder / "model.safetensors")), load_file(str(ref / folder / "model.safetensors"))
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours), folder
    assert without_timing(run / "ppo.json") == without_timing(ref / "ppo.json")


def test_sft_with_lora_under_two_processes_matches_one(tiny_run, tmp_path):
    """LoRA and data parallel together: each rank trains the adapters on its half of every batch and only the
    adapters' gradients are averaged; the merged model lands where one process's does."""
    from safetensors.torch import load_file

    from stages import sft
    from tests.test_multiprocess import launcher, run_cli

    changes = {**LORA, "eval_prompts": 2}
    one = tmp_path / "one"
    m1 = sft.run(tiny_params("sft", **changes), base=tiny_run.base, data=tiny_run.prepared, world=tmp_path / "none.json",
                 out=one / "sft", metrics=one / "sft.json", plots=one / "plots", checkpoints=one / "ckpt")
    params = yaml.safe_load(TINY.read_text())
    params["sft"].update(changes)
    params_path = tmp_path / "params.yaml"
    params_path.write_text(yaml.safe_dump(params))
    two = tmp_path / "two"
    run_cli([*launcher(2), "sft", "--params", str(params_path), "--base", str(tiny_run.base), "--data",
             str(tiny_run.prepared), "--world", str(tmp_path / "none.json"), "--out", str(two / "sft"),
             "--metrics", str(two / "sft.json"), "--plots", str(two / "plots"), "--checkpoints", str(two / "ckpt")])
    m2 = json.loads((two / "sft.json").read_text())
    assert m2["processes"] == 2 and m2["lora"] == m1["lora"] and m2["steps"] == m1["steps"]
    assert abs(m1["train_loss"] - m2["train_loss"]) < 0.02 * m1["train_loss"]
    w1, w2 = load_file(one / "sft/model.safetensors"), load_file(two / "sft/model.safetensors")
    base = load_file(tiny_run.base / "model.safetensors")
    moved = [k for k in w1 if not torch.equal(w1[k], base[k])]
    assert moved  # the merged adapters changed the linear layers
    for k in moved:  # the two runs agree far more closely than either moved away from the base model
        assert (w1[k] - w2[k]).norm() <= 0.2 * (w1[k] - base[k]).norm() + 1e-6, k
