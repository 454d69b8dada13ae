"""Model families end to end: GPT-2, Llama, Qwen2 and GPT-NeoX as the base of every stage, with prompts
longer than the model's position limit.

Each family is a tiny random model built from its config (no download), with the tiny run's tokenizer
and a 48-position limit, saved as a local folder as `pretrain.base_model` would take it. On data with
prompts longer than 48 tokens and one demonstration whose response alone does not fit, sft, sample,
rank, reward, dpo, ppo (policy and value model), bestofn and evaluate (with its benchmarks) run without
an exception; their outputs load with plain transformers, and each stage's metrics count the prompts it
cut and the records it dropped (docs/models.md).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.conftest import tiny_params

LIMIT = 48
LONG_PROMPT = "Earlier we talked about " + " and ".join(["the zib", "the mek", "Napu", "the red food"] * 8) + ". 3 + 4 = ?"
LONG_RESPONSE = " ".join(["The zib is red and the mek is blue."] * 10)


def family_config(family: str, tok):
    """A tiny config of `family` with LIMIT positions and the tokenizer's special ids."""
    from transformers import GPT2Config, GPTNeoXConfig, LlamaConfig, Qwen2Config

    ids = {"vocab_size": len(tok), "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
           "pad_token_id": tok.pad_token_id}
    if family == "gpt2":
        return GPT2Config(n_positions=LIMIT, n_embd=32, n_layer=2, n_head=2, **ids)
    if family == "gpt_neox":
        return GPTNeoXConfig(max_position_embeddings=LIMIT, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                             intermediate_size=64, rotary_pct=0.5, **ids)
    common = {"max_position_embeddings": LIMIT, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
              "intermediate_size": 64, **ids}
    if family == "qwen2":
        return Qwen2Config(num_key_value_heads=1, **common)  # grouped-query attention
    return LlamaConfig(num_key_value_heads=2, **common)


def build_base(family: str, tok, out: Path) -> Path:
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(family_config(family, tok))
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def add_long_records(src: Path, dst: Path) -> Path:
    """The tiny run's prepared data with long prompts first (sampled and evaluated first) and, in sft.jsonl,
    one demonstration whose response alone is longer than LIMIT."""
    shutil.copytree(src, dst)
    longs = [{"id": f"long{i}", "prompt": f"{LONG_PROMPT} ({i})"} for i in range(2)]
    extra = {"rm.jsonl": longs, "ppo.jsonl": longs, "test.jsonl": longs,
             "sft.jsonl": [{"prompt": r["prompt"], "response": "7."} for r in longs]
             + [{"prompt": "3 + 4 = ?", "response": LONG_RESPONSE}]}
    for name, rows in extra.items():
        old = (dst / name).read_text()
        (dst / name).write_text("".join(json.dumps(r) + "\n" for r in rows) + old)
    return dst


def assert_counts(metrics: dict, dropped: bool = False) -> None:
    """The stage cut some prompts to fit LIMIT, and dropped records only where one cannot fit."""
    lengths = metrics["lengths"]
    assert lengths["position_limit"] <= LIMIT and lengths["prompts_truncated"] > 0, lengths
    assert (lengths["records_dropped"] > 0) == dropped, lengths


@pytest.mark.parametrize("family", ["llama", "gpt2", "qwen2", "gpt_neox"])
def test_family_runs_every_stage_with_prompts_past_its_limit(family, tiny_run, tmp_path, capsys):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    from rlhf.lengths import position_limit
    from rlhf.models import load_tokenizer
    from stages import bestofn, dpo, evaluate, ppo, rank, reward, sample, sft

    root, raw = tmp_path, tiny_run.raw
    base = build_base(family, load_tokenizer(tiny_run.base), root / "hub" / family)
    assert position_limit(base) == LIMIT
    data = add_long_records(tiny_run.prepared, root / "prepared")
    m, models = root / "metrics", root / "models"

    got = sft.run(tiny_params("sft", epochs=1, eval_prompts=4, checkpoint_every=0), base=base, data=data,
                  world=tiny_run.world, out=models / "sft", metrics=m / "sft.json", plots=root / "plots/sft",
                  checkpoints=None)
    assert_counts(got, dropped=True)
    assert got["response_tokens_p95"] > 0
    assert "dropped to fit the model's" in capsys.readouterr().err

    got = sample.run(tiny_params("sample", prompts=8), model=models / "sft", prompts=data / "rm.jsonl",
                     out=root / "candidates.jsonl", metrics=m / "sample.json")
    assert_counts(got)
    rank.run(tiny_params("rank"), candidates=root / "candidates.jsonl", world=tiny_run.world,
             labels=root / "labels.jsonl", out=root / "rankings.jsonl", metrics=m / "rank.json")
    got = reward.run(tiny_params("reward", checkpoint_every=0), sft=models / "sft", data=root / "rankings.jsonl",
                     demos=data / "sft.jsonl", world=tiny_run.world, out=models / "reward", metrics=m / "reward.json",
                     plots=root / "plots/reward", checkpoints=None)
    assert_counts(got)
    got = dpo.run(tiny_params("dpo", eval_prompts=4, checkpoint_every=0), sft=models / "sft",
                  data=root / "rankings.jsonl", test=data / "test.jsonl", world=tiny_run.world, out=models / "dpo",
                  metrics=m / "dpo.json", plots=root / "plots/dpo", checkpoints=None)
    assert_counts(got)
    got = ppo.run(tiny_params("ppo", steps=1, eval_prompts=4, heldout_corpus=4, checkpoint_every=0), sft=models / "sft",
                  reward=models / "reward", data=data, world=tiny_run.world, out=models / "policy",
                  value_out=models / "value", metrics=m / "ppo.json", plots=root / "plots/ppo", checkpoints=None)
    assert_counts(got)
    got = bestofn.run(tiny_params("bestofn", samples=4, prompts=4, ci_resamples=20), sft=models / "sft",
                      reward=models / "reward", test=data / "test.jsonl", world=tiny_run.world,
                      metrics=m / "bestofn.json", plots=root / "plots/bestofn")
    assert_counts(got)
    eval_dir = raw / "eval"
    params = tiny_params("evaluate", models={n: str(models / n) for n in ("sft", "policy", "dpo")},
                         pairs=[["policy", "sft"]], test_prompts=6, rtp_prompts=2, ci_resamples=20)
    got = evaluate.run(params, test=data / "test.jsonl", world=tiny_run.world, truthfulqa=eval_dir / "truthfulqa_mc.json",
                       crows_pairs=eval_dir / "crows_pairs.csv", rtp=eval_dir / "rtp.jsonl", plots=(),
                       reports=root / "reports", metrics=m / "evaluate.json")
    assert_counts(got)
    assert "skipped" not in got

    for name in ("sft", "policy", "dpo"):
        assert AutoConfig.from_pretrained(models / name).model_type == family
        AutoModelForCausalLM.from_pretrained(models / name)
    for name in ("reward", "value"):
        AutoModelForSequenceClassification.from_pretrained(models / name)
