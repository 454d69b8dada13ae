"""pretrain: the base language model — trained from scratch on the corpus, or taken from Hugging Face.

Reads  data/prepared/corpus.jsonl
Writes models/base (HF folder: config, safetensors, tokenizer with chat template, PAD != EOS),
       metrics/pretrain.json, plots/pretrain (dvclive curves)
Run    rlhf pretrain            (or set pretrain.base_model to a hub id or local folder, and
                                 pretrain.continue_on_corpus to train it further on the corpus)

From scratch: a byte-level BPE tokenizer and a small Llama-architecture decoder are trained on the
corpus packed into fixed-length blocks (`<|bos|> doc <|eos|>` back to back). A slice of blocks is held
out for validation loss. With `base_model` set, that model and tokenizer are loaded (safetensors only,
remote code only if `trust_remote_code`), given a PAD token distinct from EOS and a chat template, and
saved unchanged otherwise: the corpus is then not trained on (no continued pretraining), which the stage
says in one line. With `continue_on_corpus` too, that model is trained further on the corpus the way a
model from scratch is (same blocks, steps, schedule, validation and checkpoints), its tokenizer kept: a
base model that never saw the chat template or the user's domain sees them before SFT. Any causal LM
family works (docs/models.md lists the tested ones).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rlhf.io import CORPUS_SCHEMA, read_jsonl, remove_outputs, timing, write_metrics
from rlhf.params import require, to_dict


@dataclass(frozen=True)
class Params:
    base_model: str
    """Hugging Face id or local folder to use as the base model; empty trains a model from scratch. Set, the
    model's own position limit applies to every later stage (docs/models.md), and the corpus is trained on
    only with continue_on_corpus."""
    continue_on_corpus: bool
    """With base_model set: continue pretraining it on the corpus (its tokenizer kept; seq_len, batch_size,
    lr, warmup_steps, max_steps, … apply; seq_len is capped at its position limit). False takes it as it is."""
    trust_remote_code: bool
    """Allow a hub model's own Python code to run; off unless you trust its author."""
    vocab_size: int
    """BPE vocabulary size (tiny: the world has a small vocabulary)."""
    hidden: int
    """Model width."""
    layers: int
    """Transformer blocks."""
    heads: int
    """Attention heads (hidden must divide by heads)."""
    intermediate: int
    """MLP width (Llama's SwiGLU)."""
    seq_len: int
    """Tokens per training block; also the model's max position embeddings."""
    batch_size: int
    """Blocks per optimizer step."""
    lr: float
    """Peak AdamW learning rate; cosine decay to lr/10 (nanoGPT)."""
    warmup_steps: int
    """Linear warm-up steps."""
    max_steps: int
    """Optimizer steps: on 2 CPU cores steps matter more than parameters (measured on a prototype of this world)."""
    weight_decay: float
    """AdamW weight decay."""
    val_fraction: float
    """Share of blocks held out for validation loss."""
    eval_every: int
    """Steps between validation-loss measurements."""
    checkpoint_every: int
    """Steps between resumable checkpoints (0 disables)."""
    seed: int
    """Initialization and data-order seed."""
    threads: int
    """torch CPU threads (2 on this machine; more only slows it down). 0 leaves torch's default."""
    device: str
    """'auto' (CUDA when present), 'cpu' or 'cuda'."""
    fsdp: bool
    """Under a multi-process launch, shard parameters, gradients and optimizer state across the processes
    (FSDP2, rlhf/dist.py) instead of a whole copy on each; false: plain data parallel. No effect with one
    process. docs/models.md, "When a model outgrows one device"."""

    @property
    def trains(self) -> bool:
        """Whether the stage trains (from scratch, or a base model further on the corpus)."""
        return not self.base_model or self.continue_on_corpus

    def validate(self) -> None:
        if not self.trains:
            return
        for key in ("seq_len", "batch_size", "max_steps"):
            require(getattr(self, key) > 0, f"pretrain.{key}", "must be > 0")
        require(self.lr > 0, "pretrain.lr", "must be > 0")
        require(0 < self.val_fraction < 0.5, "pretrain.val_fraction", "must be in (0, 0.5)")
        if self.base_model:
            return  # the architecture and vocabulary are the base model's
        require(self.hidden % self.heads == 0, "pretrain.heads", f"hidden {self.hidden} must divide by heads")
        for key in ("vocab_size", "hidden", "layers", "heads", "intermediate"):
            require(getattr(self, key) > 0, f"pretrain.{key}", "must be > 0")
        require(self.vocab_size >= 300, "pretrain.vocab_size", "must be >= 300 (256 bytes + special tokens)")


def pack_blocks(tokenizer, texts: list[str], seq_len: int) -> torch.Tensor:
    """(N, seq_len) token blocks: documents as `<|bos|> text <|eos|>`, concatenated, cut into blocks."""
    ids: list[int] = []
    for enc in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        ids += [tokenizer.bos_token_id, *enc, tokenizer.eos_token_id]
    n = len(ids) // seq_len
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)


def tokenize_corpus(params: Params, texts: list[str], corpus: Path) -> tuple[Any, torch.Tensor, torch.Tensor]:
    """(tokenizer, training blocks, validation blocks): a BPE tokenizer trained on the corpus, the corpus
    packed into blocks, and a seeded permutation that holds out `val_fraction` of them."""
    from rlhf.tokenization import train_tokenizer

    tokenizer = train_tokenizer(texts, params.vocab_size)
    return (tokenizer, *split_blocks(params, pack_blocks(tokenizer, texts, params.seq_len), params.seq_len, corpus))


def split_blocks(params: Params, blocks: torch.Tensor, seq_len: int, corpus: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """(training, validation) blocks: a seeded permutation holds out `val_fraction` of them."""
    from rlhf.errors import StageError

    perm = torch.randperm(len(blocks), generator=torch.Generator().manual_seed(params.seed))
    n_val = max(1, int(len(blocks) * params.val_fraction))
    val, train = blocks[perm[:n_val]], blocks[perm[n_val:]]
    if len(train) < params.batch_size:
        raise StageError(f"{corpus}: only {len(train)} training blocks of {seq_len} tokens; add text or lower pretrain.batch_size")
    return train, val


def load_hf_base(params: Params):
    """(model, tokenizer) of `base_model`, the tokenizer given PAD != EOS, BOS and a chat template
    (`prepare_tokenizer`), the embeddings resized for any token that added."""
    from rlhf.errors import StageError
    from rlhf.models import load_causal_lm
    from rlhf.tokenization import prepare_tokenizer

    from transformers import AutoTokenizer

    local = Path(params.base_model).exists()
    try:
        tokenizer = AutoTokenizer.from_pretrained(params.base_model, trust_remote_code=params.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise StageError(
            f"pretrain.base_model '{params.base_model}': cannot load its tokenizer ({str(exc).splitlines()[0]}); "
            "give a local folder, or a hub id with network access"
        ) from None
    model = load_causal_lm(params.base_model, trust_remote_code=params.trust_remote_code, local_only=local)
    if prepare_tokenizer(tokenizer):
        model.resize_token_embeddings(len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def take_hf_model(params: Params, out: Path) -> dict[str, Any]:
    from rlhf.models import param_count, save_model

    model, tokenizer = load_hf_base(params)
    save_model(model, tokenizer, out)
    return {"source": params.base_model, "parameter_count": param_count(model), "trained_steps": 0}


def base_and_blocks(params: Params, texts: list[str], corpus: Path):
    """(model, tokenizer, training blocks, validation blocks, seq_len): a model from scratch on a tokenizer
    trained on the corpus, or `base_model` with its own tokenizer (`continue_on_corpus`), blocks no
    longer than its position limit."""
    from rlhf.lengths import position_limit
    from rlhf.models import build_llama

    if not params.base_model:
        tokenizer, train, val = tokenize_corpus(params, texts, corpus)
        model = build_llama(tokenizer, hidden=params.hidden, layers=params.layers, heads=params.heads,
                            intermediate=params.intermediate, max_len=params.seq_len, seed=params.seed)
        return model, tokenizer, train, val, params.seq_len
    torch.manual_seed(params.seed)  # the rows of any token prepare_tokenizer added start random
    model, tokenizer = load_hf_base(params)
    limit = position_limit(model)
    seq_len = min(params.seq_len, limit) if limit else params.seq_len
    train, val = split_blocks(params, pack_blocks(tokenizer, texts, seq_len), seq_len, corpus)
    return model, tokenizer, train, val, seq_len


def run(params: Params, *, corpus: Path, out: Path, metrics: Path, plots: Path, checkpoints: Path | None) -> dict[str, Any]:
    from rlhf.devices import autocast, make_optimizer
    from rlhf.models import param_count, save_model
    from rlhf.training import Checkpointer, cosine_lr, epoch_batches, file_digest, fingerprint, masked_lm_loss, open_live, train_loop

    t0 = time.time()
    if not params.trains:
        from rlhf.progress import console

        remove_outputs(out, metrics)
        result = take_hf_model(params, Path(out))
        console.print(f"[yellow]pretrain: took pretrain.base_model '{params.base_model}' as it is; the corpus "
                      f"{corpus} is not trained on (set pretrain.continue_on_corpus to continue pretraining it)",
                      soft_wrap=True)
        write_metrics(metrics, result, settings=["source"])  # pretrain.base_model is a setting, not a measurement
        return result

    from rlhf.dist import gather_model, shard_model, start_stage

    dist, device = start_stage(params)
    texts = [r["text"] for r in read_jsonl(corpus, CORPUS_SCHEMA)]
    if dist.is_main:
        # Like `dvc repro`, which deletes a stage's outs first: a killed or failed run leaves no stale
        # model or metrics from an earlier run that would look like this run's result.
        remove_outputs(out, metrics)

    # 1. Tokenizer, model (from a config, or the base model) and blocks; a seeded permutation holds out validation.
    model, tokenizer, train, val, seq_len = base_and_blocks(params, texts, corpus)
    n_params = param_count(model)
    model = shard_model(model.to(device), dist, device)  # under `fsdp: true` and several processes

    # 2. AdamW, cosine schedule.
    optimizer = make_optimizer(model.parameters(), params.lr, params.weight_decay, device)
    checkpointer = Checkpointer(checkpoints, fingerprint(to_dict(params), file_digest(corpus)))

    def loss_fn(step: int) -> torch.Tensor:
        ids = train[dist.shard(epoch_batches(len(train), params.batch_size, step, params.seed))].to(device)
        with autocast(device):
            logits = model(input_ids=ids, use_cache=False).logits
        return masked_lm_loss(logits, ids)

    @torch.no_grad()
    def evaluate() -> dict[str, float]:
        losses = []
        for i in range(0, len(val), 64):
            ids = val[i: i + 64].to(device)
            with autocast(device):
                losses.append(float(masked_lm_loss(model(input_ids=ids, use_cache=False).logits, ids)) * len(ids))
        return {"val_loss": sum(losses) / len(val)}

    live = open_live(plots, resume=checkpointer.load() is not None) if dist.is_main else None
    t_train = time.time()
    last = train_loop(
        model=model, optimizer=optimizer, loss_fn=loss_fn, total_steps=params.max_steps,
        lr_at=lambda s: cosine_lr(s, params.max_steps, lr=params.lr, warmup=params.warmup_steps),
        checkpointer=checkpointer, checkpoint_every=params.checkpoint_every, live=live,
        description="pretrain", evaluate=evaluate, eval_every=params.eval_every, dist=dist, device=device,
    )
    train_s = time.time() - t_train
    model = gather_model(model, dist, device)  # sharded: whole on rank 0 (None elsewhere)
    if dist.is_main:
        live.end()
        save_model(model, tokenizer, out)
    result = {
        **({"source": params.base_model, "continued_on_corpus": True} if params.base_model else {}),
        "parameter_count": n_params,
        "vocab_size": len(tokenizer),
        "train_blocks": len(train),
        "trained_steps": params.max_steps,
        "train_loss": round(last["train_loss"], 4),
        "val_loss": round(last["val_loss"], 4),
        "processes": dist.world_size,
    }
    start = last["resumed_from"]
    result["timing"] = timing(t0, train_s=train_s, done=(params.max_steps - start) * params.batch_size * seq_len,
                              unit="tokens", resumed_from=start)
    if dist.is_main:
        write_metrics(metrics, result, settings=["source"])  # written last: its presence marks a finished run
        checkpointer.clear()  # only now: a kill before this point still resumes
    return result


def summary(m: dict[str, Any]) -> str:
    if "source" in m and "timing" not in m:
        return f"took {m['source']} ({m['parameter_count']:,} parameters)"
    t = m["timing"]
    took = f"{m['source']} continued on the corpus: " if "source" in m else ""
    return (f"{took}{m['parameter_count']:,} parameters, {m['trained_steps']} steps, val loss {m['val_loss']}, "
            f"{t['tokens_per_s']:,.0f} tokens/s, {t['wall_s']} s")
