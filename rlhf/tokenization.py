"""Tokenizers and the chat format: training one from scratch, preparing a loaded one, encoding and decoding.

One chat format for every stage: `CHAT_TEMPLATE` (user or system turns after USER, assistant turns after
ASSISTANT ending with EOS; a multi-turn conversation is these back to back).
Conventions (docs/ppo.md, item 7): PAD differs from EOS, and EOS is never treated as padding; batches
are left-padded (`padding_side = "left"`).
"""

from __future__ import annotations

from collections.abc import Sequence

from rlhf.errors import StageError
from rlhf.text import ASSISTANT, BOS, EOS, PAD, USER, conversation

SPECIAL_TOKENS = [BOS, EOS, PAD, USER, ASSISTANT]

# Turns in order: a user (or system) turn after USER, an assistant turn after ASSISTANT ending with EOS;
# a multi-turn conversation is these back to back. Jinja, as transformers expects.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' or message['role'] == 'system' %}" + USER + "{{ message['content'] }}"
    "{% elif message['role'] == 'assistant' %}" + ASSISTANT + "{{ message['content'] }}{{ eos_token }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}" + ASSISTANT + "{% endif %}"
)


def train_tokenizer(texts: Sequence[str], vocab_size: int):
    """Byte-level BPE trained from scratch, wrapped as a transformers fast tokenizer with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
        additional_special_tokens=[USER, ASSISTANT],
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.padding_side = "left"
    return fast


def prepare_tokenizer(tokenizer) -> bool:
    """Make a loaded tokenizer usable here: left padding, PAD != EOS, a chat template.

    Returns True when a token was added (the model's embeddings must then be resized).
    """
    added = False
    if tokenizer.eos_token is None:
        raise StageError("tokenizer has no EOS token; responses could never end. Pick a model with one")
    if tokenizer.pad_token is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        # docs/ppo.md item 7: padding that shares EOS's id would mask the real EOS.
        tokenizer.add_special_tokens({"pad_token": PAD})
        added = True
    if tokenizer.bos_token is None:
        tokenizer.add_special_tokens({"bos_token": BOS})
        added = True
    if not tokenizer.chat_template:
        tokenizer.chat_template = CHAT_TEMPLATE
        if USER not in tokenizer.get_vocab():
            tokenizer.add_special_tokens({"additional_special_tokens": [USER, ASSISTANT]})
            added = True
    tokenizer.padding_side = "left"
    return added


def chat_prompt(tokenizer, prompt: str) -> str:
    """The text a model sees before its response: the tokenizer's chat template with the generation prompt.
    A conversation prompt ("Human: …\n\nAssistant: …\n\nHuman: …", rlhf.text.conversation) renders as its
    turns, in order, each in the template's own markers; any other prompt is one user turn."""
    from jinja2 import TemplateError

    messages = conversation(prompt)
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except TemplateError as exc:  # a template that refuses a system turn, or turns that do not alternate
        roles = ", ".join(m["role"] for m in messages)
        raise StageError(f"the tokenizer's chat template cannot render a conversation of roles {roles} "
                         f"({str(exc).splitlines()[0]}); edit the prompt or the tokenizer's chat_template") from None


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    return tokenizer(chat_prompt(tokenizer, prompt), add_special_tokens=False)["input_ids"]


def encode_response(tokenizer, response: str, *, add_eos: bool = True) -> list[int]:
    ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    return ids + [tokenizer.eos_token_id] if add_eos else ids


def decode_response(tokenizer, ids: Sequence[int]) -> tuple[str, bool]:
    """Text of a response cut at its first EOS (docs/ppo.md item 10), and whether an EOS was found."""
    ids = list(ids)
    ended = tokenizer.eos_token_id in ids
    if ended:
        ids = ids[: ids.index(tokenizer.eos_token_id)]
    ids = [i for i in ids if i != tokenizer.pad_token_id]
    return tokenizer.decode(ids, skip_special_tokens=True).strip(), ended


def same_tokenizer(a, b) -> bool:
    return a.get_vocab() == b.get_vocab() and a.eos_token_id == b.eos_token_id and a.pad_token_id == b.pad_token_id
