"""Models and tokenizers: building, loading, saving, chat formatting, scoring and sampling.

Every stage goes through these helpers so the chat format, the padding rules and the safety rules
(safetensors only, `trust_remote_code` off unless params turn it on) live in one place.

Conventions (docs/ppo.md, items 6-8):
- PAD differs from EOS, and EOS is never treated as padding.
- Batches are left-padded; forward passes take `position_ids = cumsum(mask) - mask`, so a padded
  sequence gets the same logits as the same sequence unpadded.
- Lengths (docs/models.md): nothing reaches a model longer than its position limit (`position_limit`).
  Prompts are cut on the left (the end of the conversation is kept), responses are kept: generation
  gives a prompt `limit - max_new_tokens` tokens, a training example that cannot hold its whole response
  is dropped. Every cut and drop is counted in the stage's `LengthTally` (`length_tally`), which the
  stage reports as a metric and one warning line.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError

from rlhf.decode import LlamaDecoder
from rlhf.decode import supports as decode_supports
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


# ----------------------------------------------------------------------------------------------
# Devices and numerics


def pick_device(requested: str = "auto") -> torch.device:
    """'auto' takes CUDA when present, else CPU."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise StageError(f"device '{requested}' requested but CUDA is not available; set device: auto or cpu")
    return torch.device(requested)


def setup_torch(threads: int, device: torch.device) -> None:
    """Thread count for CPU runs (a third thread only slows a 2-core machine); on CUDA, TF32 and no cuDNN
    attention.

    SDPA's cuDNN backend, which torch prefers on Hopper for masked attention, builds an execution plan
    for each new (batch, width) shape, and padded widths change from batch to batch. On an H100, PPO on
    a 114M model had a 5.9 s step among ~0.8 s ones; without cuDNN (SDPA then takes its memory-efficient
    kernel) it ran 80.4 episodes/s instead of 47.5, with SFT throughput unchanged (bench/README.md).
    """
    if threads > 0:
        torch.set_num_threads(threads)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cuda.enable_cudnn_sdp(False)


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The dtype `autocast(device)` runs matmuls in: bf16 on CUDA, None (fp32, no autocast) elsewhere."""
    return torch.bfloat16 if device.type == "cuda" else None


def autocast(device: torch.device):
    """bf16 autocast on CUDA; a no-op context on CPU (fp32 there is faster and exact)."""
    dtype = autocast_dtype(device)
    if dtype is not None:
        return torch.autocast(device.type, dtype=dtype)
    return torch.autocast("cpu", enabled=False)


def make_optimizer(params, lr: float, weight_decay: float, device: torch.device, betas=(0.9, 0.95),
                   fused_on_cpu: bool = False, eps: float = 1e-8):
    """AdamW; torch's fused kernel on CUDA, and on CPU where the caller asks for it.

    On CPU the fused kernel is ~3x faster at our sizes (the per-tensor loop's small ops dominate) and
    equal up to float rounding (7e-9 after 20 steps). ppo asks for it. pretrain, sft and reward keep the
    loop: when the fused kernel's rounding went through pretraining, the default run's reward model fell
    from 70.6% to 59.0% held-out gold accuracy (docs/world.md), so it stays off there until the reward
    model is less fragile.
    """
    fused = device.type == "cuda" or (fused_on_cpu and device.type == "cpu")
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=betas, eps=eps, fused=fused)


# ----------------------------------------------------------------------------------------------
# Tokenizers


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


# ----------------------------------------------------------------------------------------------
# Lengths: the position limit, left truncation of prompts, and the counts a stage reports


POSITION_KEYS = ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length", "seq_length")


def position_limit(model) -> int | None:
    """The most tokens `model` (a model, a config or its dict, or a model folder) can take at once, or None when its
    config names no limit. GPT-2 calls it n_positions (and n_ctx), Llama, Qwen2 and GPT-NeoX
    max_position_embeddings; rotary models run past it, but on positions they never trained on."""
    if isinstance(model, (str, Path)):
        from transformers import AutoConfig

        try:
            model = AutoConfig.from_pretrained(str(model))
        except (OSError, ValueError) as exc:
            raise StageError(f"{model}: cannot read its config.json ({str(exc).splitlines()[0]})") from None
    cfg = getattr(model, "config", model)
    for key in POSITION_KEYS:
        value = cfg.get(key) if isinstance(cfg, dict) else getattr(cfg, key, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


class LengthTally:
    """What a stage cut to fit its models' position limits: prompts left-truncated, records dropped.

    The library's encoders report here (`note_lengths`) while the stage's tally is open (`length_tally`),
    so a stage gets its counts without passing a counter through every helper; `report` gives the metric
    and prints the one warning line.
    """

    def __init__(self) -> None:
        self.limit: int | None = None
        self.truncated = 0
        self.dropped = 0

    def note(self, limit: int | None, truncated: int = 0, dropped: int = 0) -> None:
        if limit is not None:
            self.limit = limit if self.limit is None else min(self.limit, limit)
        self.truncated += truncated
        self.dropped += dropped

    def metrics(self) -> dict[str, Any]:
        return {"position_limit": self.limit, "prompts_truncated": self.truncated, "records_dropped": self.dropped}

    def report(self, stage: str) -> dict[str, Any]:
        """The `lengths` metric; one warning line on stderr when anything was cut or dropped."""
        if self.truncated or self.dropped:
            from rlhf.progress import console

            console.print(f"[yellow]{stage}: {self.truncated} prompts cut on the left and {self.dropped} records "
                          f"dropped to fit the model's {self.limit} positions (docs/models.md)", soft_wrap=True)
        return self.metrics()


_TALLY: list[LengthTally] = [LengthTally()]  # the open tally; a fresh one per stage run


def length_tally() -> LengthTally:
    """Open a fresh tally for this stage run: the library's cuts and drops are counted in it from now on."""
    _TALLY[0] = LengthTally()
    return _TALLY[0]


def open_length_tally() -> LengthTally:
    """The tally `length_tally` last opened (a stage whose setup opened it reports it at the end)."""
    return _TALLY[0]


def note_lengths(limit: int | None, *, truncated: int = 0, dropped: int = 0) -> None:
    _TALLY[0].note(limit, truncated, dropped)


def warn_rarely_ended(stage: str, ended_share: float, max_new_tokens: int, key: str, below: float = 0.5) -> None:
    """One warning line when fewer than `below` of a stage's sampled responses ended with EOS: the cap
    `key` is likely below what the SFT model needs (sft's metrics: response_tokens_p95), or SFT never
    learned to stop. Responses cut by the cap are ranked and rewarded as they are."""
    if ended_share < below:
        from rlhf.progress import console

        console.print(f"[yellow]{stage}: only {ended_share:.0%} of responses ended with EOS within {key}="
                      f"{max_new_tokens} tokens; raise {key} (sft reports response_tokens_p95) or train SFT longer",
                      soft_wrap=True)


def fit_prompt(ids: Sequence[int], budget: int) -> list[int]:
    """`ids` cut on the left to `budget` tokens, keeping its first token (BOS in the chat format) and the
    end (the latest turns and the assistant marker the response follows)."""
    ids = list(ids)
    if len(ids) <= budget:
        return ids
    return ids[:1] + ids[len(ids) - budget + 1:] if budget >= 2 else ids[len(ids) - budget:]


def fit_example(prompt: Sequence[int], response: Sequence[int], limit: int | None) -> tuple[list[int], list[int]] | None:
    """(prompt, response) with the prompt cut on the left so the whole response fits `limit` (a cut counted in
    the open tally), or None when the response alone leaves no room for a prompt token (the caller drops
    the record and counts it, or cuts otherwise)."""
    prompt, response = list(prompt), list(response)
    if limit is None or len(prompt) + len(response) <= limit:
        return prompt, response
    if len(response) + 1 > limit:
        return None
    note_lengths(limit, truncated=1)
    return fit_prompt(prompt, limit - len(response)), response


def fit_pair(context: list[int], continuation: list[int], limit: int) -> tuple[list[int], list[int]]:
    """Context cut on the left so context + continuation fit `limit`, one context token kept at least (the
    continuation then loses its start)."""
    if len(context) + len(continuation) <= limit:
        return context, continuation
    keep = max(1, limit - len(continuation)) if context else 0
    return context[len(context) - keep:], continuation[len(continuation) - (limit - keep):]


def prompt_budget(model, max_new_tokens: int) -> int | None:
    """Tokens a prompt may take so that it and `max_new_tokens` fit the model's positions (None: no limit)."""
    limit = position_limit(model)
    if limit is None:
        return None
    if max_new_tokens >= limit:
        raise StageError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt in the model's {limit} "
                         f"positions; set it below {limit}")
    return limit - max_new_tokens


def fit_queries(model, queries: Sequence[Sequence[int]], max_new_tokens: int) -> list[list[int]]:
    """Prompts cut on the left so each plus `max_new_tokens` fits the model (counted in the open tally)."""
    budget = prompt_budget(model, max_new_tokens)
    if budget is None:
        return [list(q) for q in queries]
    cut = sum(len(q) > budget for q in queries)
    if cut:
        note_lengths(budget + max_new_tokens, truncated=cut)
    return [fit_prompt(q, budget) for q in queries]


# ----------------------------------------------------------------------------------------------
# Models


def check_model_dir(path: str | Path, what: str = "model") -> Path:
    """`path` if it is a Hugging Face model folder with safetensors weights; else a StageError naming
    the fix (for a pipeline folder, the command that writes it)."""
    path = Path(path)
    if not path.is_dir():
        # The pipeline's model folders (dvc.yaml outs) and the stage that writes each; a test checks dvc.yaml.
        written_by = {"base": "pretrain", "sft": "sft", "reward": "reward", "dpo": "dpo", "policy": "ppo", "value": "ppo",
                      "rloo": "rloo", "grpo": "grpo"}
        # The controls: `rlhf ppo --set KEY=0` with outputs of their own, run by their dvc.yaml stage.
        controls = {"sft_ptx": "sft_ptx", "policy_noptx": "ppo_noptx", "value_noptx": "ppo_noptx"}
        in_models = path.parent.name == "models"
        stage = written_by.get(path.name) if in_models else None
        if stage is not None:
            raise StageError(f"{path}: {what} folder not found; run `rlhf {stage}` (or `dvc repro {stage}`) first")
        if in_models and path.name in controls:
            raise StageError(f"{path}: {what} folder not found; run `dvc repro {controls[path.name]}` first")
        raise StageError(f"{path}: {what} folder not found; check the path, or run `dvc repro` to build the "
                         "pipeline's models")
    if not (path / "config.json").is_file():
        raise StageError(f"{path}: not a Hugging Face {what} folder (no config.json)")
    if not any(path.glob("*.safetensors")):
        raise StageError(
            f"{path}: no *.safetensors weights; only safetensors are loaded (re-save the model with "
            "save_pretrained(..., safe_serialization=True))"
        )
    return path


def _load_kwargs(trust_remote_code: bool) -> dict[str, Any]:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    # Safe loading: safetensors only, no remote code unless params say so.
    return {"use_safetensors": True, "trust_remote_code": trust_remote_code}


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def load_tokenizer(path: str | Path, *, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        if not Path(path).exists():  # else transformers reports a missing folder as a malformed hub id
            check_model_dir(path)  # raises, naming the command that writes the folder
        if Path(path).is_dir() and not any((Path(path) / f).is_file() for f in TOKENIZER_FILES):
            raise StageError(f"{path}: no tokenizer files ({', '.join(TOKENIZER_FILES[:2])}); "
                             "save the tokenizer into the model folder (tokenizer.save_pretrained)") from None
        raise StageError(f"{path}: cannot load a tokenizer ({str(exc).splitlines()[0]})") from None
    prepare_tokenizer(tok)
    return tok


def load_causal_lm(path: str | Path, *, trust_remote_code: bool = False, local_only: bool = True):
    from transformers import AutoModelForCausalLM

    if local_only:
        check_model_dir(path)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, **_load_kwargs(trust_remote_code))
    except (OSError, ValueError) as exc:
        raise StageError(f"{path}: cannot load a causal LM ({str(exc).splitlines()[0]})") from None
    except SafetensorError as exc:
        raise StageError(f"{path}: corrupt *.safetensors weights ({exc}); re-save or re-download the model") from None
    return model


def load_reward_model(path: str | Path, *, trust_remote_code: bool = False):
    from transformers import AutoModelForSequenceClassification

    check_model_dir(path, "reward model")
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            str(path), dtype=torch.float32, **_load_kwargs(trust_remote_code)
        )
    except (OSError, ValueError) as exc:
        raise StageError(f"{path}: cannot load a reward model ({str(exc).splitlines()[0]})") from None
    except SafetensorError as exc:
        raise StageError(f"{path}: corrupt *.safetensors weights ({exc}); re-save or re-download the model") from None
    if model.config.num_labels != 1:
        raise StageError(f"{path}: reward model must have num_labels=1, has {model.config.num_labels}")
    return model


def build_llama(tokenizer, *, hidden: int, layers: int, heads: int, intermediate: int, max_len: int, seed: int):
    """A Llama-architecture decoder built from a config (no downloaded weights)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=max_len,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
        attention_dropout=0.0,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model


def save_model(model, tokenizer, out: str | Path) -> None:
    """Write a standard HF folder (config, safetensors, tokenizer with chat template) atomically.

    A failed write (a full disk, a permission) leaves no folder under `out` and is one line naming
    the file: safetensors reports it as SafetensorError "(os error 28)", turned here into the OSError
    it is, named after the weights file, so `atomic_dir` reports it like any other write.
    """
    import os

    from transformers.utils import logging as hf_logging

    from rlhf.io import atomic_dir, write_errno

    hf_logging.disable_progress_bar()  # our own progress bars are enough; keep the log one line per stage

    # The weights, plus the tokenizer files (tokenizer.json takes ~60 bytes per vocabulary entry) and config.
    need = sum(t.numel() * t.element_size() for t in model.state_dict().values()) + 64 * len(tokenizer) + 100_000
    with atomic_dir(out, need=need) as tmp:
        try:
            model.save_pretrained(tmp, safe_serialization=True)
        except Exception as exc:
            code = write_errno(exc)
            if code is None or isinstance(exc, OSError):
                raise
            raise OSError(code, os.strerror(code), str(tmp / "model.safetensors")) from exc
        tokenizer.save_pretrained(tmp)


def same_tokenizer(a, b) -> bool:
    return a.get_vocab() == b.get_vocab() and a.eos_token_id == b.eos_token_id and a.pad_token_id == b.pad_token_id


def param_count(model) -> int:
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------------------------
# Batching and scoring


def pad_sequences(seqs: Sequence[Sequence[int]], pad_value: int, *,
                  side: str = "left") -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) ids and mask of `seqs`, padded with `pad_value` on the left (generation, scoring) or the
    right (teacher-forced losses); T is the longest sequence."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_value, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if len(s):
            cols = slice(width - len(s), width) if side == "left" else slice(0, len(s))
            ids[i, cols] = torch.tensor(list(s), dtype=torch.long)
            mask[i, cols] = 1
    return ids, mask


def left_pad(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) ids and mask, padded on the left."""
    return pad_sequences(seqs, pad_id, side="left")


def right_pad(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) ids and mask, padded on the right."""
    return pad_sequences(seqs, pad_id, side="right")


def position_ids(mask: torch.Tensor) -> torch.Tensor:
    """docs/ppo.md item 6: positions count real tokens only, so left padding does not shift them."""
    return (mask.cumsum(-1) - mask).clamp(min=0)


def forward_logits(model, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask), use_cache=False).logits


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log p(target) under logits / temperature; logits (B, T, V), targets (B, T) -> (B, T)."""
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    return logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)


@torch.no_grad()
def continuation_loglik(
    model, tokenizer, pairs: Sequence[tuple[Sequence[int], Sequence[int]]], *, batch_size: int,
    device: torch.device,
) -> list[float]:
    """Summed log-likelihood of each continuation given its context (lm-evaluation-harness style).

    The model reads every token but the last (whose next-token logits nothing needs), so a pair fits in
    limit + 1 tokens, as in lm-evaluation-harness; a longer one loses the start of its context (counted),
    and a continuation longer than that its first tokens.
    """
    limit = position_limit(model)
    out: list[float] = []
    for start in range(0, len(pairs), batch_size):
        chunk = [(list(c), list(x)) for c, x in pairs[start: start + batch_size]]
        if limit is not None:
            cut = sum(len(c) + len(x) > limit + 1 for c, x in chunk)
            if cut:
                note_lengths(limit, truncated=cut)
                chunk = [fit_pair(c, x, limit + 1) for c, x in chunk]
        ids, mask = left_pad([c + x for c, x in chunk], tokenizer.pad_token_id)
        ids, mask = ids.to(device), mask.to(device)
        with autocast(device):
            logits = forward_logits(model, ids[:, :-1], mask[:, :-1])  # left-padded: column -1 is each last token
        lp = token_logprobs(logits, ids[:, 1:])  # (B, T-1): log p(token t+1 | ..t)
        width = ids.shape[1]
        for i, (_, x) in enumerate(chunk):
            n = len(x)
            out.append(float(lp[i, width - 1 - n: width - 1].sum()) if n else 0.0)
    return out


# ----------------------------------------------------------------------------------------------
# Sampling with the KV cache


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of tokens whose probability reaches `top_p` (Holtzman et al. 2020); (B, V).

    A token is kept when the mass of the tokens ranked above it is < top_p, so the most likely token is
    always kept and the set is the smallest one with mass >= top_p.
    """
    if top_p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = torch.softmax(sorted_logits, dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # (B, V) probability of better-ranked tokens
    sorted_logits = sorted_logits.masked_fill(mass_before >= top_p, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)


def inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The index whose slice of [0, total) holds u·total, per row: probs (B, V), u (B, 1) in [0, 1) -> (B,).

    The cumulative sum is taken in float64. In float32 its spacing near 1 is 6e-8, so a token of
    probability below ~3e-8 that comes after most of the mass adds nothing to the running sum: its
    slice is empty and it is never drawn, however many such tokens a large vocabulary holds. float64
    resolves 1e-16. A token of probability 0 has an empty slice and is never returned, also when
    u·total rounds up to the total itself: the index is capped at the last token of positive probability.
    """
    cdf = probs.double().cumsum(dim=-1)
    total = cdf[:, -1:].contiguous()
    index = torch.searchsorted(cdf, u.double() * total, right=True)
    last_positive = torch.searchsorted(cdf, total, right=False)  # first index where the sum reaches the total
    return torch.minimum(index, last_positive).squeeze(-1)


def sample_categorical(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One index per row of `probs` (B, V), drawn with probability probs[b, i] (rows need not sum to 1).

    Inverse-CDF sampling (`inverse_cdf`): one float64 uniform draw per row, located in the row's float64
    cumulative sum. Exact like `torch.multinomial(probs, 1)`, whose CPU kernel draws an exponential variate
    for every vocabulary entry (B·V draws instead of B: ~15% of a rollout step on the default model).
    """
    u = torch.rand(probs.shape[0], 1, generator=generator, device=probs.device, dtype=torch.float64)
    return inverse_cdf(probs, u)


def sample_tokens(
    model,
    queries: Sequence[Sequence[int]],
    *,
    pad_id: int,
    eos_id: int,
    max_new_tokens: int,
    temperature: float,
    generator: torch.Generator | None,
    device: torch.device,
    top_p: float = 1.0,
) -> torch.Tensor:
    """Sample responses for a batch of queries with the KV cache; returns (B, max_new_tokens) ids.

    Temperature 0 means greedy. Rollouts use no top-k / top-p (docs/ppo.md item 8); `top_p` < 1 is for
    protocols that ask for nucleus sampling (RealToxicityPrompts: 0.9). Positions after
    a sequence's first EOS are filled with PAD. The loop stops early once every sequence has ended.
    A query too long for the model's positions with `max_new_tokens` is cut on the left (`fit_queries`).
    """
    ids, mask = left_pad(fit_queries(model, queries, max_new_tokens), pad_id)
    ids, mask = ids.to(device), mask.to(device)
    batch, width = ids.shape
    # The whole attention mask up front (queries' padding, then 1 for every new token), sliced each step.
    full_mask = torch.cat([mask, mask.new_ones((batch, max_new_tokens))], dim=1)
    out = torch.full((batch, max_new_tokens), pad_id, dtype=torch.long, device=device)
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    pos = position_ids(mask)
    past = None
    step_ids = ids
    # inference_mode rather than no_grad: a step is ~100 small ops on (B, 1) tokens, and leaving out
    # autograd's view and version tracking makes a rollout ~8% faster here (bench/README.md).
    with torch.inference_mode():
        # Llama models take the lean incremental forward of rlhf.decode (same logits, less overhead).
        decoder = (LlamaDecoder(model, full_mask, weight_dtype=autocast_dtype(device))
                   if decode_supports(model) else None)
        for t in range(max_new_tokens):
            with autocast(device):
                if decoder is not None:
                    logits = decoder.forward(step_ids, pos).float()
                else:
                    # logits_to_keep=1: only the last position's logits are needed to pick the next token.
                    res = model(input_ids=step_ids, attention_mask=full_mask[:, : width + t], position_ids=pos,
                                cache=past, use_cache=True, logits_to_keep=1)
                    past = res.cache
                    logits = res.logits[:, -1, :].float()
            if temperature > 0:
                if temperature != 1.0:  # x / 1 is x: the division would only copy
                    logits = logits / temperature
                nxt = sample_categorical(torch.softmax(top_p_filter(logits, top_p), dim=-1), generator)
            else:
                nxt = logits.argmax(-1)
            nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
            out[:, t] = nxt
            done |= nxt == eos_id
            if bool(done.all()):
                break
            step_ids = nxt.unsqueeze(-1)
            pos = pos[:, -1:] + 1
    # `out` was created before inference_mode, so it stays an ordinary tensor that autograd can index with.
    return out.cpu()


def generate_responses(
    model,
    tokenizer,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    temperature: float,
    batch_size: int,
    seed: int,
    device: torch.device,
    on_batch: Callable[[int], None] | None = None,
) -> list[dict[str, Any]]:
    """Responses (text cut at EOS, and whether it ended) for `prompts`, in order, reproducible from `seed`."""
    model.eval()
    gen = torch.Generator(device=device.type if device.type != "cuda" else device)
    gen.manual_seed(seed)
    results: list[dict[str, Any]] = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start: start + batch_size]
        queries = [encode_prompt(tokenizer, p) for p in chunk]
        toks = sample_tokens(
            model, queries, pad_id=tokenizer.pad_token_id, eos_id=tokenizer.eos_token_id,
            max_new_tokens=max_new_tokens, temperature=temperature, generator=gen, device=device,
        )
        for row in toks.tolist():
            text, ended = decode_response(tokenizer, row)
            results.append({"response": text, "ended": ended})
        if on_batch:
            on_batch(len(chunk))
    return results


def offline_hub() -> None:
    """Tests and CI never reach the Hub: a hub id would otherwise hang ~47 s before failing."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
