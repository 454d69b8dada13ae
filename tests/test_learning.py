"""Tests that fail when learning breaks, not only when plumbing does (tiny models, seconds each).

- The reward model, trained with the reward stage's own K-way loss (`stages.reward.batch_loss`) and
  scored with its own held-out path (`score_groups`, `heldout_metrics`), learns a separable toy
  preference: more "good" tokens is better. A sign error, a wrong last-token read or pairs pointing
  the wrong way leaves it at chance.
- SFT, with the sft stage's own examples (`build_example`, `collate`) and loss (`masked_lm_loss`),
  learns a toy task (answer "say a b" with "b a"): the response loss, measured independently of those
  helpers, falls on the training set and on held-out prompts. Labels shifted against their tokens
  leave it high.
"""

from __future__ import annotations

import math
import random

import torch

from rlhf.devices import make_optimizer
from rlhf.rm import ranking_pairs
from rlhf.training import masked_lm_loss

CPU = torch.device("cpu")


def _train(model, loss_fn, steps: int, lr: float) -> None:
    torch.manual_seed(0)
    optimizer = make_optimizer(model.parameters(), lr, 0.0, CPU)
    model.train()
    for step in range(steps):
        loss = loss_fn(step)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()


# ----------------------------------------------------------------------------------------------
# Reward model


GOOD, PAD, EOS = 5, 0, 1


def _preference_group(rng: random.Random, k: int = 4) -> tuple[dict, list[list[int]]]:
    """A prompt and K responses whose true order is their count of GOOD tokens (distinct counts)."""
    prompt = [2] + [rng.randint(6, 11) for _ in range(3)] + [3]
    counts = rng.sample(range(5), k)
    seqs = []
    for c in counts:
        body = [GOOD] * c + [rng.randint(6, 11) for _ in range(6 - c)]
        rng.shuffle(body)
        seqs.append(prompt + body + [EOS])
    ranking = sorted(range(k), key=lambda i: -counts[i])
    group = {"prompt": str(prompt), "responses": [str(s) for s in seqs], "pairs": ranking_pairs(ranking),
             "ranking": ranking}
    return group, seqs


def toy_reward_model():
    """A one-layer random Llama with a score head over the toy vocabulary (seeded)."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    config = LlamaConfig(vocab_size=12, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=16,
                         pad_token_id=PAD, num_labels=1)
    torch.manual_seed(0)
    return LlamaForSequenceClassification(config)


def separable_preference_accuracy(model, lr: float) -> tuple[float, float]:
    """Held-out accuracy on the toy preference before and after 60 steps of the reward stage's loss on it."""
    from rlhf.preferences import heldout_metrics
    from stages.reward import batch_loss, score_groups

    rng = random.Random(0)
    train = [_preference_group(rng) for _ in range(200)]
    val = [_preference_group(rng) for _ in range(50)]

    def heldout_accuracy() -> float:
        scores = score_groups(model, [seqs for _, seqs in val], PAD, CPU, batch_size=256)
        return heldout_metrics([g for g, _ in val], scores, None)["accuracy_labels"]

    def loss_fn(step: int) -> torch.Tensor:
        batch = random.Random(step).sample(train, 8)
        return batch_loss(model, [seqs for _, seqs in batch], [g for g, _ in batch], PAD, CPU)

    model.eval()
    before = heldout_accuracy()
    _train(model, loss_fn, steps=60, lr=lr)
    return before, heldout_accuracy()


def test_reward_model_learns_a_separable_preference():
    before, after = separable_preference_accuracy(toy_reward_model(), lr=3e-3)
    assert before < 0.75, before  # an untrained head is near chance
    assert after >= 0.95, (before, after)


# ----------------------------------------------------------------------------------------------
# Supervised fine-tuning


WORDS = [f"w{i}" for i in range(10)]


class WordTokenizer:
    """Whitespace words with fixed ids and the chat template `<P> prompt <A>`."""

    eos_token_id, pad_token_id = 1, 0
    vocab = {"<P>": 2, "<A>": 3, "say": 4, **{w: 5 + i for i, w in enumerate(WORDS)}}

    def apply_chat_template(self, messages, tokenize, add_generation_prompt):
        return "<P> " + messages[0]["content"] + " <A>"

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [self.vocab[t] for t in text.split()]}


def test_sft_lowers_response_loss_on_train_and_heldout_prompts():
    from transformers import LlamaConfig, LlamaForCausalLM

    from rlhf.training import build_example, collate

    tok = WordTokenizer()
    pairs = [(a, b) for a in WORDS for b in WORDS if a != b]
    random.Random(0).shuffle(pairs)
    rows = [(f"say {a} {b}", f"{b} {a}") for a, b in pairs]
    train = [build_example(tok, prompt, response, max_len=16) for prompt, response in rows[:70]]
    config = LlamaConfig(vocab_size=16, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=16,
                         pad_token_id=0, eos_token_id=1, bos_token_id=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)

    @torch.no_grad()
    def response_loss(rows) -> float:
        """Mean -log p(response token | everything before it), measured without the stage's helpers."""
        terms = []
        for prompt, response in rows:
            p = tok(tok.apply_chat_template([{"role": "user", "content": prompt}], False, True))["input_ids"]
            r = tok(response)["input_ids"] + [tok.eos_token_id]
            logp = torch.log_softmax(model(input_ids=torch.tensor([p + r])).logits[0].float(), -1)
            terms += [-float(logp[len(p) + t - 1, r[t]]) for t in range(len(r))]
        return sum(terms) / len(terms)

    def loss_fn(step: int) -> torch.Tensor:
        ids, mask, labels = collate(random.Random(step).sample(train, 16), tok.pad_token_id)
        return masked_lm_loss(model(input_ids=ids, attention_mask=mask, use_cache=False).logits, labels)

    model.eval()
    before = (response_loss(rows[:70]), response_loss(rows[70:]))
    _train(model, loss_fn, steps=60, lr=1e-2)
    after = (response_loss(rows[:70]), response_loss(rows[70:]))
    assert before[0] > 0.8 * math.log(config.vocab_size), before  # starts near uniform
    assert after[0] < 0.3 * before[0] and after[1] < 0.4 * before[1], (before, after)
