"""Multi-turn prompts: conversations read as `messages` or HH transcripts are rendered with the tokenizer's
chat template, every turn in order, in every stage that tokenizes prompts (docs/formats.md, "Conversations")."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from rlhf.errors import StageError
from rlhf.text import conversation, transcript

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CONV = "System: Be brief.\n\nHuman: Hi there.\n\nAssistant: Hello! How can I help?\n\nHuman: Name a fruit."


def test_conversation_round_trips_the_transcript_and_leaves_plain_prompts_alone():
    msgs = conversation(CONV)
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user"]
    assert transcript([(m["role"], m["content"]) for m in msgs]) == CONV
    assert conversation("Name a fruit.") == [{"role": "user", "content": "Name a fruit."}]
    # Text that merely mentions a speaker is no transcript.
    assert len(conversation("Human: rights are a topic.")) == 1
    assert len(conversation("Summarize:\n\nHuman: hi\n\nAssistant: hello")) == 1


def test_chat_prompt_renders_every_turn_in_order_with_each_template():
    from rlhf.tokenization import chat_prompt, train_tokenizer

    tok = train_tokenizer(["hello there"] * 10, 300)
    assert chat_prompt(tok, CONV) == ("<|bos|><|user|>Be brief.<|user|>Hi there.<|assistant|>Hello! How can I help?"
                                      "<|eos|><|user|>Name a fruit.<|assistant|>")
    tok.chat_template = CHATML  # a foreign template gets the same turns in its own markers
    assert chat_prompt(tok, CONV) == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi there.<|im_end|>\n"
                                      "<|im_start|>assistant\nHello! How can I help?<|im_end|>\n"
                                      "<|im_start|>user\nName a fruit.<|im_end|>\n<|im_start|>assistant\n")
    tok.chat_template = "{{ raise_exception('System role not supported') if messages[0]['role'] == 'system' }}x"
    with pytest.raises(StageError, match="roles system, user, assistant, user.*System role not supported"):
        chat_prompt(tok, CONV)


def test_a_long_conversation_is_cut_on_the_left_keeping_its_end():
    from rlhf.lengths import fit_queries
    from rlhf.tokenization import encode_prompt, train_tokenizer

    tok = train_tokenizer(["hello there"] * 10, 300)
    turns = [("user", f"question {i} " * 5) if i % 2 == 0 else ("assistant", f"answer {i} " * 5) for i in range(9)]
    ids = encode_prompt(tok, transcript(turns))

    class Config:
        max_position_embeddings = 64

    (cut,) = fit_queries(type("M", (), {"config": Config()})(), [ids], max_new_tokens=16)
    assert len(ids) > 48 and len(cut) == 48 and cut[0] == tok.bos_token_id
    text = tok.decode(cut[1:])
    assert text.endswith("question 8<|assistant|>") and "question 0" not in text  # the end kept, the start cut


def _write(path: Path, records) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_prepare_reads_prompts_and_demonstrations_given_as_messages(tmp_path):
    from stages.prepare import Params, run

    msgs = [{"role": "user", "content": "Hi there."}, {"role": "assistant", "content": "Hello!"}]
    prompts = [{"id": f"p{i}", "messages": msgs + [{"role": "user", "content": f"Question {i}?"}]} for i in range(60)]
    demos = [{"messages": msgs + [{"role": "user", "content": f"Demo {i}?"}, {"role": "assistant", "content": f"A {i}."}]}
             for i in range(20)]
    raw = tmp_path / "raw"
    _write(raw / "prompts.jsonl", prompts), _write(raw / "demonstrations.jsonl", demos)
    _write(raw / "corpus.jsonl", [{"text": "Some text."}])
    run(Params(0, 0.2, 0.4, 0.1), raw=raw, out=tmp_path / "out", metrics=tmp_path / "m.json")
    out = [json.loads(x) for f in ("sft", "sft_val") for x in (tmp_path / "out" / f"{f}.jsonl").read_text().splitlines()]
    assert len(out) == 20 and "messages" not in out[0]
    d = next(r for r in out if r["response"] == "A 3.")
    assert d["prompt"] == "Human: Hi there.\n\nAssistant: Hello!\n\nHuman: Demo 3?"
    test = [json.loads(x) for x in (tmp_path / "out/test.jsonl").read_text().splitlines()]
    assert conversation(test[0]["prompt"])[-1]["content"].startswith("Question ")

    _write(raw / "prompts.jsonl", prompts[:5] + [{"id": "bad", "messages": msgs}])  # ends with the assistant
    with pytest.raises(StageError, match=r"prompts.jsonl:6: 'messages' must end with the user turn"):
        run(Params(0, 0.2, 0.4, 0.1), raw=raw, out=tmp_path / "out2", metrics=tmp_path / "m2.json")


# ----------------------------------------------------------------------------------------------
# End to end: ingest -> prepare -> pretrain -> sft -> reward -> ppo on three-question conversations


def hh_record(i: int) -> dict[str, str]:
    head = (f"\n\nHuman: opener{i} alpha?\n\nAssistant: reply{i} beta.\n\nHuman: middle{i} gamma?"
            f"\n\nAssistant: again{i} delta.\n\nHuman: final{i} epsilon?\n\nAssistant:")
    return {"chosen": f"{head} good{i} answer.", "rejected": f"{head} bad{i} answer."}


def expected_render(i: int) -> str:
    return (f"<|bos|><|user|>opener{i} alpha?<|assistant|>reply{i} beta.<|eos|><|user|>middle{i} gamma?"
            f"<|assistant|>again{i} delta.<|eos|><|user|>final{i} epsilon?<|assistant|>")


def test_multi_turn_conversations_through_ingest_sft_reward_and_ppo(tmp_path, monkeypatch):
    import re

    import rlhf.tokenization as modeling
    from rlhf.params import load_section
    from stages import ingest, ppo, prepare, pretrain, reward, sft
    from tests.conftest import ROOT

    hh = ROOT / "examples/hh/params.yaml"

    def params(stage, **kw):
        module = {"ingest": ingest, "prepare": prepare, "pretrain": pretrain, "sft": sft, "reward": reward, "ppo": ppo}[stage]
        return dataclasses.replace(load_section(hh, stage, module.Params), **kw)

    rendered: dict[str, list[tuple[str, str]]] = {}
    stage = ["none"]
    original = modeling.chat_prompt

    def spy(tokenizer, prompt):
        text = original(tokenizer, prompt)
        rendered.setdefault(stage[0], []).append((prompt, text))
        return text

    monkeypatch.setattr(modeling, "chat_prompt", spy)
    source = _write(tmp_path / "hh.jsonl", [hh_record(i) for i in range(80)])
    raw, prep, models, m = tmp_path / "raw", tmp_path / "prepared", tmp_path / "models", tmp_path / "metrics"
    ingest.run(params("ingest"), source=str(source), out=raw, metrics=m / "ingest.json")
    corpus = (raw / "corpus.jsonl").read_text()
    assert "<|user|>opener" in corpus and "\\n\\nHuman:" not in corpus  # the corpus is in the template's form
    prepare.run(params("prepare"), raw=raw, out=prep, metrics=m / "prepare.json")
    pretrain.run(params("pretrain"), corpus=prep / "corpus.jsonl", out=models / "base", metrics=m / "pretrain.json",
                 plots=tmp_path / "plots/pretrain", checkpoints=None)
    stage[0] = "sft"
    sft.run(params("sft", epochs=1, eval_prompts=2), base=models / "base", data=prep, world=None, out=models / "sft",
            metrics=m / "sft.json", plots=tmp_path / "plots/sft", checkpoints=None)
    stage[0] = "reward"
    reward.run(params("reward"), sft=models / "sft", data=raw / "rankings.jsonl", demos=prep / "sft.jsonl", world=None,
               out=models / "reward", metrics=m / "reward.json", plots=tmp_path / "plots/reward", checkpoints=None)
    stage[0] = "ppo"
    ppo.run(params("ppo", steps=1, eval_prompts=2), sft=models / "sft", reward=models / "reward", data=prep, world=None,
            out=models / "policy", value_out=models / "value", metrics=m / "ppo.json", plots=tmp_path / "plots/ppo",
            checkpoints=None)

    for name in ("sft", "reward", "ppo"):
        assert rendered.get(name), f"{name} rendered no prompt"
        for prompt, text in rendered[name]:
            i = int(re.search(r"opener(\d+)", prompt).group(1))
            assert text == expected_render(i), (name, text)  # every turn, in order, in the template's markers
