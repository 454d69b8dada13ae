"""SFT loss masking against a hand-built example; the tiny spine end to end."""

import json

import torch

from rlhf.training import IGNORE_INDEX, masked_lm_loss
from rlhf.training import build_example, collate
from tests.conftest import tiny_params


class ToyTokenizer:
    """Just enough of a tokenizer: the chat template and EOS, with hand-picked ids."""

    eos_token_id = 2
    pad_token_id = 0

    def apply_chat_template(self, messages, tokenize, add_generation_prompt):
        return "<P>" + messages[0]["content"] + "<A>"

    def __call__(self, text, add_special_tokens=False):
        vocab = {"<P>": 10, "<A>": 11, "hi": 20, "yo": 21, "ok": 30, "go": 31}
        tokens = text.replace("<P>", " <P> ").replace("<A>", " <A> ").split()
        return {"input_ids": [vocab[t] for t in tokens]}


def test_labels_mask_the_prompt_and_keep_response_and_eos():
    ids, labels = build_example(ToyTokenizer(), "hi yo", "ok go", max_len=32)
    assert ids == [10, 20, 21, 11, 30, 31, 2]
    assert labels == [IGNORE_INDEX] * 4 + [30, 31, 2]


def test_truncation_and_padding():
    # Too long: the prompt is cut on the left (its first token and its end kept), the response kept whole.
    ids, labels = build_example(ToyTokenizer(), "hi yo", "ok go", max_len=5)
    assert ids == [10, 11, 30, 31, 2] and labels == [IGNORE_INDEX] * 2 + [30, 31, 2]
    assert build_example(ToyTokenizer(), "hi yo", "ok go", max_len=3) is None  # no room left for the prompt
    batch_ids, mask, batch_labels = collate([(ids, labels), ([10, 11, 2], [IGNORE_INDEX, IGNORE_INDEX, 2])], pad_id=0)
    assert batch_ids.tolist()[1] == [10, 11, 2, 0, 0]
    assert mask.tolist()[1] == [1, 1, 1, 0, 0]
    assert batch_labels.tolist()[1] == [IGNORE_INDEX, IGNORE_INDEX, 2, IGNORE_INDEX, IGNORE_INDEX]


def test_masked_loss_counts_only_response_positions():
    torch.manual_seed(0)
    logits = torch.randn(1, 7, 40)
    labels = torch.tensor([[IGNORE_INDEX] * 4 + [30, 31, 2]])
    # Naive reference: position t predicts label t+1; only labelled targets count.
    terms = [-torch.log_softmax(logits[0, t], -1)[labels[0, t + 1]] for t in range(6) if labels[0, t + 1] != IGNORE_INDEX]
    assert torch.allclose(masked_lm_loss(logits, labels), torch.stack(terms).mean())


def test_tiny_spine_end_to_end(tiny_run):
    """world -> prepare -> pretrain -> sft on the tiny profile: loadable HF folders and metrics."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for folder in (tiny_run.base, tiny_run.sft):
        tok = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder)
        assert tok.pad_token_id != tok.eos_token_id
        assert tok.chat_template and "<|assistant|>" in tok.apply_chat_template(
            [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
        assert model.config.pad_token_id == tok.pad_token_id
        assert list(folder.glob("*.safetensors")) and not list(folder.glob("*.bin"))
    m = json.loads((tiny_run.metrics / "sft.json").read_text())
    assert m["steps"] > 0 and m["train_loss"] > 0
    assert m["test"]["prompts"] == min(tiny_params("sft").eval_prompts or 10**9,
                                       len((tiny_run.prepared / "test.jsonl").read_text().splitlines()))
    assert m["test"]["max_new_tokens"] == tiny_params("sft").eval_max_new_tokens
    for model in ("base", "sft"):
        assert set(m["test"][model]) == {"gold", "ended_with_eos"}
        assert set(m["test"][model]["gold"]) == {"helpful", "truthful", "harmless", "total", "by_family"}
    assert not (tiny_run.root / "ckpt/sft").exists()  # checkpoints removed on success
