"""prepare: disjoint splits by normalized text, deduplication, leakage refusal, no partial outputs."""

import json

import pytest

from rlhf.errors import StageError
from rlhf.io import read_jsonl
from rlhf.text import normalize
from stages.prepare import Params, run

P = Params(seed=0, test_fraction=0.2, rm_fraction=0.4, sft_val_fraction=0.1)


def make_raw(root, prompts, demos, corpus):
    root.mkdir(parents=True, exist_ok=True)
    for name, records in (("prompts", prompts), ("demonstrations", demos), ("corpus", corpus)):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return root


def pool(n=200):
    return [{"id": f"p{i}", "prompt": f"Question number {i}?", "family": "f"} for i in range(n)]


def demos(n=40):
    return [{"prompt": f"Demo {i}?", "response": f"Answer {i}."} for i in range(n)]


CORPUS = [{"text": "Some text."}, {"text": "<|user|>Hello there?<|assistant|>Hi."}]


def test_splits_are_disjoint_and_cover_the_pool(tmp_path):
    raw = make_raw(tmp_path / "raw", pool() + [{"id": "dup", "prompt": "  QUESTION number 5? "}], demos(), CORPUS)
    m = run(P, raw=raw, out=tmp_path / "out", metrics=tmp_path / "m.json")
    texts = {}
    for name in ("rm", "ppo", "test", "sft", "sft_val"):
        texts[name] = {normalize(r["prompt"]) for r in read_jsonl(tmp_path / "out" / f"{name}.jsonl", allow_empty=True)}
    names = list(texts)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert not texts[a] & texts[b], (a, b)
    assert len(texts["rm"]) + len(texts["ppo"]) + len(texts["test"]) == 200  # the duplicate was dropped
    assert m["duplicates_dropped"]["prompts"] == 1
    assert len(texts["sft"]) + len(texts["sft_val"]) == 40
    assert 10 < m["split_sizes"]["test"] < 70  # ~20% of 200
    assert m["split_sizes"] == {name: len(texts[name]) for name in names}


def test_split_is_deterministic_and_seeded(tmp_path):
    raw = make_raw(tmp_path / "raw", pool(), demos(), CORPUS)
    run(P, raw=raw, out=tmp_path / "a", metrics=tmp_path / "a.json")
    run(P, raw=raw, out=tmp_path / "b", metrics=tmp_path / "b.json")
    run(Params(1, 0.2, 0.4, 0.1), raw=raw, out=tmp_path / "c", metrics=tmp_path / "c.json")
    assert (tmp_path / "a/test.jsonl").read_bytes() == (tmp_path / "b/test.jsonl").read_bytes()
    assert (tmp_path / "a/test.jsonl").read_bytes() != (tmp_path / "c/test.jsonl").read_bytes()


def test_pool_prompt_that_is_demonstrated_never_reaches_test(tmp_path):
    demo = [{"prompt": "question NUMBER 7?", "response": "x"}] + demos()
    raw = make_raw(tmp_path / "raw", pool(), demo, CORPUS)
    run(P, raw=raw, out=tmp_path / "out", metrics=tmp_path / "m.json")
    for name in ("rm", "ppo", "test"):
        assert "question number 7?" not in {normalize(r["prompt"]) for r in read_jsonl(tmp_path / f"out/{name}.jsonl", allow_empty=True)}


def test_refuses_when_a_test_prompt_is_a_corpus_chat_turn(tmp_path):
    from stages.prepare import assign_split

    leaked = next(p for p in pool() if assign_split(p["prompt"], P) == "test")
    corpus = CORPUS + [{"text": f"<|user|>{leaked['prompt'].upper()}<|assistant|>whatever"}]
    raw = make_raw(tmp_path / "raw", pool(), demos(), corpus)
    with pytest.raises(StageError, match=f"test prompt '{leaked['id']}'.*corpus.jsonl"):
        run(P, raw=raw, out=tmp_path / "out", metrics=tmp_path / "m.json")
    assert not (tmp_path / "out").exists() and not (tmp_path / "m.json").exists()


# A leaked test prompt inside the chat formats users' corpora come in; {q} is the prompt as written there.
FOREIGN = {
    "hh": "\n\nHuman: Hi.\n\nAssistant: Hello!\n\nHuman: {q}\n\nAssistant: Sure, here it is.",
    "chatml": "<|im_start|>system\nYou help.<|im_end|>\n<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\nOk.<|im_end|>",
    "llama2": "<s>[INST] <<SYS>>\nYou help.\n<</SYS>>\n\n{q} [/INST] Ok. </s>",
    "llama3": "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n{q}<|eot_id|>"
              "<|start_header_id|>assistant<|end_header_id|>\n\nOk.<|eot_id|>",
    "vicuna": "A chat.\nUSER: {q}\nASSISTANT: Ok.",
    "alpaca": "### Instruction:\n{q}\n\n### Response:\nOk.",
}


@pytest.mark.parametrize("fmt", sorted(FOREIGN))
def test_refuses_a_test_prompt_inside_a_foreign_chat_transcript(tmp_path, fmt):
    from stages.prepare import assign_split

    leaked = next(p for p in pool() if assign_split(p["prompt"], P) == "test")
    text = FOREIGN[fmt].format(q="  " + leaked["prompt"].upper().replace(" ", "\n "))  # case and spacing differ
    raw = make_raw(tmp_path / "raw", pool(), demos(), CORPUS + [{"text": text}])
    with pytest.raises(StageError, match=f"test prompt '{leaked['id']}'.*corpus.jsonl"):
        run(P, raw=raw, out=tmp_path / "out", metrics=tmp_path / "m.json")
    # The same transcript with another question is no leak, and neither is the prompt inside running prose.
    other = FOREIGN[fmt].format(q="What is the capital of nowhere?")
    prose = f"Someone once asked: {leaked['prompt']} and nobody knew."
    raw = make_raw(tmp_path / "raw2", pool(), demos(), CORPUS + [{"text": other}, {"text": prose}])
    run(P, raw=raw, out=tmp_path / "out", metrics=tmp_path / "m.json")


def test_refuses_a_multi_turn_test_prompt_found_in_the_corpus_in_another_format(tmp_path):
    """A conversation (ingest's "Human: …\n\nAssistant: …" prompt text) leaks when its turns occur, in order,
    in a ChatML document; the same turns in another order do not."""
    from stages.prepare import assign_split

    convs = [{"id": f"c{i}", "prompt": f"Human: Opening {i}?\n\nAssistant: Reply {i}.\n\nHuman: Follow-up {i}?"}
             for i in range(60)]
    leaked = next(c for c in convs if assign_split(c["prompt"], P) == "test")
    i = leaked["id"][1:]
    chatml = "".join(f"<|im_start|>{role}\n{text}<|im_end|>\n" for role, text in
                     (("user", f"Opening {i}?"), ("assistant", f"Reply {i}."), ("user", f"Follow-up {i}?"), ("assistant", "x")))
    raw = make_raw(tmp_path / "raw", pool() + convs, demos(), CORPUS + [{"text": chatml}])
    with pytest.raises(StageError, match=f"test prompt '{leaked['id']}'"):
        run(P, raw=raw, out=tmp_path / "out", metrics=tmp_path / "m.json")
    swapped = chatml.replace(f"Opening {i}?", "tmp").replace(f"Follow-up {i}?", f"Opening {i}?").replace("tmp", f"Follow-up {i}?")
    raw = make_raw(tmp_path / "raw2", pool() + convs, demos(), CORPUS + [{"text": swapped}])
    run(P, raw=raw, out=tmp_path / "out", metrics=tmp_path / "m.json")


def test_chat_turns_reads_each_format():
    from rlhf.text import chat_turns

    for fmt, template in FOREIGN.items():
        turns = chat_turns(template.format(q="What is 2+2?"))
        assert ("user", "what is 2+2?") in turns, fmt
        assert turns[-1] == ("assistant", "sure, here it is." if fmt == "hh" else "ok."), fmt
    assert chat_turns("A plain document. Human rights: a topic.") == []
    assert chat_turns("What is 2+2?", default="user") == [("user", "what is 2+2?")]


def test_refuses_when_a_test_prompt_is_in_user_rankings(tmp_path):
    from stages.prepare import assign_split

    leaked = next(p for p in pool() if assign_split(p["prompt"], P) == "test")
    raw = make_raw(tmp_path / "raw", pool(), demos(), CORPUS)
    ranking = {"prompt_id": "x", "prompt": leaked["prompt"], "responses": ["a", "b"], "ranking": [0, 1], "labeler": "me"}
    (raw / "rankings.jsonl").write_text(json.dumps(ranking) + "\n")
    with pytest.raises(StageError, match="rankings.jsonl"):
        run(P, raw=raw, out=tmp_path / "out", metrics=tmp_path / "m.json")


def test_duplicate_ids_and_bad_records_fail_without_outputs(tmp_path):
    raw = make_raw(tmp_path / "raw", pool() + [{"id": "p3", "prompt": "Different?"}], demos(), CORPUS)
    with pytest.raises(StageError, match=r"prompts.jsonl:201: duplicate id 'p3'"):
        run(P, raw=raw, out=tmp_path / "out", metrics=tmp_path / "m.json")
    raw = make_raw(tmp_path / "raw2", pool(), demos() + [{"prompt": "x"}], CORPUS)
    with pytest.raises(StageError, match=r"demonstrations.jsonl:41: missing field 'response'"):
        run(P, raw=raw, out=tmp_path / "out", metrics=tmp_path / "m.json")
    assert not (tmp_path / "out").exists()


def test_fractions_are_validated():
    from rlhf.params import from_dict

    with pytest.raises(StageError, match="prepare.rm_fraction"):
        from_dict(Params, {"seed": 0, "test_fraction": 0.5, "rm_fraction": 0.6, "sft_val_fraction": 0.1}, "prepare")
